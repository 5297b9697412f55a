"""Stage 2 of MoDE: put trained experts together and run a short fine-tune on mixed data.

The gate rows always learn; the experts' layers learn too unless `freeze_experts` (the paper finds unfrozen experts
best, frozen ones more sample-efficient when mixed data is scarce). The backbone stays frozen.
"""

from __future__ import annotations

from pathlib import Path

from mode_edge.config import ParallelConfig, TrainConfig
from mode_edge.errors import UserError
from mode_edge.files import require_absent
from mode_edge.training import runs, trainer
from mode_edge.training.backbones import Backbone
from mode_edge.training.data import Corpus, as_corpus, mixed_batches
from mode_edge.training.model import MoDEModel


def compose(
    backbone: Backbone,
    expert_runs: list[Path],
    data: list[Corpus | Path],
    out: Path,
    cfg: TrainConfig,
    freeze_experts: bool,
    parallel: ParallelConfig = ParallelConfig(),
) -> dict:
    out = Path(out)
    require_absent(out)
    cfg.check_context(backbone.decoder.cfg.max_seq_len, backbone.decoder.cfg.context_note())
    if not expert_runs:
        raise UserError("--experts needs at least one expert run folder")
    if not data:
        raise UserError("--data needs at least one corpus folder")
    loaded = [e for run in expert_runs for e in runs.load_run_experts(run, backbone)]
    layout = runs.check_same_blocks(loaded)
    corpora = [as_corpus(d) for d in data]
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
    params = trainer.named_params(experts, keep=trainer.is_gate if freeze_experts else lambda name: True)
    batches = mixed_batches(corpora, backbone.tokenizer, cfg)

    def save(work: Path, result: dict) -> None:
        training = trainer.training_record("compose", data_paths, cfg, result, freeze_experts=freeze_experts)
        for e in loaded:
            record = {"expert_stage": e.meta["training"], "compose_stage": training}
            runs.save_expert(work / "experts" / e.name, e.name, e.expert, e.layout, backbone, record, e.router)
        extra = {"training": training, "history": {"compose": result["history"]}}
        runs.save_model_record(work, "composed", backbone, layout, list(experts), extra)

    label = f"compose {'+'.join(experts)}"
    result = trainer.train_into(
        out, model, params, batches, cfg, signature=signature, label=label, save=save, parallel=parallel,
        header=backbone.describe(),
    )
    return trainer.training_record("compose", data_paths, cfg, result, freeze_experts=freeze_experts)
