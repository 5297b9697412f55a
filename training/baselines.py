"""The baselines MoDE is measured against, trained on the same mixed data with the same loop and schedule:

- full fine-tuning: every backbone weight learns (on a copy; the loaded backbone is never written);
- LoRA (peft): low-rank adapters on the attention projections (rank 16 by default, as in the paper).

Run folders hold model.json (kind `full-ft` or `lora`) and the learned weights only: weights.safetensors for full
fine-tuning, adapter.safetensors for LoRA.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mode_edge.config import ParallelConfig, TrainConfig
from mode_edge.errors import UserError
from mode_edge.files import as_plain_write, require_absent
from mode_edge.integrity import check_file, checked_load, file_record
from mode_edge.ranges import check_number
from mode_edge.training import runs, trainer
from mode_edge.training.backbones import Backbone
from mode_edge.training.data import Corpus, as_corpus, mixed_batches
from mode_edge.training.model import Decoder

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = ATTENTION + ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape."""

    rank: int = 16
    """Rank of each adapter."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / rank) * B @ A."""
    targets: tuple[str, ...] = ATTENTION
    """Linear layers that get adapters: any of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj."""

    def __post_init__(self):
        check_number("--rank", self.rank, lo=1, integer=True)
        check_number("--alpha", self.alpha, lo=0, lo_open=True)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise UserError(f"--targets {','.join(unknown) or '(none)'} unknown; choose from {','.join(TARGETS)}")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0)


def _train_baseline(
    kind: str, backbone: Backbone, model: Decoder, params: dict, data: list, out: Path, cfg: TrainConfig, save,
    parallel: ParallelConfig, **extra
) -> dict:
    out = Path(out)
    require_absent(out)
    cfg.check_context(backbone.decoder.cfg.max_seq_len, backbone.decoder.cfg.context_note())
    if not data:
        raise UserError("--data needs at least one corpus folder")
    corpora: list[Corpus] = [as_corpus(d) for d in data]
    batches = mixed_batches(corpora, backbone.tokenizer, cfg)
    data_paths = [str(c.path.resolve()) for c in corpora]
    signature = {"stage": kind, "base": backbone.fingerprint(None), "train": cfg.to_dict(), "data": data_paths, **extra}

    def save_run(work: Path, result: dict) -> None:
        save(work)
        training = trainer.training_record(kind, data_paths, cfg, result, trainable_parameters=n_trainable)
        weights = work / ("weights.safetensors" if kind == "full-ft" else "adapter.safetensors")
        record = {**extra, "training": training, "history": {kind: result["history"]},
                  "weights": file_record(weights)}  # fmt: skip
        runs.save_model_record(work, kind, backbone, None, [], record)

    n_trainable = sum(p.numel() for p in params.values())
    result = trainer.train_into(
        out, model, params, batches, cfg, signature=signature, label=kind, save=save_run, parallel=parallel,
        header=backbone.describe(),
    )
    return trainer.training_record(kind, data_paths, cfg, result, trainable_parameters=n_trainable)


def train_full_ft(
    backbone: Backbone,
    data: list[Corpus | Path],
    out: Path,
    cfg: TrainConfig,
    parallel: ParallelConfig = ParallelConfig(),
) -> dict:
    """Fine-tune every weight of a copy of the backbone on the mixed data."""
    model = copy.deepcopy(backbone.decoder)
    params = dict(model.named_parameters())

    def save(work: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "weights.safetensors"))
        as_plain_write(work / "weights.safetensors")

    return _train_baseline("full-ft", backbone, model, params, data, out, cfg, save, parallel)


def shared_decoder(decoder: Decoder) -> Decoder:
    """A new module tree over the same (frozen) weight tensors: adapters can be injected into it without touching
    the loaded backbone's modules, and without a second copy of the weights in memory."""
    with torch.device("meta"):
        model = Decoder(decoder.cfg)
    model.load_state_dict(decoder.state_dict(), assign=True)
    model.rope = decoder.rope  # its tables are buffers outside the state dict
    return model.requires_grad_(False)


def lora_model(backbone: Backbone, settings: LoraSettings) -> Decoder:
    """The backbone with LoRA adapters injected (B starts at zero, so the model starts exactly as the backbone)."""
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(settings.peft_config(), shared_decoder(backbone.decoder))


def train_lora(
    backbone: Backbone,
    data: list[Corpus | Path],
    out: Path,
    cfg: TrainConfig,
    settings: LoraSettings,
    parallel: ParallelConfig = ParallelConfig(),
) -> dict:
    from peft import get_peft_model_state_dict

    model = lora_model(backbone, settings)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}

    def save(work: Path) -> None:
        adapter = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(adapter, str(work / "adapter.safetensors"))
        as_plain_write(work / "adapter.safetensors")

    lora = {**asdict(settings), "targets": list(settings.targets)}
    return _train_baseline("lora", backbone, model, params, data, out, cfg, save, parallel, lora=lora)


def load_baseline(run: Path, record: dict, backbone: Backbone) -> Decoder:
    """The trained model of a full-ft or lora run, checked against the loaded backbone."""
    runs.check_base(str(run), record["base"], backbone, None)
    name = "weights.safetensors" if record["kind"] == "full-ft" else "adapter.safetensors"
    path = Path(run) / name
    if not path.is_file():
        raise UserError(f"{path} is missing; restore the run folder from a copy or retrain the run")
    check_file(path, record.get("weights"), "restore the run folder from a copy or retrain the run")
    tensors = checked_load(path, lambda: load_file(str(path)), "restore the run folder from a copy or retrain it")
    if record["kind"] == "full-ft":
        model = copy.deepcopy(backbone.decoder)
        model.load_state_dict(tensors, strict=True)
    else:
        from peft import set_peft_model_state_dict

        lora = record["lora"]
        model = lora_model(backbone, LoraSettings(lora["rank"], lora["alpha"], tuple(lora["targets"])))
        result = set_peft_model_state_dict(model, tensors)
        if result.unexpected_keys:
            raise UserError(f"{Path(run) / name} does not fit its LoRA settings; retrain the run")
    return model.requires_grad_(False).eval()
