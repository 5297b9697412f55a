"""Held-out next-token accuracy and perplexity per domain: the paper's metric."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from mode_edge.config import MoDELayout, check_seq_len
from mode_edge.errors import UserError
from mode_edge.progress import results_console, task_progress
from mode_edge.ranges import check_number
from mode_edge.training import runs
from mode_edge.training.backbones import Backbone
from mode_edge.training.data import Corpus, HeldOut, as_corpus, held_out, require_split
from mode_edge.training.model import MoDEModel


class GateUsage:
    """Mean gate weight of the backbone and of each expert per MoDE block, over every token the model reads.

    It shows what a score alone hides: whether an expert opens on the domains it was not trained for (retention
    lost), or stays shut on its own (no gain)."""

    def __init__(self, model: torch.nn.Module):
        self.blocks = [b for b in getattr(model, "blocks", []) if b.experts]
        self.sums = [None] * len(self.blocks)
        self.tokens = 0

    def __enter__(self) -> "GateUsage":
        self.hooks = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()

    def _hook(self, i: int):
        def record(block, args):
            weights = block.gate_weights(args[0]).flatten(0, 1).sum(0)  # (1 + N,)
            self.sums[i] = weights if self.sums[i] is None else self.sums[i] + weights
            if i == 0:
                self.tokens += args[0].shape[0] * args[0].shape[1]

        return record

    def summary(self) -> dict | None:
        """{"backbone": [per block], expert: [per block]}, or None for a model without experts."""
        if not self.blocks or not self.tokens:
            return None
        names = ["backbone", *self.blocks[0].experts]
        return {n: [round(float(s[j]) / self.tokens, 4) for s in self.sums] for j, n in enumerate(names)}


def resample(n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(resamples, n) indices drawn with replacement: the bootstrap's resamples of n units (documents, prompts)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(
    correct: np.ndarray, loss: np.ndarray, count: np.ndarray, resamples: int = 1000, seed: int = 0
) -> dict:
    """95% percentile intervals of accuracy (%) and perplexity, resampling documents with replacement.

    correct, loss, count: (D,) per-document sums of correct predictions, cross-entropy (nats) and tokens. Documents,
    not tokens, are the unit: tokens of one document are not independent. With one document the interval is a point.
    """
    picks = resample(len(count), resamples, seed)  # (R, D)
    n = count[picks].sum(1)
    acc = 100.0 * correct[picks].sum(1) / n
    ppl = np.exp(loss[picks].sum(1) / n)
    return {
        "accuracy_ci": [round(float(v), 2) for v in np.percentile(acc, [2.5, 97.5])],
        "perplexity_ci": [round(float(v), 3) for v in np.percentile(ppl, [2.5, 97.5])],
        "documents": int(len(count)),
    }


def paired_ci(a: dict, b: dict, resamples: int = 1000, seed: int = 0) -> dict:
    """Accuracy of model a minus model b (points) with a 95% interval, both scored on the same held-out sample
    (`score` results with per_doc), resampling the same documents for both: far tighter than two separate intervals."""
    ca, cb = np.array(a["per_doc"]["correct"]), np.array(b["per_doc"]["correct"])
    n = np.array(a["per_doc"]["count"])
    if len(ca) != len(cb) or not np.array_equal(n, np.array(b["per_doc"]["count"])):
        raise ValueError("paired_ci needs two scores of the same held-out sample")
    picks = resample(len(n), resamples, seed)  # the same documents for both models
    diff = 100.0 * (ca[picks].sum(1) - cb[picks].sum(1)) / n[picks].sum(1)
    delta = 100.0 * (ca.sum() - cb.sum()) / n.sum()
    return {"delta": round(float(delta), 2), "ci": [round(float(v), 2) for v in np.percentile(diff, [2.5, 97.5])]}


@torch.no_grad()
def token_stats(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, label: str = "eval"):
    """Per predicted token of (N, T+1) windows: whether the argmax is right and the cross-entropy, each (N, T); and
    for a MoDE model the mean gate weights per block (None otherwise)."""
    model.eval()
    hits, losses = [], []
    with task_progress(label, len(windows)) as advance, GateUsage(model) as usage:
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            logits = model(batch[:, :-1]).float()  # (b, T, V)
            targets = batch[:, 1:]
            hits.append(logits.argmax(-1) == targets)
            losses.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets))
            advance(len(batch))
    return torch.cat(hits), torch.cat(losses), usage.summary()


def summarize(hit: torch.Tensor, loss_tok: torch.Tensor, doc: torch.Tensor | None) -> dict:
    """Accuracy %, perplexity and mean loss of per-token results (N, T); with the document of each token, also 95%
    bootstrap intervals over documents and the per-document sums (for paired comparisons)."""
    hit, loss_tok = hit.flatten().double().numpy(), loss_tok.flatten().double().numpy()
    count = hit.size
    loss = float(loss_tok.sum()) / count
    result = {"accuracy": 100.0 * float(hit.sum()) / count, "perplexity": math.exp(loss), "loss": loss, "tokens": count}
    if doc is not None:
        _, owner = np.unique(doc.flatten().numpy(), return_inverse=True)  # (N*T,) dense document index
        per_doc = [np.bincount(owner, weights=w) for w in (hit, loss_tok, np.ones_like(hit))]
        result.update(bootstrap_ci(*per_doc))
        result["per_doc"] = {k: [round(float(v), 4) for v in a] for k, a in zip(("correct", "loss", "count"), per_doc)}
    return result


def score(model: torch.nn.Module, sample: HeldOut | torch.Tensor, batch_size: int = 8, label: str = "eval") -> dict:
    """Accuracy of the argmax prediction and mean cross-entropy over every position of (N, T+1) windows, with 95%
    bootstrap intervals over documents when the sample knows its documents (HeldOut), and for a MoDE model the mean
    gate weights per block (`gates`)."""
    windows = sample.windows if isinstance(sample, HeldOut) else sample
    hit, loss, gates = token_stats(model, windows, batch_size, label)
    result = summarize(hit, loss, sample.doc if isinstance(sample, HeldOut) else None)
    return {**result, "gates": gates} if gates else result


BASELINES = ("full-ft", "lora")


def build_model(
    backbone: Backbone, run: Path | None, experts: list[str] | None
) -> tuple[torch.nn.Module, list[str], str]:
    """The model to evaluate, its experts and a label: a run's experts (all, a subset, or none: the bare backbone),
    or a baseline run's fine-tuned model."""
    record = runs.read_model_record(run) if run is not None else None
    if record is not None and record["kind"] in BASELINES:
        if experts is not None:
            raise UserError(f"--experts applies to MoDE runs; {run} is a {record['kind']} run")
        from mode_edge.training.baselines import load_baseline

        return load_baseline(run, record, backbone), [], record["kind"]
    if record is None or experts == []:
        return MoDEModel(backbone.decoder, MoDELayout(n_blocks=1, expert_layers=1)), [], "backbone"  # one plain block
    loaded = runs.load_run_experts(run, backbone, experts)
    layout = runs.check_same_blocks(loaded)
    names = [e.name for e in loaded]
    return MoDEModel(backbone.decoder, layout, {e.name: e.expert for e in loaded}), names, "+".join(names)


