"""Each graph's MatMulNBits compute type (`accuracy_level`), chosen by measurement at export.

Level 4 quantizes the activations to int8 per block (of the weights' block size) and multiplies in integers: the
fastest on CPUs with dot-product instructions, and harmless on most graphs, but on a graph whose activations carry
outliers (a norm weight far above the others) it can double the output error (onnxruntime issue 29849; reproduced in
tests/export/test_accuracy_levels.py). Level 0 computes in fp32. So the exporter measures both on each graph whose
weights it rounded (the experts' layers, a backbone without source blocks; a GGUF's own blocks keep
--base-accuracy-level), against the fp32 graph on the same inputs, and keeps level 4 unless its error is more than
ERROR_RATIO times level 0's and level 0 decodes at most MAX_SLOWDOWN times slower. Both errors and both decode times
go into the manifest, so the choice can be checked.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnx

CANDIDATES = (4, 0)
"""Compute types tried, the fastest first: int8 activations per block, fp32."""
ERROR_RATIO = 2.0
"""Level 4 is kept while its output error is at most this multiple of level 0's (plus FLOOR). Measured on expert
block graphs (random hidden states, error of the block output against fp32): ratios 1.00-1.01 at int4 and 1.32
(SmolLM2's own layers) to 1.47 (the tiny backbone) at int8, where int8 activations add an error of the weights'
own size; 2.46 on the tiny backbone with a norm weight of 30 on one channel, the outlier case."""
MAX_SLOWDOWN = 4.0
"""Level 0 is not taken for accuracy when one decode call of the graph takes more than this many times level 4's:
onnxruntime multiplies 4-bit weights in fp32 with a kernel of its own, but dequantizes 8-bit ones whole at every call
at level 0. Measured on the SmolLM2 int8 code expert: its block 2 errs 0.107 at level 4 against 0.040 at level 0
(an int4 expert block errs 0.3-1.4 at either), and decodes in 7.0 ms against 0.17 ms; taking level 0 for it held
the bundle with that expert to 53.6 tok/s in `mode-edge run` (86.4 with level 4; benchmarks/native.py, 2 threads).
On the tiny backbone's blocks level 0 is ~2.5x slower and is still taken where it halves the error."""
FLOOR = 1e-6
"""Relative errors below this count as equal (float noise)."""
DECODE_REPEATS = 20


def set_level(model: onnx.ModelProto, nodes: set[str], level: int) -> None:
    """Set the accuracy_level attribute of the MatMulNBits nodes named in `nodes`, in place."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.name in nodes:
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
                    break
            else:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """||got - want|| / ||want|| over every call's first output (float64 sums)."""
    num = sum(float(np.sum((g.astype(np.float64) - w) ** 2)) for g, w in zip(got, want))
    den = sum(float(np.sum(w.astype(np.float64) ** 2)) for w in want)
    return (num / max(den, 1e-30)) ** 0.5


def choose_level(model: onnx.ModelProto, nodes: set[str], reference: Path, feeds: list[dict], decode: dict) -> dict:
    """Measure `model` with the MatMulNBits `nodes` at each level of CANDIDATES against the fp32 graph `reference`
    on `feeds` (name -> array dicts), time one decode call (`decode`) at each, set the chosen level on the nodes
    (in place) and return the record: {"accuracy_level": L, "error": {level: relative error of the first output},
    "decode_ms": {level: median ms, 1 thread}}. Raises nothing for a graph onnxruntime loads; the model must fit in
    memory as one protobuf (< 2 GB: one graph of a phone-sized model)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    ref = ort.InferenceSession(str(reference), options, providers=["CPUExecutionProvider"])
    want = [ref.run(None, f)[0] for f in feeds]
    errors, times = {}, {}
    for level in CANDIDATES:
        set_level(model, nodes, level)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        errors[level] = relative_error([session.run(None, f)[0] for f in feeds], want)
        session.run(None, decode)  # warm-up: the first call packs weights
        samples = []
        for _ in range(DECODE_REPEATS):
            t = time.perf_counter()
            session.run(None, decode)
            samples.append((time.perf_counter() - t) * 1e3)
        times[level] = statistics.median(samples)
    fast, exact = CANDIDATES
    costly = errors[fast] > ERROR_RATIO * errors[exact] + FLOOR
    chosen = exact if costly and times[exact] <= MAX_SLOWDOWN * times[fast] else fast
    set_level(model, nodes, chosen)
    return {
        "accuracy_level": chosen,
        "error": {str(k): float(f"{v:.3g}") for k, v in errors.items()},
        "decode_ms": {str(k): round(v, 3) for k, v in times.items()},
    }
