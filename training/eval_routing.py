"""`mode-edge eval --routing`: how well prompt-level routing picks an expert (or none), and what it costs.

For each domain's held-out documents: a window of CONTEXT + CONTINUATION tokens from the start of each document long
enough. The router sees the first L tokens (L = 16, 64, 256) and chooses at most one expert or none; the
continuation (the last CONTINUATION tokens, read with the whole window as context) is then scored with

- routed: only the chosen expert (or the bare backbone), as a device would run it;
- oracle: the domain's own expert (the expert named like the domain), or the backbone for a domain no expert owns;
- composed: every expert at once, mixed token by token by their gates;
- backbone: no expert.

The expected answer for a domain is its own expert, or "none" when no expert carries its name (general text).
Routing runs through runtimes/routing.py, the device's code, on the PyTorch backbone's block inputs (--model,
TorchSide) or on the bundle's graphs through the device runtime (--bundle, BundleSide).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from mode_edge.errors import UserError
from mode_edge.progress import results_console, task_progress
from mode_edge.runtimes.routing import NONE, ROUTERS, route, without_router
from mode_edge.training.data import Corpus, held_out, require_split
from mode_edge.training.evaluate import resample, summarize, token_stats
from mode_edge.training.model import MoDEModel
from mode_edge.training.router import PROMPT_LENGTHS, block_inputs, routing_tensors

CONTEXT, CONTINUATION = 256, 64
ALL = "*all*"
"""The key of the composition of every expert (no expert name can hold '*')."""


def windows(corpus: Corpus, tokenizer, n: int) -> torch.Tensor:
    """(n', CONTEXT + CONTINUATION) token ids: the start of each held-out document that is long enough, in file
    order, at most n of them."""
    rows = []
    for _, text in require_split(corpus, "test"):
        ids = tokenizer.encode(text)
        if len(ids) >= CONTEXT + CONTINUATION:
            rows.append(ids[: CONTEXT + CONTINUATION])
        if len(rows) == n:
            break
    if not rows:
        raise UserError(f"{corpus.path}: no test document holds {CONTEXT + CONTINUATION} tokens; routing needs longer")
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def continuation_hits(model: MoDEModel, w: torch.Tensor, label: str) -> np.ndarray:
    """(n, CONTINUATION) bool: whether the argmax prediction of each continuation token is right."""
    hits = []
    with task_progress(label, len(w)) as advance:
        for i in range(0, len(w), 8):
            batch = w[i : i + 8]
            logits = model(batch[:, :-1])  # (b, T, V)
            hits.append((logits[:, CONTEXT - 1 :].argmax(-1) == batch[:, CONTEXT:]).numpy())
            advance(len(batch))
    return np.concatenate(hits)


def _ci(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of per-prompt values (one prompt per document)."""
    means = values[resample(len(values), resamples, seed)].mean(1)
    return [round(float(v), 2) for v in np.percentile(means, [2.5, 97.5])]


class TorchSide:
    """The PyTorch model of a run's experts: block inputs and continuation hits for evaluate_routing."""

    def __init__(self, backbone, loaded: list, layout):
        self.backbone, self.layout, self.tokenizer = backbone, layout, backbone.tokenizer
        self.names = [e.name for e in loaded]
        self.gates = {e.name: routing_tensors(e.expert, e.router) for e in loaded}
        self.experts = {e.name: e.expert for e in loaded}
        self.context = backbone.decoder.cfg.max_seq_len
        self.fix = (f"export the run with --context {CONTEXT + CONTINUATION} or more and evaluate that bundle "
                    f"(`eval --routing --bundle`)")  # fmt: skip

    def block_inputs(self, ids: torch.Tensor) -> list[np.ndarray]:
        return block_inputs(self.backbone.decoder, self.layout, ids)

    def hits(self, subset: list[str], w: torch.Tensor, label: str) -> np.ndarray:
        model = MoDEModel(self.backbone.decoder, self.layout, {n: self.experts[n] for n in subset})
        return continuation_hits(model, w, label)


class BundleSide:
    """A bundle on the device runtime (onnxruntime, no torch in the loop): the same two questions, answered by the
    exported graphs, with the gate files (and routers) the runtime reads."""

    def __init__(self, bundle: Path):
        from mode_edge.training.eval_bundle import BundleModel

        self.model = BundleModel(bundle, experts=[])
        self.session, self.tokenizer = self.model.session, self.model.tokenizer
        self.gates = self.session.gates
        self.names = sorted(self.gates)
        self.context = self.session.engine.context
        self.fix = f"re-export it with --context {CONTEXT + CONTINUATION} or more"

    def block_inputs(self, ids: torch.Tensor) -> list[np.ndarray]:
        rows = [self.session.engine.block_inputs(row[None].numpy()) for row in ids]  # one prompt at a time
        return [np.concatenate([r[i] for r in rows]) for i in range(len(rows[0]))]

    def hits(self, subset: list[str], w: torch.Tensor, label: str) -> np.ndarray:
        self.session.select(subset)
        hits = []
        with task_progress(label, len(w)) as advance:
            for row in w:
                logits = self.model(row[None, :-1])  # (1, T, V)
                hits.append((logits[0, CONTEXT - 1 :].argmax(-1) == row[CONTEXT:]).numpy())
                advance(1)
        return np.stack(hits)


def evaluate_routing(side, corpora: list[Corpus], n_prompts: int = 48, routers: tuple = ROUTERS) -> dict:
    """Routing accuracy, confusion and routed-model accuracy per router, prompt length and domain.

    side: TorchSide or BundleSide (the candidates' gates, block inputs and continuation hits, the context that
    must hold CONTEXT + CONTINUATION tokens, else UserError with the side's fix); corpora: held-out
    domains, general text included. Returns {"experts", "domains", "prompts", "routers": {router: {L: {"accuracy",
    "confusion", "per_domain"}}}, "scores": {domain: {"backbone", "oracle", "composed", "routed": {router: {L:
    ...}}}}} with accuracies in %."""
    names, gates = side.names, side.gates
    if side.context < CONTEXT + CONTINUATION:
        raise UserError(f"--routing reads {CONTEXT}-token prompts and their {CONTINUATION}-token continuations, "
                        f"{CONTEXT + CONTINUATION} tokens, past this model's context of {side.context}; "
                        f"{side.fix}")  # fmt: skip
    domains = [c.name for c in corpora]
    if len(set(domains)) < len(domains):
        raise UserError(f"two --data folders share a domain name ({', '.join(domains)}); evaluate each domain once")
    subsets = {NONE: [], **{n: [n] for n in names}, ALL: names}
    out = {"experts": names, "domains": [c.name for c in corpora], "prompts": {}, "routers": {}, "scores": {}}
    choices: dict[str, dict[str, dict[int, list[str]]]] = {r: {} for r in routers}
    hits: dict[str, dict[str, np.ndarray]] = {}
    for corpus in corpora:
        w = windows(corpus, side.tokenizer, n_prompts)
        out["prompts"][corpus.name] = len(w)
        inputs = [side.block_inputs(w[i : i + 8, :CONTEXT]) for i in range(0, len(w), 8)]
        for r in routers:
            choices[r][corpus.name] = {}
            for length in PROMPT_LENGTHS:
                picked = []
                for chunk in inputs:
                    picked += route([h[:, :length] for h in chunk], gates, r, top_k=1)[0]
                choices[r][corpus.name][length] = [c[0] if c else NONE for c in picked]
        hits[corpus.name] = {key: side.hits(subset, w, f"{corpus.name}: {key}") for key, subset in subsets.items()}
    for corpus in corpora:
        d, h = corpus.name, hits[corpus.name]
        oracle = d if d in names else NONE
        per_prompt = {k: v.mean(1) * 100 for k, v in h.items()}  # (n,) accuracy % of each prompt's continuation
        scores = {"backbone": per_prompt[NONE], "oracle": per_prompt[oracle], "composed": per_prompt[ALL]}
        out["scores"][d] = {k: {"accuracy": round(float(v.mean()), 2), "ci": _ci(v)} for k, v in scores.items()}
        out["scores"][d]["expected"] = oracle
        out["scores"][d]["routed"] = {}
        for r in routers:
            out["scores"][d]["routed"][r] = {}
            for length in PROMPT_LENGTHS:
                picked = choices[r][d][length]
                v = np.array([per_prompt[c][i] for i, c in enumerate(picked)])
                out["scores"][d]["routed"][r][length] = {"accuracy": round(float(v.mean()), 2), "ci": _ci(v)}
    for r in routers:
        out["routers"][r] = {}
        for length in PROMPT_LENGTHS:
            labels = [*names, NONE]
            confusion = {d: {c: choices[r][d][length].count(c) for c in labels} for d in out["domains"]}
            right = {d: confusion[d][d if d in names else NONE] for d in out["domains"]}
            total = sum(out["prompts"].values())
            out["routers"][r][length] = {
                "accuracy": round(100.0 * sum(right.values()) / total, 2),
                "per_domain": {d: round(100.0 * right[d] / out["prompts"][d], 2) for d in out["domains"]},
                "confusion": confusion,
            }
    return out


def routed_scores(backbone, loaded: list, layout, corpora: list[Corpus], max_tokens: int, route_tokens: int = 64,
                  router: str = "centroid", seq_len: int = 256) -> dict[str, dict]:  # fmt: skip
    """Held-out scores (as evaluate.evaluate) of the routed model: each window of the held-out sample runs with at
    most one expert, chosen by `router` on its first `route_tokens` tokens (or with none). Adds `routes`, the count
    of windows per choice."""
    gates = {e.name: routing_tensors(e.expert, e.router) for e in loaded}
    experts = {e.name: e.expert for e in loaded}
    results = {}
    for corpus in corpora:
        sample = held_out(require_split(corpus, "test"), backbone.tokenizer, seq_len, max_tokens)
        w = sample.windows
        picked = []
        for i in range(0, len(w), 8):
            picked += route(block_inputs(backbone.decoder, layout, w[i : i + 8, :route_tokens]), gates, router)[0]
        choice = [c[0] if c else NONE for c in picked]
        hit = torch.zeros(w[:, 1:].shape, dtype=torch.bool)
        loss = torch.zeros(w[:, 1:].shape)
        for key in sorted(set(choice)):
            rows = torch.tensor([i for i, c in enumerate(choice) if c == key])
            model = MoDEModel(backbone.decoder, layout, {} if key == NONE else {key: experts[key]})
            hit[rows], loss[rows], _ = token_stats(model, w[rows], label=f"{corpus.name}: routed to {key}")
        results[corpus.name] = {**summarize(hit, loss, sample.doc), "routes": {c: choice.count(c) for c in set(choice)}}
    return results


def print_routing(result: dict, router: str = "centroid", length: int = 64) -> None:
    """Three tables: how often each router sends a domain's prompts where expected (per prompt length); the
    confusion of `router` at `length` tokens; and the continuation accuracy of the model it routes to, beside the
    backbone, the oracle choice and the composition of all experts. Everything else is in the --json file."""
    domains = result["domains"]
    results_console.print("held-out prompts per domain (one per test document long enough): "
                          + ", ".join(f"{d} {n}" for d, n in result["prompts"].items()))  # fmt: skip
    table = Table(title="routing accuracy % (prompts sent to their domain's expert, or to none)")
    table.add_column("router @ tokens")
    for d in [*domains, "all"]:
        table.add_column(d, justify="right")
    for r, by_length in result["routers"].items():
        for n, res in by_length.items():
            table.add_row(f"{r} @{n}", *(f"{res['per_domain'][d]:.0f}" for d in domains), f"{res['accuracy']:.1f}")
    results_console.print(table)
    labels = [*result["experts"], NONE]
    table = Table(title=f"{router} router, {length}-token prompts (rows: domain, columns: choice)")
    table.add_column("domain")
    for c in labels:
        table.add_column(c, justify="right")
    for d, row in result["routers"][router][length]["confusion"].items():
        table.add_row(d, *(str(row[c]) for c in labels))
    results_console.print(table)
    table = Table(title=f"continuation accuracy % [95% interval over prompts]; routed: {router} @{length}")
    for c in ("domain", "backbone", "oracle", "composed", "routed"):
        table.add_column(c, justify="right" if c != "domain" else "left")
    for d, s in result["scores"].items():
        cells = [s["backbone"], s["oracle"], s["composed"], s["routed"][router][length]]
        table.add_row(d, *(f"{c['accuracy']:.2f} [{c['ci'][0]:.1f}, {c['ci'][1]:.1f}]" for c in cells))
    results_console.print(table)


def routing_for_run(backbone, runs: Path | list[Path], experts: list[str] | None, corpora: list[Corpus],
                    n_prompts: int) -> dict:  # fmt: skip
    """evaluate_routing over the experts of one run or of several (all, or the named subset of each run)."""
    from mode_edge.training.runs import check_same_blocks, load_run_experts, read_model_record

    runs = [runs] if isinstance(runs, Path) else runs
    loaded = []
    for run in runs:
        names = read_model_record(run)["experts"]
        only = None if experts is None else [n for n in experts if n in names]
        loaded += load_run_experts(run, backbone, only) if only != [] else []
    unrouted = [e.name for e in loaded if e.router is None]
    if unrouted:
        from mode_edge.progress import console

        which, it = without_router(unrouted)
        console.print(f"[yellow]warning:[/yellow] {which}: the centroid and logistic routers never pick {it}, or "
                      f"fall back to gate rows when no expert has one")  # fmt: skip
    missing = sorted(set(experts or []) - {e.name for e in loaded})
    if missing:
        raise UserError(f"no run of --model has an expert named {', '.join(missing)}")
    if not loaded:
        raise UserError(f"{', '.join(map(str, runs))}: no experts to route to; --routing needs MoDE runs with experts")
    return evaluate_routing(TorchSide(backbone, loaded, check_same_blocks(loaded)), corpora, n_prompts)
