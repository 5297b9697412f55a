"""Decode speed, prefill speed and peak RSS of several bundles of one model, through `mode-edge run`, interleaved.

    python benchmarks/bundle_speed.py --expert code --bundle exact=B1 --bundle requantized=B2 \\
        --bundle pte-int8=B3:executorch [--repeats 3] [--new-tokens 32]

Each run is a fresh `mode-edge run` process (greedy, one expert, a fixed code prompt) whose --json profile gives
decode tokens/s, prefill tokens/s, time to first token and sampled peak RSS; the bundles take turns, so machine noise
hits each alike, and the medians are reported. Run it on idle cores: the figures are ratios within one run.
Writes benchmarks/results/bundle_speed.{json,md} (or NAME.{json,md} with --name NAME).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
KEYS = ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s")


def run_once(bundle: Path, backend: str, expert: str, new_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        cmd = [sys.executable, "-m", "mode_edge.cli", "run", "--bundle", str(bundle), "--backend", backend,
               "--experts", expert, "--prompt", PROMPT, "--max-new-tokens", str(new_tokens), "--json", str(out)]
        subprocess.run(cmd, check=True, capture_output=True)  # fmt: skip
        profile = json.loads(out.read_text())
    profile = profile.get("profile", profile)
    return {**{k: profile[k] for k in KEYS}, "peak_rss_mb": profile["memory"]["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, help="LABEL=PATH[:BACKEND] (backend onnx default).")
    ap.add_argument("--expert", default="code")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--name", default="bundle_speed", help="Results file name in benchmarks/results/ (no suffix).")
    args = ap.parse_args()
    bundles = {}
    for spec in args.bundle:
        label, _, rest = spec.partition("=")
        path, _, backend = rest.partition(":")
        bundles[label] = (Path(path), backend or "onnx")
    runs: dict[str, list[dict]] = {label: [] for label in bundles}
    for _ in range(args.repeats):
        for label, (path, backend) in bundles.items():
            runs[label].append(run_once(path, backend, args.expert, args.new_tokens))
    cols = [*KEYS, "peak_rss_mb"]
    med = {label: {k: statistics.median(r[k] for r in rs) for k in cols} for label, rs in runs.items()}
    md = [f"# Bundle speed and memory (`mode-edge run`, expert {args.expert}, {args.new_tokens} new tokens, "
          f"median of {args.repeats}, interleaved)", "",
          "| bundle | backend | decode tok/s | prefill tok/s | TTFT ms | peak RSS MB |", "|---|---|---|---|---|---|"]
    for label, m in med.items():
        md.append(f"| {label} | {bundles[label][1]} | {m['decode_tokens_per_s']:.1f} | {m['prefill_tokens_per_s']:.0f} "
                  f"| {1000 * m['time_to_first_token_s']:.0f} | {m['peak_rss_mb']:.0f} |")  # fmt: skip
    data = {"bundles": {k: [str(p), b] for k, (p, b) in bundles.items()}, "runs": runs, "median": med,
            "new_tokens": args.new_tokens, "machine": machine()}  # fmt: skip
    write(args.name, data, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
