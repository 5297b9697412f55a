"""A prompt fed in chunks with only the last row through the head (what generation does) gives the logits of one
whole pass, and the same greedy tokens, at every prompt length around the chunk size."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from mode_edge.runtimes import engine as engine_module
from mode_edge.runtimes.engine import Engine, generate


@pytest.fixture(scope="module")
def engine(fp32_bundle):
    e = Engine(fp32_bundle)
    e.load_expert("code")
    return e


@pytest.mark.parametrize("length", [1, 6, 7, 8, 20])
def test_chunked_last_row_prefill_equals_one_whole_pass(engine, monkeypatch, length):
    ids = np.array([[(7 * i + 3) % 250 + 1 for i in range(length)]], dtype=np.int64)
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 10_000)
    whole = engine.forward(ids, engine.new_cache())  # (1, T, V): every row
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 7)
    cache = engine.new_cache()
    last = engine.forward(ids, cache, last_only=True)
    assert last.shape == (1, 1, whole.shape[-1]) and cache.pos == length
    assert_allclose(last[0, -1], whole[0, -1], rtol=1e-4, atol=1e-4)
    chunked = list(generate(engine, ids[0].tolist(), 8))
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", 10_000)
    assert chunked == list(generate(engine, ids[0].tolist(), 8))
