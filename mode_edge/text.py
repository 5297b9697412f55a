"""Text as it enters: from files (bytes that may not be UTF-8) and from the command line (where Python hands over
undecodable bytes as lone surrogates). Both are made valid Unicode by replacing what is broken with U+FFFD, counted,
and reported in one warning line naming the file or the option. Pure Python: the device side imports it.
"""

from __future__ import annotations

import re
import sys

import click

REPLACEMENT = "\ufffd"
SURROGATE = re.compile("[\ud800-\udfff]")
"""Code points that are not characters: what a JSON escape like \\ud800 or an undecodable argv byte becomes."""


def clean(text: str) -> tuple[str, int]:
    """`text` with every lone surrogate replaced by U+FFFD, and how many were replaced."""
    return SURROGATE.subn(REPLACEMENT, text)


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 bytes as text, each invalid byte sequence replaced by U+FFFD; and how many were replaced."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        replaced = raw.decode("utf-8", errors="replace")
        # 'replace' puts one U+FFFD per invalid sequence and 'ignore' none; genuine U+FFFD characters are in both
        return replaced, replaced.count(REPLACEMENT) - raw.decode("utf-8", errors="ignore").count(REPLACEMENT)


def warn_replaced(where: str, count: int) -> None:
    """One line on stderr: `where` (a file, an option) had `count` broken sequences replaced."""
    if count:
        noun = "sequence" if count == 1 else "sequences"
        sys.stderr.write(f"warning: {where}: {count} invalid UTF-8 {noun} (or lone surrogates) replaced with U+FFFD\n")


class CleanText(click.ParamType):
    """A text option made valid Unicode (see `clean`), with one warning line naming the option when it was not."""

    name = "text"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        text, count = clean(value)
        warn_replaced(f"--{param.name.replace('_', '-')}" if param else "text", count)
        return text
