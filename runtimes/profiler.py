"""Latency and memory profiles of a generation on the device. No torch; the PNG needs matplotlib where installed.

Latency: load time of the base and of each expert, routing, time to first token, prefill and decode tokens/s,
per-token p50 / p95, and the split over graph kinds (embed, backbone blocks, expert blocks, gate+mix, head).
Memory: RSS and PSS (from /proc/self/smaps_rollup, Linux and Android) at each phase, the sampled peak, and what each
loaded component added, against its weight bytes on disk.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

MB = 1 << 20


def rss_pss() -> tuple[int, int | None]:
    """Resident and proportional set sizes of this process in bytes (PSS None where the kernel has no rollup)."""
    rss = psutil.Process().memory_info().rss
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return rss, int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, None


@dataclass
class Profile:
    t0: float = field(default_factory=time.perf_counter)
    phases: list[dict] = field(default_factory=list)
    """Memory at each named phase: {'phase', 't', 'rss', 'pss'}."""
    loads: dict[str, dict] = field(default_factory=dict)
    """Per loaded component: seconds, RSS added, weight bytes on disk."""
    graph_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    token_s: list[float] = field(default_factory=list)
    """Wall time of every generated token; the first one includes routing and the prefill."""
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(t, rss) sampled through the run, for the timeline."""
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    route_s: float = 0.0

    def mark(self, phase: str) -> None:
        rss, pss = rss_pss()
        self.phases.append({"phase": phase, "t": time.perf_counter() - self.t0, "rss": rss, "pss": pss})
        self.samples.append((time.perf_counter() - self.t0, rss))

    def load(self, name: str, fn, disk_bytes: int):
        before = rss_pss()[0]
        t = time.perf_counter()
        out = fn()
        self.loads[name] = {"s": time.perf_counter() - t, "rss_added": rss_pss()[0] - before, "disk_bytes": disk_bytes}
        self.mark(f"loaded {name}")
        return out

    def timer(self, kind: str, fn):
        t = time.perf_counter()
        out = fn()
        self.graph_s[kind] += time.perf_counter() - t
        return out

    def summary(self) -> dict:
        decode = self.token_s[1:]
        rss_peak = max([s[1] for s in self.samples], default=0)
        return {
            "load_s": {k: round(v["s"], 4) for k, v in self.loads.items()},
            "route_s": round(self.route_s, 4),
            "time_to_first_token_s": round(self.token_s[0], 4) if self.token_s else None,
            "prompt_tokens": self.prompt_tokens,
            "prefill_tokens_per_s": round(self.prompt_tokens / self.prefill_s, 1) if self.prefill_s else None,
            "decode_tokens": len(decode),
            "decode_tokens_per_s": round(len(decode) / sum(decode), 2) if decode else None,
            "decode_token_ms_p50": round(1000 * float(np.percentile(decode, 50)), 2) if decode else None,
            "decode_token_ms_p95": round(1000 * float(np.percentile(decode, 95)), 2) if decode else None,
            "graph_s": {k: round(v, 4) for k, v in self.graph_s.items()},
            "memory": {
                "phases": [{**p, "rss_mb": mb(p["rss"]), "pss_mb": mb(p["pss"])} for p in self.phases],
                "peak_rss_mb": mb(rss_peak),
                "added_by": {k: added(v) for k, v in self.loads.items()},
            },
        }


def mb(n: int | None) -> float | None:
    return None if n is None else round(n / MB, 2)


def added(load: dict) -> dict:
    ratio = load["rss_added"] / load["disk_bytes"] if load["disk_bytes"] else None
    return {"rss_added_mb": mb(load["rss_added"]), "disk_mb": mb(load["disk_bytes"]),
            "ratio": None if ratio is None else round(ratio, 3)}  # fmt: skip


class Sampler:
    """Samples RSS every few milliseconds in a thread, so that short peaks between phases are seen."""

    def __init__(self, profile: Profile, interval_s: float = 0.01):
        import threading

        self.profile, self.interval_s = profile, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        proc = psutil.Process()
        while not self.stop.is_set():
            self.profile.samples.append((time.perf_counter() - self.profile.t0, proc.memory_info().rss))
            self.stop.wait(self.interval_s)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def print_summary(s: dict) -> None:
    from rich.table import Table

    from mode_edge.progress import results_console

    t = Table("latency", "value", title="generation profile")
    for k, v in s["load_s"].items():
        t.add_row(f"load {k}", f"{1000 * v:.1f} ms")
    ttft = s["time_to_first_token_s"]
    rows = [
        ("route", s["route_s"] * 1000, "ms"), ("time to first token", None if ttft is None else ttft * 1000, "ms"),
        ("prefill", s["prefill_tokens_per_s"], "tok/s"), ("decode", s["decode_tokens_per_s"], "tok/s"),
        ("decode token p50", s["decode_token_ms_p50"], "ms"), ("decode token p95", s["decode_token_ms_p95"], "ms"),
    ]  # fmt: skip
    for name, v, unit in rows:
        t.add_row(name, "-" if v is None else f"{v:.1f} {unit}")
    total = sum(s["graph_s"].values()) or 1
    for k, v in s["graph_s"].items():
        t.add_row(f"graphs: {k}", f"{1000 * v:.1f} ms ({100 * v / total:.0f}%)")
    results_console.print(t)
    m = Table("memory", "RSS MB", "PSS MB", title="memory by phase")
    for p in s["memory"]["phases"]:
        m.add_row(p["phase"], f"{p['rss_mb']:.1f}", "-" if p["pss_mb"] is None else f"{p['pss_mb']:.1f}")
    m.add_row("[bold]sampled peak", f"[bold]{s['memory']['peak_rss_mb']:.1f}", "")
    for k, v in s["memory"]["added_by"].items():
        ratio = f", x{v['ratio']:.2f}" if v["ratio"] is not None else ""
        m.add_row(f"added by {k}", f"{v['rss_added_mb']:.1f}", f"(disk {v['disk_mb']:.1f} MB{ratio})")
    results_console.print(m)


def plot_timeline(profile: Profile, path: Path) -> bool:
    """Memory over time and per-token latency, one PNG; False where matplotlib is not installed (on a device)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6))
    ts, rss = zip(*sorted(profile.samples)) if profile.samples else ((), ())
    a.plot(ts, [r / MB for r in rss], lw=1)
    for p in profile.phases:
        a.axvline(p["t"], color="grey", lw=0.5, ls=":")
    a.set_xlabel("seconds")
    a.set_ylabel("RSS MB")
    a.set_title("memory")
    b.plot(range(1, len(profile.token_s) + 1), [1000 * t for t in profile.token_s], marker=".", lw=1)
    b.set_xlabel("generated token")
    b.set_ylabel("ms")
    b.set_yscale("log")
    b.set_title("per-token latency (the first includes the prefill)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # an output file's folder is made, as for --json
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
