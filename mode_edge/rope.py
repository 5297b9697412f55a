"""Rotary position embedding frequencies, one definition for every place that needs them: the PyTorch model
(training/model.Rotary), the exported graphs (export/graphs.py) and the runtimes' cos/sin tables (runtimes/kv_cache.py;
the native runtime's engine.cpp computes the same formula). Pure numpy.

Plain RoPE (Su et al. 2021): inv_freq[i] = theta ** (-2i / r), r the dimensions of a head it turns (the head's, or
fewer under a partial rotary embedding, Phi-4-mini's). Llama 3.x scales it for a longer context
("llama3" rope type, Hugging Face's `_compute_llama3_parameters`): wavelengths 2 pi / inv_freq longer than
original_max_position_embeddings / low_freq_factor are divided by `factor`, shorter than .. / high_freq_factor are
kept, and the band between is interpolated linearly in original_max_position_embeddings / wavelength. Phi-3.5-mini
("longrope", LongRoPE, Ding et al. 2024, as Hugging Face's `_compute_longrope_parameters`): each frequency
divided by its own factor, and cos and sin multiplied by `attention_factor`. Its checkpoints hold two sets: the short
factors for a context within original_max_position_embeddings, the long ones past it. Which set applies is chosen
once, by the context the model is built for, as llama.cpp chooses by its context size (transformers switches per
call by the sequence's length): a backbone loads at its original context with the short factors unless a longer
context is asked for (`mode-edge export --context`), and the set taken is recorded under its own key, "short_factor"
or "long_factor". A GGUF file holds
Llama 3.x's scaling (and linear scaling) as what llama.cpp computes with, one divisor per frequency (its rope_freqs
tensor, ggml's freq_factors): "frequency_factors", each frequency divided by its factor.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from mode_edge.errors import UserError

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
LONGROPE_SETS = ("short_factor", "long_factor")
"""LongRoPE's factor sets; a rope_scaling records the one its context takes."""


def factors_key(scaling: dict) -> str | None:
    """The key of the divisors per frequency in `scaling`: "factors" (frequency_factors), the LongRoPE set recorded
    ("short_factor" or "long_factor"), None for llama3's parameters."""
    if scaling["rope_type"] == "frequency_factors":
        return "factors"
    if scaling["rope_type"] == "longrope":
        return next((k for k in LONGROPE_SETS if k in scaling), "short_factor")
    return None


def longrope_set(scaling: dict | None) -> str | None:
    """Which of LongRoPE's factor sets `scaling` records: "short" or "long"; None for other scaling or none."""
    if scaling is None or scaling.get("rope_type") != "longrope":
        return None
    return factors_key(scaling).removesuffix("_factor")


def positive(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 and math.isfinite(v)


def check_rope_scaling(scaling, what: str, rotated: int | None = None) -> None:
    """None; or llama3 with positive LLAMA3_KEYS and high_freq_factor > low_freq_factor; or longrope with a positive
    attention_factor and rotated / 2 positive values in one of short_factor and long_factor (the length checked when
    `rotated`, the dimensions of a head the rotary embedding turns, is given); or frequency_factors with such
    `factors`. Raises UserError naming the field."""
    if scaling is None:
        return
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind == "llama3":
        ok = all(positive(scaling.get(k)) for k in LLAMA3_KEYS)
        ok = ok and scaling["high_freq_factor"] > scaling["low_freq_factor"]
    elif kind in ("longrope", "frequency_factors"):
        factors = scaling.get(factors_key(scaling))
        ok = kind == "frequency_factors" or sum(k in scaling for k in LONGROPE_SETS) == 1
        ok = ok and isinstance(factors, list) and all(map(positive, factors))
        ok = ok and (rotated is None or len(factors) == rotated // 2)
        ok = ok and (kind == "frequency_factors" or positive(scaling.get("attention_factor")))
    else:
        ok = False
    if not ok:
        raise UserError(f"{what} must be null, {{'rope_type': 'llama3', {', '.join(repr(k) for k in LLAMA3_KEYS)}}} "
                        f"(positive, high_freq_factor > low_freq_factor), {{'rope_type': 'longrope', "
                        f"'short_factor' or 'long_factor': [one positive number per turned frequency], "
                        f"'attention_factor'}} or "
                        f"{{'rope_type': 'frequency_factors', 'factors': [one positive number per turned frequency]}}, "
                        f"got {scaling!r}")  # fmt: skip


def inv_freq(theta: float, rotated: int, scaling: dict | None = None) -> np.ndarray:
    """The rotary frequencies (rotated / 2,) in float64, radians per position; `rotated`: the dimensions of a head
    the rotation turns."""
    freq = float(theta) ** (-np.arange(0, rotated, 2, dtype=np.float64) / rotated)
    if scaling is None:
        return freq
    key = factors_key(scaling)
    if key is not None:
        return freq / np.asarray(scaling[key], dtype=np.float64)
    factor, low, high, old = (float(scaling[k]) for k in LLAMA3_KEYS)
    wavelen = 2 * math.pi / freq
    smooth = (old / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old / low, freq / factor, freq)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, (1 - smooth) * freq / factor + smooth * freq, scaled)


def scale(scaling: dict | None) -> float:
    """What cos and sin are multiplied by: longrope's attention_factor, else 1."""
    return float(scaling["attention_factor"]) if scaling is not None and scaling["rope_type"] == "longrope" else 1.0


def rotary_pairs(theta: float, rotated: int, scaling: dict | None = None,
                 local_theta: float | None = None) -> list[tuple[np.ndarray, float]]:  # fmt: skip
    """The (frequencies (rotated / 2,) float64, scale of cos and sin) of each pair of rotary tables a decoder's
    attention reads, in the order its graphs take them: the full layers' (`inv_freq`, `scale`), then, with
    `local_theta` (Gemma 3's sliding layers), plain RoPE of that base over the same dimensions."""
    pairs = [(inv_freq(theta, rotated, scaling), scale(scaling))]
    return pairs + ([(inv_freq(local_theta, rotated), 1.0)] if local_theta is not None else [])
