"""Experts that stay out of other domains (DESIGN §6): general rows in stage-1 batches, a stay-out penalty on them,
and gate rows initialised from data.

An expert trained on its domain alone has no reason to keep its gate shut elsewhere. Here a share of every batch's
rows is general text; the domain rows train with the ordinary language-model loss, and on the general rows a penalty
pulls the model back to the frozen backbone, either the KL divergence from the backbone's next-token distribution or
the relative size of each block's change to the backbone's block output. Sources: Neutral Residues (arXiv
2410.02744: general data plus a penalty on the added branch), CITI (arXiv 2409.13202), FlexOlmo (arXiv 2507.07024
§3.3: router rows from domain embeddings, a negative bias so the expert can be skipped).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from mode_edge.config import MoDELayout, StayOutConfig
from mode_edge.training.data import TokenStream
from mode_edge.training.model import Decoder, Expert, MoDEModel, run_layers

SHUT_WEIGHT, OPEN_WEIGHT = 0.02, 0.12
"""Mean gate weights that data initialisation aims at on general text (nearly shut) and on the domain (what the zero
init gives every token, sigmoid(-2)): an expert whose layers start as copies of backbone layers does not yet compute
what the block does, so opening its gate wide from the first step would throw the domain's loss far up (measured on
SmolLM2 math: a discriminant scaled to its full log-odds slope opened 0.87-1.0 on math and started at loss 5 instead
of 2.3)."""


def mixed_rows(domain: TokenStream, general: TokenStream, share: float) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of domain rows with a `share` of general rows spread evenly over the stream: row k is general when
    floor((k + 1) * share) > floor(k * share). Yields (tokens (B, T+1), is_general (B,) bool); deterministic."""
    k = 0
    while True:  # both streams advance a whole batch each step: each one's order (and a resume) ignores the other
        rows_domain, rows_general = next(domain), next(general)  # (B, T+1) each
        is_general = torch.tensor([int((k + i + 1) * share) > int((k + i) * share) for i in range(len(rows_domain))])
        k += len(rows_domain)
        yield torch.where(is_general[:, None], rows_general, rows_domain), is_general


