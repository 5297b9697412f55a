"""Atomic outputs: a command writes into a hidden sibling folder and renames it into place when complete,
so a failed or interrupted command never leaves a half-written result under the requested name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from mode_edge.errors import UserError


def partial_path(out: Path) -> Path:
    """The in-progress folder for `out`; training keeps it between runs so that a rerun resumes."""
    return out.with_name(f".{out.name}.partial")


def require_absent(out: Path) -> None:
    if Path(out).exists():
        raise UserError(f"{out} already exists; choose another --out or remove it first")


def require_writable(out: Path) -> None:
    """Raise UserError unless files can be created where `out` will be written: in the nearest existing folder above
    it and, where an interrupted run left one, in its partial folder and checkpoint folder. Checked before a long
    command starts (a probe file, created and removed: permission bits alone do not tell, for root or a read-only
    mount), so that it does not fail at its first checkpoint or its last step."""
    out = Path(out).absolute()
    parent = next(p for p in out.parents if p.exists())
    partial = partial_path(out)
    for folder in (parent, partial, partial / "train_state"):
        if folder != parent and not folder.is_dir():
            continue
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            fix = "make it writable, or choose another --out"
            raise UserError(f"{folder} is not writable ({e.strerror}); {fix}") from None


def output_file(ctx, param, value):
    """click callback for an option naming a file to write (--json, --plot, --out of an archive): checked before any
    work starts, so that a long command never fails at its last step. A missing folder is created when the file is
    written (`write_output`); a folder in the file's place, or a place that cannot be written, is one line."""
    if value is None:
        return None
    path, option = Path(value), param.opts[0]
    if path.is_dir():
        example = path / ("NAME.modepack" if ctx.command.name == "pack" else "out.json")
        raise UserError(f"{option} {path} is a folder; name the file to write (for example {example})")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path} cannot be written: {parent} is not a writable folder; choose another path")
    return path


IMAGE_SUFFIXES = (".png", ".svg", ".pdf")


def image_file(ctx, param, value):
    """`output_file` for a plot: its name must end in a format the plot is written in (IMAGE_SUFFIXES), checked
    before any work (matplotlib would refuse it only after the run, or add .png unasked)."""
    path = output_file(ctx, param, value)
    if path is not None and path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{param.opts[0]} {path}: name a {', '.join(IMAGE_SUFFIXES)} file (for example "
                        f"{path.with_suffix('.png')})")  # fmt: skip
    return path


def write_output(path: Path, text: str) -> None:
    """Write an output file named on the command line whole (atomically), creating its folder if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


@contextlib.contextmanager
def atomic_dir(out: Path, *, overwrite: bool = False, keep_partial_on_error: bool = False) -> Iterator[Path]:
    """Yield a work folder that becomes `out` only if the block completes.

    With `keep_partial_on_error` the work folder survives an exception (a resumable training run); otherwise it is
    removed, so nothing half-written is left behind.
    """
    out = Path(out)
    if not overwrite:
        require_absent(out)
    work = partial_path(out)
    resuming = work.exists()
    work.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    try:
        yield work
    except BaseException as e:
        # An interrupted run keeps its checkpoint for the rerun; a user mistake leaves no trace, except that an
        # earlier run's checkpoint (which may be refused for other settings) is never deleted.
        if not (keep_partial_on_error and (resuming or not isinstance(e, UserError))):
            shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)


def write_json(path: Path, data: dict) -> None:
    """Write `data` as JSON atomically (`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write `text` atomically (`write_atomically`)."""
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a uniquely named temporary file in path's folder (`.NAME.*.tmp`), then that file flushed,
    renamed over `path`, and the folder flushed (so that the rename survives a power cut): concurrent writers never
    share a temporary file, a reader sees the old or the new file, and an error or an interrupt removes the
    temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        as_plain_write(tmp)  # (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def remove_path(path: Path) -> None:
    """Remove a file or a folder with what it holds (a link: the link alone; what is gone already is no error)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def as_plain_write(path: Path) -> None:
    """Give a file created private (by mkstemp, or by safetensors, which writes its files 0600) the permissions a plain
    write gives under the current umask: a run or bundle on a shared disk stays readable by whom it would be."""
    os.chmod(path, 0o666 & ~current_umask())


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_file(text: str) -> bool:
    """Whether `text` names an existing file; False for anything that cannot be a path (too long, NUL bytes)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def read_json(path: Path, what: str, damaged: str | None = None) -> dict:
    """A JSON object from `path`, or a one-line UserError: `what` is the fix when the file is missing, `damaged` the
    fix when it is cut short or corrupted (default: `what`)."""
    damaged = damaged or what
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {what}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a file: {what}") from None
    except OSError as e:
        raise UserError(f"{path} could not be read ({e.strerror or e}); {damaged}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path} is damaged: not valid JSON ({str(e).splitlines()[0][:120]}); {damaged}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged: not a JSON object; {damaged}")
    return data


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
