"""Calibrated 4-bit rounding (GPTQ): each linear layer rounded against the inputs it really sees.

Round-to-nearest (RTN) rounds every weight on its own. GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", Algorithm 1) rounds a layer's input columns in turn and moves
each column's rounding error onto the columns not yet rounded, through the inverse of H = 2/n X^T X over the layer's
real inputs X (n tokens), so that the layer's *output* on such inputs changes least. The inputs here are what the
PyTorch model feeds each layer while it reads the expert's own training text (the train split, never held-out text):
an expert's layers see their expert's text, a backbone layer (rounded only when no quantized source holds it) the
text of every expert.

Each group of 32 input columns gets an asymmetric 4-bit grid, x = d * (q - z) with q and the zero point z in 0..15,
fixed when GPTQ reaches the group's first column (as the reference implementation does with groups). Integer zero
points, not a float minimum, because only with integer ones does onnxruntime use its blocked kernels (and multiply
in int8 at accuracy level 4): with float ones it silently computes on an unpacked fp32 copy, 30-40x slower.
The codes are written as they are (export/source_blocks.write_source_blocks): onnxruntime's own GPTQ path rounds
GPTQ's result a second time onto a fresh grid, which measured worse than plain RTN on our experts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mode_edge.errors import UserError
from mode_edge.export.source_blocks import BLOCK, Blocks, weight_key
from mode_edge.training.model import MoDEModel

CALIBRATION_WINDOWS = (16, 256)
"""Windows x tokens of each expert's text that GPTQ calibrates on: 4,096 tokens, more than the widest layer input
(SmolLM2's 1,536-wide down_proj), so that H has full rank before damping."""


def calibration_shape(context: int) -> tuple[int, int]:
    """CALIBRATION_WINDOWS for a model of `context` positions: its windows, or the same tokens in windows of the
    context where the context is shorter (`export --context`)."""
    windows, tokens = CALIBRATION_WINDOWS
    return (windows, tokens) if context >= tokens else (-(-windows * tokens // context), context)


def training_text(meta: dict, override: Path | None) -> Path:
    """The corpus an expert was trained on (its record), or `override`.

    Raises UserError when the record names none or the folder is gone, with the fix (--calibration-data)."""
    if override is not None:
        return Path(override)
    training = meta.get("training") or {}
    stage = training.get("expert_stage", training)  # a composed run nests the expert's own stage
    data = stage.get("data") or []
    name = meta.get("name", "?")
    if not data or not Path(data[0]).is_dir():
        where = f"its training text {data[0]} is gone" if data else "its record names no training text"
        raise UserError(f"--quant-method gptq calibrates expert {name!r} on its training text, but {where}; "
                        f"pass --calibration-data DIR (a prepared corpus of the expert's domain)")  # fmt: skip
    return Path(data[0])


def calibration_windows(corpus_dir: Path, tokenizer, windows: int, seq_len: int) -> torch.Tensor:
    """The first `windows` windows of `seq_len` tokens of a corpus's train split, in file order: (N, seq_len)."""
    from mode_edge.training.data import held_out, load_corpus, require_split

    docs = require_split(load_corpus(corpus_dir), "train")
    return held_out(docs, tokenizer, seq_len, windows * seq_len).windows[:, :seq_len]


def composed_block_inputs(model: MoDEModel, windows: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states entering each MoDE block of the composed model (experts mixed in, unlike the backbone-only
    training/router.block_inputs) while it reads `windows` (N, T), one window at a time: one (N, T, d) per block.
    What a block graph sees at run time; benchmarks and tests hold quantized graphs against fp32 on these."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    hooks = [block.register_forward_pre_hook(lambda _m, args, i=i: captured[i].append(args[0].detach().clone()))
             for i, block in enumerate(model.blocks)]  # fmt: skip
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None, :])
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(c) for c in captured]


