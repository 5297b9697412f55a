"""`mode-edge demo`: the whole pipeline on the built-in backbone, in one process (the backbone loads once): data,
experts (trained to stay out of general text, with their routers), composition, evaluation, then export to an int8
ONNX bundle, one domain pack per expert, and the device benchmark on this host. Each step writes its own folder
under --out, and a rerun reuses the steps already finished."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mode_edge.config import MoDELayout, StayOutConfig, TrainConfig
from mode_edge.files import read_json
from mode_edge.progress import console
from mode_edge.training.backbones import load_backbone
from mode_edge.training.compose import compose
from mode_edge.training.data import prepare
from mode_edge.training.evaluate import build_model, evaluate, print_gates, print_scores
from mode_edge.training.train_expert import train_expert

TARGETS = ("code", "math")
DOMAINS = ("code", "math", "english", "general")
"""English (KJV) is read by no training; general (State of the Union) trains the experts to stay out (its train
split) and measures retention (its test split)."""


@dataclass(frozen=True)
class DemoSettings:
    doc_limit: dict
    """Documents per built-in corpus (None: all)."""
    expert: TrainConfig
    compose: TrainConfig
    eval_tokens: int


FULL = DemoSettings(
    doc_limit={"code": None, "math": 1200, "english": None, "general": None},
    expert=TrainConfig(steps=110, batch_size=4, seq_len=256, warmup_steps=10, checkpoint_every=20),
    compose=TrainConfig(steps=30, batch_size=4, seq_len=256, warmup_steps=3, checkpoint_every=10),
    eval_tokens=8192,
)
QUICK = DemoSettings(
    doc_limit={"code": 120, "math": 120, "english": 120, "general": 240},
    expert=TrainConfig(steps=10, batch_size=2, seq_len=256, warmup_steps=2),
    compose=TrainConfig(steps=6, batch_size=2, seq_len=256, warmup_steps=1),
    eval_tokens=1024,
)


def run_demo(out: Path, quick: bool = False, base: str = "smollm2") -> dict:
    settings = QUICK if quick else FULL
    out = Path(out)
    t0 = time.perf_counter()
    timings = {}

    def step(name: str, done: bool, fn) -> None:
        if done:
            console.print(f"[dim]{name}: reusing {out}[/dim]")
            return
        t = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t, 1)

    data = {d: out / "data" / d for d in DOMAINS}
    for d in DOMAINS:
        step(
            f"data {d}",
            (data[d] / "dataset.json").exists(),
            lambda d=d: prepare(d, data[d], limit=settings.doc_limit[d]),
        )
    with console.status(f"loading backbone {base}"):
        t = time.perf_counter()
        backbone = load_backbone(base)
        timings["load backbone"] = round(time.perf_counter() - t, 1)
    layout = MoDELayout(gate_init="data")  # experts that stay out of general text (DESIGN §6), with their router
    experts = {d: out / f"expert-{d}" for d in TARGETS}
    for d in TARGETS:
        step(f"train expert {d}", (experts[d] / "model.json").exists(),
             lambda d=d: train_expert(backbone, d, data[d], experts[d], layout, settings.expert, data["general"],
                                      StayOutConfig()))  # fmt: skip
    composed = out / "composed"
    target_data = [data[d] for d in TARGETS]
    step(
        "compose",
        (composed / "model.json").exists(),
        lambda: compose(backbone, list(experts.values()), target_data, composed, settings.compose, False),
    )

    rows = {}
    t = time.perf_counter()
    for label, run, subset in [("backbone", None, []), *[(f"expert {d}", experts[d], None) for d in TARGETS],
                               ("composed " + "+".join(TARGETS), composed, None)]:  # fmt: skip
        model, _, _ = build_model(backbone, run, subset)
        rows[label] = evaluate(backbone, model, [data[d] for d in DOMAINS], max_tokens=settings.eval_tokens)
    timings["eval"] = round(time.perf_counter() - t, 1)

    print_scores(rows)
    print_gates({k: v for k, v in rows.items() if k.startswith("composed")})  # where the composition's gates open
    expert_tps = {
        d: read_json(experts[d] / "experts" / d / "expert.json", "retrain it", f"delete {experts[d]} to retrain it")
        .get("training", {}).get("tokens_per_s")
        for d in TARGETS
    }
    report = {
        "base": backbone.spec,
        "quick": quick,
        "rows": rows,
        "timings_s": timings,
        "expert_tokens_per_s": expert_tps,
    }
    ship(out, composed, report, timings)
    timings["total"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"demo finished in {timings['total']:.0f}s; results in {out / 'results.json'}")
    return report


def ship(out: Path, composed: Path, report: dict, timings: dict) -> None:
    """Export the composed model for the host profile, cut a pack per expert, and benchmark the bundle here."""
    from mode_edge.cli_ship import print_description
    from mode_edge.config import ExportConfig
    from mode_edge.devices.profiles import load_profile
    from mode_edge.export.pipeline import export_bundle
    from mode_edge.packs import describe, make_pack
    from mode_edge.runtimes.bench import print_bench, run_bench

    bundle, packs, host = out / "bundle", out / "packs", load_profile("host")
    if not (bundle / "manifest.json").exists():
        t = time.perf_counter()
        export_bundle(composed, bundle, ExportConfig(formats=tuple(host.export["formats"]), quant=host.export["quant"]))
        timings["export"] = round(time.perf_counter() - t, 1)
    info = describe(bundle)
    print_description(info)
    packs.mkdir(exist_ok=True)
    for name in info["experts"]:
        if not (packs / f"{name}.modepack").exists():
            make_pack(bundle, name, packs / f"{name}.modepack")
    t = time.perf_counter()
    bench = run_bench(bundle, host)
    timings["device bench"] = round(time.perf_counter() - t, 1)
    print_bench(bench)
    (out / "bench-host.json").write_text(json.dumps(bench, indent=2) + "\n")
    report["bundle"] = {"path": str(bundle), "components": info["components"], "base_bytes": info["base_bytes"],
                        "expert_bytes": {n: e["bytes"] for n, e in info["experts"].items()}}  # fmt: skip
    report["device_bench"] = {"path": str(out / "bench-host.json"),
                              "decode_tokens_per_s": {", ".join(r["selection"]) or "none": r["decode_tokens_per_s"]
                                                      for r in bench["runs"]}}  # fmt: skip
