"""Exported graphs against PyTorch: every fp32 graph, greedy generation through the runtime, quantized sizes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mode_edge.bundle import GRAPH_SUFFIX, ONNX_OPTIMIZED_AHEAD, read_bundle, read_pack_manifest, verify_files
from mode_edge.config import ExportConfig
from mode_edge.export.graphs import example_inputs, split
from mode_edge.export.pipeline import export_bundle, load_model
from mode_edge.integrity import KV_CACHE
from mode_edge.runtimes.backends import load_graph
from mode_edge.runtimes.engine import Engine, generate
from mode_edge.training.evaluate import greedy


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_every_fp32_graph_matches_its_module(fp32_bundle, composed_run, fmt):
    backbone, model, _ = load_model(composed_run, None)
    torch.manual_seed(3)
    for rel, graph in split(model, KV_CACHE[fmt]).items():
        exported = load_graph(fp32_bundle / (rel + GRAPH_SUFFIX[fmt]))
        for tokens, past in ((5, 0), (1, 7), (3, 2)):  # prefill on an empty cache, one-token decode, a chunk
            inputs = example_inputs(graph, backbone.decoder.cfg, tokens=tokens, past=past)
            with torch.no_grad():
                ref = graph(*inputs)
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = exported([t.numpy() for t in inputs])
            assert len(got) == len(ref)
            for r, g in zip(ref, got):
                assert r.shape == g.shape
                assert np.abs(r.numpy() - g).max() < 1e-4, f"{rel} ({fmt}) at T={tokens}, P={past}"


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_greedy_generation_of_32_tokens_equals_pytorch(fp32_bundle, composed_run, fmt):
    backbone, model, _ = load_model(composed_run, None)
    prompt = backbone.tokenizer.encode("def parse(text):\n    return")
    engine = Engine(fp32_bundle, backend=fmt)
    for name in ("code", "prose"):
        engine.load_expert(name)
    assert list(generate(engine, prompt, 32)) == greedy(model, prompt, 32)
    engine.unload_expert("prose")  # a subset composes without retraining: the softmax runs over the experts present
    backbone2, code_only, _ = load_model(composed_run, ["code"])
    assert list(generate(engine, prompt, 32)) == greedy(code_only, prompt, 32)


def test_manifest_lists_every_file_with_size_and_checksum(fp32_bundle):
    manifest = read_bundle(fp32_bundle)
    assert manifest["formats"] == ["onnx", "executorch"] and manifest["quantization"] == {"scheme": "fp32"}
    assert manifest["base"]["block_ranges"] == [[0, 3], [3, 6]]
    verify_files(fp32_bundle, manifest["files"], "bundle")
    assert "tokenizer.json" in manifest["files"] and "base/block1.onnx.data" in manifest["files"]
    for name in ("code", "prose"):
        pack = read_pack_manifest(fp32_bundle / "experts" / name)
        assert pack["base_fingerprint"] == manifest["base"]["fingerprint"]
        verify_files(fp32_bundle / "experts" / name, pack["files"], name)
        assert set(pack["files"]) == {"gate.safetensors"} | {
            f"block{i}{s}" for i in range(2) for s in (".onnx", ".onnx.data", ".pte")
        }
    runtime_state = (".verified.json", ".lock")  # what verifying and locking leave beside the files, not the export
    every = {str(p.relative_to(fp32_bundle)) for p in fp32_bundle.rglob("*") if p.is_file() and
             p.name not in runtime_state}  # fmt: skip
    listed = set(manifest["files"]) | {f"experts/{n}/{f}" for n in ("code", "prose")
                                       for f in read_pack_manifest(fp32_bundle / "experts" / n)["files"]}  # fmt: skip
    assert every - listed == {"manifest.json", "experts/code/pack.json", "experts/prose/pack.json"}
    verify = manifest["export"]["verify_max_abs_diff"]
    assert all(v < 1e-4 for diffs in verify.values() for v in diffs.values())


def test_expert_graphs_are_optimized_at_export_and_load_without_optimizing_again(fp32_bundle):
    import onnx
    import onnxruntime as ort

    manifest = read_bundle(fp32_bundle)
    assert not any("onnx_optimized" in c for c in manifest["components"].values())  # the base optimizes as it loads
    pack = read_pack_manifest(fp32_bundle / "experts" / "code")
    assert {c.get("onnx_optimized") for c in pack["components"].values()} == {ONNX_OPTIMIZED_AHEAD}
    graph = onnx.load(str(fp32_bundle / "experts/code/block0.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "SimplifiedLayerNormalization" in ops and "QuickGelu" in ops  # the optimizer's fusions, in the file
    engine = Engine(fp32_bundle)
    expert = engine.load_expert("code")
    level = lambda graph: graph.session.get_session_options().graph_optimization_level  # noqa: E731
    assert [level(b) for b in expert.blocks] == [ort.GraphOptimizationLevel.ORT_DISABLE_ALL] * 2
    assert level(engine.blocks[0]) == level(engine.head) == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_optimize_ahead_keeps_the_outputs_and_the_weights_file(composed_run, tmp_path, quant):
    import onnx

    from mode_edge.export.onnx_graphs import export_onnx, quantize_onnx
    from mode_edge.export.optimize_ahead import op_types, optimize_ahead

    backbone, model, _ = load_model(composed_run, ["code"])
    graph = split(model, KV_CACHE["onnx"])["experts/code/block1"]
    export_onnx(graph, backbone.decoder.cfg, tmp_path / "fp32" / "block1.onnx")
    path = tmp_path / "q" / "block1.onnx"
    if quant == "fp32":
        path = tmp_path / "fp32" / "block1.onnx"
    else:  # the experts' 4-bit / 8-bit MatMulNBits, merged q/k/v and gate/up, int8 activations
        quantize_onnx(tmp_path / "fp32" / "block1.onnx", path, quant, 16, accuracy_level=4)
    weights = path.with_name("block1.onnx.data").stat().st_size
    torch.manual_seed(0)
    cases = [[t.numpy() for t in example_inputs(graph, backbone.decoder.cfg, tokens=t, past=p)]
             for t, p in ((5, 0), (1, 7))]  # fmt: skip
    before = [load_graph(path)(inputs) for inputs in cases]
    source = onnx.load(str(path), load_external_data=False)
    assert optimize_ahead(path) is None
    assert "SimplifiedLayerNormalization" in op_types(path)  # the optimizer's fusion, in the file
    carried = {}  # no attribute its source's nodes of that op type lack (an older onnxruntime refuses them)
    for node in source.graph.node:
        carried.setdefault(node.op_type, set()).update(a.name for a in node.attribute)
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        assert node.op_type not in carried or {a.name for a in node.attribute} <= carried[node.op_type], node.op_type
    assert sorted(p.name for p in path.parent.iterdir()) == ["block1.onnx", "block1.onnx.data"]  # no leftovers
    assert path.with_name("block1.onnx.data").stat().st_size <= 1.01 * weights  # the same weights, written once
    for inputs, ref in zip(cases, before):
        got = load_graph(path, optimized_ahead=True)(inputs)
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            assert np.abs(r - g).max() <= 1e-5 * max(1.0, float(np.abs(r).max())), quant


def test_a_graph_the_optimizer_may_not_touch_is_recorded_and_verified_as_exported(composed_run, tmp_path,
                                                                                  monkeypatch, capsys):  # fmt: skip
    """Export records `onnx_optimized` for what optimize_ahead did, not for what it was offered, says why in one line
    where it declined, and verifies each graph as the runtimes will load it."""
    import mode_edge.export.optimize_ahead as ahead
    import mode_edge.runtimes.backends as backends

    real_optimize, real_load = ahead.optimize_ahead, backends.load_graph
    verified = {}

    def optimize(path):
        return "declined in this test" if path.name == "block1.onnx" else real_optimize(path)

    def load(path, threads=None, optimized_ahead=False):
        verified[str(path)] = optimized_ahead
        return real_load(path, threads, optimized_ahead)

    monkeypatch.setattr(ahead, "optimize_ahead", optimize)
    monkeypatch.setattr(backends, "load_graph", load)
    out = tmp_path / "b"
    export_bundle(composed_run, out, ExportConfig(formats=("onnx",), quant="fp32", experts=["code"]))
    said = capsys.readouterr()
    line = "experts/code/block1 is written as exported, not optimized for onnxruntime: declined in this test"
    assert line in " ".join((said.out + said.err).split())
    pack = read_pack_manifest(out / "experts" / "code")
    assert {n: c.get("onnx_optimized") for n, c in pack["components"].items()} == {"block0": ONNX_OPTIMIZED_AHEAD,
                                                                                  "block1": None}  # fmt: skip
    flags = {Path(p).parent.name + "/" + Path(p).name: v for p, v in verified.items()}
    assert flags["code/block0.onnx"] is True and flags["code/block1.onnx"] is False
    assert flags["base/block0.onnx"] is False
    engine = Engine(out)
    assert len(list(generate(engine, [1, 2, 3], 4))) == 4  # the declined graph loads as any exported one


def test_attributes_written_at_their_defaults_are_dropped_and_others_refused():
    from onnx import helper

    from mode_edge.export.optimize_ahead import drop_written_defaults

    def model(**attributes):
        node = helper.make_node("Split", ["x"], ["a", "b"], **attributes)
        return helper.make_model(helper.make_graph([node], "g", *graph_io(8)))

    source, written = model(), model(axis=0)  # Split's axis defaults to 0
    assert drop_written_defaults(written, source) is None
    assert [a.name for a in written.graph.node[0].attribute] == []
    refused = drop_written_defaults(model(axis=1), source)
    assert refused == "the optimizer set Split's axis, which the exported graph leaves out"
    kept = model(axis=1)  # an attribute the source carries stays, whatever its value
    assert drop_written_defaults(kept, model(axis=1)) is None and kept.graph.node[0].attribute[0].i == 1


def graph_io(width: int) -> tuple[list, list]:
    """The input x and output y (1, width) float of a hand-made test graph."""
    from onnx import TensorProto, helper

    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])])  # fmt: skip


def test_optimize_ahead_leaves_a_graph_whose_weights_would_grow(tmp_path):
    """An fp16 table behind a Cast (an 8-bit layer's scales under --quant mixed) would be folded into fp32, twice its
    bytes: the graph stays as exported, byte for byte. A graph without a weights file stays too, and one where the
    optimizer would add an op outside AHEAD_FUSIONS."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mode_edge.export.onnx_graphs import save_external
    from mode_edge.export.optimize_ahead import optimize_ahead

    table = numpy_helper.from_array(np.random.default_rng(0).random((64, 64)).astype(np.float16), "table")
    nodes = [helper.make_node("Cast", ["table"], ["table32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "table32"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", *graph_io(64), [table])
    path = tmp_path / "grows" / "g.onnx"
    path.parent.mkdir()
    save_external(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    files = {f.name: f.read_bytes() for f in path.parent.iterdir()}
    assert set(files) == {"g.onnx", "g.onnx.data"}
    assert optimize_ahead(path) == "the optimizer would grow its weights by 100%"
    assert {f.name: f.read_bytes() for f in path.parent.iterdir()} == files
    small = tmp_path / "small" / "g.onnx"  # every weight under 1 KB: no weights file
    small.parent.mkdir()
    table = numpy_helper.from_array(np.ones((8, 8), np.float32), "table32")
    graph = helper.make_graph(nodes[1:], "g", *graph_io(8), [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(small))
    assert optimize_ahead(small) == "it has no weights file"
    assert [f.name for f in small.parent.iterdir()] == ["g.onnx"]
    other = tmp_path / "gemm" / "g.onnx"  # a fusion outside AHEAD_FUSIONS (MatMul + Add -> Gemm) is left as well
    other.parent.mkdir()
    weights = [numpy_helper.from_array(np.ones((64, 64), np.float32), "w"),
               numpy_helper.from_array(np.ones(64, np.float32), "b")]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", *graph_io(64), weights)
    save_external(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), other)
    files = {f.name: f.read_bytes() for f in other.parent.iterdir()}
    assert optimize_ahead(other) == "the optimizer would write Gemm in a form the exported graph lacks"
    assert {f.name: f.read_bytes() for f in other.parent.iterdir()} == files


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_onnx_quantization_shrinks_the_weights_and_stays_close(composed_run, fp32_bundle, tmp_path, quant):
    out = tmp_path / quant
    manifest = export_bundle(composed_run, out, ExportConfig(formats=("onnx",), quant=quant, block_size=16))
    fp32 = read_bundle(fp32_bundle)
    for rel in ("base/block0.onnx.data", "base/block1.onnx.data"):
        assert manifest["files"][rel]["bytes"] < 0.5 * fp32["files"][rel]["bytes"], rel
    diffs = manifest["export"]["verify_max_abs_diff"]
    assert all(d["onnx-fp32"] < 1e-4 for d in diffs.values())  # the fp32 graph before quantization was exact
    assert all(d["onnx"] < 0.5 for d in diffs.values()), diffs  # quantized: close, not exact
    engine = Engine(out)
    engine.load_expert("code")
    assert len(list(generate(engine, [1, 2, 3], 4))) == 4


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_executorch_quantized_expert_block_runs_close_to_fp32(composed_run, fp32_bundle, tmp_path, quant):
    from mode_edge.export.executorch_graphs import export_pte

    backbone, model, _ = load_model(composed_run, ["code"])
    graph = split(model, "concat")["experts/code/block0"]
    assert export_pte(graph, backbone.decoder.cfg, tmp_path / "b.pte", quant, 32, context=256) > 0  # planned bytes
    inputs = example_inputs(graph, backbone.decoder.cfg)
    with torch.no_grad():
        ref = graph(*inputs)
    got = load_graph(tmp_path / "b.pte")([t.numpy() for t in inputs])
    scale = float(ref[0].abs().max())
    assert np.abs(ref[0].numpy() - got[0]).max() < 0.1 * scale
    assert np.abs(ref[0].numpy() - got[0]).max() > 0  # it was quantized
    assert (tmp_path / "b.pte").stat().st_size < 0.5 * (fp32_bundle / "experts/code/block0.pte").stat().st_size


def test_export_refuses_a_baseline_run_and_an_existing_bundle(composed_run, fp32_bundle, tmp_path):
    from mode_edge.errors import UserError

    with pytest.raises(UserError, match="already exists"):
        export_bundle(composed_run, fp32_bundle, ExportConfig(quant="fp32"))
    record = json.loads((composed_run / "model.json").read_text())
    baseline = tmp_path / "lora"
    baseline.mkdir()
    (baseline / "model.json").write_text(json.dumps({**record, "kind": "lora", "layout": None}))
    with pytest.raises(UserError, match="baseline run"):
        export_bundle(baseline, tmp_path / "out", ExportConfig(quant="fp32"))
    assert not (tmp_path / "out").exists()


def test_pte_graphs_take_bounded_chunks_and_the_runtime_feeds_them(fp32_bundle):
    """ExecuTorch plans activation memory for the largest shapes a program takes: the .pte graphs take at most
    tokens_per_call tokens a call (the head plans one chunk's logits, not a whole context's), and the runtime feeds
    a longer prompt in chunks, with the same logits and routing inputs as the ONNX graphs in one call."""
    manifest = read_bundle(fp32_bundle)
    decoder = manifest["base"]["decoder"]
    limits = manifest["executorch"]
    assert limits == {"tokens_per_call": 64, "context": min(2048, decoder["max_seq_len"])}
    planned = manifest["export"]["pte_planned_bytes"]
    assert 0 < planned["base/head"] <= 4 * 64 * decoder["vocab_size"] * 4
    ids = np.random.default_rng(0).integers(0, decoder["vocab_size"], (1, 150)).astype(np.int64)
    onnx, pte = Engine(fp32_bundle, backend="onnx"), Engine(fp32_bundle, backend="executorch")
    assert onnx.tokens_per_call is None and pte.tokens_per_call == 64 and pte.context == limits["context"]
    want, got = onnx.forward(ids, onnx.new_cache()), pte.forward(ids, pte.new_cache())
    assert got.shape == want.shape == (1, 150, decoder["vocab_size"])
    assert np.abs(got - want).max() < 1e-3
    for a, b in zip(onnx.block_inputs(ids), pte.block_inputs(ids)):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-3


def test_executorch_quantized_embed_graph_holds_the_8bit_blocks(composed_run, fp32_bundle, tmp_path):
    """The .pte embed graph at int8 / int4 gathers the same 8-bit blocks of 32 as the ONNX bundle's embedding."""
    from mode_edge.export.executorch_graphs import export_pte
    from mode_edge.export.source_blocks import int8_blocks

    backbone, model, _ = load_model(composed_run, None)
    graph = split(model, "concat")["base/embed"]
    export_pte(graph, backbone.decoder.cfg, tmp_path / "embed.pte", "int4", 32, context=256)
    ids = torch.randint(0, backbone.decoder.cfg.vocab_size, (1, 7))
    got = load_graph(tmp_path / "embed.pte")([ids.numpy()])[0]
    table = int8_blocks(graph.embed_tokens.weight.detach().numpy()).dequantize()
    np.testing.assert_allclose(got[0], table[ids[0].numpy()], rtol=0, atol=1e-6)
    assert (tmp_path / "embed.pte").stat().st_size < 0.5 * (fp32_bundle / "base/embed.pte").stat().st_size


def test_executorch_quantized_tied_head_is_8bit_and_close(composed_run, fp32_bundle, tmp_path):
    """A tied head is an F.linear on the embedding, which torchao's quantize_ does not see: the .pte head gets a
    Linear of its own at 8 bits (in an int4 bundle too), so it shrinks to about a quarter and stays close."""
    from mode_edge.export.executorch_graphs import export_pte

    backbone, model, _ = load_model(composed_run, None)
    graph = split(model, "concat")["base/head"]
    export_pte(graph, backbone.decoder.cfg, tmp_path / "head.pte", "int4", 32, context=256)
    (hidden,) = example_inputs(graph, backbone.decoder.cfg)
    with torch.no_grad():
        ref = graph(hidden).numpy()
    got = load_graph(tmp_path / "head.pte")([hidden.numpy()])[0]
    assert 0 < np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (tmp_path / "head.pte").stat().st_size < 0.5 * (fp32_bundle / "base/head.pte").stat().st_size
