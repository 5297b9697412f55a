"""Text <-> token ids, at the edge of the system. Wraps a `tokenizers.Tokenizer` (no torch, no transformers)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mode_edge.text import clean


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    eos_id: int
    """Appended after every document in training streams, and the stop token of generation."""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(clean(text)[0], add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch([clean(t)[0] for t in texts], add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path))


def byte_tokenizer() -> TextTokenizer:
    """A deterministic byte-level tokenizer: 256 byte tokens plus <|endoftext|>, for the tiny test backbone."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return TextTokenizer(tok, eos_id=tok.token_to_id("<|endoftext|>"))
