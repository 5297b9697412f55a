"""ONNX graphs: torch.onnx (dynamo) export with external weights, onnx.checker, onnxruntime quantization.

Weights live in a `.onnx.data` file beside each graph, so onnxruntime can memory-map them. int8 and int4 are
weight-only, in groups of `block_size` weights (MatMulNBits; the embedding's Gather becomes GatherBlockQuantized).

Why weight-only int8 rather than dynamic (quantize_dynamic, per-channel): dynamic quantization also rounds the
activations to 8 bits per tensor, and SmolLM2's activations carry outliers. Measured on the demo model (code, 512
held-out tokens): dynamic per-channel int8 agreed with PyTorch's top-1 token on 51% of positions and lost 9 points
of accuracy; weight-only 8-bit agreed on 97% and lost 0.4. accuracy_level 4 lets onnxruntime multiply in int8
with activations quantized per block of `block_size` (fine enough to keep the outliers in their own blocks): a
SmolLM2 block decodes 9x faster at 8 bits than with the default fp32 compute (59 ms -> 6.4 ms per token, measured).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from mode_edge.errors import UserError
from mode_edge.export.graphs import example_inputs, graph_layers, io_names


def dynamic_shapes(graph, max_tokens: int | None = None, max_context: int | None = None) -> tuple:
    """Token count and cache length are free up to the context length, or up to `max_tokens` per call and
    `max_context` in all (ExecuTorch plans every activation for the largest shapes); batch and widths are fixed.
    A "buffer" graph's rotary tables are as long as its cache buffers (the positions they can hold)."""
    longest = getattr(graph, "max_seq_len", 1 << 16)
    tokens = Dim("tokens", min=1, max=min(max_tokens or longest, longest))
    if graph_layers(graph) == 0:
        return ({1: tokens},)
    past = Dim("past", min=0, max=min(max_context or longest, longest))
    kv = tuple({2: past} for _ in range(2 * graph_layers(graph)))
    if graph.kv_cache == "concat":
        return ({1: tokens}, kv)
    tables = tuple({0: past} for _ in range(len(graph.position_names()) - 2))  # (after seqlens_k, total)
    return ({1: tokens}, (None, None, *tables, *kv))


@contextlib.contextmanager
def quiet():
    """torch.onnx and the quantizers narrate every step on stdout and the logs; our progress bar says it instead."""
    names = ("torch.onnx", "onnxscript", "torch.export", "onnxruntime.quantization.matmul_nbits_quantizer",
             "neural_compressor")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)  # incl. the int4-only Gather notice at 8 bits: the embedding stays fp32
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


