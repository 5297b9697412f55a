"""`mode-edge reproduce`: the paper's comparison (DESIGN §1, Table 1) on our own data and backbone.

Targets code + math; retention on English (KJV, which no training reads) and on general text (the test split of the
State of the Union corpus, whose train split stay-out experts read). Rows: the bare backbone, full fine-tuning, LoRA,
one MoDE expert per target domain trained on its domain alone (plain) and with general rows under the stay-out
penalty (-so, DESIGN §6), the plain experts composed with experts frozen and unfrozen, the stay-out experts composed,
and the stay-out experts *routed*: each held-out window runs with at most one expert, chosen by the centroid router
on its first ROUTE_TOKENS tokens (the device case; those tokens are scored too, like every row's). Evaluated also
on math-prose, the human-written part of math's test split. `--sweep` adds MoDE at 1 and 4 expert layers per block,
LoRA at ranks 8, 64 and 512, and stay-out experts at stage-1 learning rates 1e-4 and 3e-4. Every trained method gets
the same token budget: the MoDE composition's (two expert runs plus the composition run); the baselines spend it on
the mixed target data. Fixed seeds. Each row writes its own folder with its evaluation, so a rerun skips finished
rows. Each training runs as its own `mode-edge train` process, so the peak memory recorded for it is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mode_edge.config import DEFAULT_LR, MoDELayout, TrainConfig
from mode_edge.errors import UserError
from mode_edge.files import read_json
from mode_edge.progress import console
from mode_edge.training.backbones import Backbone
from mode_edge.training.data import load_corpus, prepare
from mode_edge.training.evaluate import build_model, evaluate
from mode_edge.training.model import MoDEModel
from mode_edge.training.runs import read_model_record

TARGETS, RETENTION = ("code", "math"), ("english", "general")
HUMAN_MATH = "math-prose"
"""Evaluated only: the human-written part of the math corpus (its own test split), which the generator does not
shape."""
DOMAINS = (*TARGETS, HUMAN_MATH, *RETENTION)
ROUTE_TOKENS = 64
"""Tokens of each held-out window the router reads in the routed row."""


@dataclass(frozen=True)
class Preset:
    doc_limit: int | None
    """Documents per corpus (None: all)."""
    expert_steps: int
    compose_steps: int
    batch_size: int
    seq_len: int
    eval_tokens: int
    """Held-out tokens per domain."""
    lr: dict
    """Peak learning rate per method: experts copy backbone layers; full FT moves every weight; LoRA starts at 0."""
    device: str = "cpu"
    """Where every training runs."""

    @property
    def budget_steps(self) -> int:
        """Optimizer steps of every trained method: MoDE's two expert runs plus its composition."""
        return len(TARGETS) * self.expert_steps + self.compose_steps

    def train_config(self, steps: int, lr: float) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            lr=lr,
            warmup_steps=max(1, steps // 10),
            checkpoint_every=max(1, steps // 4),
            device=self.device,
        )


PRESETS = {
    "tiny": Preset(
        doc_limit=40, expert_steps=3, compose_steps=2, batch_size=2, seq_len=32, eval_tokens=128, lr=DEFAULT_LR
    ),
    "quick": Preset(
        doc_limit=200, expert_steps=20, compose_steps=10, batch_size=4, seq_len=256, eval_tokens=4096, lr=DEFAULT_LR
    ),
    "paper": Preset(
        doc_limit=None, expert_steps=100, compose_steps=30, batch_size=4, seq_len=256, eval_tokens=8192, lr=DEFAULT_LR
    ),
    # 10x the paper preset's tokens (batch 16 instead of 4, 2.5x the steps) on one GPU; sized by arithmetic from the
    # CPU runs (not yet timed on a GPU: none was at hand), expected well under 10 minutes on an H200-class GPU.
    "gpu": Preset(
        doc_limit=None, expert_steps=250, compose_steps=75, batch_size=16, seq_len=256, eval_tokens=8192,
        lr=DEFAULT_LR, device="cuda",
    ),
}


@dataclass(frozen=True)
class Row:
    name: str
    """Row label in the table, also the run folder's name."""
    method: str
    """backbone | full-ft | lora | mode-expert | mode-composed | mode-routed."""
    option: object = None
    """The LoRA rank; for MoDE rows an Experts setting (and for mode-expert the domain)."""


@dataclass(frozen=True)
class Experts:
    """How the stage-1 experts of a MoDE row were trained."""

    layers: int = 2
    stay_out: bool = False
    lr: float | None = None
    """Stage-1 peak learning rate (None: the preset's)."""
    freeze: bool = False
    """For compositions: train the gate rows only."""

    def suffix(self) -> str:
        return "-so" * self.stay_out + (f"-lr{self.lr:g}" if self.lr else "")


def rows(sweep: bool) -> list[Row]:
    plain, so = Experts(), Experts(stay_out=True)
    out = [Row("backbone", "backbone"), Row("full-ft", "full-ft"), Row("lora-r16", "lora", 16)]
    out += [Row(f"mode-{d}", "mode-expert", (d, plain)) for d in TARGETS]
    out += [Row(f"mode-{d}-so", "mode-expert", (d, so)) for d in TARGETS]
    out += [Row("mode-2x-frozen", "mode-composed", Experts(freeze=True)), Row("mode-2x", "mode-composed", plain)]
    out += [Row("mode-2x-so", "mode-composed", so), Row("routed-so", "mode-routed", so)]
    if sweep:
        out += [Row(f"mode-2x-{k}layers", "mode-composed", Experts(layers=k)) for k in (1, 4)]
        out += [Row(f"lora-r{r}", "lora", r) for r in (8, 64, 512)]
        out += [Row(f"mode-{d}-so-lr{lr:g}", "mode-expert", (d, Experts(stay_out=True, lr=lr)))
                for lr in (1e-4, 3e-4) for d in TARGETS]  # fmt: skip
    return out


class Reproduction:
    def __init__(self, backbone: Backbone, out: Path, preset: Preset):
        self.backbone, self.out, self.preset = backbone, Path(out), preset
        self.data = {d: self.out / "data" / d for d in DOMAINS}
        self.runs = self.out / "runs"

    def prepare_data(self) -> None:
        from mode_edge.training.sources import SOURCES

        for d in DOMAINS:
            meta = self.data[d] / "dataset.json"
            if not meta.exists():
                prepare(d, self.data[d], limit=self.preset.doc_limit)
            elif read_json(meta, "", "delete that folder to prepare it again").get("source") != SOURCES[d].description:
                raise UserError(f"{self.data[d]} was prepared from another source by an older mode-edge (and runs "
                                "were trained on it); start a new --out folder")  # fmt: skip
        self.corpora = {d: load_corpus(self.data[d]) for d in DOMAINS}

    def train(self, command: list[str], out: Path, steps: int, lr: float) -> None:
        """Run one training as its own `mode-edge train` process, so that its peak memory is its own."""
        cfg = self.preset.train_config(steps, lr)
        options = {"base": self.backbone.spec, "out": out, "steps": cfg.steps, "batch-size": cfg.batch_size,
                   "seq-len": cfg.seq_len, "lr": cfg.lr, "warmup-steps": cfg.warmup_steps,
                   "checkpoint-every": cfg.checkpoint_every, "seed": cfg.seed, "device": cfg.device}  # fmt: skip
        args = [str(a) for k, v in options.items() for a in (f"--{k}", v)]
        proc = subprocess.run([sys.executable, "-m", "mode_edge.cli", "train", *command, *args])
        if proc.returncode != 0:
            raise UserError(f"`mode-edge train {command[0]}` for {out.name} failed (exit {proc.returncode}), see above")

    def expert_run(self, domain: str, how: Experts) -> Path:
        """Stage-1 expert, shared by the single-expert rows and the compositions of that kind."""
        run = self.runs / f"expert-{domain}-{how.layers}layers{how.suffix()}"
        if not (run / "model.json").exists():
            per_block = self.backbone.decoder.cfg.n_layers // MoDELayout().n_blocks
            init = "copy" if how.layers <= per_block else "random"  # experts larger than a block's slice start random
            command = ["expert", "--domain", domain, "--data", str(self.data[domain]),
                       "--expert-layers", str(how.layers), "--init", init]  # fmt: skip
            if how.stay_out:  # the defaults of `train expert --general`: share, weight, penalty, data gate init
                command += ["--general", str(self.data["general"])]
            self.train(command, run, self.preset.expert_steps, how.lr or self.preset.lr["mode"])
        return run

    def train_row(self, row: Row) -> list[Path]:
        """Train one row (unless done); returns the run folders that went into it, the final one last."""
        p, targets = self.preset, ",".join(str(self.data[d]) for d in TARGETS)
        run = self.runs / row.name
        if row.method == "backbone":
            return []
        if row.method == "mode-expert":
            domain, how = row.option
            return [self.expert_run(domain, how)]
        if row.method in ("mode-composed", "mode-routed"):
            how = row.option
            experts = [self.expert_run(d, how) for d in TARGETS]
            if row.method == "mode-routed":  # nothing to train: the experts alone, chosen per prompt
                return experts
            if not (run / "model.json").exists():
                command = ["compose", "--experts", ",".join(map(str, experts)), "--data", targets]
                self.train(command + ["--freeze-experts"] * how.freeze, run, p.compose_steps, p.lr["mode"])
            return [*experts, run]
        if not (run / "model.json").exists():
            command = [row.method, "--data", targets]
            if row.method == "lora":
                command += ["--rank", str(row.option), "--alpha", str(2.0 * row.option)]
            self.train(command, run, p.budget_steps, p.lr[row.method])
        return [run]

    def result(self, row: Row) -> dict:
        """Train and evaluate one row, unless done before: the result is cached in runs/NAME.eval.json."""
        cache = self.runs / f"{row.name}.eval.json"
        if cache.exists():  # kept unless an older mode-edge scored it on fewer domains or without per-document sums
            cached = read_json(cache, "", f"delete {cache} to evaluate that row again")
            if all("per_doc" in cached.get("scores", {}).get(d, {}) for d in DOMAINS):
                return cached
        console.print(f"[bold]{row.name}[/bold]")
        stages = self.train_row(row)
        corpora = list(self.corpora.values())
        if row.method == "mode-routed":
            from mode_edge.training.eval_routing import routed_scores
            from mode_edge.training.runs import check_same_blocks, load_run_experts

            loaded = [e for run in stages for e in load_run_experts(run, self.backbone)]
            layout = check_same_blocks(loaded)
            model = MoDEModel(self.backbone.decoder, layout, {e.name: e.expert for e in loaded})
            scores = routed_scores(self.backbone, loaded, layout, corpora, self.preset.eval_tokens, ROUTE_TOKENS)
        else:
            model, _, _ = build_model(self.backbone, stages[-1] if stages else None, None)
            scores = evaluate(self.backbone, model, corpora, max_tokens=self.preset.eval_tokens)
        result = {"row": row.name, "method": row.method, "scores": scores, **costs(stages, model)}
        self.runs.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result, indent=2) + "\n")
        return result


