"""Export-only rewrites of the MoDE model into the per-component graphs of a bundle (nn.Module -> nn.Module).

The training model keeps its KV cache in a Python dict and branches on shapes; an exported graph cannot. Here every
graph that holds attention layers takes the cache as tensors. Two cache interfaces, one per format:

- "buffer" (ONNX): the cache is a buffer of C >= P+T positions per layer, written in place. The graph takes the
  positions as GroupQueryAttention does (seqlens_k = P+T-1, total_sequence_length = P+T) with the rotary tables
  for C positions, and its attention is onnxruntime's fused GroupQueryAttention (rotary, cache write, grouped
  heads, causal softmax in one kernel); the runtime binds each layer's past and present to the same memory, so a
  decode step copies nothing and costs the same at any context length.
- "concat" (ExecuTorch): past k/v hold the P cached positions and the graph returns them grown to P+T.

    embed      input_ids (B, T) int64                                     -> hidden (B, T, d)
    block{i}   "buffer": hidden, seqlens_k (B,) int32, total_sequence_length () int32, cos_cache and sin_cache
               (C, r/2) [, local_cos_cache and local_sin_cache (C, r/2): the sliding layers' tables, where the
               decoder has rope_local_theta (Gemma 3)], past k/v per layer (B, Hkv, C, hd)
                                                                          -> hidden, present k/v (B, Hkv, C, hd)
               "concat": hidden, past k/v per layer (B, Hkv, P, hd)       -> hidden, present k/v (B, Hkv, P+T, hd)
    expert{i}  (per expert) as its block, with gate_logit (B, T) after hidden
    head       hidden                                                     -> logits (B, T, V)

The gate's softmax and the mix run in the runtime (numpy), over whichever experts are loaded. Gemma 3's layers are
the same graphs with their differences in place: the sandwich norms, GeGLU (the layer's own MLP), the embedding's
scale, the attention's scale and, in a sliding layer, the window (GroupQueryAttention's local_window_size: keys
j > i - window, as Hugging Face's) over the full cache buffer, with the local rotary tables.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mode_edge.config import DecoderConfig
from mode_edge.integrity import LOCAL_ROTARY_INPUTS, POSITION_INPUTS
from mode_edge.training.model import (
    Decoder,
    DecoderLayer,
    ExpertBlock,
    MoDEModel,
    RMSNorm,
    attention_mask,
    rope_pairs,
    rotate_half,
    scaled_embedding,
)


def kv_names(n_layers: int, prefix: str = "") -> tuple[list[str], list[str]]:
    """Input and output names of a graph's cache tensors, k before v, layer by layer."""
    past = [f"past_{kind}{k}" for k in range(n_layers) for kind in ("key", "value")]
    return [prefix + n for n in past], [prefix + n.replace("past_", "present_") for n in past]


def rotary_tables(inv_freq: torch.Tensor, length: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of positions 0 .. length-1 times each frequency, times `scale` (mode_edge/rope.scale), (length,
    r/2) fp32 each, r the rotated dimensions of a head: GroupQueryAttention's cos_cache / sin_cache (the runtime's
    numpy twin: runtimes/kv_cache.rotary_tables)."""
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return freqs.cos() * scale, freqs.sin() * scale


def rotary_angles(inv_freq: torch.Tensor, T: int, P: int, scale: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, r) of positions P .. P+T-1 times `inv_freq` (r/2,), times `scale` (mode_edge/rope.scale). The
    angles are computed for these positions rather than read from Rotary's table: a table for the longest context
    would weigh megabytes in every block graph."""
    freqs = (torch.arange(T) + P)[:, None].float() * inv_freq[None, :]  # (T, r/2), r the rotated dimensions
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def additive_mask(T: int, S: int, window: int | None) -> torch.Tensor:
    """training/model.attention_mask as what the attention logits add: (T, S) float32, 0 where query i sees key j,
    -inf elsewhere (every row sees its own position, so no row is all -inf)."""
    return torch.zeros(T, S).masked_fill(~attention_mask(T, S, window), float("-inf"))  # (the graphs are fp32)


