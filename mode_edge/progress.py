"""Progress bars for long work (rich), quiet when output is not a terminal except for a final line."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
"""Progress and status go to stderr."""
results_console = Console()
"""Tables of results go to stdout, so they can be piped."""


@contextlib.contextmanager
def training_progress(label: str, total: int, start: int = 0) -> Iterator[Callable[..., None]]:
    """Yield `advance(loss=..., tokens_per_s=...)`, called once per optimizer step."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if not console.is_terminal:  # logs and CI: a plain line every tenth of the run instead of a live bar
        every, state = max(1, total // 10), {"step": start, "t0": time.perf_counter()}

        def log(loss: float, tokens_per_s: float) -> None:
            state["step"] += 1
            if state["step"] % every == 0 or state["step"] == total:
                elapsed = time.perf_counter() - state["t0"]
                console.print(
                    f"{label}: step {state['step']}/{total}  loss {loss:.4f}  {tokens_per_s:.0f} tok/s  {elapsed:.0f}s"
                )

        yield log
        return
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total, completed=start, loss=float("nan"), tps=0.0)

        def advance(loss: float, tokens_per_s: float) -> None:
            progress.update(task, advance=1, loss=loss, tps=tokens_per_s)

        yield advance


@contextlib.contextmanager
def task_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)` for work measured in items (batches, documents)."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    ) as progress:  # fmt: skip
        task = progress.add_task(label, total=total)
        yield lambda n=1: progress.update(task, advance=n)


class Stages:
    """A bar over the items of a staged job; `show("export base/block0")` names what runs now. Without a terminal,
    one line per stage (the description's first word, the first time it comes) instead of a bar."""

    def __init__(self, progress: Progress | None, label: str):
        self.progress, self.label, self.stage = progress, label, None
        self.seen: set[str] = set()
        self.task = progress.add_task(label, total=None) if progress else None

    def start(self, total: int) -> None:
        if self.progress:
            self.progress.update(self.task, total=total, completed=0)

    def show(self, description: str) -> None:
        stage = description.split()[0]
        if self.progress:
            self.progress.update(self.task, description=f"{self.label}: {description}")
        elif stage not in self.seen:
            console.print(f"{self.label}: {stage}")
            self.seen.add(stage)
        self.stage = stage

    def advance(self) -> None:
        if self.progress:
            self.progress.advance(self.task)


@contextlib.contextmanager
def stage_progress(label: str) -> Iterator[Stages]:
    if not console.is_terminal:
        yield Stages(None, label)
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:  # fmt: skip
        yield Stages(progress, label)
