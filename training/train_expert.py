"""Stage 1 of MoDE: one single-expert model per domain, trained on that domain alone.

Only the expert's layers and its gate rows learn; the backbone is frozen. Runs are independent jobs: the output
records the base fingerprint, so the expert composes later with any other expert trained on the same base.
"""

from __future__ import annotations

from pathlib import Path

from mode_edge.config import MoDELayout, TrainConfig
from mode_edge.files import require_absent
from mode_edge.names import check_name
from mode_edge.training import runs, trainer
from mode_edge.training.backbones import Backbone
from mode_edge.training.data import Corpus, TokenStream, as_corpus, require_split
from mode_edge.training.model import Expert, MoDEModel


def train_expert(
    backbone: Backbone, name: str, data: Corpus | Path, out: Path, layout: MoDELayout, cfg: TrainConfig
) -> dict:
    """Train expert `name` on corpus `data` (or its folder); writes run folder `out`, returns the training record."""
    check_name(name)
    out = Path(out)
    require_absent(out)
    layout.check_backbone(backbone.decoder.cfg.n_layers)
    cfg.check_context(backbone.decoder.cfg.max_seq_len)
    corpus = as_corpus(data)
    docs = require_split(corpus, "train")
    expert = Expert.init_from(backbone.decoder, layout, seed=cfg.seed)
    model = MoDEModel(backbone.decoder, layout, {name: expert})
    batches = TokenStream(docs, backbone.tokenizer, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    data_path = str(corpus.path.resolve())
    signature = {
        "stage": "expert",
        "name": name,
        "base": backbone.fingerprint(layout),
        "layout": layout.to_dict(),
        "train": cfg.to_dict(),
        "data": data_path,
    }
    params = trainer.named_params({name: expert})

    def save(work: Path, result: dict) -> None:
        training = trainer.training_record("expert", [data_path], cfg, result, domain=corpus.name)
        runs.save_expert(work / "experts" / name, name, expert, layout, backbone, training)
        extra = {"training": training, "history": {name: result["history"]}}
        runs.save_model_record(work, "expert", backbone, layout, [name], extra)

    result = trainer.train_into(
        out, model, params, batches, cfg, signature=signature, label=f"expert {name}", save=save
    )
    return trainer.training_record("expert", [data_path], cfg, result, domain=corpus.name)
