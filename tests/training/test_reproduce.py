"""`reproduce` end to end on the tiny backbone with real (small) corpora; the table and plot writers run on the
real outputs of those runs."""

import csv
import json

import pytest

from mode_edge.training.reproduce import PRESETS, reproduce, rows


@pytest.mark.slow
def test_reproduce_writes_table_and_plots_and_resumes(tiny, tmp_path):
    out = tmp_path / "repro"
    results = reproduce(tiny, out, "tiny", sweep=True)
    names = [r.name for r in rows(sweep=True)]
    assert [r["row"] for r in results] == names
    budget = PRESETS["tiny"].budget_steps * PRESETS["tiny"].batch_size * PRESETS["tiny"].seq_len
    by_name = {r["row"]: r for r in results}
    assert by_name["backbone"]["trainable_params"] == 0
    for name in ("full-ft", "lora-r16", "mode-2x", "mode-2x-frozen", "mode-2x-so"):
        assert by_name[name]["tokens"] == budget, name  # the same token budget for every method
    routed = by_name["routed-so"]
    assert routed["trainable_params"] == by_name["mode-2x-so"]["trainable_params"]  # the same two experts, routed
    for d in ("code", "math", "math-prose", "english", "general"):
        s = routed["scores"][d]
        assert sum(s["routes"].values()) * 256 == s["tokens"]  # every held-out window of 256 tokens routed once
        assert s["accuracy_ci"][0] <= round(s["accuracy"], 2) <= s["accuracy_ci"][1]  # intervals are rounded
    assert by_name["lora-r8"]["trainable_params"] < by_name["lora-r64"]["trainable_params"]
    assert by_name["mode-2x-1layers"]["trainable_params"] < by_name["mode-2x"]["trainable_params"]
    assert by_name["mode-2x"]["total_params"] > by_name["backbone"]["total_params"]

    table = list(csv.reader(open(out / "table.csv")))
    assert table[0][:8] == ["method", "total params", "trainable params", "code", "math", "math-prose", "english",
                            "general"]  # fmt: skip
    assert len(table) == len(names) + 1
    md = (out / "table.md").read_text()
    assert f"{budget:,} training tokens" in md and "| mode-2x |" in md
    assert "| mode-math-so | " in md.split("Change against the backbone")[1]  # the off-domain cost table
    for plot in ("accuracy", "loss", "scaling"):
        png = (out / "plots" / f"{plot}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    cached = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.eval.json")}
    assert len(cached) == len(names)
    again = reproduce(tiny, out, "tiny", sweep=False)  # a rerun skips finished rows
    assert {p: p.stat().st_mtime_ns for p in cached} == cached
    assert [r["row"] for r in again] == [r.name for r in rows(sweep=False)]
    assert json.loads((out / "runs/mode-2x.eval.json").read_text())["scores"] == by_name["mode-2x"]["scores"]