def attend(layer: DecoderLayer, x, past_k, past_v, rotary: tuple, mask: torch.Tensor):
    """One decoder layer on x (B, T, d) after P cached positions ("concat" cache); returns (y, k, v) with the grown
    cache. rotary: the layer's (cos, sin) for these positions (`rotary_angles`; a sliding layer's local ones); mask:
    its `additive_mask` (T, P+T). Both are made once a graph by LayerStack.run and shared by its layers."""
    attn = layer.self_attn
    B, T, _ = x.shape
    h = pooled_rms_norm(layer.input_layernorm, x)
    q, k = attn.heads(attn.q_proj(h).view(B, T, attn.n_heads, attn.head_dim),
                      attn.k_proj(h).view(B, T, attn.n_kv_heads, attn.head_dim))  # fmt: skip
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd)
    v = attn.v_proj(h).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = rotate_half(q, *rotary), rotate_half(k, *rotary)
    k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, Hkv, S, hd), S = P + T
    y = grouped_attention(q, k, v, mask, attn.scale)
    y = y.transpose(1, 2).reshape(B, T, attn.n_heads * attn.head_dim)
    return feed_forward(layer, x, attn.o_proj(y), pooled_rms_norm), k, v


def feed_forward(layer: DecoderLayer, x: torch.Tensor, attended: torch.Tensor, norm=None) -> torch.Tensor:
    """The rest of a decoder layer after its attention output `attended` (B, T, d): the residual add and the
    feed-forward, with Gemma 3's sandwich norms where the layer has them (training/model.DecoderLayer). `norm`: how
    the RMS norms are written (`rms_norm` by default; `pooled_rms_norm` in the .pte graphs)."""
    norm = norm or rms_norm
    if not hasattr(layer, "post_feedforward_layernorm"):
        x = x + attended
        return x + layer.mlp(norm(layer.post_attention_layernorm, x))
    x = x + norm(layer.post_attention_layernorm, attended)
    return x + norm(layer.post_feedforward_layernorm, layer.mlp(norm(layer.pre_feedforward_layernorm, x)))


def attend_in_place(layer: DecoderLayer, x, past_k, past_v, positions: tuple):
    """One decoder layer on x (B, T, d) with a "buffer" cache: past_k / past_v (B, Hkv, C, hd) hold P = total - T
    cached positions, `positions` = (seqlens_k, total_sequence_length, cos_cache, sin_cache[, local_cos_cache,
    local_sin_cache]). Returns (y, k, v), the buffers with this call's keys and values written at P .. total-1. Under
    torch.onnx.export this is one com.microsoft GroupQueryAttention node (onnxruntime's contrib operator, as
    onnxruntime-genai's model builder emits it; a sliding layer's with local_window_size and the local tables); in
    PyTorch, `group_query_attention` computes the same thing."""
    attn = layer.self_attn
    positions = (*positions[:2], *positions[4:6]) if attn.local else positions[:4]
    h = rms_norm(layer.input_layernorm, x)
    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)  # (B, T, H*hd), (B, T, Hkv*hd) x 2
    if hasattr(attn, "q_norm"):  # Qwen3's per-head norms, before GroupQueryAttention rotates q and k
        B, T, _ = q.shape
        q = rms_norm(attn.q_norm, q.view(B, T, attn.n_heads, attn.head_dim)).reshape(B, T, -1)
        k = rms_norm(attn.k_norm, k.view(B, T, attn.n_kv_heads, attn.head_dim)).reshape(B, T, -1)
    if torch.onnx.is_in_onnx_export():
        attrs = dict(num_heads=attn.n_heads, kv_num_heads=attn.n_kv_heads, do_rotary=1, rotary_interleaved=0)
        if attn.scale is not None:
            attrs["scale"] = attn.scale
        if attn.window is not None:
            attrs["local_window_size"] = attn.window
        y, k_all, v_all = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::GroupQueryAttention", [q, k, v, past_k, past_v, *positions], attrs,
            dtypes=[x.dtype] * 3, shapes=[q.shape, past_k.shape, past_v.shape], version=1,
        )  # fmt: skip
    else:
        y, k_all, v_all = group_query_attention(q, k, v, past_k, past_v, positions, attn.n_heads, attn.window,
                                                attn.scale)  # fmt: skip
    return feed_forward(layer, x, attn.o_proj(y)), k_all, v_all


