"""The backbone written from its quantized source's own blocks: an int4 base that *is* the model we trained.

A backbone loaded from a GGUF file holds fp32 weights that transformers dequantized from the file's blocks, and the
backbone stays frozen, so those weights lie exactly on the blocks' grids. Requantizing them (RTN) would round them a
second time; instead each backbone weight is traced back to its source rows (by the bytes of each dequantized row, so
permuted rows, as llama.cpp stores q_proj / k_proj, are found too) and its blocks are written unchanged in
onnxruntime's block formats:

    GGUF Q4_0  x = d * (q - 8)      -> MatMulNBits 4-bit, scale d, default zero point 8
    GGUF Q4_1  x = d * q + m        -> MatMulNBits 4-bit, scale d, float zero point -m / d
    GGUF Q8_0  x = d * q (q signed) -> MatMulNBits 8-bit / GatherBlockQuantized 8-bit, q + 128, default zero point 128

all in blocks of 32 along the input dimension (ggml's QK = 32). Weights from other block types, and every weight
that is not a backbone row (experts, gates), are left to the configured quantizer. Sources: the ggml block layouts
(ggml-common.h, block_q4_0 / block_q4_1 / block_q8_0) and the contrib operators MatMulNBits and
GatherBlockQuantized of onnxruntime (docs/ContribOperators.md).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger("mode_edge.export")

BLOCK = 32
"""Weights per block in every supported ggml type."""
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
"""Bytes of one block: an fp16 scale (Q4_1: and an fp16 min), then the 32 quantized values."""
MS_DOMAIN = "com.microsoft"


def _row_key(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class Blocks:
    """One weight's blocks in onnxruntime's layout. q: (N, K/32, 16 or 32) uint8 (4-bit: two values a byte, the
    lower index in the low nibble); scales: (N, K/32) float32; zero_points: (N, K/32) float32, or uint8 (integer
    ones, unpacked here: onnxruntime computes in int8 only with these), or None (the type's default: 8 at 4 bits,
    128 at 8 bits); accuracy_level: the compute type of the MatMulNBits that holds them (0, in fp32, for the trained
    model's own blocks: int8 activations would round the model we measured)."""

    source_type: str
    bits: int
    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    accuracy_level: int = 0

    def dequantize(self) -> np.ndarray:
        """(N, K) float32: the weight these blocks stand for, computed as onnxruntime does."""
        if self.bits == 4:
            q = np.stack([self.q & 0x0F, self.q >> 4], axis=-1).reshape(*self.q.shape[:2], BLOCK)
        else:
            q = self.q
        default = np.float32(8 if self.bits == 4 else 128)
        zp = self.zero_points if self.zero_points is not None else np.full(self.scales.shape, default)
        return ((q.astype(np.float32) - zp[..., None]) * self.scales[..., None]).reshape(len(self.q), -1)


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
    flat = d == 0  # every value of the block is m: q 0, scale 1, zero point -m
    scales = np.where(flat, np.float32(1), d)
    zp = np.where(flat, -m, -m / np.where(flat, np.float32(1), d)).astype(np.float32)
    packed[flat] = 0
    return Blocks(source_type, 4, packed, scales.astype(np.float32), zp)


class SourceBlocks:
    """Every row of a GGUF file's Q4_0 / Q4_1 / Q8_0 tensors, findable by its dequantized fp32 values.

    path: the .gguf file the backbone was loaded from. Raises UserError (through the gguf reader) for a file that is
    not GGUF. Holds an index of 16-byte row digests (about 4 MB for SmolLM2-135M), not the weights."""

    def __init__(self, path: Path):
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
                self.index.setdefault(_row_key(row), (t.name, i))

    def find(self, weight: np.ndarray) -> Blocks | None:
        """weight: (N, K) float32, a torch Linear's weight (or an embedding). Its blocks when every row is a row of
        one source tensor (in any order) and they reproduce it; None otherwise."""
        if weight.ndim != 2 or weight.shape[1] % BLOCK:
            return None
        hits = [self.index.get(_row_key(row)) for row in weight]
        if any(h is None for h in hits) or len({h[0] for h in hits}) != 1:
            return None
        kind, raw = self.raw[hits[0][0]]
        blocks = decode_blocks(raw[[h[1] for h in hits]], kind)
        got = blocks.dequantize()
        if not np.allclose(got, weight, rtol=1e-6, atol=1e-7 * float(np.abs(weight).max())):
            return None  # the digest matched but the values do not: never write blocks that are not the weight
        return blocks


def int8_blocks(weight: np.ndarray) -> Blocks:
    """weight (N, K), K a multiple of 32 -> symmetric 8-bit blocks of 32 (Q8_0's scheme, fp32 scales): the largest
    magnitude of each block maps to 127."""
    w = weight.reshape(len(weight), -1, BLOCK).astype(np.float32)
    d = np.abs(w).max(-1) / 127.0
    d = np.where(d == 0, np.float32(1), d).astype(np.float32)
    q = (np.clip(np.rint(w / d[..., None]), -127, 127) + 128).astype(np.uint8)
    return Blocks("int8", 8, q, d, None)


class EmbeddingBlocks:
    """The token embedding rounded once to 8-bit blocks (`int8_blocks`), for the embed graph's Gather and, in a tied
    model, the head's MatMul: where no source blocks hold it, both then read the same bytes (stored once, see
    export/onnx_graphs.share_tied_embedding), and the 4-bit bundle keeps its largest, most sensitive matrix at 8 bits
    (as llama.cpp's Q4_K_M keeps the output and embedding tensors at higher precision).

    weight: (V, D) float32, the embedding table."""

    def __init__(self, weight: np.ndarray):
        self.weight = weight
        self.blocks = int8_blocks(weight) if weight.shape[1] % BLOCK == 0 else None

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


def write_source_blocks(model: onnx.ModelProto, source) -> dict[str, int]:
    """Replace, in place, every MatMul (x @ B, B a (K, N) initializer) and Gather (rows of a (V, D) initializer)
    whose weight is found in `source` (anything with find(weight (N, K)) -> Blocks | None) by MatMulNBits /
    GatherBlockQuantized over the found blocks, each at its blocks' accuracy level; the rest of the graph is untouched
    for the configured quantizer. Returns the count of replaced nodes per source type."""
    inits = {i.name: i for i in model.graph.initializer}
    counts: dict[str, int] = {}
    replaced: set[str] = set()
    nodes = []
    for node in model.graph.node:
        new = None
        if node.op_type == "MatMul" and node.input[1] in inits:
            b = numpy_helper.to_array(inits[node.input[1]])
            blocks = source.find(b.T) if b.ndim == 2 else None
            if blocks is not None:
                new, extra = _matmul_nbits(node, blocks, b.shape)
        elif node.op_type == "Gather" and node.input[0] in inits and _axis(node) == 0:
            table = numpy_helper.to_array(inits[node.input[0]])
            blocks = source.find(table) if table.ndim == 2 else None
            if blocks is not None and blocks.bits == 8:
                new, extra = _gather_block_quantized(node, blocks)
        if new is None:
            nodes.append(node)
            continue
        nodes.append(new)
        model.graph.initializer.extend(extra)
        replaced.add(node.input[1] if node.op_type == "MatMul" else node.input[0])
        counts[blocks.source_type] = counts.get(blocks.source_type, 0) + 1
    still_used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name not in replaced or i.name in still_used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if counts and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _matmul_nbits(node, blocks: Blocks, shape: tuple):
    k, n = shape
    prefix = f"{node.input[1]}_{blocks.source_type}"
    extra = [_initializer(prefix, blocks.q), _initializer(prefix + "_scales", blocks.scales.reshape(-1))]
    inputs = [node.input[0], prefix, prefix + "_scales"]
    if blocks.zero_points is not None:
        extra.append(_initializer(prefix + "_zero_points", _zero_points(blocks)))
        inputs.append(prefix + "_zero_points")
    new = helper.make_node(
        "MatMulNBits", inputs, list(node.output), name=(node.name or prefix) + "_nbits", domain=MS_DOMAIN,
        K=k, N=n, bits=blocks.bits, block_size=BLOCK, accuracy_level=blocks.accuracy_level,
    )  # fmt: skip
    return new, extra


def _zero_points(blocks: Blocks) -> np.ndarray:
    """MatMulNBits' zero points: float ones flat, (N * K/32,); 4-bit integer ones packed two a byte per row (the
    lower block in the low nibble), (N * ceil(K/32 / 2),) uint8."""
    zp = blocks.zero_points
    if zp.dtype != np.uint8 or blocks.bits == 8:
        return zp.reshape(-1)
    padded = np.concatenate([zp, np.zeros((len(zp), zp.shape[1] % 2), np.uint8)], axis=1)
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def _gather_block_quantized(node, blocks: Blocks):
    prefix = f"{node.input[0]}_{blocks.source_type}"
    extra = [_initializer(prefix, blocks.q.reshape(len(blocks.q), -1)), _initializer(prefix + "_scales", blocks.scales)]
    new = helper.make_node(
        "GatherBlockQuantized", [prefix, node.input[1], prefix + "_scales"], list(node.output),
        name=(node.name or prefix) + "_blocks", domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=BLOCK,
        bits=8,
    )  # fmt: skip
    return new, extra
