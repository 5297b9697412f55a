"""The MoDE paper's backbone / expert placement (`train compose --placement split`) against plain data parallel
(`--placement data`) on the same processes and the same global batch, for 1, 2 and 4 experts: step time and each
rank's peak RSS, beside the ratio the layers' arithmetic predicts.

Every run is `torchrun --nproc-per-node P mode-edge train compose` with one thread per process (gloo), a fresh
process group each time; rounds alternate the variants so that machine noise hits them alike. The step time is the
training loop's own (wall seconds / steps from model.json, which leaves out loading the backbone; the first step's
set-up is in it, alike for both). The experts are made first with one training step each (their values do not
change the speed).

Beside the measured ratio, what the arithmetic predicts (`estimate`): the ranks meet at every block's merge, so split
placement pays each block's slower side, forward and backward, and the output head on rank 0 alone, while data
parallel spreads all the work evenly.

Usage: python benchmarks/placement.py --data DIR [--base smollm2] [--experts 1,2,4] [--processes 2] [--steps 6]
       [--batch-size 4] [--seq-len 256] [--rounds 2] [--report benchmarks/results/placement.json]
Writes benchmarks/results/placement.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, median, mode_edge, write  # noqa: E402

BLOCKS, EXPERT_LAYERS = 3, 2  # the default layout (mode_edge.config.MoDELayout)
PAPER_RATIO = 204 / 329  # MoDE paper, 8 TPUv5e, 4 experts x 6 layers in 2 blocks: three meshes vs one SPMD mesh


def estimate(cfg: dict, n_experts: int, processes: int) -> float:
    """Split placement's step time over data parallel's as the arithmetic estimates it (multiply-accumulates
    per token, no communication): the ranks meet at every block's merge, so each block costs the slower side's
    forward and then the slower side's backward, and the output head runs on rank 0 alone while the others wait;
    data parallel spreads all of it evenly. Backward as autograd runs it: frozen weights get input gradients only
    (none in the first block's backbone slice), experts input and weight gradients."""
    d, hd = cfg["dim"], cfg["head_dim"]
    layer = d * hd * (2 * cfg["n_heads"] + 2 * cfg["n_kv_heads"]) + 3 * d * cfg["hidden_dim"]
    head, per_block = cfg["vocab_size"] * d, cfg["n_layers"] // BLOCKS
    busiest = -(-n_experts // (processes - 1))  # experts on the busiest expert rank
    expert_forward = layer * EXPERT_LAYERS * busiest  # per block
    split = 2 * head + sum(
        max(layer * per_block, expert_forward) + max(layer * per_block if b else 0, 2 * expert_forward)
        for b in range(BLOCKS)
    )
    total = 2 * head + layer * (2 * cfg["n_layers"] - per_block) + 3 * layer * EXPERT_LAYERS * BLOCKS * n_experts
    return split / (total / processes)


def report(results: dict, args: argparse.Namespace, cfg: dict) -> None:
    """benchmarks/results/placement.{json,md} from the runs."""
    counts = sorted({int(key.split(":")[0]) for key in results})
    rows, summary = [], {}
    for n in counts:
        step = {v: median([x["step_s"] for x in results[f"{n}:{v}"]]) for v in ("data", "split")}
        peaks = {v: [median([x["peak_rss_mb"][i] for x in results[f"{n}:{v}"]]) for i in range(args.processes)]
                 for v in ("data", "split")}  # fmt: skip
        bound = estimate(cfg, n, args.processes)
        summary[n] = {"step_s": step, "peak_rss_mb": peaks, "ratio": step["split"] / step["data"], "estimate": bound}
        rows.append(f"| {n} | {step['data']:.2f} | {step['split']:.2f} | **{step['split'] / step['data']:.2f}x** | "
                    f"{bound:.2f}x | {' / '.join(f'{m:.0f}' for m in peaks['data'])} | "
                    f"{' / '.join(f'{m:.0f}' for m in peaks['split'])} |")  # fmt: skip
    markdown = (
        f"# Backbone / expert placement ({args.base}, {BLOCKS} blocks x {EXPERT_LAYERS} expert layers, "
        f"{args.processes} processes x 1 thread, global batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.steps} steps, medians of {args.rounds} rounds)\n\n"
        "| experts | data parallel s/step | split s/step | split / data | the arithmetic's estimate | peak RSS MB per "
        "rank, data | peak RSS MB per rank, split |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
        + f"\n\nTarget: split <= 0.8x data parallel with 2 experts. The MoDE paper: {PAPER_RATIO:.2f}x (three "
        "meshes against one SPMD mesh on 8 TPUv5e).\n"
    )  # fmt: skip
    recorded = {k: str(v) for k, v in vars(args).items() if k != "report"}
    write("placement", {"machine": machine(), "args": recorded, "backbone": cfg,
                        "summary": summary, "runs": results}, markdown)  # fmt: skip


def backbone_shapes(base: str) -> dict:
    """The backbone's DecoderConfig as a dict (in a child process: this one stays free of the model)."""
    probe = ("import json, sys; from mode_edge.training.backbones import load_backbone as b; "
             "print(json.dumps(b(sys.argv[1]).decoder.cfg.to_dict()))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe, base], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a prepared corpus (e.g. the code domain); not with --report")
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--experts", default="1,2,4", help="comma-separated expert counts")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--report", type=Path, default=None,
                        help="write the report again from an earlier run's results JSON, measuring nothing")
    args = parser.parse_args()
    cfg = backbone_shapes(args.base)
    if args.report:
        earlier = json.loads(args.report.read_text())
        for k, v in earlier["args"].items():
            if k == "data":
                args.data = Path(v)
            elif k != "report":
                setattr(args, k, type(getattr(args, k))(v))
        return report(earlier["runs"], args, cfg)
    if args.data is None:
        parser.error("--data is required (or --report to rewrite an earlier report)")
    counts = [int(n) for n in args.experts.split(",")]
    results: dict[str, dict[str, list[dict]]] = {f"{n}:{v}": [] for n in counts for v in ("data", "split")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for k in range(max(counts)):
            mode_edge("train", "expert", "--base", args.base, "--domain", f"e{k}", "--data", str(args.data), "--out",
                      str(tmp / f"e{k}"), "--steps", "1", "--batch-size", "1", "--seq-len", "32", "--warmup-steps", "0",
                      "--seed", str(k))  # fmt: skip
            print(f"expert e{k} made", file=sys.stderr)
        for r in range(args.rounds):
            for key in results:
                n, variant = key.split(":")
                out = tmp / f"{r}-{n}-{variant}"
                mode_edge("train", "compose", "--experts", ",".join(str(tmp / f"e{k}") for k in range(int(n))),
                          "--data", str(args.data), "--out", str(out), "--steps", str(args.steps), "--batch-size",
                          str(args.batch_size), "--seq-len", str(args.seq_len), "--warmup-steps", "1",
                          "--checkpoint-every", "1000000", "--placement", variant,
                          processes=args.processes)  # fmt: skip
                training = json.loads((out / "model.json").read_text())["training"]
                results[key].append({"step_s": training["wall_s"] / args.steps,
                                     "peak_rss_mb": training["parallel"]["peak_rss_mb"]})  # fmt: skip
                print(f"round {r + 1}: {n} expert(s), {variant}: {results[key][-1]}", file=sys.stderr)
    report(results, args, cfg)


if __name__ == "__main__":
    main()