def quantize_onnx(src: Path, dst: Path, quant: str, block_size: int, accuracy_level: int | str = 4,
                  source=None, method: str = "rtn", measure: tuple[list[dict], dict] | None = None,
                  ) -> tuple[dict[str, int], dict | None]:  # fmt: skip
    """src (fp32, external data) -> dst with weight-only int8 or int4 (mixed: int4 here, its 8-bit layers come from
    `source`) MatMulNBits (and the embedding's Gather as
    GatherBlockQuantized), its weights in dst.data. Activations stay fp32: see the module docstring for why.

    source: where weights' blocks are found before any rounding here, or None: a GGUF's own blocks (computed in
    fp32), GPTQ's blocks (export/calibrate.py), the 8-bit embedding (export/source_blocks.py). The rest is rounded
    to `quant`, by round-to-nearest or, with method "kquant" at 4 bits, llama.cpp's search for each block's scale
    and minimum (onnxruntime's KQuantWeightOnlyQuantConfig). The rounded weights (GPTQ's included) compute at
    `accuracy_level`; "auto" measures levels 4 and 0 on `measure` (feeds, one decode feed) against src and keeps
    the better (export/accuracy_levels.py). Projections that read the same input (q/k/v, gate/up) are then merged
    into one MatMulNBits each, and q/k/v fed packed to GroupQueryAttention (export/fuse_matmuls.py). Returns the
    count of weights written from `source` by block type, and the measured choice (None when nothing was
    measured)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from mode_edge.export.accuracy_levels import CANDIDATES, choose_level
    from mode_edge.export.fuse_matmuls import fuse_parallel_matmuls, pack_qkv
    from mode_edge.export.source_blocks import ROUNDED_HERE, write_source_blocks

    bits = {"int8": 8, "int4": 4, "mixed": 4}[quant]
    auto = accuracy_level == "auto"
    if auto and measure is None:
        raise ValueError("accuracy_level 'auto' needs inputs to measure on")
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    origins: dict[str, str] = {}
    exact = write_source_blocks(model, source, origins) if source is not None else {}
    weights = {i.name for i in model.graph.initializer}
    with quiet():  # (the quantizers round only MatMuls of initializer weights: the exact offset products stay)
        kquant = method == "kquant" and bits == 4 and any(
            n.op_type == "MatMul" and n.input[1] in weights for n in model.graph.node)
        if kquant and exact:  # (onnxruntime's k-quant path rebuilds the graph without the blocks' helper nodes)
            raise UserError(f"--quant-method kquant cannot round {src.name}: it also holds weights written from "
                            f"source blocks ({', '.join(sorted(exact))}), which onnxruntime's k-quant path drops; "
                            f"pass --quant-method gptq or rtn")  # fmt: skip
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=block_size, is_symmetric=True,
            accuracy_level=CANDIDATES[0] if auto else accuracy_level,
            op_types_to_quantize=("MatMul", "Gather"), algo_config=KQuantWeightOnlyQuantConfig() if kquant else None,
        )  # fmt: skip
        quantizer.process()
        model = quantizer.model.model
        rounded = {n.name for n in model.graph.node
                   if n.op_type == "MatMulNBits" and origins.get(n.name, "rounded") in ROUNDED_HERE}  # fmt: skip
        compute = choose_level(model, rounded, src, *measure) if auto and rounded else None
        fuse_parallel_matmuls(model)
        pack_qkv(model)
        save_external(model, dst)
    return exact, compute


def share_tied_embedding(embed: Path, head: Path) -> int:
    """A tied model's embedding, stored once: when every weight the embed graph keeps in its weights file (its
    GatherBlockQuantized table and scales, as written from a Q8_0 source or the 8-bit embedding blocks: 8-bit, or
    the nibble table at accuracy level 0, export/source_blocks.nibble_table) holds the same bytes as an initializer
    of the head graph, the embed graph's initializers are pointed at the head's weights file and its own is
    removed. Returns the bytes saved (0 when some weight has no such twin, and nothing changes). Source of the
    idea: onnxruntime-genai's builder feeds one quantized tensor to both ops of a tied model."""
    embed_model = onnx.load(str(embed), load_external_data=False)
    head_model = onnx.load(str(head), load_external_data=False)
    if not any(n.op_type == "GatherBlockQuantized" for n in embed_model.graph.node):
        return 0
    pairs = []
    for mine in embed_model.graph.initializer:
        if not mine.external_data:  # small tensors stay inside the graph file
            continue
        ours = _external_bytes(embed, mine)
        other = next((t for t in head_model.graph.initializer if t.external_data and t.data_type == mine.data_type
                      and _length(t) == len(ours) and _external_bytes(head, t) == ours), None)  # fmt: skip
        if other is None:
            return 0
        pairs.append((mine, other))
    if not pairs:
        return 0
    saved = embed.with_name(embed.name + ".data").stat().st_size
    for mine, other in pairs:
        fields = {e.key: e.value for e in other.external_data}  # both graphs lie in base/: the same folder
        del mine.external_data[:]
        for key, value in fields.items():
            mine.external_data.add(key=key, value=value)
    onnx.save_model(embed_model, str(embed))
    embed.with_name(embed.name + ".data").unlink()
    return saved


def _length(tensor: onnx.TensorProto) -> int:
    """Bytes an initializer keeps in external data (-1 when not recorded)."""
    return int({e.key: e.value for e in tensor.external_data}.get("length", -1))


def _external_bytes(graph: Path, tensor: onnx.TensorProto) -> bytes:
    """The raw bytes of an initializer stored in the graph's external data file."""
    fields = {e.key: e.value for e in tensor.external_data}
    offset, length = int(fields.get("offset", 0)), int(fields["length"])
    with open(graph.parent / fields["location"], "rb") as f:
        f.seek(offset)
        return f.read(length)
