"""The int4 base written from its GGUF source's own blocks: the graphs compute the very weights that were trained."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from onnx import TensorProto, helper, numpy_helper

from mode_edge.errors import UserError
from mode_edge.export.fuse_matmuls import fuse_parallel_matmuls
from mode_edge.export.onnx_graphs import quantize_onnx, share_tied_embedding
from mode_edge.export.source_blocks import BLOCK_BYTES, EmbeddingBlocks, SourceBlocks, int8_blocks, write_source_blocks

RNG = np.random.default_rng(0)
SHAPES = {"q4_0": (T.Q4_0, (48, 96)), "q4_1": (T.Q4_1, (40, 64)), "q8_0": (T.Q8_0, (50, 64))}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A GGUF file with one tensor of each supported block type (and one F32 tensor); returns its path and the
    dequantized weights, as a checkpoint reader would hand them to our model."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    weights = {}
    for name, (kind, shape) in SHAPES.items():
        w = RNG.standard_normal(shape).astype(np.float32) * 0.05
        w[0, :32] = 0.25  # a block whose values are all equal (Q4_1: scale 0)
        q = quantize(w, kind)
        writer.add_tensor(name, q, raw_dtype=kind)
        weights[name] = dequantize(q, kind).astype(np.float32)
    writer.add_tensor("norm", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, weights


def matmul_model(b: np.ndarray, k: int) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "B"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(b, "B")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_block_type_is_written_as_its_own_blocks_and_computes_the_weight(tiny_gguf, name, tmp_path):
    path, weights = tiny_gguf
    w = weights[name]
    w = w[RNG.permutation(len(w))]  # rows in another order, as llama.cpp stores q_proj and k_proj
    model = matmul_model(np.ascontiguousarray(w.T), w.shape[1])
    counts = write_source_blocks(model, SourceBlocks(path))
    assert counts == {SHAPES[name][0].name: 1}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # one 4-bit product without zero points, onnxruntime's fast blocked kernels at accuracy level 0 (Q8_0 over
    # its high and low nibbles, stacked: twice as wide)
    assert len(nbits) == 1 and len(nbits[0].input) == 3
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == 4 and attrs["N"] == (2 if name == "q8_0" else 1) * len(w)
    ops = [n.op_type for n in model.graph.node]
    if name == "q4_1":  # the minimum as a per-block offset: block sums (one MatMul) times offsets, added
        assert ops.count("MatMul") == 2 and ops.count("Add") == 2  # (the other Add: m + 8 d, folded at load)
    # the blocks take on disk what they take in the file (fp16 scales and minimums), stored as the kernel reads
    # them: no node computes from the quantized values at load (that set the peak RSS of the head's session)
    stored = sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    assert stored <= w.size // 32 * BLOCK_BYTES[SHAPES[name][0].name] + 128  # + a few scalars (sizes, the 8)
    table = nbits[0].input[1]
    assert table in {i.name for i in model.graph.initializer}
    assert [n.op_type for n in model.graph.node if table in n.input] == ["MatMulNBits"]
    assert not any(i.name == "B" for i in model.graph.initializer)  # the fp32 weight is gone
    x = RNG.standard_normal((1, 3, w.shape[1])).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    ref = x @ w.T
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    if name == "q4_0":
        return  # symmetric 4-bit rounding of Q4_0 rows lands on the same grid; Q4_1 and Q8_0 rows do not:
    # the same weight rounded again by onnxruntime's int4 quantizer (what the exporter did before) is not the model
    onnx.save(matmul_model(np.ascontiguousarray(w.T), w.shape[1]), str(tmp_path / "fp32.onnx"))
    quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "rtn.onnx", "int4", 32)
    rounded = ort.InferenceSession(str(tmp_path / "rtn.onnx")).run(None, {"x": x})[0]
    assert np.abs(rounded - ref).max() > 1e-3 * np.abs(ref).max() > 100 * np.abs(got - ref).max()


def test_matmuls_of_one_input_share_its_block_sums(tiny_gguf):
    """Two Q4_1 weights read by the same input (as q_proj and k_proj are) need the input's block sums once; the
    graph of both computes both weights exactly, for an input of any leading shape."""
    path, weights = tiny_gguf
    w = weights["q4_1"]
    a, b = w[:24], w[RNG.permutation(len(w))][:16]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["ya"]), helper.make_node("MatMul", ["x", "B"], ["yb"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", 64])],
        [helper.make_tensor_value_info("ya", TensorProto.FLOAT, ["batch", "tokens", 24]),
         helper.make_tensor_value_info("yb", TensorProto.FLOAT, ["batch", "tokens", 16])],
        [numpy_helper.from_array(np.ascontiguousarray(a.T), "A"), numpy_helper.from_array(np.ascontiguousarray(b.T), "B")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert write_source_blocks(model, SourceBlocks(path)) == {"Q4_1": 2}
    assert sum(n.op_type == "MatMul" and n.input[0] == "x" for n in model.graph.node) == 1  # the block sums, once
    x = RNG.standard_normal((2, 5, 64)).astype(np.float32)
    ya, yb = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(ya, x @ a.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(yb, x @ b.T, rtol=1e-5, atol=1e-6)
    # merged (export/fuse_matmuls.py): one MatMulNBits and one offset product for both, the same outputs
    assert fuse_parallel_matmuls(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("Split") == 1
    onnx.checker.check_model(model, full_check=True)
    fa, fb = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(fa, ya, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fb, yb, rtol=1e-6, atol=1e-6)


def test_an_embedding_table_of_q8_0_rows_becomes_gather_block_quantized(tiny_gguf):
    path, weights = tiny_gguf
    table = weights["q8_0"]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["y"], axis=0)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(table, "E")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert write_source_blocks(model, SourceBlocks(path)) == {"Q8_0": 1}
    ids = np.array([[0, 7, 49, 3]], np.int64)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, table[ids])
    # at accuracy level 4 (where the head is an 8-bit MatMulNBits) one 8-bit gather, the same rows
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert write_source_blocks(model, SourceBlocks(path, accuracy_level=4)) == {"Q8_0": 1}
    assert [n.op_type for n in model.graph.node] == ["Cast", "GatherBlockQuantized"]  # (the fp16 scales, folded)
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})[0]
    np.testing.assert_array_equal(got, table[ids])


def test_weights_that_are_not_the_source_rows_are_left_to_the_quantizer(tiny_gguf):
    path, weights = tiny_gguf
    trained = weights["q4_1"].copy()
    trained[3, 5] += 1e-3  # one weight moved by training: not the source's any more
    mixed = np.concatenate([weights["q4_0"][:, :64], weights["q4_1"]])  # rows of two tensors
    source = SourceBlocks(path)
    for w in (trained, mixed):
        model = matmul_model(np.ascontiguousarray(w.T), w.shape[1])
        assert write_source_blocks(model, source) == {}
        assert [n.op_type for n in model.graph.node] == ["MatMul"]


def test_a_tied_embedding_is_stored_once_at_8_bits(int8_bundle, tiny):
    """The tiny backbone is tied and has no GGUF: its embedding is rounded once to 8-bit blocks, and the embed graph
    reads them from the head's weights file."""
    from mode_edge.bundle import read_bundle
    from mode_edge.runtimes.backends import load_graph

    manifest = read_bundle(int8_bundle)
    assert manifest["components"]["base/embed"]["onnx_weights_in"] == "base/head.onnx.data"
    assert not (int8_bundle / "base/embed.onnx.data").exists() and "base/embed.onnx.data" not in manifest["files"]
    assert manifest["export"]["block_sources"] == {"base/embed": {"int8": 1}, "base/head": {"int8": 1}}
    table = tiny.decoder.embed_tokens.weight.detach().numpy()
    ids = np.arange(len(table), dtype=np.int64)[None]
    (got,) = load_graph(int8_bundle / "base/embed.onnx", threads=1)([ids])
    np.testing.assert_array_equal(got[0], int8_blocks(table).dequantize())  # the rows the head multiplies with
    assert np.abs(got[0] - table).max() <= np.abs(table).max() / 254 * 1.001  # half a step of the 8-bit grid


