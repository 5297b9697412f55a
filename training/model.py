"""The MoDE model in plain PyTorch, read top to bottom.

Small pieces first (RMS norm, rotary embedding, attention with a KV cache and, for Gemma 3's local layers, a sliding
window, SwiGLU / GeGLU MLP, decoder layer: pre-norm, or Gemma 3's sandwich of norms), then the frozen backbone, then
an expert's per-block layer stack with its gate row, the MoDE block that mixes backbone and experts, and the full
MoDE model. Parameter names of the backbone follow Hugging Face's Llama (and Gemma's) so checkpoints copy in by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mode_edge.config import DecoderConfig, MoDELayout
from mode_edge.rope import rotary_pairs


def rope_pairs(cfg: DecoderConfig) -> list[tuple[torch.Tensor, float]]:
    """The (frequencies (cfg.rotated / 2,) fp32, scale of cos and sin) of each pair of rotary tables the layers
    read: the full layers', then the sliding layers' where cfg has rope_local_theta (mode_edge/rope.rotary_pairs,
    computed in float64, rounded once). On the current default device (torch.tensor honours it, torch.from_numpy
    does not: a model built on the meta device, as peft's loaders build it, needs its tables there too)."""
    pairs = rotary_pairs(cfg.rope_theta, cfg.rotated, cfg.rope_scaling, cfg.rope_local_theta)
    return [(torch.tensor(freq, dtype=torch.float32), scale) for freq, scale in pairs]


class KVCache:
    """Keys and values of every attention layer for the tokens seen so far, by layer name; `pos` is their count."""

    def __init__(self):
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pos = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Hugging Face Llama's rotate-half convention: t (B, H, T, hd), cos and sin (T, r) with r
    <= hd the dimensions turned (r < hd: a partial rotary embedding, as Phi-4-mini's; the last hd - r pass as they
    are)."""
    r = cos.shape[-1]
    turned = t[..., :r] if r < t.shape[-1] else t
    t1, t2 = turned.chunk(2, dim=-1)
    turned = turned * cos + torch.cat([-t2, t1], dim=-1) * sin
    return torch.cat([turned, t[..., r:]], dim=-1) if r < t.shape[-1] else turned


class Rotary(nn.Module):
    """Rotary position embedding tables (the rotate-half convention of Hugging Face's Llama; frequencies and the
    scale of cos and sin, with Llama 3.x's or LongRoPE's scaling where the config has one, from mode_edge/rope.py;
    over the first cfg.rotated dimensions of each head). With cfg.rope_local_theta, a second pair for the sliding
    layers: plain RoPE of that base (Gemma 3's local layers)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        positions = torch.arange(cfg.max_seq_len, dtype=torch.float32)
        for prefix, (inv_freq, scale) in zip(("", "local_"), rope_pairs(cfg)):  # (scale: longrope's attention factor)
            freqs = torch.outer(positions, inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)  # (max_seq_len, rotated)
            self.register_buffer(prefix + "cos", emb.cos() * scale, persistent=False)
            self.register_buffer(prefix + "sin", emb.sin() * scale, persistent=False)

    def forward(self, x: torch.Tensor, pos: int, local: bool = False) -> torch.Tensor:
        """x: (B, H, T, head_dim), positions pos .. pos+T-1; `local`: the sliding layers' tables."""
        T = x.shape[-2]
        cos, sin = (self.local_cos, self.local_sin) if local else (self.cos, self.sin)
        return rotate_half(x, cos[pos : pos + T].to(x.dtype), sin[pos : pos + T].to(x.dtype))


def attention_mask(T: int, S: int, window: int | None, device=None) -> torch.Tensor:
    """(T, S) bool, True where query i (at position S - T + i) sees key j: j <= S - T + i, and within a sliding
    window j > S - T + i - window (the query itself and window - 1 keys before it, Hugging Face's sliding window).
    The one definition of the mask for the model and the exported graphs' references (export/graphs.py)."""
    q = torch.arange(S - T, S, device=device)[:, None]
    k = torch.arange(S, device=device)[None, :]
    visible = k <= q
    return visible & (k > q - window) if window is not None else visible


class Attention(nn.Module):
    """Grouped-query attention with a KV cache. `layer`: the backbone layer whose kind it has (full attention, or
    a sliding window with the local rotary tables: DecoderConfig.window, rope_local_theta)."""

    def __init__(self, cfg: DecoderConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window, self.scale = cfg.window(layer), cfg.query_scale
        self.local = self.window is not None and cfg.rope_local_theta is not None
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:  # Qwen3: an RMS norm over each head's query and key, before the rotary embedding
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)

    def heads(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, T, H, hd) and k (B, T, Hkv, hd) through the per-head norms where the architecture has them."""
        return (self.q_norm(q), self.k_norm(k)) if hasattr(self, "q_norm") else (q, k)

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache | None, name: str) -> torch.Tensor:
        B, T, _ = x.shape
        pos = cache.pos if cache is not None else 0
        q, k = self.heads(self.q_proj(x).view(B, T, self.n_heads, self.head_dim),
                          self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim))  # fmt: skip
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, pos, self.local), rope(k, pos, self.local)
        if cache is not None:
            if name in cache.kv:
                past_k, past_v = cache.kv[name]
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # (B, Hkv, S, hd)
            cache.kv[name] = (k, v)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        S = k.shape[2]
        if S == T and T > 1 and self.window is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:  # one query, or a chunk after a cached prefix (query i sees keys up to S - T + i), or a window
            sees_all = T == 1 and (self.window is None or S <= self.window)
            mask = None if sees_all else attention_mask(T, S, self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.o_proj(y)


ACTIVATION = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
"""DecoderConfig.activation -> the gate's function (SwiGLU; Gemma's GeGLU with GELU's tanh approximation)."""


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.act = ACTIVATION[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention and feed-forward, each added to the residual stream. With cfg.sandwich_norms (Gemma 3)
    each sublayer's output is normed too before it is added: input_layernorm -> attention -> post_attention_layernorm,
    pre_feedforward_layernorm -> MLP -> post_feedforward_layernorm (Hugging Face's names; in a Llama layer
    post_attention_layernorm is the feed-forward's pre-norm). `layer`: the backbone layer whose attention kind it
    has."""

    def __init__(self, cfg: DecoderConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache | None, name: str) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), rope, cache, name)
        if not hasattr(self, "post_feedforward_layernorm"):
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def run_layers(layers: nn.ModuleList, x: torch.Tensor, rope: Rotary, cache: KVCache | None, names: list[str]):
    for layer, name in zip(layers, names):
        x = layer(x, rope, cache, name)
    return x


def scaled_embedding(table: nn.Embedding, scale: float | None, idx: torch.Tensor) -> torch.Tensor:
    """idx (B, T) token ids -> (B, T, d): the table's rows (`scale_rows`)."""
    return scale_rows(table(idx), scale)


def scale_rows(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Embedding rows x (B, T, d) times `scale` where set (Gemma's sqrt(d), in fp32 as its scaled embedding
    multiplies; None: as they are)."""
    return x if scale is None else x * torch.tensor(scale, dtype=torch.float32).to(x.dtype)


class Decoder(nn.Module):
    """The pretrained backbone: token embedding, L decoder layers, final norm and output head."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = Rotary(cfg)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> (B, T, d) (`scaled_embedding`)."""
        return scaled_embedding(self.embed_tokens, self.cfg.embed_scale, idx)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return F.linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)  # (B, T, V)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.embed(idx)  # (B, T, d)
        x = run_layers(self.layers, x, self.rope, cache, [f"bb.{i}" for i in range(len(self.layers))])
        if cache is not None:
            cache.pos += idx.shape[1]
        return self.head(x)


class Gate(nn.Module):
    """One expert's gate row in one block: a logit per token, read from the RMS-normalised block input.

    The backbone's logit is pinned at 0. That loses nothing (a softmax is unchanged when one logit is subtracted from
    all) and makes every expert's row meaningful on its own, so any subset of experts composes. Normalising the input
    keeps the logits in range while the residual stream's scale grows with depth.
    """

    def __init__(self, dim: int, bias: float, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf @ self.weight + self.bias  # (B, T)


class ExpertBlock(nn.Module):
    """An expert's share of one MoDE block: a short stack of decoder layers and its gate row."""

    def __init__(self, layers: nn.ModuleList, gate: Gate):
        super().__init__()
        self.layers = layers
        self.gate = gate


class Expert(nn.Module):
    """One domain expert: an ExpertBlock for every MoDE block. Its state dict is what a training run saves."""

    def __init__(self, blocks: list[ExpertBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    @classmethod
    def empty(cls, cfg: DecoderConfig, layout: MoDELayout) -> "Expert":
        """Expert layer k of a block has the attention kind of the backbone layer it is copied from (`init_from`):
        the k-th of the block's last expert_layers (a random init with more layers than the block: the block's first
        for the extra ones)."""
        E = layout.expert_layers
        return cls(
            [
                ExpertBlock(
                    nn.ModuleList(DecoderLayer(cfg, max(start, end - E + k)) for k in range(E)),
                    Gate(cfg.dim, layout.gate_bias, cfg.norm_eps),
                )
                for start, end in layout.block_ranges(cfg.n_layers)
            ]
        )

    @classmethod
    def init_from(cls, backbone: Decoder, layout: MoDELayout, seed: int = 0) -> "Expert":
        """A new expert: copies of the last layers of each block's backbone slice, or a seeded random init."""
        expert = cls.empty(backbone.cfg, layout)
        ranges = layout.block_ranges(backbone.cfg.n_layers)
        gen = torch.Generator().manual_seed(seed)
        for block, (_, end) in zip(expert.blocks, ranges):
            for k, layer in enumerate(block.layers):
                if layout.init == "copy":
                    layer.load_state_dict(backbone.layers[end - layout.expert_layers + k].state_dict())
                else:
                    for name, p in layer.named_parameters():
                        if name.endswith("norm.weight"):  # (incl. q_norm / k_norm: RMS norms start at 1)
                            nn.init.ones_(p)
                        elif name.endswith("bias"):
                            nn.init.zeros_(p)
                        else:
                            with torch.no_grad():
                                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        return expert


class MoDEBlock(nn.Module):
    """One MoDE block: the backbone slice and the experts read the same input x; a softmax gate mixes them.

    [a_bb, a_1 .. a_N] = softmax([0, g_1(x) .. g_N(x)])
    y = a_bb * f_bb(x) + sum_j a_j * f_j(x)
    """

    def __init__(self, index: int, first_layer: int, backbone: nn.ModuleList, experts: dict[str, ExpertBlock]):
        super().__init__()
        self.index = index
        self.backbone_names = [f"bb.{first_layer + k}" for k in range(len(backbone))]
        self.backbone = backbone
        self.experts = nn.ModuleDict(experts)

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        logits = [torch.zeros(x.shape[:2], device=x.device)] + [e.gate(x) for e in self.experts.values()]
        return torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (B, T, 1 + N)

    def forward(self, x: torch.Tensor, rope: Rotary, cache: KVCache | None) -> torch.Tensor:
        y_bb = run_layers(self.backbone, x, rope, cache, self.backbone_names)  # (B, T, d)
        if not self.experts:
            return y_bb  # exactly the frozen backbone
        a = self.gate_weights(x).to(x.dtype)  # (B, T, 1 + N)
        y = a[..., :1] * y_bb
        for j, (name, expert) in enumerate(self.experts.items(), start=1):
            names = [f"{name}.{self.index}.{k}" for k in range(len(expert.layers))]
            y = y + a[..., j : j + 1] * run_layers(expert.layers, x, rope, cache, names)
        return y


class MoDEModel(nn.Module):
    """The frozen backbone cut into MoDE blocks, with any set of experts beside it."""

    def __init__(self, backbone: Decoder, layout: MoDELayout, experts: dict[str, Expert] | None = None):
        super().__init__()
        self.backbone = backbone
        self.layout = layout
        self.ranges = layout.block_ranges(backbone.cfg.n_layers)
        self.set_experts(experts or {})

    def set_experts(self, experts: dict[str, Expert]) -> None:
        """Swap the experts present; the backbone stays as it is."""
        for name, expert in experts.items():
            if len(expert.blocks) != len(self.ranges):
                raise ValueError(f"expert {name!r} has {len(expert.blocks)} blocks, the model {len(self.ranges)}")
        self.experts = nn.ModuleDict(experts)
        # The blocks only regroup modules registered above (backbone, experts), so they are kept out of the module
        # tree: registering them too would list every parameter twice in state_dict().
        self._blocks = [
            MoDEBlock(i, start, self.backbone.layers[start:end], {n: e.blocks[i] for n, e in experts.items()})
            for i, (start, end) in enumerate(self.ranges)
        ]

    @property
    def blocks(self) -> list[MoDEBlock]:
        return self._blocks

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.backbone.embed(idx)  # (B, T, d)
        for block in self._blocks:
            x = block(x, self.backbone.rope, cache)
        if cache is not None:
            cache.pos += idx.shape[1]
        return self.backbone.head(x)  # (B, T, V)
