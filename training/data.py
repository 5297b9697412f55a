"""Corpora on disk and the token streams that training and evaluation read.

A prepared corpus is a folder with train.jsonl, validation.jsonl and test.jsonl (one {"id", "text"} object per line)
and dataset.json (domain, source, licence, sizes). Any folder of .txt / .jsonl files works too: each .txt file, or
each line of a .jsonl file (its "text" field), is a document, split deterministically by id.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from mode_edge.config import TrainConfig
from mode_edge.errors import UserError
from mode_edge.files import atomic_dir, read_json, write_json
from mode_edge.integrity import check_file, file_record
from mode_edge.text import clean, decode, warn_replaced
from mode_edge.tokenizer import TextTokenizer
from mode_edge.training.sources import SOURCES, assign_splits

SPLITS = ("train", "validation", "test")


def prepare(domain: str, out: Path, limit: int | None = None, overwrite: bool = False) -> dict:
    """Build the corpus of a built-in domain into `out` (atomically); returns its dataset.json content."""
    if domain not in SOURCES:
        raise UserError(
            f"unknown domain {domain!r}; choose one of {', '.join(SOURCES)} (or pass your own folder as --data)"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 20):
        raise UserError(f"--limit {limit!r} is too small to give every split a document; use an integer >= 20")
    source = SOURCES[domain]
    documents = list(source.documents(limit))
    split = assign_splits([doc_id for doc_id, _ in documents], group=source.group)
    documents = [(doc_id, text) for doc_id, text in documents if source.keep(doc_id)]
    with atomic_dir(Path(out), overwrite=overwrite) as work:
        sizes = {s: {"documents": 0, "characters": 0} for s in SPLITS}
        files = {s: open(work / f"{s}.jsonl", "w") for s in SPLITS}
        with contextlib.ExitStack() as stack:
            for f in files.values():
                stack.enter_context(f)
            for doc_id, text in documents:
                files[split[doc_id]].write(json.dumps({"id": doc_id, "text": text}) + "\n")
                sizes[split[doc_id]]["documents"] += 1
                sizes[split[doc_id]]["characters"] += len(text)
        if any(sizes[s]["documents"] == 0 for s in SPLITS):
            raise UserError(f"{domain}: too few documents for three splits ({sizes}); raise --limit")
        meta = {
            "domain": domain,
            "source": source.description,
            "licence": source.licence,
            "split_rule": "documents ordered by sha256(id), sections of one source document together: first 5% "
            "test, next 5% validation, rest train",
            "limit": limit,
            "splits": sizes,
            "files": {f"{s}.jsonl": file_record(work / f"{s}.jsonl") for s in SPLITS},
        }
        write_json(work / "dataset.json", meta)
    return meta


@dataclass
class Corpus:
    name: str
    """Domain name: from dataset.json, else the folder name."""
    path: Path
    docs: dict[str, list[tuple[str, str]]]
    """Documents (id, text) of each split."""


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    """The (id, text) documents of a .jsonl file; broken UTF-8 and lone surrogates become U+FFFD (one warning)."""
    docs, replaced = [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            line, bad = decode(raw)
            line = line.removeprefix("\ufeff") if n == 1 else line  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(
                    f"{path}:{n} is not valid JSON; each line must be an object with a 'text' field"
                ) from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f'{path}:{n} has no string \'text\' field; each line must look like {{"text": "..."}}')
            doc_id, (text, bad_text) = clean(str(obj.get("id", f"{path.name}:{n}")))[0], clean(obj["text"])
            replaced += bad + bad_text
            docs.append((doc_id, text))
    warn_replaced(str(path), replaced)
    return docs


def _read_txt(path: Path) -> str:
    """A .txt file as one document; broken UTF-8 becomes U+FFFD (one warning)."""
    text, replaced = decode(path.read_bytes())
    warn_replaced(str(path), replaced)
    return text.removeprefix("\ufeff")


def load_corpus(path: str | Path) -> Corpus:
    """Read a prepared corpus or a user's folder of .txt / .jsonl files."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"data folder {path} does not exist; run `mode-edge data prepare --domain NAME --out {path}` first"
        )
    if all((path / f"{s}.jsonl").is_file() for s in SPLITS):
        described = (path / "dataset.json").is_file()
        fix = f"prepare it again with `mode-edge data prepare --overwrite --out {path}`"
        meta = read_json(path / "dataset.json", fix, fix) if described else {}
        for rel, rec in (meta.get("files") or {}).items() if isinstance(meta.get("files"), dict) else []:
            if rel in {f"{s}.jsonl" for s in SPLITS}:  # corpora prepared before these records: no check
                check_file(path / rel, rec, fix)
        docs = {s: list(_read_jsonl(path / f"{s}.jsonl")) for s in SPLITS}
        name = clean(str(meta.get("domain", path.name)))[0]
    else:
        found: dict[str, tuple[str, str]] = {}
        for file in sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()):
            rel = clean(str(file.relative_to(path)))[0]  # a file name that is not UTF-8 comes as surrogates
            items = _read_jsonl(file) if file.suffix == ".jsonl" else [(rel, _read_txt(file))]
            for doc_id, text in items:
                if text.strip():
                    found[f"{rel}/{doc_id}"] = (doc_id, text)
        split = assign_splits(list(found))
        docs = {s: [doc for key, doc in found.items() if split[key] == s] for s in SPLITS}
        name = clean(path.name)[0]  # a folder name that is not UTF-8 would break every table it is printed in
    if not docs["train"] and not docs["test"]:
        raise UserError(
            f"data folder {path} holds no documents; add .txt or .jsonl files, or run `mode-edge data prepare`"
        )
    return Corpus(name=name, path=path, docs=docs)


