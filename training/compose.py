"""Stage 2 of MoDE: put trained experts together and run a short fine-tune on mixed data.

The gate rows always learn; the experts' layers learn too unless `freeze_experts` (the paper finds unfrozen experts
best, frozen ones more sample-efficient when mixed data is scarce). The backbone stays frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from mode_edge.config import TrainConfig
from mode_edge.errors import UserError
from mode_edge.files import atomic_dir, partial_path
from mode_edge.progress import console
from mode_edge.training import runs, trainer
from mode_edge.training.backbones import Backbone
from mode_edge.training.data import TokenStream, load_corpus, require_split
from mode_edge.training.model import MoDEModel


def mixed_batches(streams: list[TokenStream], batch_size: int) -> Iterator[torch.Tensor]:
    """Every batch holds rows of every domain in turn, so each step sees the mixture."""
    while True:
        rows = torch.cat([next(s) for s in streams])  # (n_domains * per_domain, T+1)
        order = torch.arange(len(rows)).view(len(streams), -1).t().flatten()  # interleave domains
        yield rows[order][:batch_size]


def compose(
    backbone: Backbone, expert_runs: list[Path], data: list[Path], out: Path, cfg: TrainConfig, freeze_experts: bool
) -> dict:
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out or remove it first")
    if not expert_runs:
        raise UserError("--experts needs at least one expert run folder")
    if not data:
        raise UserError("--data needs at least one corpus folder")
    loaded = [e for run in expert_runs for e in runs.load_run_experts(run, backbone)]
    layout = runs.check_same_blocks(loaded)
    docs = [require_split(load_corpus(d), "train") for d in data]
    per_domain = -(-cfg.batch_size // len(docs))
    streams = [TokenStream(d, backbone.tokenizer, per_domain, cfg.seq_len, seed=cfg.seed + i) for i, d in enumerate(docs)]
    experts = {e.name: e.expert for e in loaded}
    model = MoDEModel(backbone.decoder, layout, experts)
    signature = {"stage": "compose", "experts": [str(Path(r).resolve()) for r in expert_runs], "freeze": freeze_experts,
                 "base": backbone.fingerprint(layout), "train": cfg.to_dict(), "data": [str(Path(d).resolve()) for d in data]}  # fmt: skip
    if partial_path(out).exists():
        console.print(f"resuming the interrupted run in {partial_path(out)}")
    with atomic_dir(out, keep_partial_on_error=True) as work:
        result = trainer.train(
            model, experts, mixed_batches(streams, cfg.batch_size), cfg, work,
            train_layers=not freeze_experts, signature=signature, label=f"compose {'+'.join(experts)}",
        )  # fmt: skip
        training = {"stage": "compose", "freeze_experts": freeze_experts, "data": signature["data"], "config": cfg.to_dict(),
                    **{k: result[k] for k in ("tokens", "wall_s", "tokens_per_s")}}  # fmt: skip
        for e in loaded:
            record = {"expert_stage": e.meta["training"], "compose_stage": training}
            runs.save_expert(work / "experts" / e.name, e.name, e.expert, e.layout, backbone, record)
        runs.save_model_record(work, "composed", backbone, layout, list(experts), {"history": {"compose": result["history"]}})
        trainer.clear_state(work)
    return training
