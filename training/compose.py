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
from mode_edge.files import atomic_dir, partial_path, require_absent
from mode_edge.progress import console
from mode_edge.training import runs, trainer
from mode_edge.training.backbones import Backbone
from mode_edge.training.data import Corpus, TokenStream, as_corpus, require_split
from mode_edge.training.model import MoDEModel


def mixed_batches(streams: list[TokenStream], batch_size: int) -> Iterator[torch.Tensor]:
    """Every batch holds rows of every domain in turn, so each step sees the mixture."""
    while True:
        rows = torch.cat([next(s) for s in streams])  # (n_domains * per_domain, T+1)
        order = torch.arange(len(rows)).view(len(streams), -1).t().flatten()  # interleave domains
        yield rows[order][:batch_size]


def compose(
    backbone: Backbone,
    expert_runs: list[Path],
    data: list[Corpus | Path],
    out: Path,
    cfg: TrainConfig,
    freeze_experts: bool,
) -> dict:
    out = Path(out)
    require_absent(out)
    if not expert_runs:
        raise UserError("--experts needs at least one expert run folder")
    if not data:
        raise UserError("--data needs at least one corpus folder")
    loaded = [e for run in expert_runs for e in runs.load_run_experts(run, backbone)]
    layout = runs.check_same_blocks(loaded)
    corpora = [as_corpus(d) for d in data]
    docs = [require_split(c, "train") for c in corpora]
    per_domain = -(-cfg.batch_size // len(docs))
    streams = [
        TokenStream(d, backbone.tokenizer, per_domain, cfg.seq_len, seed=cfg.seed + i) for i, d in enumerate(docs)
    ]
    experts = {e.name: e.expert for e in loaded}
    model = MoDEModel(backbone.decoder, layout, experts)
    data_paths = [str(c.path.resolve()) for c in corpora]
    signature = {
        "stage": "compose",
        "experts": [str(Path(r).resolve()) for r in expert_runs],
        "freeze": freeze_experts,
        "base": backbone.fingerprint(layout),
        "train": cfg.to_dict(),
        "data": data_paths,
    }
    if partial_path(out).exists():
        console.print(f"resuming the interrupted run in {partial_path(out)}")
    with atomic_dir(out, keep_partial_on_error=True) as work:
        batches = mixed_batches(streams, cfg.batch_size)
        label = f"compose {'+'.join(experts)}"
        result = trainer.train(
            model, experts, batches, cfg, work, train_layers=not freeze_experts, signature=signature, label=label
        )
        training = trainer.training_record("compose", data_paths, cfg, result, freeze_experts=freeze_experts)
        for e in loaded:
            record = {"expert_stage": e.meta["training"], "compose_stage": training}
            runs.save_expert(work / "experts" / e.name, e.name, e.expert, e.layout, backbone, record)
        runs.save_model_record(
            work, "composed", backbone, layout, list(experts), {"history": {"compose": result["history"]}}
        )
        trainer.clear_state(work)
    return training
