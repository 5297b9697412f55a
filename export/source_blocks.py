"""The backbone written from its quantized source's own blocks: an int4 base that *is* the model we trained.

A backbone loaded from a GGUF file holds fp32 weights that transformers dequantized from the file's blocks, and the
backbone stays frozen, so those weights lie exactly on the blocks' grids. Requantizing them (RTN) would round them a
second time; instead each backbone weight is traced back to its source rows (by the bytes of each dequantized row, so
permuted rows, as llama.cpp stores q_proj / k_proj, are found too) and its blocks are written unchanged in
onnxruntime's block formats:

    GGUF Q4_0  x = d * (q - 8)      -> MatMulNBits 4-bit, scale d, default zero point 8
    GGUF Q4_1  x = d * q + m        -> MatMulNBits 4-bit, scale d, default zero point 8, plus a per-block offset
                                       o = m + 8 d:  y = MatMulNBits(x) + (sums of x over each block) @ O
    GGUF Q8_0  x = d * q (q signed) -> below accuracy level 4 the nibbles of q + 128 as one 4-bit table
                                       (`nibble_table`): a 4-bit MatMulNBits over it plus a per-block offset, and
                                       for the embedding two 4-bit GatherBlockQuantized from it; at level 4
                                       MatMulNBits 8-bit and GatherBlockQuantized 8-bit (q + 128, zero point 128)

all in blocks of 32 along the input dimension (ggml's QK = 32). Q4_1 is written as a symmetric product plus a small
fp32 one (K/32 block sums by N offsets, 1/32 of the weight's multiply-adds) rather than as MatMulNBits with the float
zero point -m / d, which is exact too but leaves onnxruntime's blocked kernels for a path that unpacks the weight on
every call: measured 33x slower on a decode step (576 x 1536, 30 layers: 48.6 ms against 1.47; integer or default
zero points take the fast kernels). The 4-bit types' scales and minimums are fp16 in the file and stay fp16 on disk
(a Cast that onnxruntime folds into fp32 initializers when the session loads), so the base takes the file's own 5
bits a weight (Q4_1) rather than 6. Weights from other block types, and every weight
that is not a backbone row (experts, gates), are left to the configured quantizer. Sources: the ggml block layouts
(ggml-common.h, block_q4_0 / block_q4_1 / block_q8_0) and the contrib operators MatMulNBits and
GatherBlockQuantized of onnxruntime (docs/ContribOperators.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mode_edge.errors import UserError

log = logging.getLogger("mode_edge.export")

BLOCK = 32
"""Weights per block in every supported ggml type."""
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
"""Bytes of one block: an fp16 scale (Q4_1: and an fp16 min), then the 32 quantized values."""
MS_DOMAIN = "com.microsoft"
MIN_OPSET = 15
"""The ONNX opset the nodes written beside the blocks need (CastLike: 15; Range, ConstantOfShape: 11 and 9)."""


def weight_key(weight: np.ndarray) -> bytes:
    """A 16-byte digest of an array's float32 values (a GGUF row, an ONNX MatMul's weight): how blocks are found."""
    return hashlib.blake2b(np.ascontiguousarray(weight, dtype=np.float32).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class Blocks:
    """One weight's blocks in onnxruntime's layout. q: (N, K/32, 16 or 32) uint8 (4-bit: two values a byte, the
    lower index in the low nibble); scales: (N, K/32) float32; zero_points: (N, K/32) uint8 (unpacked here) or None
    (the type's default: 8 at 4 bits, 128 at 8 bits); minimums: (N, K/32) float32 or None, Q4_1's m, the weight of
    code 0 (x = d q + m; only with zero_points None; written as the default zero point and a per-block offset, see
    the module docstring); accuracy_level: the compute type of the MatMulNBits that holds them (0, in fp32, for the
    trained model's own blocks: int8 activations would round the model we measured)."""

    source_type: str
    bits: int
    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    accuracy_level: int = 0
    minimums: np.ndarray | None = None

    def codes(self) -> np.ndarray:
        """(N, K/32, 32) uint8: the unpacked codes."""
        if self.bits == 8:
            return self.q
        return np.stack([self.q & 0x0F, self.q >> 4], axis=-1).reshape(*self.q.shape[:2], BLOCK)

    def offsets(self) -> np.ndarray:
        """(N, K/32) float32: what each block adds beyond d * (q - 8), m + 8 d, as onnxruntime computes it (fp32)."""
        return (self.minimums + np.float32(8) * self.scales).astype(np.float32)

    def block_constants(self) -> np.ndarray | None:
        """(N, K/32) float32 or None: for 4-bit blocks, what each block adds beyond d * (q - 8), the symmetric product
        over the codes: Q4_1's m + 8 d, an explicit zero point z's d * (8 - z); None where nothing is added (Q4_0,
        symmetric blocks)."""
        if self.minimums is not None:
            return self.offsets()
        if self.zero_points is not None:
            return (self.scales * (np.float32(8) - self.zero_points.astype(np.float32))).astype(np.float32)
        return None

    def dequantize(self) -> np.ndarray:
        """(N, K) float32: the weight these blocks stand for, computed as onnxruntime does."""
        default = np.float32(8 if self.bits == 4 else 128)
        zp = self.zero_points if self.zero_points is not None else np.full(self.scales.shape, default)
        w = (self.codes().astype(np.float32) - zp[..., None]) * self.scales[..., None]
        if self.minimums is not None:
            w = w + self.offsets()[..., None]
        return w.reshape(len(self.q), -1)


def decode_blocks(raw: np.ndarray, source_type: str) -> Blocks:
    """raw: (N, K/32 * BLOCK_BYTES) uint8, rows of one GGUF tensor -> Blocks in onnxruntime's layout."""
    n = len(raw)
    b = raw.reshape(n, -1, BLOCK_BYTES[source_type])
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
    if source_type == "Q8_0":
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(source_type, 8, q, d, None)
    qs = b[..., 4:] if source_type == "Q4_1" else b[..., 2:]  # (N, K/32, 16): value j low nibble, j + 16 high
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (N, K/32, 32) in order
    packed = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
    if source_type == "Q4_0":
        return Blocks(source_type, 4, packed, d, None)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return Blocks(source_type, 4, packed, d, None, minimums=m)


class SourceBlocks:
    """Every row of a GGUF file's Q4_0 / Q4_1 / Q8_0 tensors, findable by its dequantized fp32 values.

    path: the .gguf file the backbone was loaded from; accuracy_level: the compute type of the MatMulNBits written
    from these blocks (0: fp32 arithmetic, the base stays exactly the trained model). Raises UserError (through the
    gguf reader) for a file that is not GGUF. Holds an index of 16-byte row digests (about 4 MB for SmolLM2-135M),
    not the weights."""

    def __init__(self, path: Path, accuracy_level: int = 0):
        self.accuracy_level = accuracy_level
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self.path = Path(path)
        reader = GGUFReader(str(self.path))
        self.raw: dict[str, tuple[str, np.ndarray]] = {}
        self.index: dict[bytes, tuple[str, int]] = {}
        self.other_types: set[str] = set()
        for t in reader.tensors:
            kind = t.tensor_type.name
            if kind not in BLOCK_BYTES:
                if len(t.shape) == 2 and kind not in ("F32", "F16", "BF16"):
                    self.other_types.add(kind)
                continue
            self.raw[t.name] = (kind, np.asarray(t.data))
            for i, row in enumerate(dequantize(t.data, t.tensor_type)):
                self.index.setdefault(weight_key(row), (t.name, i))

    def find(self, weight: np.ndarray) -> Blocks | None:
        """weight: (N, K) float32, a torch Linear's weight (or an embedding). Its blocks when every row is a row of
        one source tensor (in any order) and they reproduce it; None otherwise."""
        if weight.ndim != 2 or weight.shape[1] % BLOCK:
            return None
        hits = [self.index.get(weight_key(row)) for row in weight]
        if any(h is None for h in hits) or len({h[0] for h in hits}) != 1:
            return None
        kind, raw = self.raw[hits[0][0]]
        blocks = decode_blocks(raw[[h[1] for h in hits]], kind)
        got = blocks.dequantize()
        if not np.allclose(got, weight, rtol=1e-6, atol=1e-7 * float(np.abs(weight).max())):
            return None  # the digest matched but the values do not: never write blocks that are not the weight
        return dataclasses.replace(blocks, accuracy_level=self.accuracy_level)


def int8_blocks(weight: np.ndarray) -> Blocks:
    """weight (N, K), K a multiple of 32 -> symmetric 8-bit blocks of 32 in Q8_0's scheme: each block's scale is
    its largest magnitude over 127, rounded up to 11 significant bits (fp16's precision, at any exponent), so no code
    leaves [-127, 127] and the step grows by less than 2^-10 of itself. With 11-bit scales the nibble form
    (`nibble_table`) is exact in fp32: 16 d (h - 8) and d l are exact products, and so is their sum; within fp16's
    range the scales are fp16 values, as Q8_0 stores them, and go to disk at half the bytes."""
    w = weight.reshape(len(weight), -1, BLOCK).astype(np.float32)
    d = np.ascontiguousarray(np.abs(w).max(-1) / np.float32(127))
    low = np.uint32((1 << 13) - 1)  # the 13 mantissa bits fp32 has beyond fp16's 10
    d = ((d.view(np.uint32) + low) & ~low).view(np.float32)  # (positive: adding rounds up, a carry is exact)
    d = np.where(d == 0, np.float32(1), d).astype(np.float32)
    q = (np.clip(np.rint(w / d[..., None]), -127, 127) + 128).astype(np.uint8)
    return Blocks("int8", 8, q, d, None)


class EmbeddingBlocks:
    """The token embedding rounded once to 8-bit blocks (`int8_blocks`), for the embed graph's Gather and, in a tied
    model, the head's MatMul: where no source blocks hold it, both then read the same bytes (stored once, see
    export/onnx_graphs.share_tied_embedding), and the 4-bit bundle keeps its largest, most sensitive matrix at 8 bits
    (as llama.cpp's Q4_K_M keeps the output and embedding tensors at higher precision).

    weight: (V, D) float32, the embedding table; accuracy_level: the compute type of the head's MatMulNBits."""

    def __init__(self, weight: np.ndarray, accuracy_level: int = 0):
        self.weight = weight
        blocks = int8_blocks(weight) if weight.shape[1] % BLOCK == 0 else None
        self.blocks = dataclasses.replace(blocks, accuracy_level=accuracy_level) if blocks is not None else None

    def find(self, weight: np.ndarray) -> Blocks | None:
        same = weight.shape == self.weight.shape and np.array_equal(weight, self.weight)
        return self.blocks if same else None


class FirstOf:
    """Several block sources, asked in order (the GGUF's own blocks before any rounding)."""

    def __init__(self, *sources):
        self.sources = [s for s in sources if s is not None]

    def find(self, weight: np.ndarray) -> Blocks | None:
        return next((b for s in self.sources if (b := s.find(weight)) is not None), None)


def _initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


ROUNDED_HERE = ("gptq", "rounded")
"""Origins of MatMulNBits weights rounded by the exporter (GPTQ; onnxruntime's quantizer): their compute type is
--accuracy-level's. The others are a source's own blocks (a GGUF's, the 8-bit embedding): --base-accuracy-level;
and --quant mixed's 8-bit layers ("mixed8"), which keep the level they were written at (export/mixed_precision.py)."""


def write_source_blocks(model: onnx.ModelProto, source, origins: dict[str, str] | None = None) -> dict[str, int]:
    """Replace, in place, every MatMul (x @ B, B a (K, N) initializer) and Gather (rows of a (V, D) initializer)
    whose weight is found in `source` (anything with find(weight (N, K)) -> Blocks | None) by MatMulNBits /
    GatherBlockQuantized over the found blocks, each at its blocks' accuracy level (blocks with offsets: plus the
    block-sum product, its block sums computed once per input); the rest of the graph is untouched for the
    configured quantizer. Returns the count of replaced nodes per source type. Raises UserError, with the graph
    unchanged, when the nodes written need an opset the graph lacks (MIN_OPSET: block sums for Q4_1 and 8-bit
    blocks below level 4, the nibble gathers). `origins`, when given, receives each new MatMulNBits node's name with
    the source type of its blocks."""
    inits = {i.name: i for i in model.graph.initializer}
    block_sums: dict[str, str] = {}
    counts: dict[str, int] = {}
    replaced: set[str] = set()
    nodes, extras = [], []
    for node in model.graph.node:
        new = None
        if node.op_type == "MatMul" and node.input[1] in inits and node.input[1] not in replaced:
            # (a weight that a second MatMul shares stays as it is there: its derived tensors are named once)
            b = numpy_helper.to_array(inits[node.input[1]])
            blocks = source.find(b.T) if b.ndim == 2 else None
            if blocks is not None:
                new, extra = _matmul_nbits(node, blocks, b.shape, block_sums)
        elif node.op_type == "Gather" and node.input[0] in inits and node.input[0] not in replaced and _axis(node) == 0:
            table = numpy_helper.to_array(inits[node.input[0]])
            blocks = source.find(table) if table.ndim == 2 else None
            if blocks is not None and blocks.bits == 8:
                new, extra = _gather_block_quantized(node, blocks)
        if new is None:
            nodes.append(node)
            continue
        nodes.extend(new)
        extras.extend(extra)
        if origins is not None:
            origins.update({n.name: blocks.source_type for n in new if n.op_type == "MatMulNBits"})
        replaced.add(node.input[1] if node.op_type == "MatMul" else node.input[0])
        counts[blocks.source_type] = counts.get(blocks.source_type, 0) + 1
    helpers = {n.op_type for n in nodes} & {"Range", "CastLike"}  # (the block sums' indicator; the nibble gathers)
    if helpers and not any(o.domain in ("", "ai.onnx") and o.version >= MIN_OPSET for o in model.opset_import):
        raise UserError(f"the graph's ONNX opset is below {MIN_OPSET}, which the exact blocks' helper nodes need "
                        f"({', '.join(sorted(helpers))}); export at opset {MIN_OPSET} or above, or pass "
                        f"--requantize-base")  # fmt: skip
    still_used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name not in replaced or i.name in still_used] + extras
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if counts and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _matmul_nbits(node, blocks: Blocks, shape: tuple, block_sums: dict[str, str]):
    """The nodes (MatMulNBits, and for blocks with minimums the block-sum product and the sum) that replace `node`,
    and their initializers. block_sums maps an input to the name of its (..., K/32) block sums, shared by the
    MatMuls that read the same input (q/k/v, gate/up). Offsets are computed from the stored scales and minimums by
    nodes (folded at load), never stored as an initializer of their own, so a quantizer run after this one, which
    rounds only MatMuls of initializer weights, leaves the exact offset products alone."""
    k, n = shape
    prefix = f"{node.input[1]}_{blocks.source_type}"
    if nibbles(blocks):
        return _nibble_product(node, blocks, shape, block_sums, prefix)
    half = _fp16_exact(blocks.scales) and (blocks.minimums is None or _fp16_exact(blocks.minimums))
    scales = prefix + "_scales"
    nodes, extra = [], [_initializer(prefix, blocks.q)]
    _stored(nodes, extra, scales, blocks.scales.reshape(-1), half)
    inputs = [node.input[0], prefix, scales]
    if blocks.zero_points is not None:
        extra.append(_initializer(prefix + "_zero_points", _zero_points(blocks)))
        inputs.append(prefix + "_zero_points")
    product = list(node.output) if blocks.minimums is None else [prefix + "_symmetric"]
    nodes.append(helper.make_node(
        "MatMulNBits", inputs, product, name=(node.name or prefix) + "_nbits", domain=MS_DOMAIN,
        K=k, N=n, bits=blocks.bits, block_size=BLOCK, accuracy_level=blocks.accuracy_level,
    ))  # fmt: skip
    if blocks.minimums is None:
        return nodes, extra
    offsets = prefix + "_offsets"  # (K/32, N): m + 8 d, block by output
    _stored(nodes, extra, prefix + "_minimums", np.ascontiguousarray(blocks.minimums.T), half)
    extra.append(_initializer(prefix + "_eight", np.array(8, np.float32)))
    _scaled_scales(nodes, extra, prefix, scales, (n, k // BLOCK), prefix + "_eight", prefix + "_eight_scales")
    nodes.append(helper.make_node("Add", [prefix + "_minimums", prefix + "_eight_scales"], [offsets]))
    _add_offset_product(nodes, extra, node.input[0], k, offsets, prefix, prefix + "_symmetric", node.output[0],
                        block_sums)  # fmt: skip
    return nodes, extra


def _stored(nodes: list, extra: list, name: str, values: np.ndarray, half: bool) -> None:
    """The fp32 tensor `name` holding `values`: an initializer, or with `half` an fp16 one (as a GGUF stores its
    scales and minimums) behind a Cast that onnxruntime folds into an fp32 initializer when the session loads."""
    if not half:
        extra.append(_initializer(name, values))
        return
    extra.append(_initializer(name + "_fp16", values.astype(np.float16)))
    nodes.append(helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT))


def nibbles(blocks: Blocks) -> bool:
    """Whether blocks are written as their 4-bit nibbles (`nibble_table`, computed at level 0): 8-bit blocks
    without zero points at an accuracy level below 4, for which onnxruntime has no blocked kernel (it unpacks an
    8-bit weight on every call: 75.6 ms a decode step for SmolLM2's 49152 x 576 tied head, against 1.73 ms as
    nibbles, equal to fp32 within 3e-7); levels 1-3 (fp32, fp16, bf16) are computed in fp32 then."""
    return blocks.bits == 8 and blocks.accuracy_level < 4 and blocks.zero_points is None


def nibble_table(blocks: Blocks) -> np.ndarray:
    """8-bit blocks (N, K/32, 32) as one 4-bit table (2N, K/32, 16) uint8: with the codes u = 16 h + l, rows
    0..N-1 hold the high nibbles h and rows N..2N-1 the low nibbles l, two a byte (the lower index in the low
    nibble), as MatMulNBits and GatherBlockQuantized read them. As many bytes as the 8-bit table, stored as they
    are used, so that loading a session computes nothing from them (computing the nibbles at load, as folded
    ops, set the peak RSS: 297 MB above the process while the head graph loaded, 81 MB with the nibbles stored)."""
    packed = [(p[..., 0::2] | (p[..., 1::2] << 4)) for p in (blocks.q >> 4, blocks.q & 0x0F)]
    return np.concatenate(packed).astype(np.uint8)


def _nibble_product(node, blocks: Blocks, shape: tuple, block_sums: dict[str, str], prefix: str):
    """8-bit blocks below accuracy level 4, exactly and fast (computed at level 0): with u = 16 h + l (u = q + 128) and
    d (u - 128) = 16 d (h - 8) + d (l - 8) + 8 d, the product is one 4-bit MatMulNBits over the nibble table
    (`nibble_table`: scales 16 d for the high rows, d for the low ones, default zero point 8) whose two halves are
    added, plus the block sums times 8 d. The scales are stored once (fp16 when they are fp16 values, as a GGUF's
    are), shared with a tied embedding's gather; the stacked scales and offsets are folded at load (small)."""
    k, n = shape
    scales = prefix + "_scales"
    nodes, extra = [], [_initializer(prefix + "_nibbles", nibble_table(blocks))]
    _stored(nodes, extra, scales, blocks.scales.reshape(-1), _fp16_exact(blocks.scales))
    extra += [_initializer(prefix + "_eight", np.array(8, np.float32)),
              _initializer(prefix + "_halves", np.array([n, n], np.int64))]  # fmt: skip
    nibble_scales = _nibble_scales(nodes, extra, prefix, scales)
    nodes += [
        helper.make_node("MatMulNBits", [node.input[0], prefix + "_nibbles", nibble_scales],
                         [prefix + "_halves_product"], name=(node.name or prefix) + "_nbits", domain=MS_DOMAIN,
                         K=k, N=2 * n, bits=4, block_size=BLOCK, accuracy_level=0),
        helper.make_node("Split", [prefix + "_halves_product", prefix + "_halves"],
                         [prefix + "_high_product", prefix + "_low_product"], axis=-1),
        helper.make_node("Add", [prefix + "_high_product", prefix + "_low_product"], [prefix + "_nibble_sum"]),
    ]  # fmt: skip
    _scaled_scales(nodes, extra, prefix, scales, (n, k // BLOCK), prefix + "_eight", prefix + "_offsets")
    _add_offset_product(nodes, extra, node.input[0], k, prefix + "_offsets", prefix, prefix + "_nibble_sum",
                        node.output[0], block_sums)  # fmt: skip
    return nodes, extra


def _nibble_scales(nodes: list, extra: list, prefix: str, scales: str) -> str:
    """The scales of a nibble table (`nibble_table`), stacked as its rows are: 16 d for the high nibbles, then d for
    the low ones (constant, folded at load). Returns the tensor's name."""
    extra.append(_initializer(prefix + "_sixteen", np.array(16, np.float32)))
    nodes += [helper.make_node("Mul", [scales, prefix + "_sixteen"], [prefix + "_high_scales"]),
              helper.make_node("Concat", [prefix + "_high_scales", scales], [prefix + "_nibble_scales"], axis=0)]
    return prefix + "_nibble_scales"


def _scaled_scales(nodes: list, extra: list, prefix: str, scales: str, by_block: tuple, factor: str, out: str):
    """out (K/32, N) = factor * the flat (N * K/32) scales, transposed: constant, folded at load."""
    extra.append(_initializer(prefix + "_by_block", np.array(by_block, np.int64)))
    nodes += [helper.make_node("Reshape", [scales, prefix + "_by_block"], [prefix + "_scales_2d"]),
              helper.make_node("Transpose", [prefix + "_scales_2d"], [prefix + "_scales_t"], perm=[1, 0]),
              helper.make_node("Mul", [prefix + "_scales_t", factor], [out])]  # fmt: skip


def _add_offset_product(nodes: list, extra: list, x: str, k: int, offsets: str, prefix: str, product: str,
                        output: str, block_sums: dict[str, str]) -> None:  # fmt: skip
    """output = product + (block sums of x) @ offsets, offsets (K/32, N); x's block sums computed once per input,
    as one MatMul with a constant (K, K/32) 0/1 matrix (one per K in the graph): a single node where a reshape
    and a reduction take four, which costs more than the sums themselves on a decode step (measured on a SmolLM2
    block, 2 threads: 4 nodes per input were 0.69 ms of a 5 ms step)."""
    indicator = f"block_indicator_{k}"
    if indicator not in block_sums:  # (K, K/32): 1 where row r lies in block r // 32; built by nodes (folded at
        block_sums[indicator] = indicator  # load), as the offsets are, so no quantizer takes it for a weight
        extra += [numpy_helper.from_array(np.array(v, np.int64), indicator + f"_{name}")  # (0-d scalars kept)
                  for name, v in (("zero", 0), ("one", 1), ("k", k), ("blocks", k // BLOCK), ("block", BLOCK),
                                  ("axis", [1]))]  # fmt: skip
        c = lambda name: f"{indicator}_{name}"  # noqa: E731
        nodes += [helper.make_node("Range", [c("zero"), c("k"), c("one")], [c("rows")]),
                  helper.make_node("Div", [c("rows"), c("block")], [c("row_block")]),
                  helper.make_node("Unsqueeze", [c("row_block"), c("axis")], [c("row_block_2d")]),
                  helper.make_node("Range", [c("zero"), c("blocks"), c("one")], [c("columns")]),
                  helper.make_node("Equal", [c("row_block_2d"), c("columns")], [c("mask")]),
                  helper.make_node("Cast", [c("mask")], [indicator], to=onnx.TensorProto.FLOAT)]  # fmt: skip
    if x not in block_sums:
        sums = block_sums[x] = f"{x}_block_sums_{len(block_sums)}"
        nodes.append(helper.make_node("MatMul", [x, indicator], [sums]))
    nodes += [helper.make_node("MatMul", [block_sums[x], offsets], [prefix + "_offset_product"]),
              helper.make_node("Add", [product, prefix + "_offset_product"], [output])]  # fmt: skip


def _fp16_exact(values: np.ndarray) -> bool:
    """Whether float32 `values` survive a round trip through float16 unchanged (a GGUF's scales and minimums do)."""
    return bool(np.array_equal(values.astype(np.float16).astype(np.float32), values))


def _zero_points(blocks: Blocks) -> np.ndarray:
    """MatMulNBits' zero points: 8-bit ones flat, (N * K/32,) uint8; 4-bit ones packed two a byte per row (the
    lower block in the low nibble), (N * ceil(K/32 / 2),) uint8."""
    zp = blocks.zero_points
    if blocks.bits == 8:
        return zp.reshape(-1)
    padded = np.concatenate([zp, np.zeros((len(zp), zp.shape[1] % 2), np.uint8)], axis=1)
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def _gather_block_quantized(node, blocks: Blocks):
    """The GatherBlockQuantized nodes that replace a Gather of 8-bit blocks' rows, and their initializers: one
    8-bit gather, or, for blocks written as nibbles (`nibbles`), the sum of two 4-bit gathers from the same table
    and scales as the head's product (a tied model stores them once): rows ids of the high half give
    16 d (h - 8), rows ids + N of the low half with zero point 0 give d l, and their sum is d (u - 128), exactly
    (each term and the sum are exact in fp32). Token ids are non-negative here (a negative index, which Gather
    counts from the end, would read the other half)."""
    prefix = f"{node.input[0]}_{blocks.source_type}"
    if not nibbles(blocks):  # (scales stored as the head's MatMulNBits stores them: a tied model shares them)
        nodes, extra = [], [_initializer(prefix, blocks.q.reshape(len(blocks.q), -1))]
        _stored(nodes, extra, prefix + "_scales", blocks.scales, _fp16_exact(blocks.scales))
        nodes.append(helper.make_node(
            "GatherBlockQuantized", [prefix, node.input[1], prefix + "_scales"], list(node.output),
            name=(node.name or prefix) + "_blocks", domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
            block_size=BLOCK, bits=8,
        ))  # fmt: skip
        return nodes, extra
    n, per_row = blocks.scales.shape
    table, scales = prefix + "_nibbles", prefix + "_scales"
    nodes, extra = [], [_initializer(table, nibble_table(blocks).reshape(2 * n, -1))]
    _stored(nodes, extra, scales, blocks.scales, _fp16_exact(blocks.scales))
    extra += [_initializer(prefix + "_rows", np.array(n, np.int64)),
              _initializer(prefix + "_zero_point_shape", np.array([n, (per_row + 1) // 2], np.int64))]  # fmt: skip
    zero_points = {"_high_zero_points": 0x88, "_low_zero_points": 0}  # two 4-bit zero points a byte
    nodes += [helper.make_node("ConstantOfShape", [prefix + "_zero_point_shape"], [prefix + name],
                               value=numpy_helper.from_array(np.array([value], np.uint8)))
              for name, value in zero_points.items()]  # fmt: skip
    nodes += [
        helper.make_node("Concat", [prefix + name for name in zero_points], [prefix + "_zero_points"], axis=0),
        helper.make_node("CastLike", [prefix + "_rows", node.input[1]], [prefix + "_rows_like"]),
        helper.make_node("Add", [node.input[1], prefix + "_rows_like"], [prefix + "_low_ids"]),
    ]  # fmt: skip
    nibble_scales = _nibble_scales(nodes, extra, prefix, scales)
    for half, ids in (("_high", node.input[1]), ("_low", prefix + "_low_ids")):
        nodes.append(helper.make_node(
            "GatherBlockQuantized", [table, ids, nibble_scales, prefix + "_zero_points"],
            [prefix + half + "_rows"], name=(node.name or prefix) + half + "_blocks", domain=MS_DOMAIN,
            gather_axis=0, quantize_axis=1, block_size=BLOCK, bits=4,
        ))  # fmt: skip
    nodes.append(helper.make_node("Add", [prefix + "_high_rows", prefix + "_low_rows"], list(node.output)))
    return nodes, extra
