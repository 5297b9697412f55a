"""The KV cache of the device runtime: buffers written in place ("buffer" graphs, ONNX) or grown by concatenation
("concat" graphs, ExecuTorch). docs/bundle-format.md "Graph interfaces" gives both.

A "buffer" graph runs onnxruntime's GroupQueryAttention, which writes this call's keys and values into the cache
buffer it is given when the graph's present output is bound to the same memory as its past input (the
past_present_share_buffer mode of onnxruntime-genai). Each layer's buffer holds `capacity` positions; a decode step
then copies nothing, where a graph that returns its grown cache copies all of it, every step, for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GROWTH = 2
"""When a cache runs out of positions, its buffers grow to hold GROWTH times as many (at most the context)."""


def rotary_tables(inv_freq: np.ndarray, length: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of positions 0 .. length-1 times each rotary frequency (inv_freq (r/2,) float64, r the rotated
    dimensions of a head: mode_edge/rope.py), times `scale` (mode_edge/rope.scale), (length, r/2) float32 each:
    GroupQueryAttention's cos_cache / sin_cache. Computed in float64 and rounded once, so that they are the nearest float32 values (numpy's float32 cos is off by
    one unit in the last place for ~10% of them) and the native runtime (runtimes/native/src/engine.cpp), computing
    the same in C++, feeds the graphs the very same tables."""
    freqs = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
    return (np.cos(freqs) * scale).astype(np.float32), (np.sin(freqs) * scale).astype(np.float32)


@dataclass
class Cache:
    """Keys and values of every loaded graph's attention layers, by component, for the first `pos` tokens.

    "concat": kv[key] holds (1, Hkv, pos, hd) arrays. "buffer": kv[key] holds (1, Hkv, capacity, hd) buffers whose
    first `pos` positions are filled; `capacity` (0 until the first call) grows with `reserve`. `capacity_hint`:
    the positions to reserve at the first call (a generation knows its prompt and new tokens), else what it needs."""

    kv: dict[str, list[np.ndarray]] = field(default_factory=dict)
    pos: int = 0
    capacity_hint: int = 0
    capacity: int = 0
    tables: tuple[np.ndarray, ...] | None = None
    """The rotary tables (capacity, r/2) of the "buffer" graphs, cos before sin for each pair: cos_cache, sin_cache
    (then local_cos_cache, local_sin_cache where the graphs take the sliding layers' too)."""
    bindings: dict[str, object] = field(default_factory=dict)
    """Per component, the graph's I/O binding with this cache's buffers bound (OnnxGraph.run_in_place)."""

    def reserve(self, total: int, context: int, kv_heads: int, head_dim: int,
                ropes: list[tuple[np.ndarray, float]]) -> None:  # fmt: skip
        """Make room for `total` positions in every buffer ("buffer" caches): at the first call, max(total,
        capacity_hint); after, GROWTH times the capacity, each at most `context`. The filled positions are kept.
        ropes: (inv_freq, scale) of each pair of rotary tables (mode_edge/rope.rotary_pairs)."""
        if total <= self.capacity:
            return
        want = max(total, self.capacity_hint) if self.capacity == 0 else max(total, GROWTH * self.capacity)
        self.capacity = min(want, context)
        for key, buffers in self.kv.items():
            grown = []
            for b in buffers:
                new = np.zeros((1, kv_heads, self.capacity, head_dim), dtype=np.float32)
                new[:, :, : self.pos] = b[:, :, : self.pos]
                grown.append(new)
            self.kv[key] = grown
        self.bindings.clear()  # they name the old buffers
        self.tables = tuple(t for freq, scale in ropes for t in rotary_tables(freq, self.capacity, scale))

    def buffers(self, key: str, layers: int, kv_heads: int, head_dim: int) -> list[np.ndarray]:
        """The buffers of component `key` (2 per layer, k before v), allocated at the first call."""
        if key not in self.kv:  # (the expert set is fixed for a cache's lifetime: the first call is the prefill)
            shape = (1, kv_heads, self.capacity, head_dim)
            self.kv[key] = [np.zeros(shape, dtype=np.float32) for _ in range(2 * layers)]
        return self.kv[key]

    def positions(self, tokens: int) -> list[np.ndarray]:
        """The position inputs of a "buffer" graph for `tokens` new tokens after `pos`: seqlens_k (1,) int32 (the
        total minus one), total_sequence_length () int32, then the rotary tables (`tables`)."""
        total = self.pos + tokens
        return [np.array([total - 1], dtype=np.int32), np.array(total, dtype=np.int32), *self.tables]
