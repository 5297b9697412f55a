"""The ONNX graphs' cache, written in place by GroupQueryAttention into buffers the runtime owns: the same logits as
the PyTorch model token for token (prompts shorter and longer than one call, buffers that grow mid-sequence), and
a decode step that writes its position into the very buffers it was given."""

import numpy as np
import pytest
import torch

from mode_edge.export.pipeline import load_model
from mode_edge.rope import inv_freq as rope_frequencies
from mode_edge.runtimes.engine import PREFILL_CHUNK, Engine
from mode_edge.runtimes.kv_cache import GROWTH, rotary_tables
from mode_edge.training.model import KVCache


@pytest.fixture(scope="module")
def engine(fp32_bundle):
    e = Engine(fp32_bundle)
    for name in ("code", "prose"):
        e.load_expert(name)
    return e


@pytest.mark.parametrize("length, hint", [(1, 0), (9, 0), (300, 0), (40, 64)])
def test_in_place_cache_gives_the_models_logits_token_for_token(engine, composed_run, length, hint):
    """hint 0: the buffers hold the prompt, then grow (2x) during decode; 300 tokens: two prefill calls (chunks of
    PREFILL_CHUNK = 256), the second after a cache."""
    _, model, _ = load_model(composed_run, None)
    ids = np.random.default_rng(length).integers(1, 250, (1, length)).astype(np.int64)
    cache, ref_cache = engine.new_cache(hint), KVCache()
    got = engine.forward(ids, cache)
    with torch.no_grad():
        want = model(torch.from_numpy(ids), ref_cache).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    capacities = {cache.capacity}
    for step in range(6):
        token = np.array([[int(got[0, -1].argmax())]], dtype=np.int64)
        got = engine.forward(token, cache)
        with torch.no_grad():
            want = model(torch.from_numpy(token), ref_cache).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"decode step {step}")
        capacities.add(cache.capacity)
    assert cache.pos == length + 6
    if hint:
        assert capacities == {hint}
    elif length > PREFILL_CHUNK:
        assert capacities == {GROWTH * PREFILL_CHUNK}  # one chunk's worth for the first call, grown for the second
    else:
        assert len(capacities) > 1  # the buffers grew during decode


def test_decode_writes_into_the_buffers_it_was_given(engine):
    cache = engine.new_cache(32)
    engine.forward(np.arange(1, 11, dtype=np.int64)[None], cache)
    buffers = {key: list(kv) for key, kv in cache.kv.items()}
    before = {key: [b.copy() for b in kv] for key, kv in cache.kv.items()}
    engine.forward(np.array([[5]], dtype=np.int64), cache)
    for key, kv in cache.kv.items():
        for buf, same, old in zip(kv, buffers[key], before[key]):
            assert buf is same  # no new array: written in place
            np.testing.assert_array_equal(buf[:, :, :10], old[:, :, :10])  # the cached positions untouched
            assert np.abs(buf[:, :, 10]).sum() > 0 and not np.abs(old[:, :, 10]).any()  # position 10 written
            assert not np.abs(buf[:, :, 11:]).any()  # nothing beyond it


def test_rotary_tables_match_the_models(composed_run):
    """The runtime's numpy tables equal the PyTorch model's rotary tables (cos, sin of the first half)."""
    _, model, _ = load_model(composed_run, None)
    cfg, rope = model.backbone.cfg, model.backbone.rope
    cos, sin = rotary_tables(rope_frequencies(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling), 100)
    np.testing.assert_allclose(cos, rope.cos[:100, : cfg.head_dim // 2].numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, rope.sin[:100, : cfg.head_dim // 2].numpy(), atol=1e-6)
