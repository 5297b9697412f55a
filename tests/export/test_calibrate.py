"""GPTQ (export/calibrate.py): the blocks it writes are what onnxruntime computes, it beats round-to-nearest on
held-out inputs, and `export --quant-method gptq` writes every expert layer from it."""

import dataclasses
import json
import shutil

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from mode_edge.config import ExportConfig
from mode_edge.export.calibrate import (
    CalibratedBlocks,
    calibrate,
    calibration_windows,
    composed_block_inputs,
    gptq_blocks,
)
from mode_edge.export.graphs import io_names, prefill_inputs, split
from mode_edge.export.onnx_graphs import export_onnx, quantize_onnx
from mode_edge.export.pipeline import calibration_texts, load_model
from mode_edge.export.source_blocks import weight_key, write_source_blocks
from tests.cli_runner import invoke, refused


def rtn_asym(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest on the same grid GPTQ uses (x = d * q + m per group of 32): the baseline to beat."""
    g = w.reshape(len(w), -1, 32)
    lo = g.min(-1, keepdim=True).values
    d = (g.max(-1, keepdim=True).values - lo) / 15
    return (torch.clamp(torch.round((g - lo) / d), 0, 15) * d + lo).reshape(w.shape)


def rel_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    ref = x @ w.T
    return float(((x @ wq.T - ref).pow(2).mean() / ref.pow(2).mean()).sqrt())


def test_gptq_beats_round_to_nearest_on_held_out_inputs_with_correlated_features():
    """Real inputs have correlated features (that is what GPTQ exploits): held-out rows from the same distribution."""
    g = torch.Generator().manual_seed(0)
    n, k = 96, 192
    mix = torch.randn(k, k, generator=g) / k**0.5 + 0.3 * torch.eye(k)
    w = torch.randn(n, k, generator=g) * 0.05
    calib, held = torch.randn(2048, k, generator=g) @ mix, torch.randn(1024, k, generator=g) @ mix
    hessian = 2 * calib.double().T @ calib.double() / len(calib)
    gptq = torch.tensor(gptq_blocks(w, hessian).dequantize())
    assert rel_err(held, w, gptq) < 0.85 * rel_err(held, w, rtn_asym(w))
    # each group's codes span its grid: 4-bit values, and the weight never leaves the group's range by much
    assert torch.abs(gptq - w).max() < 0.1


def matmul_session(w: torch.Tensor, blocks) -> ort.InferenceSession:
    """x (T, K) @ w.T as one ONNX MatMul, written from `blocks`."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 40])],
        [numpy_helper.from_array(w.T.numpy().copy(), "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert write_source_blocks(model, CalibratedBlocks({weight_key(w.numpy()): blocks})) == {"gptq": 1}
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_gptq_blocks_run_in_onnxruntime_as_dequantized_and_at_their_accuracy_level():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 64, generator=g)
    x = torch.randn(64, 64, generator=g)
    blocks = gptq_blocks(w, 2 * x.double().T @ x.double() / 64)
    assert blocks.zero_points.dtype == np.uint8 and blocks.accuracy_level == 0
    exact = matmul_session(w, blocks).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(exact, x.numpy() @ blocks.dequantize().T, rtol=1e-5, atol=1e-5)
    # integer zero points let onnxruntime multiply in int8 at level 4 (with float ones it silently stays in fp32)
    fast = matmul_session(w, dataclasses.replace(blocks, accuracy_level=4)).run(None, {"x": x.numpy()})[0]
    assert not np.array_equal(fast, exact) and np.abs(fast - exact).max() < 0.05 * np.abs(exact).max()


def expert_graph_error(graph_path, fs, refs) -> float:
    s = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    errs = [np.sqrt(((s.run(None, f)[0] - r) ** 2).mean() / ((r - f["hidden"]) ** 2).mean()) for f, r in zip(fs, refs)]
    return float(np.mean(errs))


def test_calibration_windows_fit_the_context():
    """GPTQ's 4,096 calibration tokens in windows no longer than the model's context (`export --context 64`)."""
    from mode_edge.export.calibrate import CALIBRATION_WINDOWS, calibration_shape

    assert calibration_shape(8192) == calibration_shape(256) == CALIBRATION_WINDOWS == (16, 256)
    assert calibration_shape(64) == (64, 64) and calibration_shape(100) == (41, 100)


def test_calibrated_expert_graph_beats_round_to_nearest_on_held_out_text(composed_run, code_data, tmp_path):
    """The tiny composed model: an expert block calibrated on the train split of its text, held against the fp32
    graph on the test split, changes the expert's output less than symmetric round-to-nearest (the default)."""
    from mode_edge.training.data import held_out, load_corpus

    backbone, model, record = load_model(composed_run, None)
    cfg, graphs = backbone.decoder.cfg, split(model, "buffer")
    assert calibration_texts(composed_run, record, ExportConfig())["code"] == code_data
    texts = {"code": calibration_windows(code_data, backbone.tokenizer, 16, 64)}
    calibrated = calibrate(model, texts, accuracy_level=0)
    test = held_out(load_corpus(code_data).docs["test"], backbone.tokenizer, 64, 8 * 64).windows[:, :64]
    rel = "experts/code/block1"
    names = io_names(graphs[rel])[0]
    fs = [{n: t.numpy() for n, t in zip(names, prefill_inputs(graphs[rel], h[None]))}
          for h in composed_block_inputs(model, test)[1]]
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(graphs[rel], cfg, fp32)
    refs = [ort.InferenceSession(str(fp32)).run(None, f)[0] for f in fs]
    assert quantize_onnx(fp32, tmp_path / "gptq.onnx", "int4", 32, 0, calibrated)[0] == {"gptq": 14}  # 2 layers x 7
    quantize_onnx(fp32, tmp_path / "rtn.onnx", "int4", 32, 0)
    gptq = expert_graph_error(tmp_path / "gptq.onnx", fs, refs)
    rtn = expert_graph_error(tmp_path / "rtn.onnx", fs, refs)
    assert gptq < 0.9 * rtn, (gptq, rtn)

    # the .pte expert block over the same GPTQ blocks (XNNPACK's 4-bit codes, the zero points as block offsets)
    from mode_edge.export.executorch_graphs import export_pte
    from mode_edge.runtimes.backends import load_graph

    pte_graph = split(model, "concat")[rel]
    inputs = [prefill_inputs(pte_graph, h[None]) for h in composed_block_inputs(model, test)[1]]
    with torch.no_grad():
        pte_refs = [pte_graph(*i)[0].numpy() for i in inputs]
    errors = {}
    for method, source in (("gptq", calibrated), ("rtn", None)):
        counts = {}
        export_pte(pte_graph, cfg, tmp_path / f"{method}.pte", "int4", 32, 64, source, counts)
        assert counts == ({"gptq": 14} if source else {})
        run = load_graph(tmp_path / f"{method}.pte")
        errors[method] = float(np.mean([
            np.sqrt(((run([t.numpy() for t in i])[0] - r) ** 2).mean() / ((r - i[0].numpy()) ** 2).mean())
            for i, r in zip(inputs, pte_refs)
        ]))  # fmt: skip
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_export_quant_method_gptq_end_to_end_and_its_refusals(composed_run, tmp_path):
    out = tmp_path / "gptq"
    result = invoke("export", "--model", composed_run, "--out", out, "--quant", "int4")  # --quant-method auto: gptq
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "--quant-method auto: the experts' 4-bit weights are calibrated by GPTQ on each expert's training" in said
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == {"scheme": "int4", "block_size": 32, "accuracy_level": "auto",
                                        "base_accuracy_level": "auto", "source_blocks": False,
                                        "base_levels": {"embedding": 4}, "method": "gptq"}
    sources = manifest["export"]["block_sources"]
    assert {rel: c.get("gptq") for rel, c in sources.items() if rel.startswith("experts/")} == {
        f"experts/{e}/block{i}": 14 for e in ("code", "prose") for i in (0, 1)
    }
    invoke("run", "--bundle", out, "--prompt", "def f(", "--max-new-tokens", "4")  # the bundle loads and generates

    refused("export", "--model", composed_run, "--out", tmp_path / "b", "--quant", "int4", "--quant-method", "gptq",
            "--block-size", "64", message="--block-size 32")  # fmt: skip
    gone = tmp_path / "gone-run"
    shutil.copytree(composed_run, gone)
    meta_path = gone / "experts" / "prose" / "expert.json"
    meta = json.loads(meta_path.read_text())
    stage = meta["training"].get("expert_stage", meta["training"])
    stage["data"] = [str(tmp_path / "deleted-corpus")]
    meta_path.write_text(json.dumps(meta))
    refused("export", "--model", gone, "--out", tmp_path / "c", "--quant", "int4", "--quant-method", "gptq",
            message=("'prose'", "--calibration-data"))  # fmt: skip
    assert not (tmp_path / "c").exists()
    result = invoke("export", "--model", gone, "--out", tmp_path / "d", "--quant", "int4")  # auto: falls back
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "rounded to nearest" in said and "--calibration-data" in said and "calibrated by GPTQ" not in said
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["quantization"]["method"] == "rtn"


def test_auto_falls_back_to_round_to_nearest_when_calibration_fails(composed_run, tmp_path):
    """A calibration corpus too small for one window: auto says why in one line and rounds to nearest."""
    small = tmp_path / "small"
    small.mkdir()
    (small / "one.txt").write_text("def f(x):\n    return x\n")
    out = tmp_path / "b"
    result = invoke("export", "--model", composed_run, "--out", out, "--quant", "int4", "--calibration-data", small)
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "GPTQ could not calibrate" in said and "calibrated by GPTQ" not in said
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "rtn"
    assert not any("gptq" in c for c in manifest["export"].get("block_sources", {}).values())
