"""Stage 1 of MoDE: one single-expert model per domain, trained on that domain (and, to learn where to stay out, on a
share of general text under a stay-out penalty: training/stay_out.py).

Only the expert's layers and its gate rows learn; the backbone is frozen. Runs are independent jobs: the output
records the base fingerprint, so the expert composes later with any other expert trained on the same base.
"""

from __future__ import annotations

from pathlib import Path

from mode_edge.config import MoDELayout, ParallelConfig, StayOutConfig, TrainConfig
from mode_edge.errors import UserError
from mode_edge.files import require_absent
from mode_edge.names import check_name
from mode_edge.progress import console
from mode_edge.training import runs, trainer
from mode_edge.training.backbones import Backbone
from mode_edge.training.data import Corpus, TokenStream, as_corpus, require_split
from mode_edge.training.model import Expert, MoDEModel
from mode_edge.training.router import fit_router
from mode_edge.training.stay_out import StayOutLoss, data_gate_init, mixed_rows


def train_expert(
    backbone: Backbone,
    name: str,
    data: Corpus | Path,
    out: Path,
    layout: MoDELayout,
    cfg: TrainConfig,
    general: Corpus | Path | None = None,
    stay_out: StayOutConfig | None = None,
    parallel: ParallelConfig = ParallelConfig(),
) -> dict:
    """Train expert `name` on corpus `data` (or its folder); writes run folder `out`, returns the training record.

    With `general` (a corpus of general text), a `stay_out.share` of the rows come from it and carry the stay-out
    penalty instead of the language-model loss. `layout.gate_init == 'data'` needs `general` too.
    Raises UserError for a bad name, an existing `out`, a layout the backbone cannot take, or missing data."""
    check_name(name)
    out = Path(out)
    require_absent(out)
    layout.check_backbone(backbone.decoder.cfg.n_layers)
    if layout.gate_init == "data" and general is None:
        raise UserError("--gate-init data compares the domain with general text; pass --general DATA as well")
    cfg.check_context(backbone.decoder.cfg.max_seq_len, backbone.decoder.cfg.context_note())
    corpus = as_corpus(data)
    docs = require_split(corpus, "train")
    general = as_corpus(general) if general is not None else None
    stay_out = (stay_out or StayOutConfig()) if general is not None else None
    expert = Expert.init_from(backbone.decoder, layout, seed=cfg.seed)
    model = MoDEModel(backbone.decoder, layout, {name: expert})

    def stream(split_docs, seed: int) -> TokenStream:
        return TokenStream(split_docs, backbone.tokenizer, cfg.batch_size, cfg.seq_len, seed=seed)

    general_docs = require_split(general, "train") if general is not None else None
    gates_at_init = None
    if layout.gate_init == "data":
        gates_at_init = data_gate_init(
            backbone.decoder, layout, expert, stream(docs, cfg.seed + 1000), stream(general_docs, cfg.seed + 1001)
        )
    loss_fn = trainer.lm_loss
    if general is None:
        batches = stream(docs, cfg.seed)
    else:
        batches = mixed_rows(stream(docs, cfg.seed), stream(general_docs, cfg.seed + 1), stay_out.share)
        loss_fn = StayOutLoss(model, stay_out)
    data_path = str(corpus.path.resolve())
    general_path = str(general.path.resolve()) if general is not None else None
    signature = {
        "stage": "expert",
        "name": name,
        "base": backbone.fingerprint(layout),
        "layout": layout.to_dict(),
        "train": cfg.to_dict(),
        "data": data_path,
        "general": general_path,
        "stay_out": stay_out.to_dict() if stay_out else None,
    }
    params = trainer.named_params({name: expert})

    def record(result: dict) -> dict:
        return trainer.training_record(
            "expert", [data_path], cfg, result, domain=name, general=general_path,
            stay_out=stay_out.to_dict() if stay_out else None, gates_at_init=gates_at_init,
        )  # fmt: skip

    def save(work: Path, result: dict) -> None:
        if isinstance(loss_fn, StayOutLoss):
            loss_fn.close()  # training is over: the router's backbone passes below must not feed its hooks
        router = None
        if general_docs is not None:  # what `--experts auto` needs to tell this domain from general text
            with console.status(f"fitting the router of expert {name}"):
                router = fit_router(backbone.decoder, layout, backbone.tokenizer, docs, general_docs, seed=cfg.seed)
        training = record(result)
        runs.save_expert(work / "experts" / name, name, expert, layout, backbone, training, router)
        extra = {"training": training, "history": {name: result["history"]}}
        runs.save_model_record(work, "expert", backbone, layout, [name], extra)

    label = f"expert {name}" + (f" (stay-out {stay_out.penalty})" if stay_out else "")
    try:
        result = trainer.train_into(
            out, model, params, batches, cfg, signature=signature, label=label, save=save, loss_fn=loss_fn,
            parallel=parallel, header=backbone.describe(),
        )
    finally:
        if isinstance(loss_fn, StayOutLoss):
            loss_fn.close()
    return record(result)
