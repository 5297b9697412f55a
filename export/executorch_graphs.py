"""ExecuTorch graphs: torchao quantization -> torch.export -> to_edge_transform_and_lower (XNNPACK) -> .pte.

int8 is 8-bit dynamic activations with 8-bit per-channel weights, int4 8-bit dynamic activations with 4-bit grouped
weights (Int8DynamicActivationIntxWeightConfig): the schemes XNNPACK runs natively. The head stays at 8 bits in an
int4 bundle (a tied head gets a Linear of its own: torchao does not see an F.linear), and the embedding is 8-bit
blocks of 32, gathered by ExecuTorch's quantized kernel (the ONNX bundle's bytes, exactly). Weight-only int8
(IntxWeightOnlyConfig) lowers without complaint in executorch 1.5.1 but its .pte computes garbage (max abs error
~2e8 on a tiny block, measured), so it is not offered. Weights with 4-bit blocks of their own (the GGUF's Q4_0 / Q4_1
rows of the backbone, GPTQ's blocks of an expert) are not rounded again: their codes and scales become the 4-bit
weight as they are (`SourceBlockLinear`), so at either precision the backbone is the trained model up to the 8-bit
rounding of activations XNNPACK's scheme needs. Each component is its own
program with its weights inside: the split into per-expert files is what lets a pack ship alone, so program-data
separation (.ptd) would only add a second file per component here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from mode_edge.export.graphs import example_inputs
from mode_edge.export.onnx_graphs import dynamic_shapes, quiet
from mode_edge.export.source_blocks import BLOCK


class Int8EmbedGraph(torch.nn.Module):
    """The embed graph with its table in symmetric 8-bit blocks of 32 (export/source_blocks.int8_blocks, the same
    codes and scales as the ONNX bundle's embedding), gathered by ExecuTorch's quantized embedding_byte kernel, then
    times the embed graph's scale where it has one (Gemma's sqrt(d)): input_ids (B, T) int64 -> hidden (B, T, d)
    float32."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        from mode_edge.export.source_blocks import int8_blocks

        blocks = int8_blocks(graph.embed_tokens.weight.detach().numpy())
        q = torch.from_numpy(blocks.q.astype(np.int16) - 128).to(torch.int8)  # (V, D/32, 32), stored + 128
        self.register_buffer("q", q.reshape(len(q), -1))  # (V, D)
        self.register_buffer("scales", torch.from_numpy(blocks.scales))  # (V, D/32)
        self.scale = graph.scale

    def forward(self, input_ids):
        from mode_edge.training.model import scale_rows

        rows = torch.ops.quantized_decomposed.embedding_byte.default(self.q, self.scales, None, -127, 127, input_ids)
        return scale_rows(rows, self.scale)


class LinearHeadGraph(torch.nn.Module):
    """The head graph as the final norm and an nn.Linear of its own, so that torchao quantizes it: a tied model's
    F.linear on the embedding becomes a Linear over a copy of it (the .pte holds its weights anyway), and an untied
    head leaves the rest of the decoder behind (the head graph holds all of it, which quantization would walk):
    hidden (B, T, d) -> logits (B, T, V)."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        decoder = graph.decoder
        self.norm = copy.deepcopy(decoder.norm)
        weight = (decoder.lm_head or decoder.embed_tokens).weight.detach()
        self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.lm_head.weight.data.copy_(weight)

    def forward(self, hidden):
        return self.lm_head(self.norm(hidden))


def xnnpack_codes(blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """4-bit blocks as XNNPACK's symmetric 4-bit weights take them: codes (N, K/32, 32) int8 in [-8, 7], scales
    (N, K/32) float32, all positive, and what each block adds beyond scale * code, (N, K/32) float32 or None when
    nothing. A block's d (q - 8) is the code q - 8 at scale d, except where XNNPACK refuses the scale: a negative d
    (ggml's Q4_0 takes the sign of the largest magnitude) becomes (-d) (7 - q) plus -d added, since d (q - 8) =
    (-d) (8 - q) and 8 - q runs to 8; a zero d (a block of equal values) becomes codes 0 at scale 1."""
    codes = blocks.codes().astype(np.int16) - 8
    d = blocks.scales.astype(np.float32)
    constants = blocks.block_constants()
    added = np.zeros_like(d) if constants is None else constants.copy()
    negative, zero = d < 0, d == 0
    codes = np.where(negative[..., None], -codes - 1, codes)
    added = np.where(negative, added - d, added)
    codes = np.where(zero[..., None], 0, codes)
    scales = np.where(negative, -d, np.where(zero, np.float32(1), d)).astype(np.float32)
    constants = added.astype(np.float32) if constants is not None or negative.any() else None
    return codes.astype(np.int8), np.ascontiguousarray(scales), constants


def int4_weight(codes: np.ndarray, scales: np.ndarray):
    """codes (N, K/32, 32) int8 in [-8, 7] and scales (N, K/32) float32 > 0 -> torchao's IntxUnpackedToInt8Tensor
    (N, K), symmetric 4-bit blocks of 32 with 8-bit dynamic per-token activations: the weight XNNPACK lowers to its
    blockwise 4-bit kernel (the tensor Int8DynamicActivationIntxWeightConfig makes, with the codes given)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActivationQuantization,
    )

    n, groups, block = codes.shape
    return IntxUnpackedToInt8Tensor(
        torch.from_numpy(np.ascontiguousarray(codes).reshape(n, -1)), torch.from_numpy(np.ascontiguousarray(scales)),
        torch.zeros(n, groups, dtype=torch.int8), torch.int4, (1, block), torch.float32,
        ActivationQuantization.INT8_ASYM_PER_TOKEN,
    )  # fmt: skip


