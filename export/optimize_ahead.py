"""Graphs written as onnxruntime's optimizer leaves them, so that the runtimes create their sessions with
optimization off (mode_edge/bundle.ONNX_OPTIMIZED_AHEAD). No torch here: the benchmarks use it beside the runtime.

The experts' graphs are written so (export/pipeline.optimizes_at_export): an expert switch creates their sessions,
and a graph the optimizer has already fused loads faster. Measured on a SmolLM2 int4 bundle's expert (`python
benchmarks/expert_switch.py --bundle B --repeats 25`, 3 graphs, 2 threads, idle, on a host whose speed drifted
between runs; six pairs of runs): 20.1-27.7 ms for the pack exported before, 15.3-21.8 ms for the pack exported with
this (0.71-0.82x within each pair); the same greedy tokens and logits in both runtimes.
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


def signatures(graph) -> set[tuple]:
    """(domain, op type, attribute names, input count) of each node of an onnx GraphProto."""
    return {(n.domain or "", n.op_type, tuple(sorted(a.name for a in n.attribute)), len(n.input)) for n in graph.node}


def schema_defaults() -> dict[tuple[str, str, str], object]:
    """(domain, op type, attribute) -> the default value onnxruntime's op schemas give it."""
    import onnx
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    out = {}
    for schema in get_all_operator_schema():
        for name, attribute in schema.attributes.items():
            if attribute._default_value:  # (the serialized AttributeProto; empty where there is no default)
                value = onnx.helper.get_attribute_value(onnx.AttributeProto.FromString(attribute._default_value))
                out.setdefault((schema.domain, schema.name, name), value)
    return out


def drop_written_defaults(model, source) -> str | None:
    """Remove, in place, each attribute of `model` (onnx ModelProto) that no node of its op type in `source` carries
    and that holds its schema default: onnxruntime's serializer writes every attribute out, defaults included, and
    an onnxruntime older than the one that saved the graph refuses an attribute it does not know (1.23 refuses
    MatMulNBits' weight_prepacked and GroupQueryAttention's sliding_window_cache that 1.32 writes, measured). Returns
    why not, where such an attribute holds another value; op types that `source` lacks keep theirs."""
    import onnx

    carried: dict[str, set[str]] = {}
    for node in source.graph.node:
        carried.setdefault(node.op_type, set()).update(a.name for a in node.attribute)
    defaults = schema_defaults()
    for node in model.graph.node:
        if node.op_type not in carried:
            continue
        kept = []
        for attribute in node.attribute:
            if attribute.name in carried[node.op_type]:
                kept.append(attribute)
                continue
            default = defaults.get((node.domain or "", node.op_type, attribute.name), ())
            if onnx.helper.get_attribute_value(attribute) != default:
                return f"the optimizer set {node.op_type}'s {attribute.name}, which the exported graph leaves out"
        del node.attribute[:]
        node.attribute.extend(kept)
    return None


def optimize_ahead(path: Path) -> str | None:
    """Replace the graph at PATH (and its weights, PATH.data) by onnxruntime's optimization of it at
    ORT_ENABLE_EXTENDED, the highest level whose output does not depend on the machine (fused RMS norms and
    activations, folded constants), without the attributes its serializer writes at their defaults
    (`drop_written_defaults`), so that an older onnxruntime loads it too. Returns None when it did, else why not:
    a graph without a weights file, one whose optimized form holds a node its source lacks (another attribute, input
    count or op) other than AHEAD_FUSIONS, or whose weights grow past MAX_GROWTH, is left as it is. The two files
    are replaced one after the other: call it inside a folder that becomes the bundle only when complete (export's
    atomic_dir)."""
    import onnx
    import onnxruntime as ort

    weights = path.with_name(path.name + ".data")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        save_optimized(path, out, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        out_weights = out.with_name(out.name + ".data")
        if not weights.is_file() or not out_weights.is_file():
            return "it has no weights file"
        source, model = (onnx.load(str(p), load_external_data=False) for p in (path, out))
        why = drop_written_defaults(model, source)
        if why:
            return why
        new = {s[1] for s in signatures(model.graph) - signatures(source.graph)} - AHEAD_FUSIONS
        if new:
            return f"the optimizer would write {', '.join(sorted(new))} in a form the exported graph lacks"
        growth = out_weights.stat().st_size / weights.stat().st_size
        if growth > MAX_GROWTH:
            return f"the optimizer would grow its weights by {100 * (growth - 1):.0f}%"
        onnx.save(model, str(out))  # the graph only: its weights stay in onnxruntime's file, which it names
        os.replace(out_weights, weights)
        os.replace(out, path)
    return None
