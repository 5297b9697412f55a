"""What a checkpoint costs under `--fsdp`: every rank writing its own shards (torch.distributed.checkpoint, as
shipped) against the ranks gathering each tensor whole for rank 0 to write it (what data parallel does, and what
`--fsdp` did before). `mode-edge train full-ft --fsdp` under torchrun, 2 processes x 1 thread, a checkpoint every
--checkpoint-every steps; rounds alternate the two (machine noise hits both alike), each run a fresh process. Peak RSS
per rank is the training loop's own (model.json's training.parallel; checkpoints happen inside the loop), as is
tokens/s (checkpoint writes included). Run with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave RSS (see
benchmarks/data_parallel.py).

Usage: MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/checkpoint_memory.py --data DIR [--base smollm2] [--steps 4]
       [--checkpoint-every 2] [--rounds 2]
Writes benchmarks/results/checkpoint_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, median, mode_edge, write  # noqa: E402

GATHERED = (
    "import sys; from mode_edge.training.fsdp import FSDPPlan; FSDPPlan.writes_shards = False; "
    "from mode_edge.cli import entry; sys.argv[0] = 'mode-edge'; entry()"
)
"""The command line with --fsdp's checkpoints gathered on rank 0 (the data-parallel strategy's way of writing them)."""

VARIANTS = ("shards written by each rank", "gathered on rank 0")


def run(variant: str, args: argparse.Namespace, out: Path) -> dict:
    program = None if variant == VARIANTS[0] else [sys.executable, "-c", GATHERED]
    train = ["train", "full-ft", "--fsdp", "--base", args.base, "--data", str(args.data), "--out", str(out),
             "--steps", str(args.steps), "--batch-size", "4", "--seq-len", "256", "--warmup-steps", "1",
             "--checkpoint-every", str(args.checkpoint_every)]  # fmt: skip
    mode_edge(*train, processes=2, threads=1, program=program)
    return json.loads((out / "model.json").read_text())["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared corpus (e.g. the code domain)")
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.checkpoint_every >= args.steps:
        parser.error("--checkpoint-every must be below --steps: the last step writes the run, not a checkpoint")
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for k, variant in enumerate(VARIANTS):
                results[variant].append(run(variant, args, Path(tmp) / f"{r}-{k}"))
                peak = results[variant][-1]["parallel"]["peak_rss_mb"]
                print(f"round {r + 1}: {variant}: peak RSS {peak} MB", file=sys.stderr)
    peaks = {v: [median([x["parallel"]["peak_rss_mb"][i] for x in runs]) for i in range(2)]
             for v, runs in results.items()}  # fmt: skip
    tps = {v: median([x["tokens_per_s"] for x in runs]) for v, runs in results.items()}
    rows = [f"| {v} | {peaks[v][0]:.0f} | {peaks[v][1]:.0f} | {tps[v]:.0f} |" for v in VARIANTS]
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    allocator = f", glibc MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else ""
    markdown = (
        f"# Checkpoints under --fsdp (full fine-tuning of {args.base}, 2 processes x 1 thread, global batch 4 x 256, "
        f"{args.steps} steps, a checkpoint every {args.checkpoint_every}, medians of {args.rounds} rounds"
        f"{allocator})\n\n"
        "| checkpoint | peak RSS MB rank 0 | peak RSS MB rank 1 | tokens/s (with the checkpoints) |\n"
        "|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )  # fmt: skip
    write("checkpoint_memory", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                "malloc_mmap_threshold": threshold, "peak_rss_mb": peaks, "tokens_per_s": tps,
                                "runs": results}, markdown)  # fmt: skip


if __name__ == "__main__":
    main()
