"""Graphs written as onnxruntime's optimizer leaves them, so that the runtimes create their sessions with
optimization off (mode_edge/bundle.ONNX_OPTIMIZED_AHEAD). No torch here: the benchmarks use it beside the runtime.

The experts' graphs are written so (export/pipeline.optimizes_at_export): an expert switch creates their sessions,
and the optimizer was a quarter of that time. Measured on a SmolLM2 int4 bundle's expert (`python
benchmarks/expert_switch.py --bundle B --repeats 25`, 3 graphs, 2 threads, idle, on a host whose speed drifted
between runs): 22.5 / 22.6 / 26.5 / 27.7 ms for the pack exported before, 16.3 / 16.5 / 21.1 / 21.8 ms for the pack
exported with this, in four pairs of runs (0.72-0.80x); the same greedy tokens and logits.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

AHEAD_FUSIONS = frozenset({"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "QuickGelu"})
"""The ops onnxruntime's optimizer may add to our graphs at ORT_ENABLE_EXTENDED (fused RMS norms, the residual add
with the next norm, x * sigmoid(x)), all older than the onnxruntime 1.23 the runtimes require. A graph whose
optimized form holds any other op its source lacks (a newer onnxruntime's fusion, which a device's older one could
not run) is kept as exported."""
MAX_GROWTH = 1.01
"""Most weights-file growth taken for it: folding an fp16 table's Cast into fp32 (an 8-bit layer's scales under
--quant mixed, the nibble form's offsets) would store it at twice the bytes; such a graph is kept as exported."""


def save_optimized(src: Path, out: Path, level, prepacked: bool = False) -> None:
    """Create onnxruntime's session of SRC with graph optimization `level` (onnxruntime.GraphOptimizationLevel) and
    save the graph it runs as OUT, with every initializer of 1 KB or more in OUT.data (and, with `prepacked`, the
    kernels' prepacked weights too: session.save_external_prepacked_constant_initializers)."""
    import onnxruntime as ort

    from mode_edge.runtimes.backends import session_options

    options = session_options(1)
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(out)
    config = {"session.optimized_model_external_initializers_file_name": out.name + ".data",
              "session.optimized_model_external_initializers_min_size_in_bytes": "1024"}  # fmt: skip
    if prepacked:
        config["session.save_external_prepacked_constant_initializers"] = "1"
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def op_types(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def optimize_ahead(path: Path) -> bool:
    """Replace the graph at PATH (and its weights, PATH.data) by onnxruntime's optimization of it at
    ORT_ENABLE_EXTENDED, the highest level whose output does not depend on the machine (fused RMS norms and
    activations, folded constants). Returns whether it did: a graph without a weights file, whose optimized form
    holds an op outside AHEAD_FUSIONS that its source lacks, or whose weights grow past MAX_GROWTH is left as it
    is. The two files are replaced one after the other: call it inside a folder that becomes the bundle only when
    complete (export's atomic_dir)."""
    import onnxruntime as ort

    weights = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        save_optimized(path, out, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        out_weights = out.with_name(out.name + ".data")
        if not weights.is_file() or not out_weights.is_file():
            return False
        if not op_types(out) - op_types(path) <= AHEAD_FUSIONS:
            return False
        if out_weights.stat().st_size > MAX_GROWTH * weights.stat().st_size:
            return False
        os.replace(out_weights, weights)  # (the same name: onnxruntime wrote it as the graph names it)
        os.replace(out, path)
    return True
