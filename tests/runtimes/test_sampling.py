"""The sampler both runtimes share (runtimes/engine.sample, runtimes/native/src/sampling.cpp): its random stream
against SplitMix64's published outputs, and its draws against the distribution they are meant to follow."""

import numpy as np
import pytest

from mode_edge.runtimes.engine import Sampling, SplitMix64, sample


def test_the_random_stream_is_splitmix64():
    """Seed 0's first outputs of the reference implementation (Vigna's splitmix64.c): 0xe220a8397b1dcdaf,
    0x6e789e6aa1b965f4, 0x06c45d188009454f; a draw is the top 53 bits over 2**53."""
    rng = SplitMix64(0)
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [rng.uniform() for _ in expected] == [(x >> 11) / 2**53 for x in expected]


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.5, top_k=3),
                                      dict(temperature=1.0, top_p=0.8)])  # fmt: skip
def test_draws_follow_the_softmax_of_the_kept_tokens(settings):
    """20,000 draws from 6 logits: each token's frequency within 0.012 of its probability (about 4 standard errors),
    tokens outside top-k or top-p never drawn."""
    logits = np.array([2.0, 1.5, 0.3, -1.0, 1.5, 0.0], dtype=np.float32)
    s = Sampling(**settings, seed=7)
    z = logits.astype(np.float64) / s.temperature
    p = np.exp(z - z.max())
    if s.top_k:
        p[np.argsort(-p, kind="stable")[s.top_k :]] = 0
    p /= p.sum()
    if s.top_p < 1:  # 2.0 (0.36), then the two 1.5s (0.22 each) reach 0.8; the rest is cut
        order = np.argsort(-p, kind="stable")
        before = np.concatenate(([0], np.cumsum(p[order])[:-1]))
        p[order[before >= s.top_p]] = 0
        p /= p.sum()
    rng = SplitMix64(s.seed)
    counts = np.bincount([sample(logits, s, rng) for _ in range(20_000)], minlength=len(logits))
    assert np.all(counts[p == 0] == 0)
    assert np.abs(counts / counts.sum() - p).max() < 0.012, (counts / counts.sum(), p)