def layer_inputs(
    model: MoDEModel, texts: dict[str, torch.Tensor], skip=lambda w: False
) -> dict[nn.Linear, torch.Tensor]:
    """H = 2/n X^T X (K, K) float64 of every linear layer of the model's blocks, X its n input rows (tokens) while
    the model reads `texts` ({expert name: (N, T) token ids}, one window at a time): an expert's layers over their
    own expert's text only, the backbone's over all. Layers for which skip(weight (N, K) ndarray) is true are left
    out (their weights come from a quantized source)."""
    owner: dict[nn.Linear, str | None] = {}
    for block in model.blocks:
        for layer in block.backbone:
            owner.update({m: None for m in layer.modules() if isinstance(m, nn.Linear)})
        for name, expert in block.experts.items():
            owner.update({m: name for m in expert.layers.modules() if isinstance(m, nn.Linear)})
    owner = {m: o for m, o in owner.items() if not skip(m.weight.detach().numpy())}
    sums = {m: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in owner}
    rows = dict.fromkeys(owner, 0)
    reading: list[str] = [""]

    def record(module, args):
        if owner[module] in (None, reading[0]):
            x = args[0].detach().reshape(-1, module.in_features).double()  # (n, K)
            sums[module] += x.T @ x
            rows[module] += len(x)

    hooks = [m.register_forward_pre_hook(record) for m in owner]
    try:
        with torch.no_grad():
            for name, windows in texts.items():
                reading[0] = name
                for window in windows:
                    model(window[None, :])
    finally:
        for hook in hooks:
            hook.remove()
    return {m: 2.0 * sums[m] / max(rows[m], 1) for m in owner}


def gptq_blocks(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01, lazy: int = 128) -> Blocks:
    """GPTQ of one weight (N, K) float32, K a multiple of 32, given H (K, K) float64 -> asymmetric 4-bit Blocks
    (x = d * (q - z), integer zero point z per group) in onnxruntime's MatMulNBits layout. percdamp: the damping
    added to H's diagonal, as a share of its mean; lazy: columns per lazy batch update (the paper's B)."""
    n, k = weight.shape
    w = weight.detach().double().clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0  # an input that never fires: its column costs nothing, so it is zeroed
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _upper_inverse_factor(h, percdamp)  # (K, K)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, k // BLOCK, dtype=torch.float64)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % BLOCK == 0:  # the group's grid, from its columns as GPTQ has updated them so far
                group = w1[:, i : i + BLOCK]
                lo = torch.clamp(group.min(dim=1).values, max=0)  # the grid holds 0, as the reference's does
                hi = torch.clamp(group.max(dim=1).values, min=0)
                d = torch.where(hi > lo, (hi - lo) / 15, 1.0)
                scales[:, col // BLOCK], zeros[:, col // BLOCK] = d, torch.clamp(torch.round(-lo / d), 0, 15)
            d, z = scales[:, col // BLOCK], zeros[:, col // BLOCK]
            q = torch.clamp(torch.round(w1[:, i] / d) + z, 0, 15)
            codes[:, col] = q.to(torch.uint8)
            err = (w1[:, i] - d * (q - z)) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    values = codes.numpy().reshape(n, k // BLOCK, BLOCK)
    packed = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
    return Blocks("gptq", 4, packed, scales.float().numpy(), zeros.numpy().astype(np.uint8))


def _upper_inverse_factor(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)^-1, with the damping raised tenfold (up to three times) where H is
    too ill-conditioned to factor (few tokens, near-duplicate inputs), as GPTQ's reference implementations advise."""
    eye = torch.eye(len(h), dtype=h.dtype)
    for attempt in range(4):
        damped = h + percdamp * 10**attempt * torch.mean(torch.diag(h)) * eye
        try:
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise UserError("GPTQ could not factor a layer's input Hessian even with 10x damping; calibrate on more text "
                    "(--calibration-data) or use --quant-method rtn")


class CalibratedBlocks:
    """GPTQ blocks of every linear layer of the model's blocks, findable by the weight's values, as SourceBlocks is.

    Build with `calibrate`; their MatMulNBits compute at the bundle's accuracy level (Blocks.accuracy_level)."""

    def __init__(self, blocks: dict[bytes, Blocks]):
        self.blocks = blocks

    def find(self, weight: np.ndarray) -> Blocks | None:
        return self.blocks.get(weight_key(weight)) if weight.ndim == 2 else None


def calibrate(model: MoDEModel, texts: dict[str, torch.Tensor], accuracy_level: int, skip=lambda w: False,
              progress=None) -> CalibratedBlocks:  # fmt: skip
    """GPTQ blocks of the model's linear layers from their inputs over `texts` (see layer_inputs); layers whose
    weight skip() accepts, or whose input width is not a multiple of 32, are left to the configured quantizer."""
    hessians = layer_inputs(model, texts, lambda w: skip(w) or w.shape[1] % BLOCK != 0)
    blocks = {}
    for j, (module, h) in enumerate(hessians.items()):
        if progress is not None:
            progress.show(f"calibrate GPTQ, layer {j + 1} of {len(hessians)}")
        weight = module.weight.detach()
        b = gptq_blocks(weight, h)
        blocks.setdefault(weight_key(weight.numpy()), dataclasses.replace(b, accuracy_level=accuracy_level))
    return CalibratedBlocks(blocks)