def pooled_rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """`rms_norm` with the mean of squares over a (B, T, 1, d) view's last two axes: the form XNNPACK takes (its
    global average pooling; a mean over the last axis of a 3-D tensor runs outside it, splitting a .pte's XNNPACK
    program at every norm)."""
    B, T, d = x.shape
    mean = x.pow(2).view(B, T, 1, d).mean((2, 3), keepdim=True).view(B, T, 1)
    return norm.weight * (x / torch.sqrt(mean + norm.eps))


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) for x (B, T, d) written as x / sqrt(mean(x^2) + eps) * weight: the form onnxruntime's graph optimizer
    fuses into one SimplifiedLayerNormalization; RMSNorm's x * rsqrt(...) stays five separate nodes. Equal to RMSNorm
    in fp32 up to rounding."""
    return norm.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def group_query_attention(q, k, v, past_k, past_v, positions: tuple, n_heads: int, window: int | None = None,
                          scale: float | None = None):  # fmt: skip
    """What GroupQueryAttention computes for one sequence (do_rotary, rotate-half), in PyTorch: the reference the
    exported graphs are verified against. q (1, T, H*hd), k and v (1, T, Hkv*hd), past_k / past_v (1, Hkv, C, hd);
    positions (seqlens_k, total_sequence_length, cos_cache, sin_cache), the layer's tables; window: its
    local_window_size (keys j > i - window), None for full attention; scale: of the logits, None for hd ** -0.5.
    -> (y (1, T, H*hd), k and v buffers (1, Hkv, max(C, total), hd))."""
    _, total, cos_cache, sin_cache = positions
    B, T, _ = q.shape
    hkv, hd = past_k.shape[1], past_k.shape[3]
    S = int(total)
    P = S - T
    cos = torch.cat([cos_cache[P:S]] * 2, dim=-1)  # (T, r), r <= hd the rotated dimensions
    sin = torch.cat([sin_cache[P:S]] * 2, dim=-1)
    q = rotate_half(q.view(B, T, n_heads, hd).transpose(1, 2), cos, sin)
    k = rotate_half(k.view(B, T, hkv, hd).transpose(1, 2), cos, sin)
    v = v.view(B, T, hkv, hd).transpose(1, 2)
    length = max(past_k.shape[2], S)
    k_all = torch.zeros(B, hkv, length, hd, dtype=q.dtype)
    v_all = torch.zeros_like(k_all)
    k_all[:, :, : past_k.shape[2]], v_all[:, :, : past_v.shape[2]] = past_k, past_v
    k_all[:, :, P:S], v_all[:, :, P:S] = k, v
    y = grouped_attention(q, k_all[:, :, :S], v_all[:, :, :S], attention_mask(T, S, window), scale)
    return y.transpose(1, 2).reshape(B, T, n_heads * hd), k_all, v_all


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Grouped-query attention: q (B, H, T, hd), k and v (B, Hkv, S, hd), mask (T, S) bool (True: may attend) or
    float (added to the logits: `additive_mask`), scale of the logits (None: hd ** -0.5) -> (B, H, T, hd); query
    head h reads key/value head h // (H / Hkv): over the cache repeated per query head, with a bool mask
    scaled_dot_product_attention (the "buffer" graphs' reference), with an additive one written out as products and a
    softmax (the .pte graphs: XNNPACK takes them, where SDPA's decomposition adds row guards outside it)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
    if mask.dtype == torch.bool:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # written out: SDPA's decomposition guards every row against an all-masked one (any, logical_not, where per
    # layer, outside XNNPACK), which an additive mask from `additive_mask` never has
    logits = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale) + mask
    return torch.softmax(logits, dim=-1) @ v


class LayerStack(nn.Module):
    """A stack of decoder layers with the cache in and out as tensors, in the `kv_cache` interface ("buffer" or
    "concat", module docstring)."""

    def __init__(self, layers: nn.ModuleList, cfg: DecoderConfig, kv_cache: str):
        super().__init__()
        if kv_cache not in ("buffer", "concat"):
            raise ValueError(f"kv_cache must be 'buffer' or 'concat', not {kv_cache!r}")
        self.layers, self.kv_cache = layers, kv_cache
        self.max_seq_len = cfg.max_seq_len
        pairs = rope_pairs(cfg)  # the same frequencies as Rotary's; every block graph takes every pair
        for i, (inv_freq, _) in enumerate(pairs):
            self.register_buffer(f"inv_freq{i}", inv_freq, persistent=False)
        self.rope_scales = [scale for _, scale in pairs]

    def pairs(self) -> list[tuple[torch.Tensor, float]]:
        """(frequencies, scale) of each pair of rotary tables (training/model.rope_pairs): the full layers', then
        the sliding layers' where the decoder has their own base (Gemma 3)."""
        return [(getattr(self, f"inv_freq{i}"), scale) for i, scale in enumerate(self.rope_scales)]

    def position_names(self) -> list[str]:
        """The inputs between hidden and the cache: POSITION_INPUTS (and LOCAL_ROTARY_INPUTS) in the "buffer"
        interface, none in the "concat" one."""
        if self.kv_cache != "buffer":
            return []
        return POSITION_INPUTS + (LOCAL_ROTARY_INPUTS if len(self.rope_scales) > 1 else [])

    def split_inputs(self, rest: tuple) -> tuple[tuple, tuple]:
        """A forward's inputs after hidden -> (positions, past)."""
        n = len(self.position_names())
        return tuple(rest[:n]), tuple(rest[n:])

    def run(self, x, past, positions: tuple = ()):
        present = []
        T, P = x.shape[1], (past[0].shape[2] if past else 0)
        rotary, masks = {}, {}  # ("concat") made once a graph, for each kind of layer it has
        for j, layer in enumerate(self.layers):
            if self.kv_cache == "buffer":
                x, k, v = attend_in_place(layer, x, past[2 * j], past[2 * j + 1], positions)
            else:
                attn = layer.self_attn
                if attn.local not in rotary:
                    inv_freq, scale = self.pairs()[1 if attn.local else 0]
                    rotary[attn.local] = rotary_angles(inv_freq, T, P, scale, x.dtype)
                if attn.window not in masks:
                    masks[attn.window] = additive_mask(T, P + T, attn.window)
                x, k, v = attend(layer, x, past[2 * j], past[2 * j + 1], rotary[attn.local], masks[attn.window])
            present += [k, v]
        return x, present


