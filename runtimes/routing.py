"""Prompt-level routing: which installed experts (or none) a prompt should run with. numpy only, no torch, so the
device runtime and the workstation's evaluation share one implementation.

Three routers, all over the frozen backbone's block inputs for the prompt (one backbone-only pass):

- `gate`: each expert's gate rows scored on the prompt (mean logit over blocks and tokens), the highest wins. It
  compares how each expert was trained as much as what the prompt is about, and never answers "none".
- `logistic`: each pack's own logistic regression, its domain against general text, on the same pooled features
  (fitted at the end of stage 1); a pack claims a prompt with a positive logit, the most confident claim wins, and
  a prompt no pack claims runs on the backbone alone.
- `centroid`: a nearest-centroid classifier on the mean-pooled, RMS-normalised block inputs. Each pack carries the
  mean and variance of those features on its own training text and on general text (kilobytes, in its gate file);
  the classes present are compared by their squared distance scaled by the variance shared across them (a diagonal
  linear discriminant). General text is a class of its own, so a prompt that no expert claims runs on the backbone
  alone. Each class is fitted on its own, so any subset of installed packs routes without retraining (DESIGN §6).
"""

from __future__ import annotations

import numpy as np

NONE = "none"
"""The routing answer that selects no expert: the bare backbone."""
ROUTERS = ("centroid", "logistic", "gate")
ROUTER_KEYS = ("router_mean", "router_var", "general_mean", "general_var", "router_weight", "router_bias")
"""Tensors a pack's gate file holds when its expert was trained with a router fitted; (n_blocks, d) each, the bias
(1,)."""


def pooled_features(block_inputs: list[np.ndarray], eps: float) -> np.ndarray:
    """block_inputs: per block (B, T, d) -> (B, n_blocks, d): each token RMS-normalised (as the gate sees it), then
    averaged over the prompt's tokens after the first. The first position is left out (when there are others): with
    no context before it, its hidden state is unlike any other (decoders park attention there), and its share of
    the mean would shift the features with the prompt's length."""
    pooled = []
    for h in block_inputs:
        h = h[:, 1:] if h.shape[1] > 1 else h
        h = h.astype(np.float64)
        hn = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps)
        pooled.append(hn.mean(axis=1))  # (B, d)
    return np.stack(pooled, axis=1)


def has_router(gate: dict[str, np.ndarray]) -> bool:
    return all(k in gate for k in ROUTER_KEYS)


def without_router(names: list[str]) -> tuple[str, str]:
    """How a warning names packs that carry no router: ("expert X carries no router (trained without --general)",
    "it"), or for several "experts X, Y carry ..." and "them" (the pronoun for the rest of the sentence)."""
    who = f"expert {names[0]} carries" if len(names) == 1 else f"experts {', '.join(names)} carry"
    return f"{who} no router (trained without --general)", "it" if len(names) == 1 else "them"


def centroid_scores(features: np.ndarray, gates: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Score of every class for each prompt: minus half the variance-scaled squared distance to its centroid.

    features: (B, n_blocks, d) from `pooled_features`; gates: name -> gate tensors with the router keys. Returns
    name -> (B,), plus NONE -> (B,) for general text (its centroid is the mean of the packs' general centroids).
    Raises ValueError when no gate carries a router."""
    routed = {n: g for n, g in gates.items() if has_router(g)}
    if not routed:
        raise ValueError("no installed pack carries router statistics")
    means = {n: g["router_mean"] for n, g in routed.items()}
    means[NONE] = np.mean([g["general_mean"] for g in routed.values()], axis=0)
    variances = [g["router_var"] for g in routed.values()] + [np.mean([g["general_var"] for g in routed.values()], 0)]
    var = np.mean(variances, axis=0) + 1e-6  # (n_blocks, d), shared by every class
    f = features.astype(np.float64)
    return {n: -0.5 * np.sum((f - m) ** 2 / var, axis=(1, 2)) for n, m in means.items()}


def logistic_scores(features: np.ndarray, gates: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each pack's own domain-vs-general logistic regression on the pooled features: name -> (B,) logits, plus
    NONE -> 0 (a pack claims a prompt when its logit is positive; the most confident claim wins)."""
    routed = {n: g for n, g in gates.items() if has_router(g)}
    if not routed:
        raise ValueError("no installed pack carries router statistics")
    f = features.astype(np.float64)
    scores = {n: np.sum(f * g["router_weight"], axis=(1, 2)) + g["router_bias"][0] for n, g in routed.items()}
    scores[NONE] = np.zeros(len(f))
    return scores


def gate_scores(block_inputs: list[np.ndarray], gates: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean gate logit of every expert over blocks and tokens, per prompt: name -> (B,)."""
    scores = {}
    for name, g in gates.items():
        logits = []
        for i, h in enumerate(block_inputs):
            hn = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + g["eps"][0])
            logits.append(hn @ g["weight"][i] + g["bias"][i])  # (B, T)
        scores[name] = np.mean(np.stack(logits), axis=(0, 2))
    return scores


def effective_router(router: str, gates: dict[str, dict[str, np.ndarray]]) -> str:
    """The router that decides: `router`, except that centroid and logistic fall back to the gate rows when no pack
    in `gates` carries router statistics."""
    if router in ("centroid", "logistic") and not any(has_router(g) for g in gates.values()):
        return "gate"
    return router


def route(block_inputs: list[np.ndarray], gates: dict[str, dict[str, np.ndarray]], router: str = "centroid",
          top_k: int = 1) -> tuple[list[list[str]], dict[str, np.ndarray]]:  # fmt: skip
    """The experts each prompt should run with, and every candidate's scores.

    block_inputs: per block (B, T, d) of the backbone-only pass; gates: installed name -> gate tensors. With the
    centroid or logistic router a prompt whose best class is general text (NONE) gets [] (the backbone alone);
    otherwise the top_k experts that score above it. Both fall back to the gate router when no pack carries router
    statistics, and never pick a pack without them otherwise. Raises ValueError for an unknown router."""
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}")
    if not gates:
        return [[] for _ in range(len(block_inputs[0]))], {}
    if effective_router(router, gates) != "gate":
        eps = float(next(iter(gates.values()))["eps"][0])
        pick = centroid_scores if router == "centroid" else logistic_scores
        scores = pick(pooled_features(block_inputs, eps), gates)
    else:
        scores = gate_scores(block_inputs, gates)
    names = list(scores)
    table = np.stack([scores[n] for n in names], axis=1)  # (B, candidates)
    choices = []
    for row in table:
        order = [names[j] for j in np.argsort(-row, kind="stable")]
        cut = order.index(NONE) if NONE in order else len(order)
        choices.append(order[:cut][:top_k])
    return choices, scores
