"""What a KV cache in fp16 would cost the decode step: onnxruntime's GroupQueryAttention (com.microsoft, the op every
attention layer of a bundle is) alone, one query token, with fp32 and with fp16 inputs and cache, the cache bound in
place as the runtimes bind it (present outputs on the past buffers), at several positions. The heads are SmolLM2's
(9 query heads and 3 KV heads of 64); rounds alternate the two precisions, and each figure is a median.

An fp16 cache would halve the cache's memory (57 MB of the Python runtime's peak for 1,025 positions of 36 layers);
this measures what it costs in time per attention call.

Usage: python benchmarks/kv_cache_dtype.py [--threads 1] [--positions 64,1000] [--calls 300] [--rounds 5]
Writes benchmarks/results/kv_cache_dtype.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, median, write  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
DTYPES = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16)}


def attention_graph(elem: int, buffer: int) -> bytes:
    """One GroupQueryAttention node over a cache buffer of `buffer` positions, inputs and cache of type `elem`."""
    shapes = {"query": [1, 1, HEADS * HEAD_DIM], "key": [1, 1, KV_HEADS * HEAD_DIM],
              "value": [1, 1, KV_HEADS * HEAD_DIM], "past_key": [1, KV_HEADS, buffer, HEAD_DIM],
              "past_value": [1, KV_HEADS, buffer, HEAD_DIM]}  # fmt: skip
    inputs = [helper.make_tensor_value_info(name, elem, shape) for name, shape in shapes.items()]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1, 1]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]  # fmt: skip
    outputs = [helper.make_tensor_value_info(name, elem, None) for name in ("output", "present_key", "present_value")]
    node = helper.make_node("GroupQueryAttention", [i.name for i in inputs], [o.name for o in outputs],
                            domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS)  # fmt: skip
    graph = helper.make_graph([node], "attention", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def time_calls(dtype: str, position: int, args: argparse.Namespace) -> float:
    """Microseconds per call at `position` (the cache holds `position` tokens before this one)."""
    elem, np_type = DTYPES[dtype]
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    buffer = position + 1
    session = ort.InferenceSession(attention_graph(elem, buffer), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    cache = {n: ort.OrtValue.ortvalue_from_numpy(rng.random((1, KV_HEADS, buffer, HEAD_DIM)).astype(np_type))
             for n in ("key", "value")}  # fmt: skip
    binding = session.io_binding()
    for name, width in (("query", HEADS), ("key", KV_HEADS), ("value", KV_HEADS)):
        binding.bind_cpu_input(name, rng.random((1, 1, width * HEAD_DIM)).astype(np_type))
    binding.bind_cpu_input("seqlens_k", np.array([[position]], np.int32))
    binding.bind_cpu_input("total_sequence_length", np.array(position + 1, np.int32))
    for name in ("key", "value"):
        binding.bind_ortvalue_input(f"past_{name}", cache[name])
        binding.bind_ortvalue_output(f"present_{name}", cache[name])
    binding.bind_output("output")
    session.run_with_iobinding(binding)
    start = time.perf_counter()
    for _ in range(args.calls):
        session.run_with_iobinding(binding)
    return (time.perf_counter() - start) / args.calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--positions", default="64,1000", help="comma-separated cache lengths")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    positions = [int(p) for p in args.positions.split(",")]
    times: dict[str, dict[int, list[float]]] = {d: {p: [] for p in positions} for d in DTYPES}
    for _ in range(args.rounds):
        for position in positions:
            for dtype in DTYPES:
                times[dtype][position].append(time_calls(dtype, position, args))
    medians = {d: {p: median(t) for p, t in by_position.items()} for d, by_position in times.items()}
    fp32, fp16 = medians["fp32"], medians["fp16"]
    rows = [f"| {p} | {fp32[p]:.1f} | {fp16[p]:.1f} | {fp16[p] / fp32[p]:.2f}x |" for p in positions]
    markdown = (
        f"# GroupQueryAttention per call, fp32 against fp16 cache ({HEADS} query / {KV_HEADS} KV heads of {HEAD_DIM}, "
        f"{args.threads} thread(s), one token, cache bound in place, medians of {args.rounds} rounds of "
        f"{args.calls} calls)\n\n| position | fp32 us | fp16 us | fp16 / fp32 |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
    )  # fmt: skip
    write("kv_cache_dtype", {"machine": machine(), "args": vars(args), "us_per_call": medians, "runs": times}, markdown)


if __name__ == "__main__":
    main()
