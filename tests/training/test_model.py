import pytest
import torch
from torch.testing import assert_close

from mode_edge.config import MoDELayout
from mode_edge.errors import UserError
from mode_edge.training.backbones import decoder_from_hf
from mode_edge.training.model import Expert, KVCache, MoDEModel

LAYOUT = MoDELayout(n_blocks=3, expert_layers=2)


def tokens(n=24, seed=0, vocab=257):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def trained_like(expert: Expert, seed: int) -> Expert:
    """Give an expert non-trivial gate rows, as training would, so mixing weights differ per token."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in expert.blocks:
            block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=gen))
            block.gate.bias.fill_(0.5)
    return expert


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "llama3", "qwen3", "phi3", "phi4", "gemma3"])
def test_decoder_matches_transformers_logits(tmp_path, model_type):
    """100 positions: past Llama 3's original context of the tiny checkpoint (64), where its scaling matters, and
    past Gemma 3's sliding window (8) many times over. Phi-3 loads at its original context of 64 by default
    (LongRoPE's short factors hold there), so 64 positions (past it: the next test); phi4 turns 48 of each head's
    64 dimensions (Phi-4-mini's partial rotary embedding)."""
    from tests.conftest import save_tiny_hf_checkpoint

    hf = save_tiny_hf_checkpoint(tmp_path / model_type, model_type)
    ours = decoder_from_hf(hf).eval()
    phi = model_type in ("phi3", "phi4")
    rope_type = {"llama3": "llama3", "gemma3": "frequency_factors"}.get(model_type, "longrope" if phi else None)
    assert (ours.cfg.rope_scaling or {}).get("rope_type") == rope_type
    assert ours.cfg.qk_norm == (model_type in ("qwen3", "gemma3"))
    assert (ours.cfg.sliding_window, ours.cfg.sandwich_norms) == ((8, True) if model_type == "gemma3" else (None, False))
    assert (ours.cfg.rotary_dim, ours.cfg.rotated) == ((48, 48) if model_type == "phi4" else (None, 16))
    assert ours.cfg.max_seq_len == (64 if phi else 1024)
    described = ours.cfg.describe()  # (what a training run's first line says of its backbone)
    assert ("GeGLU" in described, "sandwich norms" in described) == (model_type == "gemma3",) * 2
    assert ("q/k norms" in described) == ours.cfg.qk_norm
    assert (f"{rope_type} rope scaling" in described) == bool(rope_type)
    if model_type == "gemma3":
        assert f"of {ours.cfg.n_layers} layers with a 8-token sliding window" in described
    idx = tokens(64 if phi else 100)
    with torch.no_grad():
        assert_close(ours(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["phi3", "phi4"])
def test_a_longrope_context_past_the_original_takes_the_long_factors(tmp_path, model_type):
    """Built for 128 positions, past the tiny checkpoint's original 64, the decoder takes LongRoPE's long factors
    and matches transformers' logits over 100 positions (transformers takes the long factors for a sequence past the
    original); the default decoder (short factors, 64 positions) computes other logits on the same first 64
    positions, so the factor set is what is tested. KV-cache decoding at that context equals the full forward."""
    from tests.conftest import save_tiny_hf_checkpoint

    hf = save_tiny_hf_checkpoint(tmp_path / model_type, model_type)
    ours = decoder_from_hf(hf, context=128).eval()
    assert (ours.cfg.max_seq_len, sorted(ours.cfg.rope_scaling)) == (128, ["attention_factor", "long_factor",
                                                                            "rope_type"])  # fmt: skip
    idx = tokens(100)
    with torch.no_grad():
        assert_close(ours(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours(idx[:, :64]), decoder_from_hf(hf).eval()(idx[:, :64]), atol=1e-3)
        cache = KVCache()
        parts = [ours(idx[:, :80], cache)] + [ours(idx[:, t : t + 1], cache) for t in range(80, 100)]
        assert_close(torch.cat(parts, dim=1), ours(idx), rtol=1e-5, atol=1e-5)
    # training stays within the original context, and a refusal there says what goes past it
    from mode_edge.config import TrainConfig

    default = decoder_from_hf(hf).cfg
    with pytest.raises(UserError, match=r"context of 64 tokens \(LongRoPE's original context.*export --context"):
        TrainConfig(seq_len=100).check_context(default.max_seq_len, default.context_note())
    assert ours.cfg.context_note() == ""


@pytest.mark.parametrize("model_type", ["llama3", "qwen3", "phi3", "phi4", "gemma3"])
def test_kv_cache_decoding_matches_full_forward_for_each_architecture(tmp_path, model_type):
    from tests.conftest import save_tiny_hf_checkpoint

    decoder = decoder_from_hf(save_tiny_hf_checkpoint(tmp_path / model_type, model_type)).eval()
    model = MoDEModel(decoder, LAYOUT, {"a": trained_like(Expert.init_from(decoder, LAYOUT), 1)})
    for (_, end), block in zip(LAYOUT.block_ranges(decoder.cfg.n_layers), model.experts["a"].blocks):
        for k, layer in enumerate(block.layers):  # the attention kind of the layer it was copied from
            source = decoder.layers[end - LAYOUT.expert_layers + k].self_attn
            assert (layer.self_attn.window, layer.self_attn.local) == (source.window, source.local)
    n = min(90, decoder.cfg.max_seq_len)
    idx = tokens(n)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache()
        parts = [model(idx[:, : n - 20], cache)] + [model(idx[:, t : t + 1], cache) for t in range(n - 20, n)]
    assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_mode_without_experts_is_the_backbone(tiny):
    model = MoDEModel(tiny.decoder, LAYOUT)
    idx = tokens()
    with torch.no_grad():
        assert_close(model(idx), tiny.decoder(idx), rtol=0, atol=0)


@pytest.mark.parametrize("with_experts", [False, True])
def test_kv_cache_decoding_matches_full_forward(tiny, with_experts):
    experts = {"a": trained_like(Expert.init_from(tiny.decoder, LAYOUT), 1)} if with_experts else {}
    model = MoDEModel(tiny.decoder, LAYOUT, experts)
    idx = tokens(20)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache()
        parts = [model(idx[:, :8], cache), model(idx[:, 8:11], cache)]  # prefill, then a 3-token chunk
        parts += [model(idx[:, t : t + 1], cache) for t in range(11, 20)]  # then one token at a time
    assert cache.pos == 20
    assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_copy_init_takes_the_last_layers_of_each_block(tiny):
    expert = Expert.init_from(tiny.decoder, LAYOUT)
    for block, (start, end) in zip(expert.blocks, LAYOUT.block_ranges(tiny.decoder.cfg.n_layers)):
        for k, layer in enumerate(block.layers):
            source = tiny.decoder.layers[end - 2 + k]
            for (n, p), (_, q) in zip(layer.state_dict().items(), source.state_dict().items()):
                assert torch.equal(p, q), n


def test_random_init_is_seeded_and_differs_from_copy(tiny):
    layout = MoDELayout(init="random")
    a, b = Expert.init_from(tiny.decoder, layout, seed=3), Expert.init_from(tiny.decoder, layout, seed=3)
    c = Expert.init_from(tiny.decoder, LAYOUT)
    wa = a.blocks[0].layers[0].mlp.up_proj.weight
    assert torch.equal(wa, b.blocks[0].layers[0].mlp.up_proj.weight)
    assert not torch.equal(wa, c.blocks[0].layers[0].mlp.up_proj.weight)


def test_gate_starts_with_the_backbone_dominant(tiny):
    model = MoDEModel(tiny.decoder, LAYOUT, {"a": Expert.init_from(tiny.decoder, LAYOUT)})
    x = tiny.decoder.embed_tokens(tokens())
    weights = model.blocks[0].gate_weights(x)  # (B, T, 2)
    assert weights.shape == (2, 24, 2)
    assert (weights[..., 0] > 0.85).all()
    assert_close(weights.sum(-1), torch.ones(2, 24))


def test_softmax_runs_over_the_experts_present(tiny):
    """An expert whose gate never opens is the same as an expert that is absent: subsets compose."""
    a = trained_like(Expert.init_from(tiny.decoder, LAYOUT), 1)
    b = trained_like(Expert.init_from(tiny.decoder, MoDELayout(init="random"), seed=2), 2)
    idx = tokens()
    with torch.no_grad():
        alone = MoDEModel(tiny.decoder, LAYOUT, {"a": a})(idx)
        both = MoDEModel(tiny.decoder, LAYOUT, {"a": a, "b": b})(idx)
        for block in b.blocks:
            block.gate.bias.fill_(-1e4)
        b_closed = MoDEModel(tiny.decoder, LAYOUT, {"a": a, "b": b})(idx)
    assert not torch.allclose(alone, both)
    assert_close(b_closed, alone, rtol=1e-5, atol=1e-5)


def test_set_experts_swaps_without_touching_the_backbone(tiny):
    model = MoDEModel(tiny.decoder, LAYOUT, {"a": Expert.init_from(tiny.decoder, LAYOUT)})
    model.set_experts({})
    idx = tokens()
    with torch.no_grad():
        assert_close(model(idx), tiny.decoder(idx), rtol=0, atol=0)
    assert len(list(model.experts.parameters())) == 0


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(n_blocks=4), "does not divide the backbone's 6 layers; choose one of [1, 2, 3, 6]"),
        (dict(n_blocks=3, expert_layers=3), "exceeds the 2 backbone layers per block"),
        (dict(n_blocks=0), "--blocks must be an integer >= 1, got 0"),
        (dict(init="zeros"), "--init must be 'copy' or 'random'"),
    ],
)
def test_bad_layouts_name_the_problem(tiny, layout, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MoDEModel(tiny.decoder, MoDELayout(**layout))
