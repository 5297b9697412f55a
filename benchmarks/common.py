"""Helpers for benchmarks: interleaved timing (so machine noise hits every variant alike) and result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).parent / "results"


def interleaved(variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, measured round-robin."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict:
    """The platform, the processor (its model name where /proc/cpuinfo tells it) and the CPU count."""
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")  # fmt: skip
    return {
        "platform": platform.platform(),
        "processor": model or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


def write(name: str, data: dict, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def mode_edge_command(*args: str, processes: int = 1, program: list[str] | None = None) -> list[str]:
    """The command line of `mode-edge ARGS` (or `program ARGS`), under `torchrun --standalone` with `processes`
    workers when more than one."""
    cmd = [*(program or [str(Path(sys.executable).parent / "mode-edge")]), *args]
    if processes > 1:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--standalone", f"--nproc-per-node={processes}", "--no-python", *cmd]
    return cmd


def mode_edge(*args: str, processes: int = 1, threads: int = 1, program: list[str] | None = None):
    """`mode_edge_command(ARGS)` run in a fresh process with `threads` OpenMP threads; exits with the command's
    stderr when it fails."""
    cmd = mode_edge_command(*args, processes=processes, program=program)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode:
        raise SystemExit(f"mode-edge {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc
