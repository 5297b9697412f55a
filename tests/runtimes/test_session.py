"""The device runtime: no torch, expert selection within a memory budget, LRU eviction, routing, steady memory."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mode_edge.errors import UserError
from mode_edge.packs import install_copy
from mode_edge.runtimes.profiler import rss_pss
from mode_edge.runtimes.session import MB, Session


def test_the_runtime_generates_without_importing_torch_or_transformers(int8_bundle):
    script = f"""
import json, sys
from mode_edge.runtimes.engine import Sampling
from mode_edge.runtimes.run import run
text, summary, _ = run({str(int8_bundle)!r}, "auto", "def f(x):", 12, Sampling(temperature=0.8, top_k=20, seed=1))
print(json.dumps({{"heavy": [m for m in ("torch", "transformers") if m in sys.modules],
                  "experts": summary["experts"], "tokens": summary["new_tokens"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["tokens"] == 12 and len(out["experts"]) == 1


def test_lru_eviction_within_the_budget(bundle):
    for i in range(3):
        install_copy(bundle, "code", f"copy{i}")
    probe = Session(bundle)
    base, one = probe.base_bytes, probe.expert_bytes("code")
    session = Session(bundle, budget_mb=(base + 2.5 * one) / MB)  # room for two experts
    assert session.select(["code", "copy0"]) == []
    assert session.select(["copy1"]) == ["code"]  # the least recently used goes first
    assert session.loaded == ["copy0", "copy1"]
    assert session.plan(["copy0", "copy2"]) == (["copy2"], ["copy1"])  # what would load and be evicted
    assert session.select(["copy0", "copy2"]) == ["copy1"]
    assert sorted(session.engine.experts) == ["copy0", "copy2"]  # evicted graphs are released
    with pytest.raises(UserError, match="exceed the memory budget"):
        session.select(["code", "copy0", "copy1"])
    with pytest.raises(UserError, match="the base alone needs"):
        Session(bundle, budget_mb=base / MB / 2)
    with pytest.raises(UserError, match="not installed"):
        session.select(["law"])


def test_only_the_selected_experts_run_and_switching_needs_no_base_reload(bundle):
    session = Session(bundle)
    base_graphs = [id(g) for g in session.engine.blocks]
    a = list(session.generate([3, 4, 5, 6], ["code"], 8))
    b = list(session.generate([3, 4, 5, 6], ["prose"], 8))
    c = list(session.generate([3, 4, 5, 6], ["code"], 8))
    assert a == c and session.engine.active == ["code"]
    assert [id(g) for g in session.engine.blocks] == base_graphs
    none = list(session.generate([3, 4, 5, 6], "none", 8))
    assert len(none) == 8 and len(b) == 8


def test_routing_scores_are_the_gate_rows_on_the_backbone_block_inputs(bundle, composed_run):
    from mode_edge.export.pipeline import load_model

    backbone, model, _ = load_model(composed_run, None)
    prompt = backbone.tokenizer.encode("import os\nfor name in os.listdir('.'):")
    session = Session(bundle)
    chosen = session.route(prompt, top_k=1)
    with torch.no_grad():
        h = backbone.decoder.embed_tokens(torch.tensor([prompt]))
        expected = {n: [] for n in model.experts}
        for block in model.blocks:
            for name, expert in block.experts.items():
                expected[name].append(expert.gate(h))
            for layer, name in zip(block.backbone, block.backbone_names):
                h = layer(h, backbone.decoder.rope, None, name)
    for name, logits in expected.items():
        assert session.last_scores[name] == pytest.approx(float(torch.stack(logits).mean()), abs=2e-3)
    assert chosen == [max(session.last_scores, key=session.last_scores.get)]


def test_a_thousand_alternating_switches_do_not_grow_memory(bundle):
    session = Session(bundle, budget_mb=(Session(bundle).base_bytes + 1.5 * Session(bundle).expert_bytes("code")) / MB)
    prompt = [7, 8, 9]

    def switch(n):
        for i in range(n):
            session.select(["code" if i % 2 else "prose"])
            session.engine.forward(np.array([prompt], dtype=np.int64), session.engine.new_cache())

    switch(100)  # warm: allocator pools and caches reach their steady size
    before = rss_pss()[0]
    switch(900)
    grown = (rss_pss()[0] - before) / MB
    assert grown < 8, f"RSS grew by {grown:.1f} MB over 900 expert switches"
    assert len(session.loaded) == 1


def test_a_session_keeps_running_while_its_pack_is_replaced_or_removed_and_picks_it_up_at_refresh(bundle, tmp_path):
    """The loaded expert's graphs stay in memory when its files are replaced or deleted; `refresh` evicts an expert
    whose installed pack changed or went away, so the next select loads what is installed now."""
    from mode_edge.bundle import read_bundle
    from mode_edge.packs import install, make_pack, uninstall
    from mode_edge.runtimes.engine import generate
    from tests.damage import repack

    make_pack(bundle, "code", tmp_path / "code.modepack")
    repack(tmp_path / "code.modepack", tmp_path / "code-v2.modepack", version=2)
    session = Session(bundle)
    session.select(["code"])
    before = list(generate(session.engine, [5, 6, 7, 8], 6))

    install(bundle, tmp_path / "code-v2.modepack", replace=True)  # the old folder is gone from disk
    assert list(generate(session.engine, [5, 6, 7, 8], 6)) == before  # still running on what it loaded
    assert session.engine.experts["code"].pack["version"] == 1
    session.refresh()
    assert "code" not in session.loaded  # the installed pack changed: evicted, loaded anew on demand
    session.select(["code"])
    assert session.engine.experts["code"].pack["version"] == 2
    assert list(generate(session.engine, [5, 6, 7, 8], 6)) == before  # same weights, new manifest

    uninstall(bundle, "code")
    assert list(generate(session.engine, [5, 6, 7, 8], 6)) == before
    session.refresh()
    assert "code" not in session.loaded and "code" not in read_bundle(bundle)["experts"]
    with pytest.raises(UserError, match="not installed"):
        session.select(["code"])
