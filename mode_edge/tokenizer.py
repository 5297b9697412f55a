"""Text <-> token ids, at the edge of the system. Wraps a `tokenizers.Tokenizer` (no torch, no transformers).

Encoding follows the checkpoint's own tokenizer: every text starts as its post-processor starts it (`prefix_ids`:
Llama and Mistral put `<s>` first; SmolLM2 and Qwen2 nothing), and text that looks like a control token
("<|endoftext|>", "<s>") is tokenized as the text it is. Decoding drops the control tokens: what is printed or
returned never contains them. The prefix is recorded in the bundle manifest (`tokenizer.prefix_ids`), so the device
encodes as training did; a manifest without it (older bundles) means no prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mode_edge.text import clean

PROBE = "a"
"""Any short text: the ids the post-processor adds around its ids are the checkpoint's prefix (and suffix)."""


@dataclass
class TextTokenizer:
    tokenizer: Tokenizer
    eos_id: int
    """Appended after every document in training streams, and the stop token of generation."""
    prefix_ids: tuple[int, ...] = ()
    """Put before every text, as the checkpoint's tokenizer does (its BOS); see `checkpoint_prefix`."""
    chat_template: str | None = None
    """The checkpoint's chat template (Jinja source), recorded in the bundle at export (mode_edge/chat.py)."""
    special_tokens: dict[str, str] = field(default_factory=dict)
    """The special tokens by role (bos_token, eos_token, ...): what a chat template may name."""

    def __post_init__(self):
        self.prefix_ids = tuple(int(i) for i in self.prefix_ids)
        self.tokenizer.encode_special_tokens = True  # "<s>" in a text is three characters, not a control token

    def encode(self, text: str, prefix: bool = True) -> list[int]:
        """Token ids of `text`, after the checkpoint's prefix (its BOS, if any) unless `prefix` is False."""
        ids = self.tokenizer.encode(clean(text)[0], add_special_tokens=False).ids
        return [*self.prefix_ids, *ids] if prefix else ids

    def encode_batch(self, texts: list[str], prefix: bool = True) -> list[list[int]]:
        """`encode` of each text: how training and evaluation start every document."""
        head = list(self.prefix_ids) if prefix else []
        encodings = self.tokenizer.encode_batch([clean(t)[0] for t in texts], add_special_tokens=False)
        return [head + e.ids for e in encodings]

    def encode_template(self, text: str) -> list[int]:
        """Token ids of a chat template's own text, its control tokens ("<|im_start|>") recognized as such, no
        prefix: only templates are encoded this way, never a user's text (mode_edge/chat.py)."""
        self.tokenizer.encode_special_tokens = False
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self.tokenizer.encode_special_tokens = True

    def control_ids(self) -> set[int]:
        """Ids of the control tokens (added tokens marked special: BOS, EOS, chat markers)."""
        return {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` without control tokens (BOS, EOS, chat markers)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    def save(self, path: Path) -> None:
        self.tokenizer.save(str(path))


def checkpoint_prefix(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer's post-processor puts before a text (Llama: (<s>,); SmolLM2, Qwen2: ()). What it puts
    after (an EOS, for the few that add one) is left out: training ends each document with EOS itself, and a prompt
    is continued, not closed."""
    bare = tokenizer.encode(PROBE, add_special_tokens=False).ids
    full = tokenizer.encode(PROBE, add_special_tokens=True).ids
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return tuple(full[:start])
    return ()


def byte_tokenizer() -> TextTokenizer:
    """A deterministic byte-level tokenizer: 256 byte tokens plus <|endoftext|>, for the tiny test backbone."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return TextTokenizer(tok, eos_id=tok.token_to_id("<|endoftext|>"), chat_template=TINY_CHAT_TEMPLATE,
                         special_tokens={"eos_token": "<|endoftext|>"})  # fmt: skip


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<' + message['role'] + '>\\n' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>\\n' }}{% endif %}"
)
"""The tiny test backbone's chat template: role markers in plain text, its one control token ending each turn."""
