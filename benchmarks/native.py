"""The native runtime (runtimes/native) against the Python runtime on one bundle: decode tok/s, TTFT on a 128-token
prompt, peak RSS, and the expert switch against reading the expert's files.

    make native && python benchmarks/native.py --bundle B [--expert code] [--rounds 5] [--name native]

Generation: each round runs `mode-edge run` (Python) and `mode-edge-native run` (C++) once each, interleaved, each a
fresh process, greedy, with the expert selected, on the same token ids (the prompt text is cut to --prompt-tokens
tokens of the bundle's tokenizer); decode tok/s, prefill tok/s and TTFT come from each one's --json profile, peak RSS
from the kernel's high-water mark of that process (wait4's ru_maxrss: the whole process, interpreter included).
Switch: in one process each, with a budget that holds one expert, the expert and a copy of it installed under
another name alternate (each switch evicts one and loads the other); the native figure is the load of the expert's
graphs, the Python one the whole select (benchmarks/runtime.py's worker); both against reading the expert's files
from a warm page cache. Run it on idle cores: the figures are ratios within one run.
Writes benchmarks/results/native.{json,md} (or NAME.{json,md}).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "build" / "native" / "mode-edge-native"


def ort_library() -> Path:
    """The libonnxruntime.so the native runs load: the one `mode-edge bench --runtime native` would use."""
    from mode_edge.runtimes.native_bench import ort_library as locate

    return locate(None)


def prompt_of(bundle: Path, tokens: int) -> tuple[str, list[int]]:
    """A code text of `tokens` token ids under the bundle's tokenizer (with its prefix), and those ids, as `mode-edge
    run` encodes it."""
    from mode_edge.runtimes.run import load_tokenizer

    tok = load_tokenizer(bundle)
    source = inspect.getsource(json.decoder)
    lo, hi = 1, len(source)
    while lo < hi:  # the longest prefix of the source that encodes to at most `tokens` ids
        mid = (lo + hi + 1) // 2
        n = len(tok.prefix_ids) + len(tok.encode(source[:mid], prefix=False))
        lo, hi = (mid, hi) if n <= tokens else (lo, mid - 1)
    text = source[:lo]
    return text, [*tok.prefix_ids, *tok.encode(text, prefix=False)]


def measured(cmd: list[str], env: dict | None = None) -> tuple[int, str]:
    """(peak RSS in bytes, stderr) of one process run to its end."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        err.seek(0)
        text = err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed: {text[-2000:]}")
    return usage.ru_maxrss * 1024, text


def run_python(bundle: Path, expert: str, text: str, new_tokens: int, threads: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mode_edge.cli", "run", "--bundle", str(bundle), "--experts", expert, "--prompt", text,
           "--max-new-tokens", str(new_tokens), "--device", "host", "--json", str(out)]  # fmt: skip
    peak, _ = measured(cmd)  # (the host profile's threads: --threads must match it, main checks)
    profile = json.loads(out.read_text())
    return {**summary(profile.get("profile", profile)), "peak_rss_mb": peak / 2**20}


def native_profile(bundle: Path, expert: str, ids: list[int], new_tokens: int, threads: int, out: Path,
                   ) -> tuple[dict, float]:  # fmt: skip
    """One `mode-edge-native run` in a fresh process (`expert`: names, or none): its --json profile (written to
    `out`) and its peak RSS in MB."""
    cmd = [str(NATIVE), "run", str(bundle), "--ids", ",".join(map(str, ids)), "--experts", expert,
           "--max-new-tokens", str(new_tokens), "--threads", str(threads), "--json", str(out)]  # fmt: skip
    peak, _ = measured(cmd, {**os.environ, "MODE_EDGE_ORT_LIB": str(ort_library())})
    return json.loads(out.read_text()), peak / 2**20


def run_native(bundle: Path, expert: str, ids: list[int], new_tokens: int, threads: int, out: Path) -> dict:
    profile, peak_mb = native_profile(bundle, expert, ids, new_tokens, threads, out)
    return {**summary(profile), "peak_rss_mb": peak_mb}


def summary(p: dict) -> dict:
    return {"decode_tokens_per_s": p["decode_tokens_per_s"], "prefill_tokens_per_s": p["prefill_tokens_per_s"],
            "ttft_ms": 1000 * p["time_to_first_token_s"], "prompt_tokens": p["prompt_tokens"],
            "new_tokens": p["new_tokens"], "base_load_ms": 1000 * p["load_s"]["base"]}  # fmt: skip


def native_switch(bundle: Path, a: str, b: str, ids: list[int], threads: int, budget_mb: float, repeats: int) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [str(NATIVE), "bench", str(bundle), "--ids", ",".join(map(str, ids[:8])), "--alternate", f"{a},{b}",
               "--repeats", str(repeats + 1), "--budget-mb", str(budget_mb), "--max-new-tokens", "1",
               "--threads", str(threads), "--json", str(out)]  # fmt: skip
        measured(cmd, {**os.environ, "MODE_EDGE_ORT_LIB": str(ort_library())})
        runs = json.loads(out.read_text())["runs"][1:]  # the first loads the base as well
    names = [b if i % 2 == 0 else a for i in range(repeats)]
    return [run["load_s"][f"expert {n}"] for run, n in zip(runs, names)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--expert", default="code")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--name", default="native", help="Results file name in benchmarks/results/ (no suffix).")
    args = ap.parse_args()
    from mode_edge.devices.profiles import load_profile

    if load_profile("host").threads != args.threads:
        host = load_profile("host").threads
        raise SystemExit(f"`mode-edge run --device host` runs {host} threads; pass --threads {host}")
    if not NATIVE.exists():
        raise SystemExit(f"{NATIVE} is missing; build it with `make native`")
    from runtime import in_worker

    from mode_edge.packs import install_copy
    from mode_edge.runtimes.session import MB, Session

    text, ids = prompt_of(args.bundle, args.prompt_tokens)
    runs: dict[str, list[dict]] = {"python": [], "native": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        for _ in range(args.rounds):
            runs["python"].append(run_python(args.bundle, args.expert, text, args.new_tokens, args.threads, out))
            runs["native"].append(run_native(args.bundle, args.expert, ids, args.new_tokens, args.threads, out))
        bundle = Path(tmp) / "bundle"  # a copy with the expert installed twice, for the switches
        shutil.copytree(args.bundle, bundle)
        copy = f"{args.expert}-copy"
        install_copy(bundle, args.expert, copy)
        probe = Session(bundle, verify=False)
        budget = (probe.base_bytes + 1.5 * probe.expert_bytes(args.expert)) / MB  # room for one expert
        del probe
        native_s = native_switch(bundle, args.expert, copy, ids, args.threads, budget, args.switches)
        python = in_worker("switch", bundle=str(bundle), a=args.expert, b=copy, threads=args.threads,
                           repeats=args.switches)  # fmt: skip
    med = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in runs.items()}
    read_ms = 1000 * statistics.median(python["read_s"])
    switch = {"native_ms": 1000 * statistics.median(native_s),
              "python_ms": 1000 * statistics.median(python["switch_s"]), "read_files_ms": read_ms}  # fmt: skip
    n, p = med["native"], med["python"]
    ratios = {
        "decode_native_over_python": n["decode_tokens_per_s"] / p["decode_tokens_per_s"],
        "ttft_native_over_python": n["ttft_ms"] / p["ttft_ms"],
        "peak_rss_python_minus_native_mb": p["peak_rss_mb"] - n["peak_rss_mb"],
        "native_switch_over_read": switch["native_ms"] / read_ms,
    }
    md = [
        f"# Native vs Python runtime (`{args.bundle.name}`, expert {args.expert}, {n['prompt_tokens']}-token prompt, "
        f"{args.new_tokens} new tokens, {args.threads} threads, median of {args.rounds} interleaved rounds, a fresh "
        "process each)",
        "",
        "| runtime | decode tok/s | prefill tok/s | TTFT ms | peak RSS MB | base load ms |",
        "|---|---|---|---|---|---|",
    ]
    for label, m in med.items():
        md.append(f"| {label} | {m['decode_tokens_per_s']:.1f} | {m['prefill_tokens_per_s']:.0f} | {m['ttft_ms']:.0f} "
                  f"| {m['peak_rss_mb']:.0f} | {m['base_load_ms']:.0f} |")  # fmt: skip
    md += ["", f"Expert switch (median of {args.switches}, a budget holding one expert): native "
           f"{switch['native_ms']:.1f} ms, Python {switch['python_ms']:.1f} ms; reading the expert's files "
           f"{read_ms:.1f} ms.", "",
           "| target | measured | met |", "|---|---|---|",
           f"| decode >= 1.2x Python | {ratios['decode_native_over_python']:.2f}x | "
           f"{'yes' if ratios['decode_native_over_python'] >= 1.2 else 'no'} |",
           f"| peak RSS at least 40 MB lower | {ratios['peak_rss_python_minus_native_mb']:.0f} MB lower | "
           f"{'yes' if ratios['peak_rss_python_minus_native_mb'] >= 40 else 'no'} |",
           f"| switch within 2x reading its files | {ratios['native_switch_over_read']:.1f}x | "
           f"{'yes' if ratios['native_switch_over_read'] <= 2 else 'no'} |"]  # fmt: skip
    data = {"bundle": str(args.bundle), "expert": args.expert, "runs": runs, "median": med, "switch": switch,
            "switch_native_s": native_s, "switch_python_s": python["switch_s"], "ratios": ratios,
            "threads": args.threads, "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    write(args.name, data, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
