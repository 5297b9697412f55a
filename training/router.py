"""Router statistics of an expert: what the centroid and logistic routers (runtimes/routing.py) need to know about
its domain.

Fitted once, at the end of stage 1, from the frozen backbone alone (so they do not depend on the expert's weights):
the mean and variance of the mean-pooled, RMS-normalised block inputs over prompts of the expert's training text
and of general text, at prompt lengths 16, 64 and 256 tokens, and a logistic regression between the two. Stored
beside the expert (router.safetensors) and
carried into its pack's gate file, a few kilobytes.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from mode_edge.config import MoDELayout
from mode_edge.errors import UserError
from mode_edge.files import as_plain_write
from mode_edge.integrity import check_file, checked_load
from mode_edge.runtimes.routing import ROUTER_KEYS, pooled_features
from mode_edge.tokenizer import TextTokenizer
from mode_edge.training.model import Decoder, Expert, run_layers

PROMPT_LENGTHS = (16, 64, 256)
ROUTER_FILE = "router.safetensors"


@torch.no_grad()
def block_inputs(decoder: Decoder, layout: MoDELayout, ids: torch.Tensor) -> list[np.ndarray]:
    """The backbone's input to each MoDE block for token ids (B, T): per block (B, T, d), as numpy."""
    x = decoder.embed(ids)  # (B, T, d)
    out = []
    for start, end in layout.block_ranges(decoder.cfg.n_layers):
        out.append(x.float().numpy())
        x = run_layers(decoder.layers[start:end], x, decoder.rope, None, [f"bb.{k}" for k in range(start, end)])
    return out


def prompts(docs: list[tuple[str, str]], tokenizer: TextTokenizer, length: int, n: int, seed: int) -> torch.Tensor:
    """n prompts of `length` tokens, each the start of a randomly chosen document long enough (a shorter document is
    skipped): (n', length) with n' <= n."""
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    rows = []
    for i in order:
        ids = tokenizer.encode(docs[i][1])
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == n:
            break
    return torch.tensor(rows, dtype=torch.long).view(-1, length)


def features(decoder: Decoder, layout: MoDELayout, docs, tokenizer, per_length: int, seed: int) -> np.ndarray:
    """Pooled block-input features of prompts at every PROMPT_LENGTHS: (n, n_blocks, d)."""
    eps = decoder.cfg.norm_eps
    out = []
    for length in PROMPT_LENGTHS:
        ids = prompts(docs, tokenizer, length, per_length, seed + length)
        for i in range(0, len(ids), 8):
            out.append(pooled_features(block_inputs(decoder, layout, ids[i : i + 8]), eps))
    if not out:
        raise UserError(f"no document holds {PROMPT_LENGTHS[0]} tokens; the router needs longer documents")
    return np.concatenate(out)


def fit_router(decoder: Decoder, layout: MoDELayout, tokenizer: TextTokenizer, domain_docs, general_docs,
               per_length: int = 32, seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Means and variances, (n_blocks, d) each, of the pooled features on the domain and on general text."""
    dom = features(decoder, layout, domain_docs, tokenizer, per_length, seed)
    gen = features(decoder, layout, general_docs, tokenizer, per_length, seed + 1)
    stats = {"router_mean": dom.mean(0), "router_var": dom.var(0), "general_mean": gen.mean(0),
             "general_var": gen.var(0)}  # fmt: skip
    stats["router_weight"], stats["router_bias"] = logistic(dom, gen)
    stats = {k: v.astype(np.float32) for k, v in stats.items()}
    stats["router_count"] = np.array([len(dom), len(gen)], dtype=np.int64)
    return stats


def routing_tensors(expert: Expert, router: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """What a pack's gate file holds (kilobytes): the expert's gate rows for all blocks, weight (n_blocks, d), bias
    (n_blocks,), eps (1,), and its router statistics when it has them (ROUTER_KEYS, (n_blocks, d) each)."""
    gates = [block.gate for block in expert.blocks]
    return {
        "weight": np.stack([g.weight.detach().float().numpy() for g in gates]),
        "bias": np.array([float(g.bias) for g in gates], dtype=np.float32),
        "eps": np.array([gates[0].eps], dtype=np.float32),
        **(router or {}),
    }


def logistic(domain: np.ndarray, general: np.ndarray, l2: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """An L2-regularised logistic regression telling domain features (1) from general ones (0), classes weighted
    equally. domain, general: (n, n_blocks, d). Returns weight (n_blocks, d) and bias (1,) on the raw features, so
    that logit = sum(weight * f) + bias."""
    x = torch.from_numpy(np.concatenate([domain, general])).double().flatten(1)  # (n, n_blocks * d)
    y = torch.cat([torch.ones(len(domain)), torch.zeros(len(general))]).double()
    weight = torch.cat([torch.full((len(domain),), 0.5 / len(domain)), torch.full((len(general),), 0.5 / len(general))])
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd  # standardised, so one l2 suits every feature
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight.double() * F.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none")).sum()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    raw_w = (w / sd).detach()  # back to raw features: w.(x - mu)/sd + b = (w/sd).x + (b - (w/sd).mu)
    raw_b = (b - raw_w @ mu).detach()
    return raw_w.view(domain.shape[1:]).numpy(), raw_b.view(1).numpy()


def save_router(folder: Path, stats: dict[str, np.ndarray]) -> None:
    save_file(stats, str(Path(folder) / ROUTER_FILE))
    as_plain_write(Path(folder) / ROUTER_FILE)


def load_router(folder: Path, record: dict | None = None) -> dict[str, np.ndarray] | None:
    """The expert's router statistics, or None when it was trained without them. `record`: the file's size and
    sha256 from expert.json (older experts have none: only the reader checks the file)."""
    path = Path(folder) / ROUTER_FILE
    if not path.exists():
        return None
    fix = "restore the expert folder from a copy, or retrain the expert"
    check_file(path, record, fix)
    stats = checked_load(path, lambda: load_file(str(path)), fix)
    if not all(k in stats for k in ROUTER_KEYS):
        raise UserError(f"{path} lacks {', '.join(k for k in ROUTER_KEYS if k not in stats)}; retrain the expert")
    return stats
