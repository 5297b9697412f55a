"""`mode-edge bench` on the machine it runs on: the bare base and each selected expert, one fixed generation each,
with the latency and memory profile of every run. The transports (devices/transports.py) run this same code on a
phone or a board and bring the JSON back.

Each configuration runs in a fresh worker process (this module with --worker), as benchmarks/runtime.py does: in one
process the second run's memory starts where the first left off (freed sessions and arenas are not given back to the
system), which made an expert look ~10x its cost. A worker imports numpy and onnxruntime, never torch, so the figures
are the runtime's alone, whichever process asked for them (the demo runs beside training)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import psutil

from mode_edge.bundle import read_bundle
from mode_edge.devices.profiles import DeviceProfile
from mode_edge.errors import UserError
from mode_edge.names import check_names
from mode_edge.runtimes.engine import Sampling
from mode_edge.runtimes.run import run

PROMPT = "def fibonacci(n):\n    "


def run_bench(bundle: Path, profile: DeviceProfile, experts: list[str] | None = None, new_tokens: int = 32,
              backend: str = "onnx") -> dict:  # fmt: skip
    """One run with no expert, then one per expert (default: every installed one), each in a fresh process;
    returns the JSON document."""
    experts = None if experts is None else check_names(experts, "--experts")
    manifest = read_bundle(bundle)
    every = experts is None
    experts = sorted(manifest["experts"]) if every else experts
    runs, seen = [], set()
    # an expert asked for by name that is damaged is the error of its own run: not a warning in the runs before
    hush = () if every else tuple(f"warning: expert {e!r} is damaged" for e in experts)
    for selection in [[]] + [[e] for e in experts]:
        try:
            summary = in_fresh_process(dict(bundle=str(bundle), selection=selection, new_tokens=new_tokens,
                                            backend=backend, threads=profile.threads,
                                            budget_mb=profile.memory_budget_mb), seen, hush)  # fmt: skip
        except UserError:
            if every and selection and f"expert {selection[0]!r} is damaged" in "".join(seen):
                continue  # warned above; the other experts still run
            raise
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
        "isolation": "one fresh process per configuration",
    }


def in_fresh_process(args: dict, seen: set[str], hush: tuple[str, ...] = ()) -> dict:
    """One configuration's run summary, measured in a new Python process (same interpreter and import path); its
    warnings are passed on once (`seen`), except those that start with one of `hush`."""
    proc = subprocess.run([sys.executable, "-m", "mode_edge.runtimes.bench", "--worker", json.dumps(args)],
                          capture_output=True, text=True)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    for line in lines:
        if line.startswith("warning: ") and line not in seen:
            seen.add(line)
            if not line.startswith(hush):
                print(line, file=sys.stderr)
    if proc.returncode == 2 and lines and lines[-1].startswith("error: "):
        raise UserError(lines[-1][len("error: ") :])
    if proc.returncode != 0:
        raise RuntimeError(f"the benchmark worker for {args['selection'] or 'none'} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(args: dict) -> dict:
    """Run one configuration in this (fresh) process and return its summary."""
    _, summary, _ = run(Path(args["bundle"]), args["selection"] or "none", PROMPT, args["new_tokens"], Sampling(),
                        backend=args["backend"], threads=args["threads"], budget_mb=args["budget_mb"])  # fmt: skip
    return {**summary, "torch_loaded": "torch" in sys.modules}


def print_bench(result: dict) -> None:
    from rich.table import Table

    from mode_edge.progress import results_console

    where = f"{result['machine']['machine']}, {result['threads']} threads, {result['backend']}"
    where += ", native runtime" if result.get("runtime") == "native" else ""
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


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    from mode_edge.runtimes import backends

    backends.OWN_PROCESS = True  # a fresh process that runs only this configuration
    try:
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
