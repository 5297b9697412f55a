import dataclasses

import pytest
import torch
from torch.testing import assert_close

from mode_edge.config import MoDELayout
from mode_edge.errors import UserError
from mode_edge.training.backbones import TINY_CONFIG, load_backbone, tiny_decoder, weights_sha256


def test_tiny_backbone_is_deterministic_and_frozen(tiny):
    again = load_backbone("tiny")
    assert again.weights_sha256 == tiny.weights_sha256
    assert not any(p.requires_grad for p in tiny.decoder.parameters())
    assert weights_sha256(tiny_decoder(seed=1)) != tiny.weights_sha256


def test_fingerprint_covers_weights_layout_and_tokenizer(tiny):
    layout = MoDELayout()
    fp = tiny.fingerprint(layout)
    assert fp == load_backbone("tiny").fingerprint(layout)
    assert fp != tiny.fingerprint(MoDELayout(n_blocks=2))
    assert fp == tiny.fingerprint(MoDELayout(expert_layers=1))  # expert size is the expert's own business


def test_a_context_asked_for_is_built_and_one_past_the_checkpoint_s_refused(hf_checkpoint):
    """`load_backbone(spec, context)`: the decoder's rotary tables and max_seq_len follow the context, the weights and
    the fingerprint do not (experts trained at one context export at another); past what config.json allows, or
    for the tiny backbone past its 1,024, one line naming the limit and the fix."""
    path, _ = hf_checkpoint
    default, short = load_backbone(str(path)), load_backbone(str(path), 96)
    assert (default.decoder.cfg.max_seq_len, short.decoder.cfg.max_seq_len, short.decoder.rope.cos.shape[0]) == (
        1024, 96, 96)  # fmt: skip
    assert short.fingerprint(MoDELayout()) == default.fingerprint(MoDELayout())
    assert short.weights_sha256 == default.weights_sha256
    with pytest.raises(UserError, match=r"--context 2048 is not a context this backbone takes: at most 1024 "
                                        r"tokens \(config.json max_position_embeddings\); use --context 64..1024"):
        load_backbone(str(path), 2048)
    with pytest.raises(UserError, match=r"at most 1024 tokens \(the tiny backbone's\)"):
        load_backbone("tiny", 1025)
    assert load_backbone("tiny", 300).fingerprint(None) == load_backbone("tiny").fingerprint(None)


