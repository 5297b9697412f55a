"""onnxruntime-genai's int4 build of the backbone, scored like our bundles: the comparison issue 12 asks for.

    # once, in a separate environment (onnxruntime-genai's wheel, no dependencies beyond ours):
    python -m onnxruntime_genai.models.builder -i CHECKPOINT -o GENAI -p int4 -e cpu
    # then, here:
    python benchmarks/ort_genai_int4.py --genai GENAI --data D/code,D/math,D/english,D/general [--max-tokens 4096]

CHECKPOINT is the built-in backbone saved as a Hugging Face folder (transformers loads the GGUF, dequantized). The
builder's single graph (input_ids, attention_mask, empty past_key_values -> logits) runs teacher-forced on plain
onnxruntime over the same held-out windows, scored by `eval --bundle`'s code (training/eval_bundle.evaluate_bundle)
against the PyTorch backbone: accuracy, paired change, top-1 agreement. Also records the build's bytes on disk.
Writes benchmarks/results/ort_genai_int4.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

from mode_edge.training.backbones import load_backbone  # noqa: E402
from mode_edge.training.data import load_corpus  # noqa: E402
from mode_edge.training.eval_bundle import evaluate_bundle  # noqa: E402


class GenaiModel:
    """The builder's model.onnx as a scoring model: (1, T) token ids -> (1, T, V) float32 logits, empty cache."""

    def __init__(self, folder: Path, tokenizer, max_seq_len: int):
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_heads, self.head_dim = config["num_key_value_heads"], config["head_size"]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": np.ones(ids.shape, np.int64)}
        empty = np.zeros((ids.shape[0], self.kv_heads, 0, self.head_dim), np.float32)
        feed.update({name: empty for name in self.inputs if name.startswith("past_key_values")})
        return torch.from_numpy(self.session.run(["logits"], feed)[0]).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genai", type=Path, required=True, help="Folder written by onnxruntime-genai's builder.")
    ap.add_argument("--data", required=True, help="Comma-separated prepared corpora.")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--spec", default="smollm2", help="The backbone the build was made from.")
    args = ap.parse_args()
    backbone = load_backbone(args.spec)
    model = GenaiModel(args.genai, backbone.tokenizer, backbone.decoder.cfg.max_seq_len)
    corpora = [load_corpus(p) for p in args.data.split(",")]
    results = evaluate_bundle(model, corpora, backbone.decoder.eval(), max_tokens=args.max_tokens)
    sizes = {p.name: p.stat().st_size for p in sorted(args.genai.iterdir()) if p.is_file()}
    md = [f"# onnxruntime-genai int4 build of `{args.spec}` against PyTorch", "",
          f"Held-out test split, {args.max_tokens} tokens per domain, windows of 256; change in points with the "
          f"paired 95% interval. Build on disk: {sum(sizes.values()) / 2**20:.1f} MB "
          f"(model.onnx.data {sizes.get('model.onnx.data', 0) / 2**20:.1f} MB).", "",
          "| domain | PyTorch | genai int4 | change | top-1 agreement |", "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        c = r["change"]
        md.append(f"| {name} | {r['reference']['accuracy']:.2f} | {r['accuracy']:.2f} | {c['delta']:+.2f} "
                  f"({c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}) | {r['top1_agreement']:.1f}% |")  # fmt: skip
    data = {"genai": str(args.genai), "bytes": sizes, "max_tokens": args.max_tokens, "machine": machine(),
            "domains": {k: {key: v[key] for key in ("accuracy", "change", "top1_agreement")} | {
                "reference_accuracy": v["reference"]["accuracy"]} for k, v in results.items()}}  # fmt: skip
    write("ort_genai_int4", data, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
