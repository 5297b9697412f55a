"""Export benchmark: bytes per component, export wall time, and quality of the exported model against PyTorch.

    python benchmarks/export_quality.py --model runs/demo/composed --data runs/demo/data [--formats onnx]

For each precision (fp32, int8, int4; NAME-requantized rounds a GGUF backbone again instead of keeping its blocks)
the composed run is exported; then, on the held-out test split of every domain, the runtime (all experts loaded) and
PyTorch score the same windows through `eval --bundle`'s code (training/eval_bundle.py): next-token accuracy of
each, the paired change with its 95% interval, and the top-1 agreement (teacher-forced, every position). Greedy
agreement: for the first prompts of each domain, the share of 32-token greedy continuations identical to PyTorch's,
and the mean length of the common prefix.
Writes benchmarks/results/export_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

from mode_edge.config import ExportConfig  # noqa: E402
from mode_edge.export.pipeline import export_bundle, load_model  # noqa: E402
from mode_edge.packs import describe  # noqa: E402
from mode_edge.runtimes.engine import generate  # noqa: E402
from mode_edge.training.data import eval_windows, load_corpus, require_split  # noqa: E402
from mode_edge.training.eval_bundle import BundleModel, evaluate_bundle  # noqa: E402
from mode_edge.training.evaluate import greedy  # noqa: E402


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/demo/composed"))
    ap.add_argument("--data", type=Path, default=Path("runs/demo/data"), help="Folder of the domain corpora.")
    ap.add_argument("--formats", default="onnx", help="onnx or executorch; the first one is what the runtime runs.")
    ap.add_argument("--quants", default="fp32,int8,int4",
                    help="Precisions; NAME-requantized rounds a GGUF backbone again instead of keeping its blocks.")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="Held-out tokens per domain.")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4, help="Greedy prompts per domain.")
    args = ap.parse_args()

    backbone, model, _ = load_model(args.model, None)
    domains = sorted(p.name for p in args.data.iterdir() if (p / "dataset.json").exists())
    corpora = [load_corpus(args.data / d) for d in domains]
    windows = {c.name: eval_windows(require_split(c, "test"), backbone.tokenizer, args.seq_len, 32 * args.prompts)
               for c in corpora}  # fmt: skip
    prompts = {d: [w[:32].tolist() for w in windows[d][: args.prompts]] for d in domains}
    ref_greedy = {d: [greedy(model, p, 32) for p in prompts[d]] for d in domains}
    rows = {}

    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    try:
        for variant in args.quants.split(","):
            quant, requantize = variant.removesuffix("-requantized"), variant.endswith("-requantized")
            out = work / variant
            t0 = time.perf_counter()
            export_bundle(args.model, out, ExportConfig(formats=tuple(args.formats.split(",")), quant=quant,
                                                        source_blocks=not requantize))  # fmt: skip
            wall = time.perf_counter() - t0
            info = describe(out)
            shipped = BundleModel(out, None, args.formats.split(",")[0])  # every expert loaded
            scores = evaluate_bundle(shipped, corpora, model, args.seq_len, args.eval_tokens)
            rows.setdefault("pytorch", {"accuracy": {d: s["reference"]["accuracy"] for d, s in scores.items()}})
            row = {"export_s": round(wall, 1), "components": info["components"], "base_bytes": info["base_bytes"],
                   "expert_bytes": {n: e["bytes"] for n, e in info["experts"].items()},
                   "accuracy": {d: s["accuracy"] for d, s in scores.items()},
                   "change": {d: s["change"] for d, s in scores.items()},
                   "top1_agreement": {d: s["top1_agreement"] for d, s in scores.items()},
                   "greedy_identical": {}, "greedy_prefix": {}}  # fmt: skip
            engine = shipped.session.engine
            for d in domains:
                pairs = list(zip([list(generate(engine, p, 32)) for p in prompts[d]], ref_greedy[d]))
                row["greedy_identical"][d] = 100.0 * float(np.mean([g == r for g, r in pairs]))
                row["greedy_prefix"][d] = float(np.mean([common_prefix(g, r) for g, r in pairs]))
            rows[variant] = row
            print(f"{variant}: {row['accuracy']} agreement {row['top1_agreement']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    data = {"machine": machine(), "model": str(args.model), "base": backbone.spec, "formats": args.formats,
            "eval_tokens_per_domain": args.eval_tokens, "rows": rows}  # fmt: skip
    name = "export_quality" if args.formats == "onnx" else f"export_quality_{args.formats.replace(',', '_')}"
    write(name, data, markdown(data, domains))


def mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def markdown(data: dict, domains: list[str]) -> str:
    rows = data["rows"]
    quants = [q for q in rows if q != "pytorch"]
    comps = list(rows[quants[0]]["components"])
    lines = [f"# Export: sizes and quality ({data['base']}, {data['formats']}, "
             f"{data['eval_tokens_per_domain']} held-out tokens per domain)", "",
             "## MB on disk per component", "", "| component | " + " | ".join(quants) + " |",
             "|---|" + "---|" * len(quants)]  # fmt: skip
    for c in comps:
        lines.append(f"| {c} | " + " | ".join(mb(rows[q]["components"][c]) for q in quants) + " |")
    for name in rows[quants[0]]["expert_bytes"]:
        lines.append(f"| expert pack {name} | " + " | ".join(mb(rows[q]["expert_bytes"][name]) for q in quants) + " |")
    lines.append("| base total | " + " | ".join(mb(rows[q]["base_bytes"]) for q in quants) + " |")
    lines.append("| export wall s | " + " | ".join(str(rows[q]["export_s"]) for q in quants) + " |")
    lines += ["", "## Next-token accuracy % (all experts loaded), and agreement with PyTorch", "",
              "| model | " + " | ".join(domains) + " | top-1 agreement % | greedy 32-token identical % | "
              "greedy common prefix |", "|---|" + "---|" * (len(domains) + 3)]  # fmt: skip
    for q, r in rows.items():
        accs = " | ".join(f"{r['accuracy'][d]:.2f}" + (f" ({r['change'][d]['delta']:+.2f})" if "change" in r else "")
                          for d in domains)  # fmt: skip
        if q == "pytorch":
            lines.append(f"| pytorch | {accs} | - | - | - |")
            continue
        agree = np.mean(list(r["top1_agreement"].values()))
        ident = np.mean(list(r["greedy_identical"].values()))
        prefix = np.mean(list(r["greedy_prefix"].values()))
        lines.append(f"| {q} | {accs} | {agree:.2f} | {ident:.0f} | {prefix:.1f} / 32 |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
