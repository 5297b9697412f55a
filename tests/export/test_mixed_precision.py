"""--quant mixed: int4 with llama.cpp's Q4_K_M layers' value and down projections at 8 bits."""

import json

import numpy as np
import torch

from mode_edge.export.mixed_precision import use_more_bits
from mode_edge.export.pipeline import load_model
from mode_edge.runtimes.engine import Engine
from tests.cli_runner import invoke, refused


def test_the_layers_that_get_more_bits_follow_llama_cpp():
    """llama.cpp's use_more_bits: the first and last eighth and every third layer between (integer eighths)."""
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29,
                                                               30, 31]  # fmt: skip
    assert [i for i in range(6) if use_more_bits(i, 6)] == [2, 5]  # the tiny backbone
    assert [i for i in range(4) if use_more_bits(i, 4)] == [2, 3]  # an expert of 2 blocks x 2 layers


def base_logits_error(bundle, model, ids: np.ndarray) -> float:
    """Relative error of the bundle's base-only logits against the PyTorch backbone's on ids (1, T)."""
    engine = Engine(bundle)
    got = engine.forward(ids, engine.new_cache(ids.shape[1]))[0]
    with torch.no_grad():
        want = model.backbone(torch.from_numpy(ids))[0].numpy()
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_export_quant_mixed_writes_the_rule_s_layers_at_8_bits_and_errs_less_than_int4(composed_run, tmp_path):
    for quant in ("int4", "mixed"):  # round to nearest: the same rounding for both but the 8-bit layers
        invoke("export", "--model", composed_run, "--out", tmp_path / quant, "--quant", quant, "--quant-method", "rtn")
    manifest = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == "mixed"
    # the tiny backbone's 6 layers in 2 blocks: layers 2 and 5, one per block; each expert's 4 layers: 2 and 3,
    # both in its second block; 2 projections (value, down) a layer
    expected = {"base/embed": 0, "base/head": 0, "base/block0": 2, "base/block1": 2,
                "experts/code/block0": 0, "experts/code/block1": 4, "experts/prose/block0": 0,
                "experts/prose/block1": 4}  # fmt: skip
    sources = manifest["export"]["block_sources"]
    assert {rel: sources.get(rel, {}).get("mixed8", 0) for rel in expected} == expected
    assert set(sources) <= set(expected)
    int4 = json.loads((tmp_path / "int4" / "manifest.json").read_text())
    assert all(c.get("mixed8", 0) == 0 for c in int4["export"]["block_sources"].values())
    assert manifest["experts"]["code"]["bytes"] > int4["experts"]["code"]["bytes"]  # the 8-bit layers' price

    _, model, _ = load_model(composed_run, None)
    ids = np.random.default_rng(0).integers(0, 257, (1, 48), dtype=np.int64)
    mixed_error = base_logits_error(tmp_path / "mixed", model, ids)
    int4_error = base_logits_error(tmp_path / "int4", model, ids)
    assert mixed_error < 0.95 * int4_error, (mixed_error, int4_error)  # measured: 0.200 against 0.233
    invoke("run", "--bundle", tmp_path / "mixed", "--experts", "code", "--prompt", "def f(", "--max-new-tokens", "4")
    refused("run", "--bundle", tmp_path / "mixed", "--backend", "executorch", "--prompt", "x",
            message="--quant int4 or int8 and --format executorch (mixed: ONNX)")  # fmt: skip
    # a mixed pack fits an int4 bundle of the same base (its 8-bit layers are its graphs' own)
    invoke("pack", "--bundle", tmp_path / "mixed", "--expert", "code", "--out", tmp_path / "code.modepack")
    invoke("install", "--bundle", tmp_path / "int4", "--replace", tmp_path / "code.modepack")
    invoke("run", "--bundle", tmp_path / "int4", "--experts", "code", "--prompt", "def f(", "--max-new-tokens", "4")
    described = json.loads(invoke("inspect", tmp_path / "int4", "--json").output)  # which packs are mixed: shown
    assert described["experts"]["code"]["scheme"] == "mixed" and described["experts"]["prose"]["scheme"] == "int4"
    assert "experts/code/block1 (mixed)" in invoke("inspect", tmp_path / "int4").output


def test_quant_mixed_refusals_executorch_kquant_and_a_file_for_out(composed_run, tmp_path):
    refused("export", "--model", composed_run, "--out", tmp_path / "pte", "--quant", "mixed", "--format",
            "onnx,executorch", message=("--quant mixed", "--format onnx"))  # fmt: skip
    assert not (tmp_path / "pte").exists()
    refused("export", "--model", composed_run, "--out", tmp_path / "kq", "--quant", "mixed", "--quant-method",
            "kquant", message=("k-quant", "--quant-method gptq or rtn"))  # fmt: skip
    refused("export", "--model", composed_run, "--out", tmp_path / "kq", "--quant", "int4", "--format", "executorch",
            "--quant-method", "kquant", message=("k-quant search, for ONNX bundles", "gptq or rtn"))  # fmt: skip
    (tmp_path / "file").write_text("not a bundle")
    refused("export", "--model", composed_run, "--out", tmp_path / "file", "--quant", "mixed", "--overwrite",
            message="is a file; a bundle is a folder")  # fmt: skip
    assert (tmp_path / "file").read_text() == "not a bundle" and not (tmp_path / "kq").exists()
    refused("export", "--model", composed_run / "model.json", "--out", tmp_path / "m", message="is a file; a run is")


def test_mixed_at_accuracy_level_0_merges_8_and_4_bit_projections_into_a_graph_that_loads(composed_run, tmp_path):
    """At level 0 the 8-bit value projection is written as nibbles (flat scales, 4-bit, 3 inputs) and onnxruntime's
    quantizer writes q/k with 2-D scales: the merge of the three must still make a graph onnxruntime loads, and the
    bundle must match the PyTorch model as closely as at level 4."""
    out = tmp_path / "mixed0"
    invoke("export", "--model", composed_run, "--out", out, "--quant", "mixed", "--quant-method", "rtn",
           "--accuracy-level", "0")  # fmt: skip
    _, model, _ = load_model(composed_run, None)
    ids = np.random.default_rng(0).integers(0, 257, (1, 48), dtype=np.int64)
    assert base_logits_error(out, model, ids) < 0.22  # level 4's mixed bundle: 0.200, int4: 0.233
