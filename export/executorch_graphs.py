"""ExecuTorch graphs: torchao quantization -> torch.export -> to_edge_transform_and_lower (XNNPACK) -> .pte.

int8 is 8-bit dynamic activations with 8-bit per-channel weights, int4 8-bit dynamic activations with 4-bit grouped
weights (Int8DynamicActivationIntxWeightConfig): the schemes XNNPACK runs natively. Weight-only int8
(IntxWeightOnlyConfig) lowers without complaint in executorch 1.5.1 but its .pte computes garbage (max abs error
~2e8 on a tiny block, measured), so it is not offered. Each component is its own
program with its weights inside: the split into per-expert files is what lets a pack ship alone, so program-data
separation (.ptd) would only add a second file per component here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mode_edge.export.graphs import example_inputs
from mode_edge.export.onnx_graphs import dynamic_shapes, quiet


def quantize_module(module: torch.nn.Module, quant: str, block_size: int) -> torch.nn.Module:
    if quant == "fp32":
        return module
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    module = copy.deepcopy(module)  # quantize_ rewrites in place; the graph shares its weights with the model
    if quant == "int8":
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
    from executorch.exir import to_edge_transform_and_lower

    module = quantize_module(graph, quant, block_size).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = dynamic_shapes(graph, max_tokens=PTE_TOKENS_PER_CALL, max_context=context)
    with quiet(), torch.no_grad():
        program = torch.export.export(module, example_inputs(graph, cfg), dynamic_shapes=shapes)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(lowered.buffer)
    return int(sum(lowered.executorch_program.execution_plan[0].non_const_buffer_sizes))