def as_corpus(data: "Corpus | str | Path") -> Corpus:
    return data if isinstance(data, Corpus) else load_corpus(data)


def require_split(corpus: Corpus, split: str) -> list[tuple[str, str]]:
    docs = corpus.docs[split]
    if not docs:
        raise UserError(f"{corpus.path} has no {split} documents; add more documents or prepare a larger corpus")
    return docs


class TokenStream:
    """Endless (B, T+1) token windows from a corpus split: documents in a seeded shuffled order, each followed by
    the end-of-text token, packed back to back. Deterministic for a seed, so a resumed run replays it exactly."""

    def __init__(self, docs: list[tuple[str, str]], tokenizer: TextTokenizer, batch_size: int, seq_len: int, seed: int):
        self.docs, self.tokenizer = docs, tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rng = random.Random(seed)
        self.buffer: list[int] = []
        self.order: list[int] = []

    def _refill(self, need: int) -> None:
        while len(self.buffer) < need:
            if not self.order:
                self.order = list(range(len(self.docs)))
                self.rng.shuffle(self.order)
            chunk, self.order = self.order[:32], self.order[32:]
            for ids in self.tokenizer.encode_batch([self.docs[i][1] for i in chunk]):
                self.buffer.extend(ids)
                self.buffer.append(self.tokenizer.eos_id)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        n = self.seq_len + 1
        self._refill(self.batch_size * n)
        rows = [self.buffer[i * n : (i + 1) * n] for i in range(self.batch_size)]
        del self.buffer[: self.batch_size * n]
        return torch.tensor(rows, dtype=torch.long)  # (B, T+1)


def mixed_batches(corpora: list[Corpus], tokenizer: TextTokenizer, cfg: TrainConfig) -> Iterator[torch.Tensor]:
    """Training batches that hold rows of every corpus in turn, so each step sees the whole mixture."""
    per_corpus = -(-cfg.batch_size // len(corpora))
    streams = [
        TokenStream(require_split(c, "train"), tokenizer, per_corpus, cfg.seq_len, seed=cfg.seed + i)
        for i, c in enumerate(corpora)
    ]
    return _interleave(streams, cfg.batch_size)


def _interleave(streams: list[TokenStream], batch_size: int) -> Iterator[torch.Tensor]:
    while True:
        rows = torch.cat([next(s) for s in streams])  # (n_corpora * per_corpus, T+1)
        order = torch.arange(len(rows)).view(len(streams), -1).t().flatten()  # interleave the corpora
        yield rows[order][:batch_size]


@dataclass
class HeldOut:
    """A held-out sample: token windows and, for every predicted token, the index of the document it belongs to
    (so that confidence intervals can resample documents, not tokens)."""

    windows: torch.Tensor
    """(N, T+1) token ids."""
    doc: torch.Tensor
    """(N, T) document index (into the split's documents) of each window's targets, windows[:, 1:]."""


def held_out(
    docs: list[tuple[str, str]], tokenizer: TextTokenizer, seq_len: int, max_tokens: int, doc_tokens: int | None = 512
) -> HeldOut:
    """The first `max_tokens` tokens of a split in file order, each document cut to its first `doc_tokens` tokens
    (None: whole documents) so that the sample spans many documents, packed into (N, T+1) windows."""
    buffer: list[int] = []
    owner: list[int] = []
    n = seq_len + 1
    for i in range(0, len(docs), 32):
        for k, ids in enumerate(tokenizer.encode_batch([text for _, text in docs[i : i + 32]])):
            ids = (ids + [tokenizer.eos_id])[:doc_tokens] if doc_tokens else ids + [tokenizer.eos_id]
            buffer.extend(ids)
            owner.extend([i + k] * len(ids))
        if len(buffer) >= max_tokens + n:
            break
    n_windows = min(len(buffer) // n, max(1, max_tokens // seq_len))
    if n_windows == 0:
        raise UserError(
            f"the held-out split has only {len(buffer)} tokens, fewer than one window of {n}; lower --seq-len"
        )
    windows = torch.tensor(buffer[: n_windows * n], dtype=torch.long).view(n_windows, n)
    doc = torch.tensor(owner[: n_windows * n], dtype=torch.long).view(n_windows, n)[:, 1:]
    return HeldOut(windows, doc)


def eval_windows(docs: list[tuple[str, str]], tokenizer: TextTokenizer, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of a split in file order, whole documents, cut into (N, T+1) windows."""
    return held_out(docs, tokenizer, seq_len, max_tokens, doc_tokens=None).windows