class EmbedGraph(nn.Module):
    """input_ids (B, T) -> hidden (B, T, d): Decoder.embed (the table's rows, times cfg.embed_scale where set)."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.embed_tokens, self.scale = decoder.embed_tokens, decoder.cfg.embed_scale

    def forward(self, input_ids):
        return scaled_embedding(self.embed_tokens, self.scale, input_ids)


class BackboneBlockGraph(LayerStack):
    def forward(self, hidden, *rest):
        positions, past = self.split_inputs(rest)
        y, present = self.run(hidden, past, positions)
        return (y, *present)


class ExpertBlockGraph(LayerStack):
    """An expert's layers in one block together with its gate logit, both read from the block input."""

    def __init__(self, block: ExpertBlock, cfg: DecoderConfig, kv_cache: str):
        super().__init__(block.layers, cfg, kv_cache)
        self.gate = block.gate

    def forward(self, hidden, *rest):
        positions, past = self.split_inputs(rest)
        y, present = self.run(hidden, past, positions)
        return (y, self.gate(hidden), *present)


class HeadGraph(nn.Module):
    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, hidden):
        return self.decoder.head(hidden)  # (B, T, V)


def split(model: MoDEModel, kv_cache: str) -> dict[str, nn.Module]:
    """Every graph of a bundle by its component path: base/embed, base/block{i}, base/head, experts/NAME/block{i};
    `kv_cache`: the cache interface of the graphs with attention (KV_CACHE[format])."""
    bb, cfg = model.backbone, model.backbone.cfg
    graphs: dict[str, nn.Module] = {"base/embed": EmbedGraph(bb)}
    for i, block in enumerate(model.blocks):
        graphs[f"base/block{i}"] = BackboneBlockGraph(block.backbone, cfg, kv_cache)
        for name, expert in block.experts.items():
            graphs[f"experts/{name}/block{i}"] = ExpertBlockGraph(expert, cfg, kv_cache)
    graphs["base/head"] = HeadGraph(bb)
    return {k: g.eval() for k, g in graphs.items()}


def graph_layers(graph: nn.Module) -> int:
    """Attention layers in a graph, i.e. the number of k/v pairs it takes and returns."""
    return len(graph.layers) if isinstance(graph, (LayerStack, FusedGraph)) else 0


