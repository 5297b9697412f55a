"""Data-parallel scaling of training on CPU: `mode-edge train expert` (or `full-ft`) in one process with one thread,
under `torchrun` with two processes of one thread each (gloo; the same global batch, so the same weights), whole
copies or sharded (`--fsdp`), and in one process with two threads (what a single process makes of the same two
cores). Rounds alternate the variants (machine noise hits all alike); each run is a fresh process, and its
throughput is the training loop's own (tokens / wall seconds of the loop, model.json), which leaves out loading the
backbone. Peak RSS is each rank's own (model.json's training.parallel). glibc keeps freed blocks below its (dynamic)
mmap threshold in the process, so memory a variant frees may not leave its RSS: run with MALLOC_MMAP_THRESHOLD_=65536
to see what each variant holds (the title says when it was set).

Usage: python benchmarks/data_parallel.py --data DIR [--base smollm2] [--steps 8] [--batch-size 4] [--seq-len 256]
       [--rounds 2] [--kind expert|full-ft]
Writes benchmarks/results/data_parallel.{json,md} (data_parallel_full-ft.* for --kind full-ft).
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

VARIANTS = {  # name: (processes, threads per process, extra options)
    "1 process x 1 thread": (1, 1, []),
    "2 processes x 1 thread (torchrun)": (2, 1, []),
    "2 processes x 1 thread (torchrun --fsdp)": (2, 1, ["--fsdp"]),
    "1 process x 2 threads": (1, 2, []),
}


def run(variant: str, args: argparse.Namespace, out: Path) -> dict:
    processes, threads, extra = VARIANTS[variant]
    stage = ["expert", "--domain", "code"] if args.kind == "expert" else [args.kind]
    train = ["train", *stage, "--base", args.base, "--data", str(args.data), "--out", str(out),
             "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
             "--warmup-steps", "1", "--checkpoint-every", "100000", *extra]  # fmt: skip
    mode_edge(*train, processes=processes, threads=threads)
    return json.loads((out / "model.json").read_text())["training"]


def peaks(runs: list[dict]) -> list[float]:
    """Each rank's median peak RSS (one process: its own)."""
    per_run = [x.get("parallel", {}).get("peak_rss_mb", [x["peak_rss_mb"]]) for x in runs]
    return [median([p[i] for p in per_run]) for i in range(len(per_run[0]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared corpus (e.g. the code domain)")
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kind", choices=["expert", "full-ft"], default="expert",
                        help="what trains: one MoDE expert (21M weights), or every weight of the backbone")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in VARIANTS:
                out = Path(tmp) / f"{r}-{list(VARIANTS).index(variant)}"
                results[variant].append(run(variant, args, out))
                print(f"round {r + 1}: {variant}: {results[variant][-1]['tokens_per_s']} tok/s", file=sys.stderr)
    tps = {v: median([x["tokens_per_s"] for x in runs]) for v, runs in results.items()}
    base = tps["1 process x 1 thread"]
    rows = [f"| {v} | {tps[v]:.0f} | {tps[v] / base:.2f}x | {median([x['peak_rss_mb'] for x in results[v]]):.0f} |"
            f" {' / '.join(f'{m:.0f}' for m in peaks(results[v]))} |" for v in VARIANTS]  # fmt: skip
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")  # glibc: freed large tensors leave RSS only when mmapped
    allocator = f", glibc MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else ""
    markdown = (
        f"# Data-parallel {'expert training' if args.kind == 'expert' else 'full fine-tuning'} ({args.base}, "
        f"global batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.steps} steps, medians of {args.rounds} rounds{allocator})\n\n"
        "| variant | tokens/s (training loop) | vs 1 x 1 | peak RSS MB (rank 0) | peak RSS MB per rank |\n"
        "|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n\nTarget: 2 processes x 1 thread >= 1.8x one process with one thread.\n"
    )  # fmt: skip
    name = "data_parallel" + ("" if args.kind == "expert" else f"_{args.kind}")
    write(name, {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                 "malloc_mmap_threshold": threshold, "tokens_per_s": tps, "runs": results}, markdown)  # fmt: skip


if __name__ == "__main__":
    main()
