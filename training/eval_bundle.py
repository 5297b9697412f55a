"""`mode-edge eval --bundle`: the quality of what ships, measured through the device runtime.

The bundle's graphs (its quantization, its backend) score the same held-out windows as `eval --model` does on the
PyTorch model: next-token accuracy and perplexity with 95% intervals over documents. With a reference model (the run
the bundle was exported from), also the top-1 agreement: the share of positions where the runtime's argmax equals
PyTorch's (teacher-forced, every position), and the paired accuracy change with its interval.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mode_edge.config import check_seq_len
from mode_edge.errors import UserError
from mode_edge.progress import task_progress
from mode_edge.ranges import check_number
from mode_edge.training.data import Corpus, held_out, require_split
from mode_edge.training.evaluate import paired_ci, summarize


class BundleModel:
    """A bundle on the runtime as a scoring model: `model(ids)` maps (b, T) token ids to (b, T, V) float32 logits.

    experts: the experts to run (None: every installed one, the composed model; []: the base alone). Raises
    UserError for an expert the bundle does not hold or a damaged pack (Session's checks)."""

    def __init__(self, bundle: Path, experts: list[str] | None = None, backend: str = "onnx"):
        from mode_edge.runtimes.run import load_tokenizer
        from mode_edge.runtimes.session import Session

        self.session = Session(bundle, backend=backend)
        self.tokenizer = load_tokenizer(bundle)
        names = sorted(self.session.gates) if experts is None else experts
        self.session.select(names)
        self.experts = names
        self.max_seq_len = self.session.engine.context

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        engine = self.session.engine
        rows = [engine.forward(row[None].numpy().astype(np.int64), engine.new_cache(len(row)))[0] for row in ids]
        return torch.from_numpy(np.stack(rows)).float()


def evaluate_bundle(
    model: BundleModel,
    corpora: list[Corpus],
    reference: torch.nn.Module | None = None,
    seq_len: int = 256,
    max_tokens: int = 8192,
    split: str = "test",
) -> dict[str, dict]:
    """Per domain: the bundle's scores (`summarize`'s keys: accuracy %, perplexity, loss, 95% intervals, per-document
    sums); with `reference`, also "reference" (its scores), "top1_agreement" (%) and "change" (paired accuracy change
    bundle - reference in points, with its 95% interval)."""
    check_seq_len(seq_len, model.max_seq_len)
    check_number("--max-tokens", max_tokens, lo=1, integer=True)
    results: dict[str, dict] = {}
    for corpus in corpora:
        if corpus.name in results:
            raise UserError(f"two --data folders are both named {corpus.name!r}; evaluate each domain once")
        sample = held_out(require_split(corpus, split), model.tokenizer, seq_len, max_tokens)
        stats = {"bundle": ([], []), "reference": ([], [])}
        agree = []
        with task_progress(f"eval {corpus.name}", len(sample.windows)) as advance:
            for row in sample.windows:
                ids, targets = row[None, :-1], row[None, 1:]
                got = model(ids)
                pairs = [("bundle", got)]
                if reference is not None:
                    with torch.no_grad():
                        ref = reference(ids).float()
                    pairs.append(("reference", ref))
                    agree.append(got.argmax(-1) == ref.argmax(-1))
                for key, logits in pairs:
                    stats[key][0].append(logits.argmax(-1) == targets)
                    stats[key][1].append(F.cross_entropy(logits[0], targets[0], reduction="none")[None])
                advance(1)
        scores = summarize(torch.cat(stats["bundle"][0]), torch.cat(stats["bundle"][1]), sample.doc)
        if reference is not None:
            ref_scores = summarize(torch.cat(stats["reference"][0]), torch.cat(stats["reference"][1]), sample.doc)
            scores["reference"] = ref_scores
            scores["top1_agreement"] = 100.0 * float(torch.cat(agree).double().mean())
            scores["change"] = paired_ci(scores, ref_scores)
        results[corpus.name] = scores
    return results


def print_bundle_scores(results: dict[str, dict], label: str) -> None:
    """One table: accuracy [95% interval] (perplexity) per domain; with a reference, its scores, the paired change
    and the top-1 agreement."""
    from rich.table import Table

    from mode_edge.progress import results_console
    from mode_edge.training.evaluate import score_cell

    with_ref = any("reference" in s for s in results.values())
    table = Table(title=f"next-token accuracy % [95% interval over documents] (perplexity): {label}")
    for col in ["domain", "bundle"] + ["PyTorch", "change, points [95%]", "top-1 agreement %"] * with_ref:
        table.add_column(col, justify="left" if col == "domain" else "right")
    for domain, s in results.items():
        cells = [domain, score_cell(s)]
        if "reference" in s:
            c = s["change"]
            cells += [score_cell(s["reference"]), f"{c['delta']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]",
                      f"{s['top1_agreement']:.1f}"]  # fmt: skip
        table.add_row(*cells)
    results_console.print(table)