def test_hf_checkpoint_folder_loads_with_matching_logits(hf_checkpoint):
    path, hf = hf_checkpoint
    backbone = load_backbone(str(path))
    assert backbone.spec == str(path.resolve())
    ids = torch.tensor([backbone.tokenizer.encode("def f(x):\n    return x + 1\n")])
    with torch.no_grad():
        assert_close(backbone.decoder(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", ["missing", "empty_dir", "not_gguf"])
def test_a_base_that_is_not_a_checkpoint_is_refused(tmp_path, make):
    target = {"missing": tmp_path / "nope", "empty_dir": tmp_path, "not_gguf": tmp_path / "w.bin"}[make]
    if make == "not_gguf":
        target.write_bytes(b"junk")
    with pytest.raises(UserError, match="is not a checkpoint"):
        load_backbone(str(target))


def test_a_broken_checkpoint_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UserError, match="could not load a checkpoint|is not supported"):
        load_backbone(str(tmp_path))


def unsupported_checkpoint(path, kind: str):
    """A tiny checkpoint folder transformers writes and reads, of an architecture or rope scaling not supported."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
    )  # fmt: skip

    kw = dict(vocab_size=257, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, head_dim=16)  # fmt: skip
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**kw))
    elif kind == "partial":  # half of 16 dimensions: GroupQueryAttention turns multiples of 16
        kw.pop("head_dim")
        model = Phi3ForCausalLM(Phi3Config(**kw, pad_token_id=None, partial_rotary_factor=0.5))
    else:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(**kw, rope_parameters=rope))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,field,supported", [
    ("gemma2", "backbone type 'gemma2' (config.json model_type)", "llama, mistral, qwen2, qwen3, phi3, gemma3_text"),
    ("yarn", "rope scaling 'yarn' (config.json rope_scaling.rope_type)", "default (plain RoPE), llama3, longrope and linear"),
    ("partial", "over 8 of 16 dimensions (config.json partial_rotary_factor 0.5)", "a multiple of 16"),
])  # fmt: skip
def test_what_is_not_supported_is_named_with_the_supported_list(tmp_path, kind, field, supported):
    with pytest.raises(UserError) as refused:
        load_backbone(str(unsupported_checkpoint(tmp_path / kind, kind)))
    assert field in str(refused.value) and supported in str(refused.value)


@pytest.mark.real_scale
def test_smollm2_matches_transformers_on_real_weights():
    """The built-in backbone, loaded from its GGUF file, against transformers' own Llama on the same weights."""
    from transformers import AutoModelForCausalLM

    from mode_edge.training.backbones import SMOLLM2_GGUF, smollm2_dir

    backbone = load_backbone("smollm2")
    assert backbone.decoder.cfg.n_layers == 30 and backbone.decoder.cfg.vocab_size == 49152
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    ids = torch.tensor([backbone.tokenizer.encode("import os\nfor name in os.listdir('.'):\n    print(name)")])
    with torch.no_grad():
        assert_close(backbone.decoder(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_gguf_file_or_a_folder_holding_one_resolves_to_it(tmp_path):
    from mode_edge.training.backbones import SMOLLM2_GGUF, resolve_spec, smollm2_dir

    assert resolve_spec("smollm2") == (smollm2_dir(), SMOLLM2_GGUF)
    assert resolve_spec(str(smollm2_dir() / SMOLLM2_GGUF)) == (smollm2_dir(), SMOLLM2_GGUF)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert resolve_spec(str(tmp_path)) == (tmp_path, "model.gguf")


def write_gguf(path, arch, dims=None, tensors=(), keys=()):
    """A GGUF file holding only rotary metadata and tensors (what `gguf_rope` reads) and one embedding."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    if dims is not None:
        writer.add_rope_dimension_count(dims)
    for key, value in keys:
        (writer.add_string if isinstance(value, str) else writer.add_float32 if isinstance(value, float)
         else writer.add_uint32)(f"{arch}.{key}", value)  # fmt: skip
    for tensor_name, values in tensors:
        writer.add_tensor(tensor_name, np.asarray(values, np.float32))
    writer.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_divisors(theta: float, rotated: int, factor: float, low: float, high: float, old: int) -> list[float]:
    """Llama 3.x's rope_freqs tensor as llama.cpp's convert_hf_to_gguf (LlamaModel) writes it: a divisor per
    frequency, computed there, not with mode_edge/rope.py."""
    import math

    import numpy as np

    out = []
    for freq in theta ** (-np.arange(0, rotated, 2) / rotated):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


@pytest.mark.parametrize("kind", ["llama3", "linear", "phi4"])
def test_a_gguf_s_rotary_settings_are_read_from_the_file(tmp_path, kind):
    """transformers' GGUF reader carries neither the rotated width (Phi-4-mini's 96 of 128) nor any rotary scaling
    into its config. `gguf_rope` reads them from the file: the decoder built from the reader's plain config plus the
    file's settings computes the logits of transformers' model with the scaling in its config (Llama 3.x's divisors
    as llama.cpp writes them; linear scaling; LongRoPE with a partial rotary width and the attention factor in the
    metadata), past the original context where the scaling matters; without them it would not."""
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    from mode_edge.training.backbones import _hf_decoder_config, decoder_from_hf, gguf_rope
    from tests.conftest import LLAMA3_ROPE, PHI4_ROPE, save_tiny_hf_checkpoint

    if kind == "phi4":
        hf = save_tiny_hf_checkpoint(tmp_path / "phi4", "phi4")
        want = _hf_decoder_config(hf.config)
        plain = dataclasses.replace(want, rotary_dim=None, rope_scaling=None, max_seq_len=1024)
        keys = [("rope.scaling.attn_factor", want.rope_scaling["attention_factor"]),
                ("rope.scaling.original_context_length", 64), ("context_length", 1024)]  # fmt: skip
        tensors = [("rope_factors_short.weight", PHI4_ROPE["short_factor"]),
                   ("rope_factors_long.weight", PHI4_ROPE["long_factor"])]  # fmt: skip
        path = write_gguf(tmp_path / "phi4.gguf", "phi3", dims=48, tensors=tensors, keys=keys)
        n = 64
    else:
        rope = dict(LLAMA3_ROPE) if kind == "llama3" else {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
        c = TINY_CONFIG
        torch.manual_seed(0)
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads, intermediate_size=c.hidden_dim, head_dim=c.head_dim,
            rms_norm_eps=c.norm_eps, tie_word_embeddings=True, max_position_embeddings=1024,
            rope_parameters=rope)).eval()  # fmt: skip
        plain = dataclasses.replace(TINY_CONFIG, max_seq_len=1024)
        if kind == "llama3":
            divisors = llama_cpp_divisors(10000.0, 16, 8.0, 1.0, 4.0, 64)
            path = write_gguf(tmp_path / "llama3.gguf", "llama", dims=16, tensors=[("rope_freqs.weight", divisors)])
        else:
            keys = [("rope.scaling.type", "linear"), ("rope.scaling.factor", 4.0)]
            path = write_gguf(tmp_path / "linear.gguf", "llama", dims=16, keys=keys)
        n = 100
    cfg = gguf_rope(path, plain)
    if kind == "phi4":
        assert (cfg.rotary_dim, cfg.max_seq_len, cfg.rope_scaling["rope_type"]) == (48, 64, "longrope")
    else:
        assert cfg.rope_scaling["rope_type"] == "frequency_factors"
    if kind == "linear":  # the same scaling from a Hugging Face folder's config
        assert _hf_decoder_config(hf.config).rope_scaling == cfg.rope_scaling
    idx = torch.randint(0, 257, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits = hf(idx).logits
        assert_close(decoder_from_hf(hf, cfg).eval()(idx), want_logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(decoder_from_hf(hf, plain).eval()(idx), want_logits, atol=1e-3)
    assert gguf_rope(write_gguf(tmp_path / "p.gguf", "llama"), plain) == plain  # nothing to add: unchanged
    if kind == "phi4":  # a context past the original 64 takes the long factors, as transformers does past it
        long = gguf_rope(path, dataclasses.replace(plain, max_seq_len=128), context=128)
        assert (long.max_seq_len, sorted(long.rope_scaling)) == (128, ["attention_factor", "long_factor", "rope_type"])
        idx = torch.randint(0, 257, (1, 100), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert_close(decoder_from_hf(hf, long).eval()(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)


GEMMA3_SIZES = {"270m": (640, 4, 1, 256, 18, 256), "1b": (1152, 4, 1, 256, 26, 256), "4b": (2560, 8, 4, 256, 34, 256),
                "12b": (3840, 16, 8, 256, 48, 256), "27b": (5376, 32, 16, 128, 62, 168)}  # fmt: skip
"""Gemma 3's text models as their config.json files give them: hidden_size, heads, key/value heads, head_dim,
layers, query_pre_attn_scalar."""


@pytest.mark.parametrize("size", GEMMA3_SIZES)
def test_a_gemma3_gguf_s_attention_scale_is_the_checkpoint_s(size):
    """A Gemma 3 GGUF holds no query_pre_attn_scalar (transformers' reader takes 256); `gguf_gemma3` sets the scale
    by llama.cpp's rule, which gives every size's config.json value, 27B's 168 included (configs only: no weights)."""
    from transformers import Gemma3TextConfig

    from mode_edge.training.backbones import _hf_decoder_config, gguf_gemma3

    dim, heads, kv, head_dim, layers, scalar = GEMMA3_SIZES[size]
    kw = dict(hidden_size=dim, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
              num_hidden_layers=layers, intermediate_size=4 * dim, vocab_size=512)  # fmt: skip
    from_gguf = _hf_decoder_config(Gemma3TextConfig(**kw))  # as transformers reads a GGUF: the default 256
    assert from_gguf.query_scale == 256**-0.5
    checkpoint = _hf_decoder_config(Gemma3TextConfig(**kw, query_pre_attn_scalar=scalar))
    assert gguf_gemma3(from_gguf) == checkpoint and checkpoint.query_scale == scalar**-0.5


def test_a_gguf_s_unsupported_rotary_settings_are_refused_naming_them(tmp_path):
    """YaRN, a partial width GroupQueryAttention cannot turn, factors of the wrong length: one line each."""
    plain = TINY_CONFIG
    from mode_edge.training.backbones import gguf_rope

    with pytest.raises(UserError, match=r"turns 8 of each head's 16 dimensions \(phi3.rope.dimension_count\)"):
        gguf_rope(write_gguf(tmp_path / "partial.gguf", "phi3", dims=8), plain)
    yarn = write_gguf(tmp_path / "yarn.gguf", "qwen3", keys=[("rope.scaling.type", "yarn"),
                                                              ("rope.scaling.factor", 4.0)])  # fmt: skip
    with pytest.raises(UserError, match=r"with yarn \(qwen3.rope.scaling.type\), which is not supported"):
        gguf_rope(yarn, plain)
    with pytest.raises(UserError, match=r"'rope_type': 'frequency_factors', 'factors': \[one positive number"):
        dataclasses.replace(plain, rope_scaling={"rope_type": "frequency_factors", "factors": [2.0] * 7})
    with pytest.raises(UserError, match="sliding_window is set but layer_types has no sliding_attention layer"):
        dataclasses.replace(plain, sliding_window=8)
    with pytest.raises(UserError, match=r"linearly without a positive factor \(llama.rope.scaling.factor: None\)"):
        gguf_rope(write_gguf(tmp_path / "nofactor.gguf", "llama", keys=[("rope.scaling.type", "linear")]), plain)
    with pytest.raises(UserError, match=r"LongRoPE's factors without rope_factors_short.weight, which a context of "
                                        r"1024 tokens takes .* damaged"):  # fmt: skip
        gguf_rope(write_gguf(tmp_path / "long.gguf", "phi3", tensors=[("rope_factors_long.weight", [2.0] * 8)]), plain)
    short_only = write_gguf(tmp_path / "short_only.gguf", "phi3", tensors=[("rope_factors_short.weight", [2.0] * 8)],
                            keys=[("rope.scaling.original_context_length", 64)])  # fmt: skip
    assert gguf_rope(short_only, plain).max_seq_len == 64  # the default: the original context, short factors
    with pytest.raises(UserError, match=r"without rope_factors_long.weight, which a context of 1024 tokens takes "
                                        r"\(the file's original context: 64\); use --context 64..64"):  # fmt: skip
        gguf_rope(short_only, plain, context=1024)
    with pytest.raises(UserError, match="holds 3 rotary factors in rope_freqs.weight where its 16 turned"):
        gguf_rope(write_gguf(tmp_path / "short.gguf", "llama", tensors=[("rope_freqs.weight", [1.0, 2.0, 4.0])]),
                  plain)  # fmt: skip
