"""`mode-edge bench` on the machine it runs on: the bare base and each selected expert, one fixed generation each,
with the latency and memory profile of every run. The transports (devices/transports.py) run this same code on a
phone or a board and bring the JSON back."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

from mode_edge.bundle import read_bundle
from mode_edge.devices.profiles import DeviceProfile
from mode_edge.names import check_names
from mode_edge.runtimes.engine import Sampling
from mode_edge.runtimes.run import run

PROMPT = "def fibonacci(n):\n    "


def run_bench(bundle: Path, profile: DeviceProfile, experts: list[str] | None = None, new_tokens: int = 32,
              backend: str = "onnx") -> dict:  # fmt: skip
    """One run with no expert, then one per expert (default: every installed one); returns the JSON document."""
    experts = None if experts is None else check_names(experts, "--experts")
    manifest = read_bundle(bundle)
    experts = sorted(manifest["experts"]) if experts is None else experts
    runs = []
    for selection in [[]] + [[e] for e in experts]:
        _, summary, _ = run(bundle, selection or "none", PROMPT, new_tokens, Sampling(), backend=backend,
                            threads=profile.threads, budget_mb=profile.memory_budget_mb)  # fmt: skip
        runs.append({"selection": selection, **summary})
    return {
        "device": profile.name,
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "ram_mb": psutil.virtual_memory().total >> 20,
        },  # fmt: skip
        "bundle": {"quantization": manifest["quantization"], "base": manifest["base"]["spec"]},
        "backend": backend,
        "threads": profile.threads,
        "prompt": PROMPT,
        "new_tokens": new_tokens,
        "runs": runs,
    }


def print_bench(result: dict) -> None:
    from rich.table import Table

    from mode_edge.progress import results_console

    where = f"{result['machine']['machine']}, {result['threads']} threads, {result['backend']}"
    title = f"bench on {result['device']} ({where})"
    t = Table("experts", "load ms", "TTFT ms", "prefill tok/s", "decode tok/s", "p50 ms", "p95 ms", "peak RSS MB",
              title=title)  # fmt: skip
    for r in result["runs"]:
        load = sum(r["load_s"].values()) * 1000
        t.add_row(", ".join(r["selection"]) or "none", f"{load:.0f}", f"{r['time_to_first_token_s'] * 1000:.0f}",
                  f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.1f}",
                  f"{r['decode_token_ms_p50']:.1f}", f"{r['decode_token_ms_p95']:.1f}",
                  f"{r['memory']['peak_rss_mb']:.0f}")  # fmt: skip
    results_console.print(t)