def evaluate(
    backbone: Backbone,
    model: MoDEModel,
    data: list[Corpus | Path],
    seq_len: int = 256,
    max_tokens: int = 8192,
    split: str = "test",
) -> dict[str, dict]:
    """Scores per domain, keyed by the corpus name."""
    check_seq_len(seq_len, backbone.decoder.cfg.max_seq_len, note=backbone.decoder.cfg.context_note())
    check_number("--max-tokens", max_tokens, lo=1, integer=True)
    results = {}
    for path in data:
        corpus = as_corpus(path)
        if corpus.name in results:
            raise UserError(f"two --data folders are both named {corpus.name!r}; evaluate each domain once")
        sample = held_out(require_split(corpus, split), backbone.tokenizer, seq_len, max_tokens)
        results[corpus.name] = score(model, sample, label=f"eval {corpus.name}")
    return results


def print_scores(rows: dict[str, dict[str, dict]]) -> None:
    """One table: a row per model, accuracy (and perplexity) per domain."""
    domains = list(dict.fromkeys(d for r in rows.values() for d in r))
    table = Table(title="next-token accuracy % [95% interval over documents] (perplexity)")
    table.add_column("model")
    for d in domains:
        table.add_column(d, justify="right")
    for name, r in rows.items():
        table.add_row(name, *(score_cell(r[d]) if d in r else "-" for d in domains))
    results_console.print(table)


def score_cell(s: dict) -> str:
    """'acc [lo, hi] (ppl)' for a table cell."""
    ci = f" [{s['accuracy_ci'][0]:.1f}, {s['accuracy_ci'][1]:.1f}]" if "accuracy_ci" in s else ""
    return f"{s['accuracy']:.2f}{ci} ({s['perplexity']:.2f})"


def print_gates(rows: dict[str, dict[str, dict]]) -> None:
    """Mean gate weight of each expert per domain, averaged over blocks (MoDE models only)."""
    for name, r in rows.items():
        usage = {d: s["gates"] for d, s in r.items() if s.get("gates")}
        if not usage:
            continue
        parts = list(next(iter(usage.values())))
        table = Table(title=f"{name}: mean gate weight")
        table.add_column("domain")
        for part in parts:
            table.add_column(part, justify="right")
        for d, g in usage.items():
            table.add_row(d, *(f"{sum(g[p]) / len(g[p]):.3f}" for p in parts))
        results_console.print(table)


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after the prompt with a KV cache: the reference exported graphs are held against."""
    from mode_edge.training.model import KVCache

    cache, out = KVCache(), []
    logits = model(torch.tensor([prompt]), cache)
    for _ in range(n):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]]), cache)
    return out
