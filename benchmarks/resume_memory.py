"""What resuming costs under `--fsdp`: each rank reading only the parts of a sharded checkpoint its own shards need,
straight into them (as shipped), against each rank reading the checkpoint whole and then keeping its shards (what
`--fsdp` did before, and what every other strategy does). `mode-edge train full-ft --fsdp` under torchrun, 2
processes x 1 thread: one run is interrupted after its checkpoint of step --checkpoint-every (each rank's shards);
copies of it are then resumed, the two ways in alternating rounds (machine noise hits both alike), each a fresh
torchrun with no checkpoint after it. The peak is each process's whole life as the kernel counts it (ru_maxrss of the
largest of torchrun's processes, torchrun itself included, which is far below a rank), so the resume counts; the
training loop's own peak per rank (model.json) stands beside it. Run with MALLOC_MMAP_THRESHOLD_=65536 so that freed
tensors leave RSS (see benchmarks/data_parallel.py).

Usage: MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/resume_memory.py --data DIR [--base smollm2]
       [--checkpoint-every 2] [--rounds 2]
Writes benchmarks/results/resume_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from checkpoint_memory import GATHERED  # noqa: E402
from common import machine, median, mode_edge_command, write  # noqa: E402

INTERRUPTED = (
    "import sys; import mode_edge.training.trainer as trainer; schedule = trainer.lr_factor\n"
    "def interrupted(step, cfg):\n"
    "    if step == STEP:\n"
    "        raise KeyboardInterrupt\n"
    "    return schedule(step, cfg)\n"
    "trainer.lr_factor = interrupted\n"
    "from mode_edge.cli import entry; sys.argv[0] = 'mode-edge'; entry()"
)
"""The command line, with every rank interrupted as it starts step STEP + 1 (the learning-rate schedule is asked
first thing in each step)."""

PEAK = (
    "import resource, subprocess, sys; proc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
    "stderr=subprocess.PIPE, text=True); sys.stderr.write(proc.stderr[-3000:] if proc.returncode else ''); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(proc.returncode)"
)
"""Runs a command line and prints the largest peak RSS (KiB) of the processes under it, in a process of its own (the
kernel's count of a process's children only grows)."""

VARIANTS = ("each rank its own shards", "each rank the whole checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared corpus (e.g. the code domain)")
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    steps = args.checkpoint_every + 2  # (the resumed runs train two steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["train", "full-ft", "--fsdp", "--base", args.base, "--data", str(args.data), "--steps", str(steps),
             "--batch-size", "4", "--seq-len", "256", "--warmup-steps", "1"]  # fmt: skip
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        interrupted = [sys.executable, "-c", INTERRUPTED.replace("STEP", str(args.checkpoint_every))]
        first = Path(tmp) / "first"
        every = ["--checkpoint-every", str(args.checkpoint_every)]
        proc = subprocess.run(mode_edge_command(*train, "--out", str(first), *every, processes=2, program=interrupted),
                              env=env, capture_output=True, text=True)  # fmt: skip
        partial = Path(tmp) / ".first.partial"
        if f"the checkpoint of step {args.checkpoint_every} of {steps} is kept" not in proc.stderr:
            raise SystemExit(f"the run to resume did not stop after its checkpoint:\n{proc.stderr[-3000:]}")
        for r in range(args.rounds):
            for k, variant in enumerate(VARIANTS):
                out = Path(tmp) / f"{r}-{k}"
                shutil.copytree(partial, out.with_name(f".{out.name}.partial"))
                program = None if k == 0 else [sys.executable, "-c", GATHERED]
                cmd = mode_edge_command(*train, "--out", str(out), "--checkpoint-every", "1000", processes=2,
                                        program=program)  # (no checkpoint after the resume)  # fmt: skip
                proc = subprocess.run([sys.executable, "-c", PEAK, *cmd], env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{variant}: the resumed run failed:\n{proc.stderr}")
                training = json.loads((out / "model.json").read_text())["training"]
                peak = int(proc.stdout.split()[-1]) / 1024
                loop = training["parallel"]["peak_rss_mb"]
                results[variant].append({"peak_rss_mb": round(peak, 1), "loop_peak_rss_mb": loop,
                                         "launches": training["launches"]})  # fmt: skip
                print(f"round {r + 1}: {variant}: peak RSS {peak:.0f} MB", file=sys.stderr)
    peaks = {v: median([x["peak_rss_mb"] for x in runs]) for v, runs in results.items()}
    loops = {v: [median([x["loop_peak_rss_mb"][i] for x in runs]) for i in range(2)] for v, runs in results.items()}
    rows = [f"| {v} | {peaks[v]:.0f} | {loops[v][0]:.0f} / {loops[v][1]:.0f} |" for v in VARIANTS]
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    allocator = f", glibc MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else ""
    markdown = (
        f"# Resuming under --fsdp (full fine-tuning of {args.base}, 2 processes x 1 thread, global batch 4 x 256, "
        f"from the checkpoint of step {args.checkpoint_every}, two steps after it, medians of {args.rounds} "
        f"rounds{allocator})\n\n"
        "| each rank reads | peak RSS MB, the largest process, resume included | training loop's peak MB rank 0 / 1 |\n"
        "|---|---|---|\n" + "\n".join(rows) + "\n"
    )  # fmt: skip
    write("resume_memory", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                            "malloc_mmap_threshold": threshold, "peak_rss_mb": peaks, "loop_peak_rss_mb": loops,
                            "runs": results}, markdown)  # fmt: skip


if __name__ == "__main__":
    main()