def costs(stages: list[Path], model) -> dict:
    """Parameters, training wall time summed over all stages, the largest peak RSS, and the loss histories."""
    records = [read_model_record(run) for run in stages]
    if not records:
        trainable = 0
    elif records[-1]["kind"] in ("full-ft", "lora"):
        trainable = records[-1]["training"]["trainable_parameters"]
    else:  # the experts of the final stage, or of every stage when the row only routes between expert runs
        finals = stages[-1:] if records[-1]["kind"] == "composed" else stages
        trainable = sum(
            json.loads((run / "experts" / n / "expert.json").read_text())["parameters"]
            for run in finals for n in read_model_record(run)["experts"]
        )  # fmt: skip
    return {
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": trainable,
        "train_s": round(sum(r["training"]["wall_s"] for r in records), 1),
        "peak_rss_mb": max((r["training"]["peak_rss_mb"] for r in records), default=None),
        "tokens": sum(r["training"]["tokens"] for r in records),
        "history": {run.name: h for run, r in zip(stages, records) for h in r["history"].values()},
    }


def reproduce(backbone: Backbone, out: Path, preset_name: str, sweep: bool) -> list[dict]:
    if preset_name not in PRESETS:
        raise UserError(f"unknown --preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    r = Reproduction(backbone, out, preset)
    r.prepare_data()
    results = [r.result(row) for row in rows(sweep)]
    from mode_edge.training.report import write_report

    write_report(Path(out), results, preset_name, preset)
    return results
