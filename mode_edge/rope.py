"""Rotary position embedding frequencies, one definition for every place that needs them: the PyTorch model
(training/model.Rotary), the exported graphs (export/graphs.py) and the runtimes' cos/sin tables (runtimes/kv_cache.py;
the native runtime's engine.cpp computes the same formula). Pure numpy.

Plain RoPE (Su et al. 2021): inv_freq[i] = theta ** (-2i / head_dim). Llama 3.x scales it for a longer context
("llama3" rope type, Hugging Face's `_compute_llama3_parameters`): wavelengths 2 pi / inv_freq longer than
original_max_position_embeddings / low_freq_factor are divided by `factor`, shorter than .. / high_freq_factor are
kept, and the band between is interpolated linearly in original_max_position_embeddings / wavelength.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from mode_edge.errors import UserError

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling, what: str) -> None:
    """None, or a complete llama3 scaling with positive numbers and high_freq_factor > low_freq_factor. Raises
    UserError naming the field."""
    if scaling is None:
        return
    ok = isinstance(scaling, dict) and scaling.get("rope_type") == "llama3" and all(
        isinstance(scaling.get(k), numbers.Real) and not isinstance(scaling.get(k), bool) and scaling[k] > 0
        and math.isfinite(scaling[k]) for k in LLAMA3_KEYS)  # fmt: skip
    if not ok or scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise UserError(f"{what} must be null or {{'rope_type': 'llama3', {', '.join(repr(k) for k in LLAMA3_KEYS)}}} "
                        f"with positive numbers and high_freq_factor > low_freq_factor, got {scaling!r}")


def inv_freq(theta: float, head_dim: int, scaling: dict | None = None) -> np.ndarray:
    """The rotary frequencies (head_dim / 2,) in float64, radians per position."""
    freq = float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return freq
    factor, low, high, old = (float(scaling[k]) for k in LLAMA3_KEYS)
    wavelen = 2 * math.pi / freq
    smooth = (old / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old / low, freq / factor, freq)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, (1 - smooth) * freq / factor + smooth * freq, scaled)