def block_sums_weight(groups: int) -> torch.nn.Parameter:
    """The 4-bit weight S (groups, 32 groups) whose row g has code 1 over block g and 0 elsewhere, at scale 1: its
    product with x is the sums of x's blocks of 32, of the same 8-bit activations the layer's own product rounds x
    to. (A sum op would run outside XNNPACK and split the graph at every layer; an fp32 0/1 matrix would be read at
    32 bits a weight.)"""
    codes = np.zeros((groups, groups, BLOCK), np.int8)
    codes[np.arange(groups), np.arange(groups)] = 1
    return torch.nn.Parameter(int4_weight(codes, np.ones((groups, groups), np.float32)), requires_grad=False)


class SourceBlockLinear(torch.nn.Module):
    """A linear layer over 4-bit blocks of 32 that a source holds (export/source_blocks.Blocks: a GGUF's Q4_0 /
    Q4_1, GPTQ's), in XNNPACK's one 4-bit scheme without rounding them again: the codes q - 8 in [-8, 7] with the
    blocks' own scales d are the symmetric 4-bit weight (8-bit dynamic activations, as torchao's
    Int8DynamicActivationIntxWeightConfig makes it), and what a block adds beyond d (q - 8) (Q4_1: m + 8 d; a zero
    point z: d (8 - z)) is a small fp32 product of the input's block sums (as in the ONNX bundle, which sums x in
    fp32):

        y = x W^T = x (d (q - 8))^T + (x @ S^T) @ offsets^T     (S (K/32, K): code 1 where column k is in block g)

    with x rounded to 8 bits per token in both products (XNNPACK's dynamic quantization, the same rounding in
    both), so y is the source's weight times that activation, exactly but for the block scales, which XNNPACK stores
    as bfloat16: a weight moves by at most 8 * 2^-8 d, 1/480 of a Q4_1 block's range, where rounding Q4_1's grid
    again moves it by up to 1/30. `block_sums`: S = block_sums_weight(K/32), passed to share one among the layers
    of a width (made here when None). x (..., K) -> y (..., N), plus `bias` (N,) when given. Raises ValueError for
    blocks that are not 4-bit."""

    def __init__(self, blocks, bias: torch.Tensor | None = None, block_sums: torch.nn.Parameter | None = None):
        super().__init__()
        if blocks.bits != 4:
            raise ValueError(f"SourceBlockLinear takes 4-bit blocks, not {blocks.bits}-bit {blocks.source_type}")
        codes, scales, constants = xnnpack_codes(blocks)
        self.weight = torch.nn.Parameter(int4_weight(codes, scales), requires_grad=False)
        self.offsets = None if constants is None else torch.nn.Parameter(
            torch.from_numpy(np.ascontiguousarray(constants)), requires_grad=False)  # (N, K/32)  # fmt: skip
        self.block_sums = None if constants is None else block_sums if block_sums is not None else (
            block_sums_weight(scales.shape[1]))  # fmt: skip
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = torch.nn.functional.linear(x, self.weight, self.bias)  # (..., N)
        if self.offsets is None:
            return y
        sums = torch.nn.functional.linear(x, self.block_sums)  # (..., K/32)
        return y + torch.nn.functional.linear(sums, self.offsets)