def example_inputs(graph: nn.Module, cfg, batch: int = 1, tokens: int = 3, past: int = 4) -> tuple:
    """Inputs for tracing and checks after `past` cached positions (a "buffer" cache holds exactly past + tokens),
    random: sizes of at least 2 on every dynamic axis, so that the exporter keeps them symbolic."""
    if isinstance(graph, (EmbedGraph, FusedGraph)):
        first = torch.randint(0, cfg.vocab_size, (batch, tokens))
    else:
        first = torch.randn(batch, tokens, cfg.dim)
    return with_cache(graph, first, past, torch.randn)


def prefill_inputs(graph: nn.Module, hidden: torch.Tensor) -> tuple:
    """A graph's inputs for a prefill of hidden (1, T, d) on an empty cache (for "buffer" graphs: buffers of
    exactly T positions); the head's: hidden alone."""
    return with_cache(graph, hidden, 0, torch.zeros)


def with_cache(graph: nn.Module, first: torch.Tensor, past: int, fill) -> tuple:
    """`first` (input ids or hidden states, (B, T, ...)) followed by the graph's cache inputs after `past` cached
    positions, the cache tensors made by `fill` (torch.randn, torch.zeros): for a "buffer" graph the positions, the
    rotary tables and buffers of exactly past + T positions, for a "concat" graph tensors of `past` positions."""
    layers = graph_layers(graph)
    if layers == 0:
        return (first,)
    B, T = first.shape[:2]
    attn = graph.layers[0].self_attn
    length = past + T if graph.kv_cache == "buffer" else past
    kv = [fill(B, attn.n_kv_heads, length, attn.head_dim) for _ in range(2 * layers)]
    if graph.kv_cache == "concat":
        return (first, *kv)
    tables = [t for inv_freq, scale in graph.pairs() for t in rotary_tables(inv_freq, length, scale)]
    total = past + T
    return (first, torch.full((B,), total - 1, dtype=torch.int32), torch.tensor(total, dtype=torch.int32), *tables,
            *kv)  # fmt: skip


def io_names(graph: nn.Module) -> tuple[list[str], list[str]]:
    past, present = kv_names(graph_layers(graph))
    if isinstance(graph, EmbedGraph):
        return ["input_ids"], ["hidden"]
    if isinstance(graph, HeadGraph):
        return ["hidden"], ["logits"]
    positions = graph.position_names()
    if isinstance(graph, FusedGraph):
        return ["input_ids", *positions, *past], ["logits", *present]
    if isinstance(graph, ExpertBlockGraph):
        return ["hidden", *positions, *past], ["hidden_out", "gate_logit", *present]
    return ["hidden", *positions, *past], ["hidden_out", *present]


class FusedGraph(nn.Module):
    """The whole composed model as one graph (embed, every block with its experts and gate, head): the reference the
    runtime benchmark holds the split runtime against. Cache: per block, the backbone's layers, then each expert's."""

    def __init__(self, model: MoDEModel, kv_cache: str):
        super().__init__()
        self.model, self.kv_cache = model, kv_cache
        cfg = model.backbone.cfg
        self.stacks = nn.ModuleList()
        for block in model.blocks:
            self.stacks.append(LayerStack(block.backbone, cfg, kv_cache))
            for expert in block.experts.values():
                self.stacks.append(ExpertBlockGraph(expert, cfg, kv_cache))
        self.layers = [layer for stack in self.stacks for layer in stack.layers]  # for graph_layers()
        self.max_seq_len = cfg.max_seq_len
        self.pairs, self.position_names = self.stacks[0].pairs, self.stacks[0].position_names  # (every stack's)

    def forward(self, input_ids, *rest):
        positions, past = self.stacks[0].split_inputs(rest)
        h = self.model.backbone.embed(input_ids)
        present, k, stacks = [], 0, iter(self.stacks)
        for block in self.model.blocks:
            stack = next(stacks)
            n = 2 * len(stack.layers)
            y, kv = stack.run(h, past[k : k + n], positions)
            k, present = k + n, present + kv
            ys, logits = [y], [torch.zeros(h.shape[:2], dtype=h.dtype)]
            for _ in block.experts:
                expert = next(stacks)
                n = 2 * len(expert.layers)
                out = expert(h, *positions, *past[k : k + n])
                k, present = k + n, present + list(out[2:])
                ys.append(out[0])
                logits.append(out[1])
            a = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (B, T, 1 + N)
            h = sum(a[..., j : j + 1] * y for j, y in enumerate(ys))
        return (self.model.backbone.head(h), *present)
