"""ONNX graphs: torch.onnx (dynamo) export with external weights, onnx.checker, onnxruntime quantization.

Weights live in a `.onnx.data` file beside each graph, so onnxruntime can memory-map them. int8 is dynamic, per
channel (onnxruntime.quantization.quantize_dynamic); int4 is weight-only MatMulNBits with a configurable block size
(the embedding's Gather becomes GatherBlockQuantized).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from mode_edge.export.graphs import example_inputs, graph_layers, io_names


def dynamic_shapes(graph) -> tuple:
    """Token count and cache length are free (up to the context length); batch and widths are fixed."""
    longest = getattr(graph, "max_seq_len", 1 << 16)
    tokens = Dim("tokens", min=1, max=longest)
    if graph_layers(graph) == 0:
        return ({1: tokens},)
    past = Dim("past", min=0, max=longest)
    return ({1: tokens}, tuple({2: past} for _ in range(2 * graph_layers(graph))))


@contextlib.contextmanager
def quiet():
    """torch.onnx and the quantizers narrate every step on stdout and the logs; our progress bar says it instead."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "root", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(graph: torch.nn.Module, cfg, path: Path) -> None:
    """Write PATH (graph) and PATH.data (weights); dynamic token and cache lengths."""
    inputs, outputs = io_names(graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet(), torch.no_grad():
        program = torch.onnx.export(
            graph, example_inputs(graph, cfg), dynamo=True, input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic_shapes(graph), verbose=False,
        )  # fmt: skip
        program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=True)


def save_external(model: onnx.ModelProto, path: Path) -> None:
    """One graph file and one weights file named GRAPH.onnx.data, whatever the producer called its weights."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)  # fmt: skip


def vector_matmuls(path: Path) -> list[str]:
    """MatMuls by a constant vector: the gate's logit. It is a few hundred weights, and onnxruntime's per-channel
    integer MatMul rejects a 1-D weight, so it stays fp32."""
    model = onnx.load(str(path), load_external_data=False)
    vectors = {t.name for t in model.graph.initializer if len(t.dims) == 1}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in vectors]


def quantize_onnx(src: Path, dst: Path, quant: str, block_size: int) -> None:
    """src (fp32, external data) -> dst quantized, with its weights in dst.data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as tmp, quiet():
        if quant == "int8":
            out = Path(tmp) / "model.onnx"
            quantize_dynamic(
                src, out, weight_type=QuantType.QInt8, per_channel=True, use_external_data_format=True,
                nodes_to_exclude=vector_matmuls(src), extra_options={"MatMulConstBOnly": True},
            )  # fmt: skip
            model = onnx.load(str(out), load_external_data=True)
        elif quant == "int4":
            quantizer = MatMulNBitsQuantizer(
                onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True,
                op_types_to_quantize=("MatMul", "Gather"),
            )  # fmt: skip
            quantizer.process()
            model = quantizer.model.model
        else:
            raise ValueError(f"unknown ONNX quantization {quant!r}")
        save_external(model, dst)
