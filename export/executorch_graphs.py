"""ExecuTorch graphs: torchao quantization -> torch.export -> to_edge_transform_and_lower (XNNPACK) -> .pte.

int8 is 8-bit dynamic activations with 8-bit per-channel weights, int4 8-bit dynamic activations with 4-bit grouped
weights (Int8DynamicActivationIntxWeightConfig): the schemes XNNPACK runs natively. The head stays at 8 bits in an
int4 bundle (a tied head gets a Linear of its own: torchao does not see an F.linear), and the embedding is 8-bit
blocks of 32, gathered by ExecuTorch's quantized kernel (the ONNX bundle's bytes, exactly). Weight-only int8
(IntxWeightOnlyConfig) lowers without complaint in executorch 1.5.1 but its .pte computes garbage (max abs error
~2e8 on a tiny block, measured), so it is not offered. Each component is its own
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


class Int8EmbedGraph(torch.nn.Module):
    """The embed graph with its table in symmetric 8-bit blocks of 32 (export/source_blocks.int8_blocks, the same
    codes and scales as the ONNX bundle's embedding), gathered by ExecuTorch's quantized embedding_byte kernel:
    input_ids (B, T) int64 -> hidden (B, T, d) float32."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        from mode_edge.export.source_blocks import int8_blocks

        blocks = int8_blocks(graph.embed_tokens.weight.detach().numpy())
        q = torch.from_numpy(blocks.q.astype(np.int16) - 128).to(torch.int8)  # (V, D/32, 32), stored + 128
        self.register_buffer("q", q.reshape(len(q), -1))  # (V, D)
        self.register_buffer("scales", torch.from_numpy(blocks.scales))  # (V, D/32)

    def forward(self, input_ids):
        return torch.ops.quantized_decomposed.embedding_byte.default(self.q, self.scales, None, -127, 127, input_ids)


class LinearHeadGraph(torch.nn.Module):
    """A tied model's head graph with its matrix as an nn.Linear of its own (a copy of the embedding: the .pte holds
    its weights anyway), so that torchao quantizes it: hidden (B, T, d) -> logits (B, T, V)."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        decoder = graph.decoder
        self.norm = copy.deepcopy(decoder.norm)
        weight = decoder.embed_tokens.weight.detach()
        self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.lm_head.weight.data.copy_(weight)

    def forward(self, hidden):
        return self.lm_head(self.norm(hidden))


def quantize_module(module: torch.nn.Module, quant: str, block_size: int) -> torch.nn.Module:
    """The graph at the .pte's precision: linears as 8-bit dynamic activations with 8-bit per-channel or 4-bit
    grouped weights (torchao); the embed graph's table as 8-bit blocks of 32 (Int8EmbedGraph)."""
    if quant == "fp32":
        return module
    from mode_edge.export.graphs import EmbedGraph, HeadGraph

    if isinstance(module, EmbedGraph) and module.embed_tokens.weight.shape[1] % 32 == 0:
        import executorch.kernels.quantized  # noqa: F401  (registers the quantized embedding kernel's out variant)

        return Int8EmbedGraph(module)
    head = isinstance(module, HeadGraph)
    if head and module.decoder.lm_head is None:
        module = LinearHeadGraph(module)
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    module = copy.deepcopy(module)  # quantize_ rewrites in place; the graph shares its weights with the model
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


def export_pte(graph: torch.nn.Module, cfg, path: Path, quant: str, block_size: int, context: int) -> int:
    """Write PATH (.pte) for at most PTE_TOKENS_PER_CALL tokens a call and `context` cached positions; returns the
    bytes of activation memory the program plans (ExecuTorch allocates them when it loads the method)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    module = quantize_module(graph, quant, block_size).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = dynamic_shapes(graph, max_tokens=PTE_TOKENS_PER_CALL, max_context=context)
    with quiet(), torch.no_grad():
        program = torch.export.export(module, example_inputs(graph, cfg), dynamic_shapes=shapes)
        # the quantized embedding op is not core ATen, which the edge dialect's validity check insists on
        check = not isinstance(module, Int8EmbedGraph)
        lowered = to_edge_transform_and_lower(
            program, partitioner=[XnnpackPartitioner()], compile_config=EdgeCompileConfig(_check_ir_validity=check)
        ).to_executorch()
    path.write_bytes(lowered.buffer)
    return int(sum(lowered.executorch_program.execution_plan[0].non_const_buffer_sizes))
