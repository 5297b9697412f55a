"""Training efficiency on one backbone, batch and sequence length, measured in one run.

Time: variants timed round-robin in one process on the same token batch (machine noise hits all alike):
  forward       the bare backbone, no grad (evaluation / inference cost)
  expert_step   a MoDE expert-training step (3x2 expert): forward, backward through the frozen backbone, AdamW
  full_ft_step  a full fine-tuning step on a copy of the backbone
  lora_step     a LoRA step (rank 16, attention), the paper's baseline
Memory: each training variant runs alone in a fresh subprocess that samples its RSS while the variant sets up and
runs two steps: the peak, and what training added on top of the loaded backbone.

Usage: python benchmarks/train_efficiency.py [--base smollm2] [--batch-size 4] [--seq-len 256] [--repeats 5]
Writes benchmarks/results/train_efficiency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import interleaved, machine, median, write  # noqa: E402

from mode_edge.config import MoDELayout, TrainConfig  # noqa: E402
from mode_edge.memory import PeakRSS  # noqa: E402
from mode_edge.training.backbones import load_backbone  # noqa: E402
from mode_edge.training.baselines import LoraSettings, lora_model  # noqa: E402
from mode_edge.training.model import Expert, MoDEModel  # noqa: E402
from mode_edge.training.trainer import named_params, param_groups  # noqa: E402

TRAINING = ("expert_step", "full_ft_step", "lora_step")


def make_step(backbone, variant: str, batch: torch.Tensor):
    """A closure running one optimizer step of `variant`, and its trainable parameter count."""
    if variant == "expert_step":
        expert = Expert.init_from(backbone.decoder, MoDELayout())
        model, params = MoDEModel(backbone.decoder, MoDELayout(), {"e": expert}), named_params({"e": expert})
    elif variant == "full_ft_step":
        import copy

        model = copy.deepcopy(backbone.decoder)
        params = dict(model.named_parameters())
    else:
        model = lora_model(backbone, LoraSettings())
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(param_groups(params, TrainConfig()))

    def step():
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params.values())


def memory_probe(args) -> None:
    """Child process: load, then sample RSS while one variant builds its optimizer and runs a few steps."""
    backbone = load_backbone(args.base)
    batch = make_batch(backbone, args)
    import peft  # noqa: F401  (imported before the reading, so the LoRA variant is not charged for the module)

    before = psutil.Process().memory_info().rss / 2**20
    with PeakRSS(interval_s=0.01) as peak:
        step, _ = make_step(backbone, args.memory_probe, batch)
        for _ in range(2):
            step()
    print(json.dumps({"loaded_mb": before, "peak_mb": peak.peak_mb}))


def make_batch(backbone, args) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, backbone.decoder.cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-probe", choices=TRAINING, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        return memory_probe(args)

    backbone = load_backbone(args.base)
    batch = make_batch(backbone, args)
    tokens = args.batch_size * args.seq_len

    @torch.no_grad()
    def forward():
        backbone.decoder(batch[:, :-1])

    variants, trainable = {"forward": forward}, {"forward": 0}
    for v in TRAINING:
        variants[v], trainable[v] = make_step(backbone, v, batch)
    times = interleaved(variants, args.repeats)
    med = {k: median(v) for k, v in times.items()}

    memory = {}
    for v in TRAINING:
        cmd = [sys.executable, __file__, "--memory-probe", v, "--base", args.base]
        cmd += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory[v] = json.loads(out.strip().splitlines()[-1])
        memory[v]["step_added_mb"] = memory[v]["peak_mb"] - memory[v]["loaded_mb"]

    ratios = {
        "expert_vs_full_ft_time": med["expert_step"] / med["full_ft_step"],
        "expert_vs_full_ft_peak_rss": memory["expert_step"]["peak_mb"] / memory["full_ft_step"]["peak_mb"],
        "expert_vs_full_ft_step_added_memory": memory["expert_step"]["step_added_mb"]
        / memory["full_ft_step"]["step_added_mb"],
        "expert_step_vs_forward_time": med["expert_step"] / med["forward"],
    }
    data = {
        "base": backbone.spec,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "trainable_parameters": trainable,
        "median_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "memory_mb": memory,
        "ratios": ratios,
        "raw_s": times,
    }
    rows = ""
    for k in variants:
        mem = memory.get(k, {})
        peak = f"{mem['peak_mb']:.0f} (+{mem['step_added_mb']:.0f})" if mem else "-"
        rows += f"| {k} | {trainable[k] / 1e6:.2f}M | {med[k]:.3f} | {tokens / med[k]:.0f} | {peak} |\n"
    md = (
        f"# Training efficiency ({backbone.spec}, batch {args.batch_size} x {args.seq_len}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats})\n\n"
        "| variant | trainable | s / step | tokens/s | peak RSS MB (+ added by training) |\n|---|---|---|---|---|\n"
        + rows
        + "\n"
        + "".join(f"- {k}: {v:.2f}\n" for k, v in ratios.items())
        + "\nCommand: `python benchmarks/train_efficiency.py "
        + " ".join(sys.argv[1:])
        + "`\n"
    )
    write("train_efficiency", data, md)


if __name__ == "__main__":
    main()