def use_source_blocks(module: torch.nn.Module, source) -> dict[str, int]:
    """Replace, in place, every nn.Linear of `module` whose weight `source` holds as 4-bit blocks
    (anything with find(weight (N, K)) -> Blocks | None) by a SourceBlockLinear over them; returns the count of
    replaced layers per source type (the manifest's export.pte_block_sources). 8-bit blocks (an embedding's, --quant
    mixed's) are left to torchao: XNNPACK's 8-bit weights are per channel, not per block."""
    counts: dict[str, int] = {}
    sums: dict[tuple[int, int], torch.nn.Parameter] = {}  # one block-sum weight per (width, blocks), shared
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            blocks = source.find(child.weight.detach().numpy())
            if blocks is None or blocks.bits != 4:
                continue
            shape = (child.in_features, blocks.scales.shape[1])
            layer = SourceBlockLinear(blocks, child.bias, sums.get(shape))
            if layer.block_sums is not None:
                sums[shape] = layer.block_sums
            setattr(parent, name, layer)
            counts[blocks.source_type] = counts.get(blocks.source_type, 0) + 1
    return counts


def quantize_module(module: torch.nn.Module, quant: str, block_size: int, source=None,
                    counts: dict[str, int] | None = None) -> torch.nn.Module:  # fmt: skip
    """The graph at the .pte's precision: linears as 8-bit dynamic activations with 8-bit per-channel or 4-bit
    grouped weights (torchao), those whose 4-bit blocks `source` holds over those blocks as they are
    (`use_source_blocks`; `counts` receives what it replaced); the embed graph's table as 8-bit blocks of 32
    (Int8EmbedGraph)."""
    if quant == "fp32":
        return module
    from mode_edge.export.graphs import EmbedGraph, HeadGraph

    if isinstance(module, EmbedGraph) and module.embed_tokens.weight.shape[1] % 32 == 0:
        import executorch.kernels.quantized  # noqa: F401  (registers the quantized embedding kernel's out variant)

        return Int8EmbedGraph(module)
    head = isinstance(module, HeadGraph)
    if head:
        module = LinearHeadGraph(module)
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    module = copy.deepcopy(module)  # quantize_ rewrites in place; the graph shares its weights with the model
    if source is not None:
        replaced = use_source_blocks(module, source)
        if counts is not None:
            counts.update(replaced)
    if quant == "int8" or head:  # the head at 8 bits in an int4 bundle too, as the ONNX bundle keeps it
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    else:
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(block_size))
    quantize_(module, config)
    return module


PTE_TOKENS_PER_CALL = 64
"""Most tokens one .pte call takes; the runtime feeds a longer prompt in chunks of this many. ExecuTorch plans every
activation for the largest shapes the program accepts, up front: a SmolLM2 head exported for any length planned
12.4 GB (65,536 tokens x 49,152 logits), which is what made an earlier full export grow past 19 GB."""


def lower(module: torch.nn.Module, inputs: tuple, shapes=None, check_ir: bool = True):
    """torch.export of `module` on `inputs` (dynamic `shapes` as torch.export takes them), lowered to XNNPACK
    wherever its partitioner takes the ops: the ExecutorchProgramManager (.buffer: the .pte's bytes)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    with quiet(), torch.no_grad():
        program = torch.export.export(module, inputs, dynamic_shapes=shapes)
        return to_edge_transform_and_lower(
            program, partitioner=[XnnpackPartitioner()], compile_config=EdgeCompileConfig(_check_ir_validity=check_ir)
        ).to_executorch()


def export_pte(graph: torch.nn.Module, cfg, path: Path, quant: str, block_size: int, context: int, source=None,
               counts: dict[str, int] | None = None) -> int:  # fmt: skip
    """Write PATH (.pte) for at most PTE_TOKENS_PER_CALL tokens a call and `context` cached positions, its linears
    over `source`'s 4-bit blocks where it holds them (`quantize_module`; `counts` receives how many, by block type);
    returns the bytes of activation memory the program plans (ExecuTorch allocates them when it loads the method)."""
    module = quantize_module(graph, quant, block_size, source, counts).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = dynamic_shapes(graph, max_tokens=PTE_TOKENS_PER_CALL, max_context=context)
    # the quantized embedding op is not core ATen, which the edge dialect's validity check insists on
    lowered = lower(module, example_inputs(graph, cfg), shapes, check_ir=not isinstance(module, Int8EmbedGraph))
    path.write_bytes(lowered.buffer)
    return int(sum(lowered.executorch_program.execution_plan[0].non_const_buffer_sizes))
