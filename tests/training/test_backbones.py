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
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
    )  # fmt: skip

    kw = dict(vocab_size=257, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, head_dim=16)  # fmt: skip
    if kind == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kw))
    elif kind == "partial":  # half of 16 dimensions: GroupQueryAttention turns multiples of 16
        kw.pop("head_dim")
        model = Phi3ForCausalLM(Phi3Config(**kw, pad_token_id=None, partial_rotary_factor=0.5))
    else:
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(**kw, rope_parameters=rope))
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind,field,supported", [
    ("gemma3", "backbone type 'gemma3_text' (config.json model_type)", "llama, mistral, qwen2, qwen3"),
    ("yarn", "rope scaling 'yarn' (config.json rope_scaling.rope_type)", "default (plain RoPE), llama3 and longrope"),
    ("partial", "over 8 of 16 dimensions (config.json partial_rotary_factor 0.5)", "a multiple of 16"),
])  # fmt: skip
def test_what_is_not_supported_is_named_with_the_supported_list(tmp_path, kind, field, supported):
    with pytest.raises(UserError) as refused:
        load_backbone(str(unsupported_checkpoint(tmp_path / kind, kind)))
    assert field in str(refused.value) and supported in str(refused.value)


@pytest.mark.slow
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


def test_a_gguf_whose_rotary_embedding_transformers_drops_is_refused(tmp_path):
    """transformers' GGUF reader carries neither the rotated width (Phi-4-mini's 96 of 128), nor scaling written as
    metadata (YaRN), nor frequencies scaled by a tensor (Llama 3.x's rope_freqs) into its config: such a file would
    load as plain RoPE over the whole head, so it is refused; one whose tensor matches what the config says passes.
    The Llama 3 divisors are computed as llama.cpp's converter writes them, not with mode_edge/rope.py."""
    import math

    import numpy as np
    from gguf import GGUFWriter
    from gguf import constants as gguf_constants

    from mode_edge.training.backbones import check_gguf_rope
    from tests.conftest import LLAMA3_ROPE

    def gguf(name, arch, dims=None, tensors=(), yarn=False):
        path = tmp_path / f"{name}.gguf"
        writer = GGUFWriter(str(path), arch)
        if dims is not None:
            writer.add_rope_dimension_count(dims)
        if yarn:
            writer.add_rope_scaling_type(gguf_constants.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(4.0)
        for tensor_name, values in tensors:
            writer.add_tensor(tensor_name, np.asarray(values, np.float32))
        writer.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    plain = TINY_CONFIG
    llama3 = dataclasses.replace(TINY_CONFIG, rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"})
    # llama.cpp's convert_hf_to_gguf (LlamaModel, rope_type llama3): a divisor per frequency
    factor, low, high, old = 8.0, 1.0, 4.0, 64
    factors = []
    for freq in plain.rope_theta ** (-np.arange(0, 16, 2) / 16):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    with pytest.raises(UserError, match=r"turns 8 of each head's 16 dimensions \(phi3.rope.dimension_count\)"):
        check_gguf_rope(gguf("partial", "phi3", dims=8), plain)
    with pytest.raises(UserError, match="scales its rotary frequencies by the tensor rope_freqs.weight"):
        check_gguf_rope(gguf("llama3", "llama", dims=16, tensors=[("rope_freqs.weight", factors)]), plain)
    check_gguf_rope(gguf("llama3", "llama", dims=16, tensors=[("rope_freqs.weight", factors)]), llama3)
    check_gguf_rope(gguf("plain", "llama", dims=16), plain)
    with pytest.raises(UserError, match=r"scales its rotary embedding \(qwen3.rope.scaling: yarn\)"):
        check_gguf_rope(gguf("yarn", "qwen3", dims=16, yarn=True), plain)
