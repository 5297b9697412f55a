"""Parallel MatMulNBits merged into one (export/fuse_matmuls.py): the same outputs as the separate nodes, for the
weights onnxruntime's quantizer rounds (int8 and int4, each accuracy level), with other readers left alone; the
merged q/k/v fed packed to GroupQueryAttention: the same attention and cache as through the Split."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from mode_edge.export.fuse_matmuls import fuse_parallel_matmuls, pack_qkv

RNG = np.random.default_rng(1)


def three_projections() -> onnx.ModelProto:
    """q/k/v-like: three weights (64 -> 32, 16, 16) read x; a fourth reads q's output (another input: not merged)."""
    weights = {n: RNG.standard_normal((64 if n != "O" else 32, c)).astype(np.float32) * 0.1
               for n, c in (("Q", 32), ("K", 16), ("V", 16), ("O", 64))}  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", w], [w.lower()], name=f"proj_{w}") for w in "QKV"]
    nodes.append(helper.make_node("MatMul", ["q", "O"], ["o"], name="proj_O"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "t", w]) for n, w in
         (("q", 32), ("k", 16), ("v", 16), ("o", 64))],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("bits, level, symmetric", [(4, 0, True), (4, 4, True), (8, 0, True), (8, 4, True),
                                                    (4, 4, False), (8, 0, False)])  # asymmetric: with zero points
def test_merged_projections_compute_what_the_separate_ones_did(bits, level, symmetric):
    q = MatMulNBitsQuantizer(three_projections(), bits=bits, block_size=32, is_symmetric=symmetric,
                             accuracy_level=level)  # fmt: skip
    q.process()
    model = q.model.model
    x = RNG.standard_normal((1, 5, 64)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert fuse_parallel_matmuls(model) == 2  # Q, K, V -> one node; O stays
    onnx.checker.check_model(model, full_check=True)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and sorted(next(a.i for a in n.attribute if a.name == "N") for n in nbits) == [64, 64]
    assert {len(n.input) for n in nbits} == {3 if symmetric else 4}
    assert not any(i.name.startswith(("Q_", "K_", "V_")) for i in model.graph.initializer)  # parts not kept twice
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    assert fuse_parallel_matmuls(model) == 0  # nothing left to merge


def attention_layer(rotary: bool) -> onnx.ModelProto:
    """q/k/v projections (64 -> 4 heads, 2 kv heads of 16) into GroupQueryAttention with a cache buffer of 8
    positions (the bundles' "buffer" interface, fed back here as arrays), and the output projection."""
    heads, kv_heads, hd = 4, 2, 16
    weights = {n: RNG.standard_normal((64, c)).astype(np.float32) * 0.1
               for n, c in (("Q", heads * hd), ("K", kv_heads * hd), ("V", kv_heads * hd))}  # fmt: skip
    weights["O"] = RNG.standard_normal((heads * hd, 64)).astype(np.float32) * 0.1
    nodes = [helper.make_node("MatMul", ["x", w], [w.lower()], name=f"proj_{w}") for w in "QKV"]
    nodes.append(helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens_k",
                                                          "total_sequence_length", *(["cos", "sin"] * rotary)],
                                  ["attn", "present_key", "present_value"], domain="com.microsoft",
                                  num_heads=heads, kv_num_heads=kv_heads, do_rotary=int(rotary)))  # fmt: skip
    nodes.append(helper.make_node("MatMul", ["attn", "O"], ["y"], name="proj_O"))
    cache = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, kv_heads, 8, hd])
             for n in ("past_key", "past_value")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "t", 64]), *cache,
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              *[helper.make_tensor_value_info(n, TensorProto.FLOAT, [8, hd // 2])
                for n in ("cos", "sin")][: 2 * rotary]]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "t", 64]),
               *[helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, kv_heads, 8, hd])
                 for n in ("present_key", "present_value")]]  # fmt: skip
    inits = [numpy_helper.from_array(w, n) for n, w in weights.items()]
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(helper.make_graph(nodes, "layer", inputs, outputs, inits), opset_imports=opsets)


@pytest.mark.parametrize("rotary", [False, True])
def test_packed_qkv_attends_as_the_split_did(rotary):
    q = MatMulNBitsQuantizer(attention_layer(rotary), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    model = q.model.model
    assert fuse_parallel_matmuls(model) == 2
    split = onnx.ModelProto.FromString(model.SerializeToString())
    assert pack_qkv(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert not any(n.op_type == "Split" for n in model.graph.node)
    assert "" in next(n for n in model.graph.node if n.op_type == "GroupQueryAttention").input[:3]
    assert len(model.graph.initializer) == len(split.graph.initializer) - 1  # the split sizes went with the Split
    assert pack_qkv(model) == 0

    freqs = np.arange(8)[:, None] * 10000.0 ** (-np.arange(8) / 8)[None, :]
    tables = {"cos": np.cos(freqs).astype(np.float32), "sin": np.sin(freqs).astype(np.float32)} if rotary else {}
    runs = []
    for m in (split, model):  # a 5-token prefill, then one decode step, each writing its positions of the cache
        session = ort.InferenceSession(m.SerializeToString())
        cache = [np.zeros((1, 2, 8, 16), np.float32) for _ in range(2)]
        out = []
        for pos, t in ((0, 5), (5, 1)):
            x = np.random.default_rng(pos).standard_normal((1, t, 64)).astype(np.float32)
            feeds = {"x": x, "past_key": cache[0], "past_value": cache[1], **tables,
                     "seqlens_k": np.array([pos + t - 1], np.int32),
                     "total_sequence_length": np.array(pos + t, np.int32)}  # fmt: skip
            y, *cache = session.run(None, feeds)
            out.append(y)
        runs.append((out, cache))
    (want, want_cache), (got, got_cache) = runs
    for g, w in zip(got + got_cache, want + want_cache):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    assert np.abs(want_cache[0][:, :, :6]).min() > 0 and not want_cache[0][:, :, 6:].any()  # 6 positions written


def test_a_split_read_elsewhere_stays():
    """q/k/v that something else reads too (a graph output, another node) keep their Split; the sizes a kept Split
    shares stay with it."""
    q = MatMulNBitsQuantizer(attention_layer(False), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    model = q.model.model
    fuse_parallel_matmuls(model)
    out = onnx.ModelProto.FromString(model.SerializeToString())
    out.graph.output.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, "t", 32]))
    assert pack_qkv(out) == 0 and sum(n.op_type == "Split" for n in out.graph.node) == 1
    read = onnx.ModelProto.FromString(model.SerializeToString())
    split = next(n for n in read.graph.node if n.op_type == "Split")
    read.graph.node.append(helper.make_node("Split", ["v", split.input[1]], ["v0", "v1"], axis=-1))  # shares sizes
    assert pack_qkv(read) == 0
    shared = onnx.ModelProto.FromString(model.SerializeToString())
    other = helper.make_node("Split", ["x", split.input[1]], ["x0", "x1", "x2"], axis=-1)  # 64 = 32 + 16 + 16
    shared.graph.node.append(other)
    shared.graph.output.extend(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, "t", "n"]) for i in range(3))
    assert pack_qkv(shared) == 1 and split.input[1] in {i.name for i in shared.graph.initializer}
    onnx.checker.check_model(shared, full_check=True)
