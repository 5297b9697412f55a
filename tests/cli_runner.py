"""The real `mode-edge` group driven in-process with click's CliRunner (faster than a subprocess per case), and the
checks of a refusal: exit code 2, one `error: ` line naming the problem, no traceback."""

from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from mode_edge.cli import main


def invoke(*args, ok: bool = True):
    """Run `mode-edge ARGS`; with ok, assert it succeeded."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def refused(*args, message: str | tuple = ()):
    """Run `mode-edge ARGS` and assert a one-line refusal holding every piece of `message`; returns the line."""
    result = invoke(*args, ok=False)
    assert result.exit_code == 2, (args, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    for piece in (message,) if isinstance(message, str) else message:
        assert piece in lines[0], (args, lines[0])
    return lines[0]


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash: 'nothing changed' means this is equal before and after."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}  # fmt: skip
