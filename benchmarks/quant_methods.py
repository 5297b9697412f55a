"""4-bit rounding methods of the expert graphs, held against the fp32 graph on held-out text of each expert's domain.

    python benchmarks/quant_methods.py --model runs/mode-2x-so [--windows 8]

For every expert block graph of the run: export it to fp32 ONNX, then to 4-bit MatMulNBits by round-to-nearest
(symmetric, the default), k-quant, and GPTQ calibrated on the expert's training text (export/calibrate.py), each at
accuracy levels 4 and 0. Each variant runs on the hidden states that enter its block while the PyTorch model reads
held-out windows (test split) of the expert's own text; the error is the RMS of the output's difference from the
fp32 graph's, relative to the RMS of the change the fp32 graph makes to its input (the first position left out: its
activations are outliers of another scale). Lower is better; 0 is exact.
Writes benchmarks/results/quant_methods.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

from mode_edge.config import ExportConfig  # noqa: E402
from mode_edge.export.calibrate import (  # noqa: E402
    CALIBRATION_WINDOWS,
    CalibratedBlocks,
    calibrate,
    calibration_windows,
    composed_block_inputs,
)
from mode_edge.export.graphs import io_names, prefill_inputs, split  # noqa: E402
from mode_edge.export.onnx_graphs import export_onnx, quantize_onnx  # noqa: E402
from mode_edge.export.pipeline import calibration_texts, load_model  # noqa: E402
from mode_edge.export.source_blocks import SourceBlocks  # noqa: E402
from mode_edge.training.backbones import resolve_spec  # noqa: E402
from mode_edge.training.data import held_out, load_corpus  # noqa: E402

VARIANTS = [("rtn", 4), ("rtn", 0), ("kquant", 4), ("kquant", 0), ("gptq", 4), ("gptq", 0)]


def relative_error(session, feeds, refs) -> float:
    errs = []
    for f, r in zip(feeds, refs):
        got, x = session.run(None, f)[0][:, 1:], f["hidden"][:, 1:]
        errs.append(np.sqrt(((got - r[:, 1:]) ** 2).mean() / ((r[:, 1:] - x) ** 2).mean()))
    return float(np.mean(errs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="A MoDE run (expert or composed).")
    ap.add_argument("--windows", type=int, default=8, help="Held-out windows of 256 tokens per expert.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    backbone, model, record = load_model(args.model, None)
    cfg, graphs = backbone.decoder.cfg, split(model, "buffer")
    corpora = calibration_texts(args.model, record, ExportConfig())
    texts = {n: calibration_windows(c, backbone.tokenizer, *CALIBRATION_WINDOWS) for n, c in corpora.items()}
    directory, gguf_file = resolve_spec(backbone.spec)
    gguf = SourceBlocks(directory / gguf_file) if gguf_file else None
    at4 = calibrate(model, texts, 4, skip=lambda w: gguf is not None and gguf.find(w) is not None)
    # the same blocks computed at level 0: the accuracy level is the MatMulNBits attribute, not the rounding
    at0 = CalibratedBlocks({k: dataclasses.replace(b, accuracy_level=0) for k, b in at4.blocks.items()})
    calibrated = {4: at4, 0: at0}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, corpus in corpora.items():
            docs = load_corpus(corpus).docs
            windows = held_out(docs["test"] or docs["validation"], backbone.tokenizer, 256, args.windows * 256)
            hidden = composed_block_inputs(model, windows.windows[:, :256])
            for i, h in enumerate(hidden):
                rel = f"experts/{name}/block{i}"
                names = io_names(graphs[rel])[0]
                feeds = [{n: t.numpy() for n, t in zip(names, prefill_inputs(graphs[rel], x[None]))} for x in h]
                fp32 = Path(tmp) / "fp32" / (rel + ".onnx")
                export_onnx(graphs[rel], cfg, fp32)
                reference = ort.InferenceSession(str(fp32), so)
                refs = [reference.run(None, f)[0] for f in feeds]
                rows[rel] = {}
                for method, level in VARIANTS:
                    q = Path(tmp) / f"{method}{level}" / (rel + ".onnx")
                    source = calibrated[level] if method == "gptq" else None
                    quantize_onnx(fp32, q, "int4", 32, level, source, method)
                    rows[rel][f"{method} / {level}"] = relative_error(ort.InferenceSession(str(q), so), feeds, refs)
                print(rel, {k: round(v, 4) for k, v in rows[rel].items()}, flush=True)
    head = [f"{m} / {lvl}" for m, lvl in VARIANTS]
    md = [f"# 4-bit rounding of the expert graphs: `{args.model.name}`", "",
          f"Relative error of each expert block graph against fp32 on {args.windows} held-out windows of 256 tokens "
          f"(lower is better; method / accuracy level). GPTQ calibrated on {CALIBRATION_WINDOWS[0]} x "
          f"{CALIBRATION_WINDOWS[1]} training tokens per expert.", "",
          "| graph | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]  # fmt: skip
    for rel, r in rows.items():
        md.append(f"| {rel} | " + " | ".join(f"{r[h]:.4f}" for h in head) + " |")
    means = {h: float(np.mean([r[h] for r in rows.values()])) for h in head}
    md.append("| mean | " + " | ".join(f"**{means[h]:.4f}**" for h in head) + " |")
    data = {"model": str(args.model), "windows": args.windows, "calibration": CALIBRATION_WINDOWS,
            "errors": rows, "mean": means, "machine": machine()}  # fmt: skip
    write("quant_methods", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
