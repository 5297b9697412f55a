"""Run folders on disk: what expert training and composition write, and what eval and compose read.

    RUN/model.json                     kind (expert | composed), base spec + fingerprint, layout, experts,
                                       this run's training record (tokens, wall time, peak RSS) and loss history
    RUN/experts/NAME/expert.safetensors the expert's layers and gate rows, all blocks (never pickle)
    RUN/experts/NAME/expert.json       the expert's own record: base fingerprint, layout, how it was trained

An expert folder is self-contained, so it can be copied into another run and composed there. Baseline runs
(full-ft, lora) share model.json's format and keep their weights beside it (training/baselines.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from mode_edge.config import MoDELayout
from mode_edge.errors import UserError
from mode_edge.files import as_plain_write, read_json, write_json
from mode_edge.integrity import check_file, checked_load, file_record
from mode_edge.names import check_name, check_names
from mode_edge.training.backbones import Backbone
from mode_edge.training.model import Expert
from mode_edge.training.router import ROUTER_FILE, load_router, save_router

EXPERT_FORMAT, MODEL_FORMAT, FORMAT_VERSION = "mode-edge-expert", "mode-edge-model", 1


@dataclass
class LoadedExpert:
    name: str
    expert: Expert
    layout: MoDELayout
    meta: dict
    router: dict | None = None
    """Router statistics (training/router.py), when the expert was trained with general text."""


def save_expert(
    folder: Path, name: str, expert: Expert, layout: MoDELayout, backbone: Backbone, training: dict,
    router: dict | None = None,
) -> None:
    """Write an expert folder: its tensors, its record and, when given, its router statistics."""
    folder.mkdir(parents=True, exist_ok=True)
    if router is not None:
        save_router(folder, router)
    tensors = {k: v.detach().contiguous().cpu() for k, v in expert.state_dict().items()}
    save_file(tensors, str(folder / "expert.safetensors"))
    as_plain_write(folder / "expert.safetensors")
    weights = file_record(folder / "expert.safetensors")
    write_json(
        folder / "expert.json",
        {
            "format": EXPERT_FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "base": {"spec": backbone.spec, "fingerprint": backbone.fingerprint(layout)},
            "decoder": backbone.decoder.cfg.to_dict(),
            "layout": layout.to_dict(),
            "parameters": sum(t.numel() for t in tensors.values()),
            "training": training,
            "weights": weights,
            "router": file_record(folder / ROUTER_FILE) if router is not None else None,
        },
    )


def save_model_record(
    run: Path, kind: str, backbone: Backbone, layout: MoDELayout | None, experts: list[str], extra: dict
) -> None:
    """model.json of any run; baselines (full-ft, lora) have no block layout and no experts."""
    write_json(
        run / "model.json",
        {
            "format": MODEL_FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "base": {"spec": backbone.spec, "fingerprint": backbone.fingerprint(layout)},
            "layout": layout.to_dict() if layout else None,
            "experts": experts,
            **extra,
        },
    )


def check_base(what: str, base: dict, backbone: Backbone, layout: MoDELayout | None) -> None:
    """Refuse weights trained on another backbone, naming both fingerprints."""
    have, want = backbone.fingerprint(layout), base["fingerprint"]
    if have != want:
        raise UserError(
            f"{what} was trained on base {base['spec']!r} (fingerprint {want[:16]}), but the loaded base "
            f"{backbone.spec!r} has fingerprint {have[:16]}; use it only with the backbone it was trained on (--base)"
        )


def read_model_record(run: Path) -> dict:
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise UserError(f"{run} is a file; a run is the folder a `mode-edge train` command wrote (its --out)")
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist; pass the --out of a `mode-edge train` command")
    record = read_json(run / "model.json", "this is not a finished mode-edge run; train one with `mode-edge train`",
                       "restore the run folder from a copy or train it again")  # fmt: skip
    if record.get("format") != MODEL_FORMAT or record.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{run}/model.json has format {record.get('format')!r} v{record.get('format_version')}; "
            f"this mode-edge reads {MODEL_FORMAT} v{FORMAT_VERSION}"
        )
    ok = isinstance(record.get("base"), dict) and isinstance(record.get("experts"), list) and isinstance(
        record.get("kind"), str)  # fmt: skip
    if not ok or not all(isinstance(e, str) for e in record["experts"]):
        raise UserError(f"{run}/model.json is damaged: kind, base or experts is malformed; restore the run folder "
                        "from a copy or train it again")  # fmt: skip
    return record


def load_expert(folder: Path, backbone: Backbone) -> LoadedExpert:
    fix = "restore the expert folder from a copy or retrain the expert"
    meta = read_json(folder / "expert.json", "the expert's record is missing; retrain the expert", fix)
    if meta.get("format") != EXPERT_FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{folder}/expert.json is not a {EXPERT_FORMAT} v{FORMAT_VERSION} record")
    ok = isinstance(meta.get("name"), str) and isinstance(meta.get("base"), dict)
    ok = ok and isinstance(meta.get("layout"), dict)
    if not ok or not isinstance(meta["base"].get("fingerprint"), str):
        raise UserError(f"{folder}/expert.json is damaged: name, base or layout is malformed; {fix}")
    check_name(meta.get("name"), f"{folder}/expert.json (corrupt?)")
    layout = checked_load(folder / "expert.json", lambda: MoDELayout.from_dict(meta["layout"]), fix)
    check_base(f"expert {meta['name']!r} in {folder}", meta["base"], backbone, layout)
    weights = folder / "expert.safetensors"
    if not weights.is_file():
        raise UserError(f"{weights} is missing; {fix}")
    check_file(weights, meta.get("weights"), fix)
    tensors = checked_load(weights, lambda: load_file(str(weights)), fix)
    expert = Expert.empty(backbone.decoder.cfg, layout)
    try:
        expert.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{folder}/expert.safetensors does not fit its record ({first}); retrain the expert") from None
    expert.requires_grad_(False).eval()
    return LoadedExpert(meta["name"], expert, layout, meta, load_router(folder, meta.get("router")))


def load_run_experts(run: Path, backbone: Backbone, only: list[str] | None = None) -> list[LoadedExpert]:
    """The experts of a finished run (all, or the named subset), checked against the loaded backbone."""
    record = read_model_record(run)
    names = check_names(record["experts"], f"{run}/model.json (corrupt?)")
    if only is not None:
        check_names(only, "--experts")
        unknown = [n for n in only if n not in names]
        if unknown:
            raise UserError(f"{run} has no expert named {', '.join(unknown)}; it has: {', '.join(names) or 'none'}")
        names = only
    return [load_expert(Path(run) / "experts" / n, backbone) for n in names]


def check_unique_experts(names: list[str]) -> None:
    """Raise UserError when experts to be put in one model share a name (each run names its experts by the
    --domain they were trained for)."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two experts are named {', '.join(dupes)}; expert names must be unique within a model: "
                        f"pass each run once, or train one of them again with another --domain")  # fmt: skip


def run_expert_names(expert_runs: list[Path]) -> list[str]:
    """The names of the experts the finished runs hold, in order, checked unique: read from their model.json, before
    any backbone loads. Raises UserError for a run without experts (a baseline's)."""
    names = []
    for run in expert_runs:
        record = read_model_record(run)
        if not record["experts"]:
            raise UserError(f"{run} holds no experts (a {record['kind']} run); --experts takes runs of `mode-edge "
                            f"train expert` or `train compose`")  # fmt: skip
        names += check_names(record["experts"], f"{run}/model.json (corrupt?)")
    check_unique_experts(names)
    return names


def check_same_blocks(experts: list[LoadedExpert]) -> MoDELayout | None:
    check_unique_experts([e.name for e in experts])
    blocks = {e.layout.n_blocks for e in experts}
    if len(blocks) > 1:
        raise UserError(f"experts use different block counts {sorted(blocks)}; compose experts of one block layout")
    return experts[0].layout if experts else None
