"""Data-parallel scaling of expert training on CPU: `mode-edge train expert` in one process with one thread, under
`torchrun` with two processes of one thread each (gloo; the same global batch, so the same weights), and in one
process with two threads (what a single process makes of the same two cores). Rounds alternate the variants (machine
noise hits all alike); each run is a fresh process, and its throughput is the training loop's own (tokens / wall
seconds of the loop, model.json), which leaves out loading the backbone.

Usage: python benchmarks/data_parallel.py --data DIR [--base smollm2] [--steps 8] [--batch-size 4] [--seq-len 256]
       [--rounds 2]
Writes benchmarks/results/data_parallel.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, median, write  # noqa: E402

BIN = Path(sys.executable).parent
VARIANTS = {  # name: (processes, threads per process)
    "1 process x 1 thread": (1, 1),
    "2 processes x 1 thread (torchrun)": (2, 1),
    "1 process x 2 threads": (1, 2),
}


def run(variant: str, args: argparse.Namespace, out: Path) -> dict:
    processes, threads = VARIANTS[variant]
    train = ["train", "expert", "--base", args.base, "--domain", "code", "--data", str(args.data), "--out", str(out),
             "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
             "--warmup-steps", "1", "--checkpoint-every", "100000"]  # fmt: skip
    cmd = [str(BIN / "mode-edge"), *train]
    if processes > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={processes}", "--no-python", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / "model.json").read_text())["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared corpus (e.g. the code domain)")
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in VARIANTS:
                out = Path(tmp) / f"{r}-{variant.split()[0]}-{VARIANTS[variant][1]}"
                results[variant].append(run(variant, args, out))
                print(f"round {r + 1}: {variant}: {results[variant][-1]['tokens_per_s']} tok/s", file=sys.stderr)
    tps = {v: median([x["tokens_per_s"] for x in runs]) for v, runs in results.items()}
    base = tps["1 process x 1 thread"]
    rows = [f"| {v} | {tps[v]:.0f} | {tps[v] / base:.2f}x | {median([x['peak_rss_mb'] for x in results[v]]):.0f} |"
            for v in VARIANTS]  # fmt: skip
    markdown = (
        f"# Data-parallel expert training ({args.base}, global batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.steps} steps, medians of {args.rounds} rounds)\n\n"
        "| variant | tokens/s (training loop) | vs 1 x 1 | peak RSS MB (rank 0) |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n\nTarget: 2 processes x 1 thread >= 1.8x one process with one thread.\n"
    )  # fmt: skip
    write("data_parallel", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                            "tokens_per_s": tps, "runs": results}, markdown)  # fmt: skip


if __name__ == "__main__":
    main()
