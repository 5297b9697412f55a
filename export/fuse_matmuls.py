"""Parallel MatMulNBits merged into one: the q, k and v projections (and gate and up) read the same input, so one
MatMulNBits over their weights stacked along N computes all of them in one kernel call, followed by a Split.

A decode step of a small model is dominated by per-node costs, not arithmetic: onnxruntime runs a SmolLM2 layer as
some 14 nodes (7 MatMulNBits), each a few microseconds of dispatch and a thread-pool wake-up. Merging the
projections that share an input gives 4 MatMulNBits a layer, each with a wider N (which the blocked kernels also
use better). Where a weight's exact blocks carry per-block offsets (GGUF Q4_1, export/source_blocks.py: y =
MatMulNBits(x) + (block sums of x) @ O), the offset products of the merged weights are merged as well (their block
sums are one tensor already), and the Split comes after the sum. onnxruntime-genai's model builder packs q/k/v
and gate/up the same way when it writes a model.

Weights are stacked at export (numpy) when they are initializers; computed ones (an fp16 scale behind a Cast, an
offset computed from scales and minimums) are stacked by a Concat node, which onnxruntime folds when the session
loads. The merged node computes exactly what its parts did: each output row of a MatMulNBits depends only on its own
weights, scales and zero points.

Where the merged q/k/v output goes straight into GroupQueryAttention, the Split goes too (`pack_qkv`): the operator
takes q, k and v packed in one tensor, as onnxruntime-genai's builder feeds it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MERGED_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")
"""What the MatMulNBits of a group must share (N is summed)."""


def fuse_parallel_matmuls(model: onnx.ModelProto) -> int:
    """Merge, in place, every group of 2 or more MatMulNBits that read the same input with the same attributes
    (MERGED_ATTRIBUTES, and the same optional inputs: zero points, no g_idx or bias); returns the MatMulNBits
    nodes removed. The merged outputs keep their names (a Split writes them), so the rest of the graph is unchanged."""
    nodes = list(model.graph.node)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    groups: dict[tuple, list] = {}
    for n in nodes:
        if n.op_type == "MatMulNBits" and len(n.input) in (3, 4):
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            key = (n.input[0], len(n.input), *(attrs.get(a, 0) for a in MERGED_ATTRIBUTES))
            groups.setdefault(key, []).append(n)
    removed, new_inits, drop = 0, [], set()
    for g, members in enumerate(groups.values()):
        if len(members) < 2:
            continue
        first = members[0]
        prefix = f"{first.name or 'matmul_nbits'}_merged{g}"
        ns = [_attr(m, "N") for m in members]
        stacked = [_stack([m.input[j] for m in members], f"{prefix}_in{j}", inits, nodes, new_inits, drop,
                          flat=j >= 2) for j in range(1, len(first.input))]  # fmt: skip
        merged = helper.make_node("MatMulNBits", [first.input[0], *stacked], [prefix + "_out"], name=prefix,
                                  domain=first.domain, **{a.name: helper.get_attribute_value(a) for a in
                                                         first.attribute if a.name != "N"}, N=sum(ns))  # fmt: skip
        offsets = _offset_adds(members, producers, consumers)
        split_sizes = prefix + "_split"
        new_inits.append(numpy_helper.from_array(np.array(ns, np.int64), split_sizes))
        if offsets is None:  # Split straight into the members' outputs
            tail = [helper.make_node("Split", [merged.output[0], split_sizes], [m.output[0] for m in members],
                                     axis=-1)]  # fmt: skip
        else:  # merged offset product added once, then split into the Adds' outputs
            sums, adds, products = offsets
            offset_weights = _stack([p.input[1] for p in products], f"{prefix}_offsets", inits, nodes, new_inits, drop,
                                    axis=-1)  # fmt: skip
            tail = [helper.make_node("MatMul", [sums, offset_weights], [prefix + "_offset_product"]),
                    helper.make_node("Add", [merged.output[0], prefix + "_offset_product"], [prefix + "_sum"]),
                    helper.make_node("Split", [prefix + "_sum", split_sizes], [a.output[0] for a in adds],
                                     axis=-1)]  # fmt: skip
            for n in (*adds, *products):
                nodes.remove(n)
        at = nodes.index(first)
        for m in members:
            nodes.remove(m)
        nodes[at:at] = [merged, *tail]
        removed += len(members) - 1
    if not removed:
        return 0
    still_used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name not in drop or i.name in still_used]
    del model.graph.node[:]
    model.graph.node.extend(_sorted(nodes, {i.name for i in kept} | {i.name for i in new_inits}, model))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits)
    return removed


def pack_qkv(model: onnx.ModelProto) -> int:
    """Feed, in place, each GroupQueryAttention whose query, key and value are the three outputs of one Split along
    the last axis (the merged q/k/v projection, in that order, read by nothing else) with the Split's input: its
    packed-QKV form, (B, T, (num_heads + 2 kv_num_heads) * head_size) with the key and value inputs left empty,
    which the operator splits itself. Subgraphs are not searched (the exported graphs have none). Returns the Split
    nodes removed. Measured on the SmolLM2 int4 bundle with one expert, the base rounded again (2 threads, 3
    interleaved in-process runs each): a decode step 5.92-6.63 -> 5.53-5.59 ms (36 Splits fewer a token); no
    change measured on the exact base, whose fp32 kernels dominate."""
    nodes = list(model.graph.node)
    producers = {o: n for n in nodes for o in n.output}
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in model.graph.output}
    removed = []
    for n in nodes:
        if n.op_type != "GroupQueryAttention" or len(n.input) < 3:
            continue
        split = producers.get(n.input[0])
        if (split is None or split.op_type != "Split" or list(split.output) != list(n.input[:3])
                or _attr(split, "axis", 0) not in (-1, 2)
                or any(readers.get(o) != 1 or o in outputs for o in split.output)):  # fmt: skip
            continue
        n.input[0], n.input[1], n.input[2] = split.input[0], "", ""
        removed.append(split)
    if removed:
        kept = [n for n in nodes if all(n is not r for r in removed)]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        used = {i for n in kept for i in n.input}
        sizes = {r.input[1] for r in removed if len(r.input) > 1} - used  # the sizes, unless read elsewhere
        inits = [i for i in model.graph.initializer if i.name not in sizes]
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
    return len(removed)


def _attr(node, name: str, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _stack(names: list[str], out: str, inits: dict, nodes: list, new_inits: list, drop: set, axis: int = 0,
           flat: bool = False) -> str:  # fmt: skip
    """One tensor of `names` stacked along `axis` (N: 0 for MatMulNBits' weights, scales and zero points, -1 for
    offsets (K/32, N)): at export when all are initializers (and the parts are dropped where nothing else reads
    them), else by a Concat node that onnxruntime folds at load. `flat`: each part flattened first (scales and zero
    points, which MatMulNBits takes flat or as (N, blocks) rows: onnxruntime's quantizer writes them 2-D, the
    exporter's blocks flat, and a merge may meet both)."""
    if all(n in inits for n in names):
        arrays = [numpy_helper.to_array(inits[n]) for n in names]
        arrays = [a.reshape(-1) for a in arrays] if flat else arrays
        new_inits.append(numpy_helper.from_array(np.concatenate(arrays, axis=axis), out))
        drop.update(names)
        return out
    if flat:
        shape = f"{out}_flat_shape"
        new_inits.append(numpy_helper.from_array(np.array([-1], np.int64), shape))
        nodes += [helper.make_node("Reshape", [n, shape], [f"{out}_part{i}"]) for i, n in enumerate(names)]
        names = [f"{out}_part{i}" for i in range(len(names))]
    nodes.append(helper.make_node("Concat", names, [out], axis=axis))
    return out


def _offset_adds(members: list, producers: dict, consumers: dict):
    """For members whose only consumer is Add(product, MatMul(S, O_i)) with one S for all (the exact offset path):
    (S, the Adds, the offset MatMuls), in member order; else None."""
    adds, products = [], []
    for m in members:
        users = consumers.get(m.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or list(users[0].input).index(m.output[0]) != 0:
            return None
        other = producers.get(users[0].input[1])
        if other is None or other.op_type != "MatMul":
            return None
        adds.append(users[0])
        products.append(other)
    sums = {p.input[0] for p in products}
    if len(sums) != 1 or any(len(consumers.get(p.output[0], [])) != 1 for p in products):
        return None
    return sums.pop(), adds, products


def _sorted(nodes: list, constants: set[str], model: onnx.ModelProto) -> list:
    """`nodes` in an order where each runs after the nodes it reads, as close to the given order as that allows
    (Kahn's algorithm, the earliest ready node first): a merged node sits where its first part was, and what it
    reads (the last part's scales, a Concat) may come later in the list."""
    import heapq

    available = constants | {i.name for i in model.graph.input} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        deps = {producer[i] for i in n.input if i not in available and i in producer}
        missing = [i for i in n.input if i not in available and i not in producer]
        if missing:
            raise ValueError(f"node {n.name or n.op_type} reads {missing[0]}, which nothing produces")
        waiting[k] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(k)
    ready = [k for k in range(len(nodes)) if waiting[k] == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        k = heapq.heappop(ready)
        ordered.append(nodes[k])
        for r in readers.get(k, []):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(ordered) != len(nodes):
        raise ValueError("the merged graph has a cycle")
    return ordered
