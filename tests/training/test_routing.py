"""Prompt routing that can answer "none", on toy domains whose answer is known: the centroid router's statistics
fitted at the end of stage 1, carried into packs, merged by installing, and read by a fresh device Session."""

import json

import pytest
from safetensors.numpy import load_file

from mode_edge.config import ExportConfig
from mode_edge.packs import install, make_pack, uninstall
from mode_edge.runtimes.routing import NONE, ROUTER_KEYS
from mode_edge.runtimes.session import Session
from mode_edge.training.data import load_corpus
from mode_edge.training.eval_routing import routing_for_run, windows
from tests.cli_runner import invoke, refused


def test_centroid_router_answers_none_for_general_text_and_the_expert_for_its_domain(tiny, toy_domains, routed):
    corpora = [load_corpus(toy_domains[d]) for d in ("hex", "digits", "general")]
    result = routing_for_run(tiny, routed / "both", None, corpora, n_prompts=8)
    assert result["prompts"] == {"hex": 8, "digits": 8, "general": 8}
    centroid = result["routers"]["centroid"]
    # on the tiny random backbone a prose chunk about string escapes can look like hex: one miss of 24 is allowed
    assert centroid[256]["accuracy"] >= 95.0, centroid[256]["confusion"]
    assert centroid[64]["accuracy"] >= 90.0, centroid[64]["confusion"]
    assert centroid[256]["confusion"]["general"][NONE] >= 7
    assert result["routers"]["gate"][256]["confusion"]["general"][NONE] == 0  # the gate router cannot say "none"
    scores = result["scores"]
    assert scores["general"]["expected"] == NONE and scores["hex"]["expected"] == "hex"
    for d in ("hex", "digits"):  # routing right on these: the routed model is the oracle choice
        assert scores[d]["routed"]["centroid"][256]["accuracy"] == scores[d]["oracle"]["accuracy"]
    assert scores["general"]["oracle"]["accuracy"] == scores["general"]["backbone"]["accuracy"]


def test_eval_routing_through_the_cli(toy_domains, routed, tmp_path):
    data = ",".join(str(toy_domains[d]) for d in ("hex", "digits", "general"))
    out = tmp_path / "routing.json"
    result = invoke("eval", "--routing", "--model", routed / "both", "--data", data, "--prompts", 4, "--json", out)
    assert "routing accuracy" in result.output and "centroid router, 64-token prompts" in result.output
    report = json.loads(out.read_text())["routing"]
    assert report["experts"] == ["hex", "digits"]
    for by_length in report["routers"].values():
        for res in by_length.values():
            assert {d: sum(row.values()) for d, row in res["confusion"].items()} == report["prompts"]
    apart = tmp_path / "apart.json"  # experts trained apart, routed without a composition: the same choices
    invoke("eval", "--routing", "--model", f"{routed / 'hex'},{routed / 'digits'}", "--data", data, "--prompts", 4,
           "--json", apart)  # fmt: skip
    assert json.loads(apart.read_text())["routing"]["routers"]["centroid"] == report["routers"]["centroid"]


def test_router_travels_in_packs_and_a_pack_trained_alone_claims_only_its_domain(tiny, toy_domains, routed, tmp_path):
    from mode_edge.export.pipeline import export_bundle

    bundle, alone = tmp_path / "bundle", tmp_path / "alone"
    export_bundle(routed / "both", bundle, ExportConfig(formats=("onnx",), quant="int8"))
    export_bundle(routed / "records", alone, ExportConfig(formats=("onnx",), quant="int8"))
    gate = load_file(str(bundle / "experts" / "hex" / "gate.safetensors"))
    assert all(k in gate for k in ROUTER_KEYS) and gate["router_mean"].shape == (2, tiny.decoder.cfg.dim)
    make_pack(alone, "records", tmp_path / "records.modepack")
    install(bundle, tmp_path / "records.modepack")  # trained alone, installed later: nothing retrained

    prompts = {d: windows(load_corpus(toy_domains[d]), tiny.tokenizer, 6).tolist()  # 320-token prompts
               for d in ("hex", "digits", "records", "general")}  # fmt: skip
    expected = {"hex": ["hex"], "digits": ["digits"], "records": ["records"], "general": []}

    def choices(session):
        return {d: [session.route(p) for p in ps] for d, ps in prompts.items()}

    session = Session(bundle)
    assert choices(session) == {d: [expected[d]] * 6 for d in prompts}
    uninstall(bundle, "records")
    session.refresh()
    assert all(c != ["records"] for c in choices(session)["records"])
    install(bundle, tmp_path / "records.modepack")
    assert choices(Session(bundle)) == {d: [expected[d]] * 6 for d in prompts}  # a fresh session reads the packs


def test_packs_without_a_router_are_named_once_and_fall_back_to_gate_rows(int8_bundle, tiny):
    """The shared bundle's experts were trained without --general: no router inside their packs."""
    warnings = []
    session = Session(int8_bundle, warn=warnings.append)
    prompt = tiny.tokenizer.encode("def f(x):\n    return x\n")
    for _ in range(3):
        assert session.route(prompt, router="centroid") == session.route(prompt, router="gate")  # the fallback
    session.route(prompt, router="logistic")
    assert session.last_router == "gate"  # what the run summary names: the router that chose
    assert len(warnings) == 1 and "experts code, prose carry no router" in warnings[0]
    assert "falls back to gate rows" in warnings[0]


def test_eval_routing_on_a_bundle_matches_the_run(toy_domains, routed, tmp_path):
    """The device runtime's fp32 graphs route and score as the PyTorch model does."""
    from mode_edge.export.pipeline import export_bundle

    export_bundle(routed / "both", tmp_path / "fp32", ExportConfig(formats=("onnx",), quant="fp32"))
    data = ",".join(str(toy_domains[d]) for d in ("hex", "digits", "general"))
    on_run, on_bundle = tmp_path / "run.json", tmp_path / "bundle.json"
    invoke("eval", "--routing", "--model", routed / "both", "--data", data, "--prompts", 3, "--json", on_run)
    invoke("eval", "--routing", "--bundle", tmp_path / "fp32", "--data", data, "--prompts", 3, "--json", on_bundle)
    run, bundle = (json.loads(p.read_text())["routing"] for p in (on_run, on_bundle))
    assert bundle["routers"] == run["routers"]
    for d, s in run["scores"].items():
        for key in ("backbone", "oracle", "composed"):
            assert bundle["scores"][d][key]["accuracy"] == pytest.approx(s[key]["accuracy"], abs=2.0)


def test_eval_routing_on_a_bundle_of_a_shorter_context_is_one_line(toy_domains, routed, tmp_path):
    """Routing's prompts and continuations take 320 positions: a bundle exported for fewer is refused, naming the
    fix, before any prompt runs (it failed in the runtime, blaming a prompt the user never gave)."""
    from mode_edge.export.pipeline import export_bundle

    export_bundle(routed / "both", tmp_path / "short", ExportConfig(formats=("onnx",), quant="fp32", context=128))
    data = ",".join(str(toy_domains[d]) for d in ("hex", "general"))
    refused("eval", "--routing", "--bundle", tmp_path / "short", "--data", data, "--prompts", 3,
            message=("320 tokens, past this model's context of 128", "re-export it with --context 320"))  # fmt: skip