def test_an_embedding_that_differs_from_the_head_is_not_shared(tmp_path):
    from mode_edge.export.onnx_graphs import save_external, share_tied_embedding

    table = RNG.standard_normal((64, 64)).astype(np.float32)
    embed = helper.make_model(helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["y"], axis=0)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(table, "E")],
    ), opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
    head = matmul_model(np.ascontiguousarray(table.T + 1e-3), 64)  # untied: another matrix
    write_source_blocks(embed, EmbeddingBlocks(table))
    write_source_blocks(head, EmbeddingBlocks(table.T.T + 1e-3))
    save_external(embed, tmp_path / "embed.onnx")
    save_external(head, tmp_path / "head.onnx")
    assert share_tied_embedding(tmp_path / "embed.onnx", tmp_path / "head.onnx") == 0
    assert (tmp_path / "embed.onnx.data").exists()


@pytest.mark.slow
@pytest.mark.real_scale
def test_smollm2_int4_base_graphs_equal_the_pytorch_backbone(tmp_path):
    """The built-in backbone's first block (10 layers), embedding and tied head at int4 from the GGUF's blocks:
    fp32 tolerance against PyTorch, and the same next token at every position."""
    from mode_edge.config import MoDELayout
    from mode_edge.export.graphs import prefill_inputs, split
    from mode_edge.export.onnx_graphs import export_onnx
    from mode_edge.training.backbones import SMOLLM2_GGUF, load_backbone, smollm2_dir
    from mode_edge.training.model import MoDEModel

    backbone = load_backbone("smollm2")
    model = MoDEModel(backbone.decoder, MoDELayout()).eval()
    graphs = split(model, "buffer")
    source = SourceBlocks(smollm2_dir() / SMOLLM2_GGUF)
    ids = torch.tensor([backbone.tokenizer.encode("def fibonacci(n):\n    return n if n < 2 else")])
    hidden = None
    for rel in ("base/embed", "base/block0", "base/head"):
        graph = graphs[rel]
        export_onnx(graph, backbone.decoder.cfg, tmp_path / f"{rel}.fp32.onnx")
        counts, _ = quantize_onnx(tmp_path / f"{rel}.fp32.onnx", tmp_path / f"{rel}.onnx", "int4", 32, 4, source)
        assert counts == ({"Q8_0": 1} if rel != "base/block0" else {"Q4_1": 70})  # 10 layers x 7 linear layers
        session = ort.InferenceSession(str(tmp_path / f"{rel}.onnx"))
        names = [i.name for i in session.get_inputs()]
        if rel == "base/embed":
            inputs = [ids]
        else:
            inputs = prefill_inputs(graph, hidden)
        with torch.no_grad():
            ref = graph(*inputs)
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
        got = session.run(None, dict(zip(names, [t.numpy() for t in inputs])))[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
        hidden = torch.from_numpy(ref)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # the tied embedding: the embed graph now reads the head's Q8_0 blocks, and computes the same rows
    before = ort.InferenceSession(str(tmp_path / "base/embed.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    saved = share_tied_embedding(tmp_path / "base/embed.onnx", tmp_path / "base/head.onnx")
    assert saved > 25 * 2**20 and not (tmp_path / "base/embed.onnx.data").exists()
    after = ort.InferenceSession(str(tmp_path / "base/embed.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_array_equal(after, before)


def test_blocks_that_need_block_sums_refuse_an_old_opset_and_leave_the_graph_as_it_was(tiny_gguf):
    path, weights = tiny_gguf
    w = weights["q4_1"]
    model = matmul_model(np.ascontiguousarray(w.T), w.shape[1])
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 14))
    before = model.SerializeToString()
    with pytest.raises(UserError, match="opset is below 15"):
        write_source_blocks(model, SourceBlocks(path))
    assert model.SerializeToString() == before
    gather = helper.make_model(helper.make_graph(  # the nibble gathers of a Q8_0 table need it too
        [helper.make_node("Gather", ["E", "ids"], ["y"], axis=0)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weights["q8_0"], "E")],
    ), opset_imports=[helper.make_opsetid("", 14)])  # fmt: skip
    with pytest.raises(UserError, match="opset is below 15"):
        write_source_blocks(gather, SourceBlocks(path))
    plain = matmul_model(np.ascontiguousarray(weights["q4_0"].T), weights["q4_0"].shape[1])  # no helper nodes
    del plain.opset_import[:]
    plain.opset_import.append(helper.make_opsetid("", 14))
    assert write_source_blocks(plain, SourceBlocks(path)) == {"Q4_0": 1}


def test_8_bit_embedding_blocks_have_11_bit_scales_so_their_nibble_form_is_exact():
    """int8_blocks rounds each scale up to 11 significant bits at any magnitude (tiny and large rows alike): codes
    stay within [-127, 127], the rounding error within half a step, and 16 d (h - 8) + d l equals d (u - 128)
    exactly in fp32 (the head's and embed graph's nibble form)."""
    w = RNG.standard_normal((6, 64)).astype(np.float32) * np.array([1e-6, 1e-3, 1, 30, 1e4, 0])[:, None]
    blocks = int8_blocks(w.astype(np.float32))
    d = blocks.scales
    assert (d.view(np.uint32) & 0x1FFF == 0).all() and (d[5] == 1).all()  # an all-zero block: scale 1
    codes = blocks.q.astype(np.int16) - 128
    assert codes.min() >= -127 and codes.max() <= 127
    step = np.abs(w.reshape(6, 2, 32)).max(-1) / 127
    assert (d >= step).all() and (d[:5] <= step[:5] * (1 + 2**-10)).all()
    err = np.abs(blocks.dequantize() - w).reshape(6, 2, 32).max(-1)
    assert (err <= d / 2 * (1 + 1e-6)).all()
    high, low = (blocks.q >> 4).astype(np.float32), (blocks.q & 15).astype(np.float32)
    nibbles = (np.float32(16) * d[..., None]) * (high - 8) + d[..., None] * low
    np.testing.assert_array_equal(nibbles, d[..., None] * (blocks.q.astype(np.float32) - 128))


@pytest.mark.parametrize("name", ["q4_0", "q4_1"])
def test_pte_linears_take_the_4bit_blocks_as_they_are(tiny_gguf, name, tmp_path):
    """A .pte linear over a GGUF's Q4_0 / Q4_1 rows holds their codes and scales (and Q4_1's offsets) as they are:
    its weight is the source weight to fp32 precision, and lowered to XNNPACK it errs only by the 8-bit rounding of
    activations, several times less than the same weight rounded again by torchao's symmetric 4-bit scheme."""
    from executorch.runtime import Runtime

    from mode_edge.export.executorch_graphs import SourceBlockLinear, lower, quantize_module

    path, weights = tiny_gguf
    w = weights[name][RNG.permutation(len(weights[name]))]
    layer = torch.nn.Linear(w.shape[1], w.shape[0])
    layer.weight.data = torch.from_numpy(w)
    module = torch.nn.Sequential(layer)
    counts = {}
    exact = quantize_module(module, "int4", 32, SourceBlocks(path), counts)
    assert counts == {SHAPES[name][0].name: 1} and isinstance(exact[0], SourceBlockLinear)
    # XNNPACK refuses scales <= 0: ggml's Q4_0 signs its scales, and a block of equal values has scale 0
    assert (exact[0].weight.scale > 0).all() and exact[0].weight.qdata.min() >= -8 and exact[0].weight.qdata.max() <= 7
    if name == "q4_0":
        assert (SourceBlocks(path).find(w).scales < 0).any()
    held = exact[0].weight.dequantize()
    if exact[0].offsets is not None:
        held = held + exact[0].offsets.repeat_interleave(32, dim=1)
    np.testing.assert_allclose(held.numpy(), w, rtol=1e-6, atol=1e-7)
    assert torch.equal(exact[0].bias, layer.bias)
    rounded = quantize_module(module, "int4", 32)  # no source: torchao's own 4-bit blocks of the same weight
    assert isinstance(rounded[0], torch.nn.Linear) and isinstance(rounded[0].weight, type(exact[0].weight))

    x = torch.from_numpy(RNG.standard_normal((1, 5, w.shape[1])).astype(np.float32))
    ref = (x @ torch.from_numpy(w).T + layer.bias).detach().numpy()
    errors = {}
    for kind, m in (("exact", exact), ("rounded", rounded)):
        lowered = lower(m.eval(), (x,))
        ops = [str(n.target) for n in lowered.exported_program().graph.nodes if n.op == "call_function"]
        assert ops.count("executorch_call_delegate") == 1 and not [o for o in ops if "aten" in o], ops  # one subgraph
        (tmp_path / f"{kind}.pte").write_bytes(lowered.buffer)
        got = Runtime.get().load_program(str(tmp_path / f"{kind}.pte")).load_method("forward").execute([x])[0]
        errors[kind] = float(np.abs(got.numpy() - ref).max() / np.abs(ref).max())
    assert 0 < errors["exact"] < 0.02  # the activations' 8-bit rounding, no more
    if name == "q4_1":  # Q4_1's asymmetric grid is not symmetric 4-bit's: rounding it again costs several times more
        assert errors["rounded"] > 3 * errors["exact"], errors


def test_xnnpack_codes_make_every_scale_positive_and_keep_the_weight():
    """XNNPACK refuses blockwise scales <= 0: a negative scale (ggml's Q4_0 signs them), a zero one (a block of equal
    values) and GPTQ's zero points all become codes in [-8, 7] at positive scales plus a per-block constant, and
    scale * code + constant is the blocks' weight."""
    from mode_edge.export.executorch_graphs import xnnpack_codes
    from mode_edge.export.source_blocks import Blocks

    codes = RNG.integers(0, 16, (3, 4, 32))
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = np.array([[0.5, -0.25, 0.0, 2.0]] * 3, np.float32)
    cases = [Blocks("Q4_0", 4, packed, scales, None),
             Blocks("Q4_1", 4, packed, scales, None, minimums=np.full((3, 4), -0.75, np.float32)),
             Blocks("gptq", 4, packed, np.abs(scales), RNG.integers(0, 16, (3, 4)).astype(np.uint8))]  # fmt: skip
    for blocks in cases:
        c, d, constants = xnnpack_codes(blocks)
        assert c.min() >= -8 and c.max() <= 7 and (d > 0).all(), blocks.source_type
        got = c.astype(np.float32) * d[..., None] + (0 if constants is None else constants[..., None])
        np.testing.assert_allclose(got.reshape(3, -1), blocks.dequantize(), rtol=1e-6, atol=1e-6)
