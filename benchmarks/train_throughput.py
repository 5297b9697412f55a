"""Expert-training throughput against a plain forward pass of the same backbone, measured in one run.

Variants, timed round-robin on the same (batch, seq_len) token batch:
  forward      the bare backbone, no grad (evaluation / inference cost)
  mode_forward the backbone with one 3x2 expert beside it, no grad
  expert_step  one MoDE expert-training step: forward, backward (through the frozen backbone), AdamW

Usage: python benchmarks/train_throughput.py [--base smollm2] [--batch-size 4] [--seq-len 256] [--repeats 5]
Writes benchmarks/results/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import interleaved, machine, median, write  # noqa: E402

from mode_edge.config import MoDELayout, TrainConfig  # noqa: E402
from mode_edge.training.backbones import load_backbone  # noqa: E402
from mode_edge.training.model import Expert, MoDEModel  # noqa: E402
from mode_edge.training.trainer import param_groups  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    backbone = load_backbone(args.base)
    layout = MoDELayout()
    expert = Expert.init_from(backbone.decoder, layout)
    model = MoDEModel(backbone.decoder, layout, {"bench": expert})
    groups = param_groups({"bench": expert}, TrainConfig(), train_layers=True)
    optimizer = torch.optim.AdamW(groups)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, backbone.decoder.cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)
    tokens = args.batch_size * args.seq_len

    @torch.no_grad()
    def forward():
        backbone.decoder(batch[:, :-1])

    @torch.no_grad()
    def mode_forward():
        model(batch[:, :-1])

    def expert_step():
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = interleaved({"forward": forward, "mode_forward": mode_forward, "expert_step": expert_step}, args.repeats)
    med = {k: median(v) for k, v in times.items()}
    tps = {k: tokens / v for k, v in med.items()}
    trainable = sum(p.numel() for p in expert.parameters())
    data = {
        "base": backbone.spec, "layout": layout.to_dict(), "batch_size": args.batch_size, "seq_len": args.seq_len,
        "repeats": args.repeats, "threads": torch.get_num_threads(), "machine": machine(),
        "trainable_parameters": trainable, "backbone_parameters": sum(p.numel() for p in backbone.decoder.parameters()),
        "median_s": med, "tokens_per_s": tps, "expert_step_vs_forward_time": med["expert_step"] / med["forward"],
        "raw_s": times,
    }  # fmt: skip
    md = (
        f"# Expert-training throughput ({backbone.spec}, batch {args.batch_size} x {args.seq_len}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats})\n\n"
        "| variant | median s / batch | tokens/s | time vs plain forward |\n|---|---|---|---|\n"
        + "".join(f"| {k} | {med[k]:.3f} | {tps[k]:.0f} | {med[k] / med['forward']:.2f}x |\n" for k in med)
        + f"\nTrainable parameters per expert: {trainable / 1e6:.1f}M "
        f"(backbone {data['backbone_parameters'] / 1e6:.1f}M, frozen).\n"
        "Command: `python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]) + "`\n"
    )
    write("train_throughput", data, md)


if __name__ == "__main__":
    main()