def row_shares(n_domain: int, n_general: int, device: torch.device) -> tuple[float, float]:
    """What this process's mean over its domain rows and its mean over its general rows weigh so that, once the
    trainer averages the ranks' gradients (training/distributed.py), the result is the gradient of the global
    batch's means: world size x this rank's rows / all ranks' rows of each kind. (1, 1) in a single process."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 1.0, 1.0
    counts = torch.tensor([n_domain, n_general], dtype=torch.float64, device=device)  # (NCCL: on the GPU)
    dist.all_reduce(counts)
    size = dist.get_world_size()
    return tuple(size * n / float(total) if total else 0.0 for n, total in zip((n_domain, n_general), counts.tolist()))


class StayOutLoss:
    """Cross-entropy on the domain rows plus `weight` x the stay-out penalty on the general rows.

    Called with a model and a batch (tokens (B, T+1), is_general (B,)); returns the scalar loss. The 'delta' penalty
    reads each block's output and its backbone slice's output through forward hooks, so it costs no extra forward;
    'kl' runs the bare backbone over the general rows without gradients."""

    def __init__(self, model: MoDEModel, cfg: StayOutConfig):
        self.model, self.cfg = model, cfg
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        self.hooks = []
        if cfg.penalty == "delta":
            for i, (block, (_, end)) in enumerate(zip(model.blocks, model.ranges)):
                self.hooks.append(block.register_forward_hook(self._keep("mix", i)))
                self.hooks.append(model.backbone.layers[end - 1].register_forward_hook(self._keep("backbone", i)))

    def _keep(self, kind: str, i: int):
        def hook(module, args, output):
            self.outputs[(kind, i)] = output

        return hook

    def close(self) -> None:
        """Remove the hooks (idempotent): nothing is recorded once training is over."""
        for h in self.hooks:
            h.remove()
        self.hooks, self.outputs = [], {}

    def __call__(self, model: MoDEModel, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, is_general = batch
        logits = model(tokens[:, :-1])  # (B, T, V)
        domain = ~is_general
        share = row_shares(int(domain.sum()), int(is_general.sum()), tokens.device)
        loss = logits.sum() * 0.0  # keeps the graph when no row carries a loss (all general rows, weight 0)
        if domain.any():
            loss = share[0] * F.cross_entropy(logits[domain].flatten(0, 1).float(), tokens[domain, 1:].flatten())
        if is_general.any() and self.cfg.weight > 0:
            loss = loss + share[1] * self.cfg.weight * self.penalty(logits, tokens, is_general)
        self.outputs.clear()
        return loss

    def penalty(self, logits: torch.Tensor, tokens: torch.Tensor, is_general: torch.Tensor) -> torch.Tensor:
        if self.cfg.penalty == "kl":
            with torch.no_grad():
                reference = self.model.backbone(tokens[is_general, :-1]).float()  # (b, T, V)
            log_p = F.log_softmax(logits[is_general].float(), dim=-1)
            log_q = F.log_softmax(reference, dim=-1)
            return F.kl_div(log_p.flatten(0, 1), log_q.flatten(0, 1), log_target=True, reduction="batchmean")
        changes = []
        for i in range(len(self.model.blocks)):
            y, y_bb = self.outputs[("mix", i)][is_general], self.outputs[("backbone", i)][is_general]  # (b, T, d)
            changes.append((y - y_bb).abs().mean(-1) / y_bb.abs().mean(-1).clamp_min(1e-6))  # (b, T)
        return torch.stack(changes).mean()


@torch.no_grad()
def data_gate_init(
    decoder: Decoder,
    layout: MoDELayout,
    expert: Expert,
    domain: TokenStream,
    general: TokenStream,
    n_batches: int = 8,
    shrinkage: float = 0.1,
) -> dict:
    """Set each block's gate row from data: the direction that best tells the frozen backbone's RMS-normalised block
    inputs on the domain from those on general text, w ~ S^-1 (mu_domain - mu_general) with S their pooled covariance
    shrunk towards a multiple of the identity (a linear discriminant; FlexOlmo, arXiv 2507.07024 §3.3, starts router
    rows from the plain mean difference). Scale and bias give a mean weight of SHUT_WEIGHT on general text and of
    OPEN_WEIGHT on the domain; the scale never exceeds the discriminant's log-odds slope, (m_domain - m_general) /
    var of the projections, so where the data cannot tell the domains apart the gate opens less. Reads n_batches of
    each stream; returns, per block, the mean initial gate weight on the domain and on general text over those
    tokens."""
    ranges = layout.block_ranges(decoder.cfg.n_layers)
    inputs: dict[str, list[list[torch.Tensor]]] = {"domain": [[] for _ in ranges], "general": [[] for _ in ranges]}
    for kind, stream in (("domain", domain), ("general", general)):
        for _ in range(n_batches):
            x = decoder.embed(next(stream)[:, :-1])  # (B, T, d)
            for i, (start, end) in enumerate(ranges):
                inputs[kind][i].append(_normalised(x, expert.blocks[i].gate.eps).flatten(0, 1))  # (B*T, d)
                x = run_layers(decoder.layers[start:end], x, decoder.rope, None, [f"bb.{k}" for k in range(start, end)])
    opened = {"domain": [], "general": []}
    for i, block in enumerate(expert.blocks):
        h = {k: torch.cat(v[i]).double() for k, v in inputs.items()}  # (n, d) each
        mu = {k: v.mean(0) for k, v in h.items()}
        cov = sum(torch.cov(v.T) for v in h.values()) / 2  # (d, d) pooled within-class covariance
        cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
        direction = torch.linalg.solve(cov, mu["domain"] - mu["general"])  # (d,)
        p = {k: v @ direction for k, v in h.items()}  # (n,) projections; the domain's mean is the larger (S is SPD)
        spread = (p["domain"].var() + p["general"].var()) / 2
        slope = float((p["domain"].mean() - p["general"].mean()) / spread.clamp_min(1e-12))
        scale = _scale_for(p["domain"], p["general"], slope)
        block.gate.weight.copy_((scale * direction).float())
        block.gate.bias.fill_(_bias_for(scale * p["general"], SHUT_WEIGHT))
        for k in opened:
            logits = h[k].float() @ block.gate.weight + block.gate.bias
            opened[k].append(round(float(torch.sigmoid(logits).mean()), 4))  # softmax over [0, logit]
    return opened


def _bias_for(logits: torch.Tensor, mean_weight: float) -> float:
    """The bias b with mean(sigmoid(logits + b)) = mean_weight, by bisection (the mean is increasing in b)."""
    lo, hi = -50.0 - float(logits.max()), 50.0 - float(logits.min())
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(torch.sigmoid(logits + mid).mean()) < mean_weight else (lo, mid)
    return (lo + hi) / 2


def _scale_for(p_domain: torch.Tensor, p_general: torch.Tensor, slope: float) -> float:
    """The scale in [0, slope] at which, with the bias that leaves SHUT_WEIGHT on general text, the domain's mean
    gate weight is OPEN_WEIGHT (by bisection: it grows with the scale); `slope` when even that opens less."""

    def opened(scale: float) -> float:
        return float(torch.sigmoid(scale * p_domain + _bias_for(scale * p_general, SHUT_WEIGHT)).mean())

    if opened(slope) <= OPEN_WEIGHT:
        return slope
    lo, hi = 0.0, slope
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if opened(mid) < OPEN_WEIGHT else (lo, mid)
    return (lo + hi) / 2


def _normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The gate's view of a block input: RMS-normalised without a learned scale, as in model.Gate."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
