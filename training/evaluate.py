"""Held-out next-token accuracy and perplexity per domain: the paper's metric."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

from mode_edge.config import MoDELayout, check_seq_len
from mode_edge.errors import UserError
from mode_edge.ranges import check_number
from mode_edge.progress import results_console, task_progress
from mode_edge.training import runs
from mode_edge.training.backbones import Backbone
from mode_edge.training.data import Corpus, as_corpus, eval_windows, require_split
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


@torch.no_grad()
def score(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8, label: str = "eval") -> dict:
    """Accuracy of the argmax prediction and mean cross-entropy over every position of (N, T+1) windows, and for a
    MoDE model the mean gate weights per block (`gates`)."""
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    with task_progress(label, len(windows)) as advance, GateUsage(model) as usage:
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            logits = model(batch[:, :-1]).float()  # (b, T, V)
            targets = batch[:, 1:]
            correct += (logits.argmax(-1) == targets).sum().item()
            loss_sum += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
            advance(len(batch))
    loss = loss_sum / count
    result = {"accuracy": 100.0 * correct / count, "perplexity": math.exp(loss), "loss": loss, "tokens": count}
    gates = usage.summary()
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
    check_seq_len(seq_len, backbone.decoder.cfg.max_seq_len)
    check_number("--max-tokens", max_tokens, lo=1, integer=True)
    results = {}
    for path in data:
        corpus = as_corpus(path)
        if corpus.name in results:
            raise UserError(f"two --data folders are both named {corpus.name!r}; evaluate each domain once")
        windows = eval_windows(require_split(corpus, split), backbone.tokenizer, seq_len, max_tokens)
        results[corpus.name] = score(model, windows, label=f"eval {corpus.name}")
    return results


def print_scores(rows: dict[str, dict[str, dict]]) -> None:
    """One table: a row per model, accuracy (and perplexity) per domain."""
    domains = list(dict.fromkeys(d for r in rows.values() for d in r))
    table = Table(title="next-token accuracy % (perplexity)")
    table.add_column("model")
    for d in domains:
        table.add_column(d, justify="right")
    for name, r in rows.items():
        table.add_row(name, *(f"{r[d]['accuracy']:.2f} ({r[d]['perplexity']:.2f})" if d in r else "-" for d in domains))
    results_console.print(table)


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
