"""--accuracy-level auto (export/accuracy_levels.py): each rounded graph computes at level 4 unless that measurably
hurts it (a norm outlier in its activations), the choice and both measurements are in the bundle, and a source's
own blocks keep their level."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from mode_edge.config import ExportConfig, MoDELayout
from mode_edge.export.accuracy_levels import ERROR_RATIO, relative_error
from mode_edge.export.graphs import split
from mode_edge.export.onnx_graphs import export_onnx, quantize_onnx
from mode_edge.export.pipeline import export_bundle, measure_inputs
from mode_edge.export.source_blocks import EmbeddingBlocks
from mode_edge.training.model import Expert, MoDEModel

LAYOUT = MoDELayout(n_blocks=2, expert_layers=2, gate_bias=0.0)


def levels(path) -> set[int]:
    model = onnx.load(str(path), load_external_data=False)
    return {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"}  # fmt: skip


def run(path, feeds) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def expert_graph(tiny, outlier: float | None):
    """Block 1 of a fresh expert on the tiny backbone; `outlier`: every layer norm's channel 3 set to it (the
    activation outliers that int8 activations round badly; onnxruntime issue 29849)."""
    expert = Expert.init_from(tiny.decoder, LAYOUT, seed=0)
    if outlier is not None:
        for name, p in expert.named_parameters():
            if name.endswith("layernorm.weight"):
                p.data[3] = outlier
    return split(MoDEModel(tiny.decoder, LAYOUT, {"e": expert}).eval(), "buffer")["experts/e/block1"]


@pytest.mark.parametrize("outlier, expected", [(None, 4), (30.0, 0)])
def test_auto_keeps_int8_activations_unless_an_outlier_makes_them_costly(tiny, tmp_path, outlier, expected):
    graph = expert_graph(tiny, outlier)
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(graph, tiny.decoder.cfg, src)
    feeds, decode = measure_inputs(graph, tiny.decoder.cfg)
    _, chosen = quantize_onnx(src, dst, "int8", 32, "auto", measure=(feeds, decode))
    error = {int(k): v for k, v in chosen["error"].items()}
    assert chosen["accuracy_level"] == expected and levels(dst) == {expected}
    assert (error[4] > ERROR_RATIO * error[0]) == (expected == 0)
    assert set(chosen["decode_ms"]) == {"0", "4"} and all(v > 0 for v in chosen["decode_ms"].values())
    # the recorded error is the written graph's, on the same inputs
    assert relative_error(run(dst, feeds), run(src, feeds)) == pytest.approx(error[expected], rel=1e-2)
    if outlier is not None:  # the measurement is not a constant: a fixed level 4 errs as recorded, 2x and more
        _, none = quantize_onnx(src, tmp_path / "at4.onnx", "int8", 32, 4)
        assert none is None and levels(tmp_path / "at4.onnx") == {4}
        assert relative_error(run(tmp_path / "at4.onnx", feeds), run(src, feeds)) > 2 * error[0]


def test_auto_keeps_int8_activations_where_fp32_compute_is_much_slower(tiny, tmp_path, monkeypatch):
    """The outlier graph again, with the slowdown allowed for accuracy cut to 1x (the tiny graph's level 0 decodes
    ~2.5x slower than level 4 at int8; a SmolLM2 expert block's ~37x): the choice follows the measured times."""
    from mode_edge.export import accuracy_levels

    monkeypatch.setattr(accuracy_levels, "MAX_SLOWDOWN", 1.0)
    graph = expert_graph(tiny, 30.0)
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(graph, tiny.decoder.cfg, src)
    _, chosen = quantize_onnx(src, dst, "int8", 32, "auto", measure=measure_inputs(graph, tiny.decoder.cfg))
    error, ms = ({int(k): v for k, v in chosen[key].items()} for key in ("error", "decode_ms"))
    assert error[4] > ERROR_RATIO * error[0]  # level 0 would be taken for accuracy
    assert chosen["accuracy_level"] == (0 if ms[0] <= ms[4] else 4) and levels(dst) == {chosen["accuracy_level"]}


def test_a_sources_own_blocks_keep_their_level(tiny, tmp_path):
    """The head of a tied model written from the embedding's 8-bit blocks keeps the level they carry (0 here):
    nothing of it is rounded by onnxruntime's quantizer, so auto measures nothing and changes nothing."""
    graph = split(MoDEModel(tiny.decoder, LAYOUT, {}).eval(), "buffer")["base/head"]
    src, dst = tmp_path / "fp32.onnx", tmp_path / "head.onnx"
    export_onnx(graph, tiny.decoder.cfg, src)
    source = EmbeddingBlocks(tiny.decoder.embed_tokens.weight.detach().numpy(), 0)
    counts, chosen = quantize_onnx(src, dst, "int8", 32, "auto", source, measure=measure_inputs(graph, tiny.decoder.cfg))
    assert counts == {"int8": 1} and chosen is None and levels(dst) == {0}


def test_export_records_each_rounded_graphs_choice_in_the_bundle_and_its_pack(composed_run, tmp_path):
    out = tmp_path / "bundle"
    manifest = export_bundle(composed_run, out, ExportConfig(quant="int8", accuracy_level="auto"))
    assert manifest["quantization"]["accuracy_level"] == "auto"
    comps = {rel: c for rel, c in manifest["components"].items()}
    for name in ("code", "prose"):  # an expert's components are in its pack.json: it ships alone
        pack = json.loads((out / "experts" / name / "pack.json").read_text())
        comps.update({f"experts/{name}/{c}": {**v, "onnx": f"experts/{name}/{v['onnx']}"}
                      for c, v in pack["components"].items()})  # fmt: skip
    measured = {rel for rel, c in comps.items() if "onnx_compute" in c}
    # the tiny backbone has no GGUF: its blocks are rounded here too; the embedding's own blocks and Gather are not
    assert measured == {f"{p}/block{i}" for p in ("base", "experts/code", "experts/prose") for i in (0, 1)}
    for rel in measured:
        record = comps[rel]["onnx_compute"]
        assert levels(out / comps[rel]["onnx"]) == {record["accuracy_level"]}
        assert set(record["error"]) == {"0", "4"} and set(record["decode_ms"]) == {"0", "4"}
