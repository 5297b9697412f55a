"""Parallel MatMulNBits merged into one (export/fuse_matmuls.py): the same outputs as the separate nodes, for the
weights onnxruntime's quantizer rounds (int8 and int4, each accuracy level), with other readers left alone."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from mode_edge.export.fuse_matmuls import fuse_parallel_matmuls

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
