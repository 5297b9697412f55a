"""Helpers that damage or alter real files the way failure reports do: cut short, one byte flipped, a pack rebuilt
with other fields in its pack.json."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def repack(src: Path, out: Path, **changes) -> None:
    """A copy of the pack `src` with fields of its pack.json changed (another name, another base, another version)."""
    with tarfile.open(src) as tar, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as new:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()
            if m.name == "pack.json":
                data = json.dumps({**json.loads(data), **changes}).encode()
                m.size = len(data)
            new.addfile(m, io.BytesIO(data))


def offsets(size: int) -> dict[str, int]:
    """Where to cut a file: at the start, in the middle, one byte short."""
    return {"empty": 0, "middle": size // 2, "one-short": size - 1}


def cut(path: Path, at: int) -> None:
    """Truncate `path` to `at` bytes."""
    with open(path, "r+b") as f:
        f.truncate(at)


def flip(path: Path, at: int | None = None) -> None:
    """Flip every bit of one byte (the middle one by default); the size stays the same."""
    data = bytearray(Path(path).read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    Path(path).write_bytes(bytes(data))


DAMAGES = ["empty", "middle", "one-short", "flip"]


def damage(path: Path, how: str) -> None:
    """Damage `path` one way of DAMAGES; a JSON file's trailing newline carries nothing, so "one-short" cuts the byte
    before it."""
    if how == "flip":
        flip(path)
        return
    size = path.stat().st_size - (path.read_bytes().endswith(b"\n") and how == "one-short")
    cut(path, offsets(size)[how])
