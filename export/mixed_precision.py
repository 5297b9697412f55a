"""`--quant mixed`: 4-bit weights, with the layers that 4-bit rounding hurts most kept at 8 bits.

The rule is llama.cpp's for its Q4_K_M type (llama-quant.cpp, `use_more_bits`): the attention's value projection
and the MLP's down projection get more bits in the first and last eighth of the layers and in every third layer
between them (14 of SmolLM2's 30 layers; llama.cpp gives them 6 bits); every other linear layer is 4-bit. Here
the "more bits" are symmetric 8-bit blocks of 32 in Q8_0's scheme (export/source_blocks.int8_blocks), whatever
--block-size is. They multiply int8 activations (accuracy level 4) unless --accuracy-level asks for 0-3 (then at
level 0, fp32 compute, in the exact nibble form of the 8-bit head): onnxruntime has no fast fp32 kernel for 8-bit
weights, and --accuracy-level auto, which may pick level 0 for a graph, leaves them at 4. Measured on SmolLM2 with
the base rounded again (README, export section): fp32 compute for these layers was 17% slower to decode than level 4
and no more accurate (every domain within 0.25 points). The rule counts the backbone's layers over the whole model
and each expert's layers over its own stack.

Weights that a source holds exactly (a GGUF's own blocks) are written from it first, so with the default exact base
the mixed rule reaches only the experts; it matters for a base that is rounded (`--requantize-base`, a checkpoint
without quantized source).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mode_edge.export.source_blocks import BLOCK, Blocks, int8_blocks, weight_key


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's rule: the first and last eighth of `n_layers` layers, and every third layer between them."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def more_bits_layers(layers) -> list[np.ndarray]:
    """The (N, K) fp32 weights that get 8 bits among `layers` (a sequence of decoder layers, in order): the value
    and down projections of the layers `use_more_bits` picks."""
    n = len(layers)
    chosen = []
    for i, layer in enumerate(layers):
        if use_more_bits(i, n):
            chosen += [layer.self_attn.v_proj.weight, layer.mlp.down_proj.weight]
    return [w.detach().float().numpy() for w in chosen]


class MoreBits:
    """The 8-bit blocks of a model's `more_bits_layers`, found by their fp32 values (a block source, as
    export/source_blocks.SourceBlocks is). model: a training.model.MoDEModel; accuracy_level: --accuracy-level
    ('auto' or 4: int8 activations; 0-3: level 0, fp32 compute, as nibbles). Weights whose input width is not a
    multiple of 32 are left to the quantizer (4-bit)."""

    def __init__(self, model, accuracy_level: int | str = "auto"):
        level = 4 if accuracy_level in ("auto", 4) else 0
        stacks = [list(model.backbone.layers)]
        stacks += [[layer for block in expert.blocks for layer in block.layers] for expert in model.experts.values()]
        self.blocks: dict[bytes, Blocks] = {}
        for stack in stacks:
            for weight in more_bits_layers(stack):
                if weight.shape[1] % BLOCK == 0:
                    blocks = dataclasses.replace(int8_blocks(weight), source_type="mixed8", accuracy_level=level)
                    self.blocks.setdefault(weight_key(weight), blocks)

    def find(self, weight: np.ndarray) -> Blocks | None:
        return self.blocks.get(weight_key(weight)) if weight.ndim == 2 else None

    def holds(self, weight: np.ndarray) -> bool:
        """Whether `weight` ((N, K) fp32) is one of the 8-bit ones (so GPTQ need not calibrate it)."""
        return self.find(weight) is not None
