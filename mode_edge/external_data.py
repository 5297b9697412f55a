"""The external-data paths inside a pack's ONNX graphs: they must name files of the pack.

An .onnx graph keeps its weights in a file beside it and names that file in each tensor's external_data
"location". A hostile pack could name `../../base/block0.onnx.data` or `/etc/passwd`; onnxruntime itself refuses
paths that leave the graph's folder in recent versions, but the check belongs before any reader touches the file.
Uses the `onnx` package to parse the graph (the weights are not read).
"""

from __future__ import annotations

from mode_edge.errors import UserError

MAX_GRAPH_BYTES = 64 << 20
"""An .onnx graph file of a pack holds no weights (they are in its .onnx.data); a larger one is not ours."""


def graph_tensors(model):
    """Every TensorProto of an ONNX model that may keep its data outside the file: initializers (sparse ones too),
    the tensors of node attributes, in the graph, its subgraphs and its functions."""

    def nodes_tensors(nodes):
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
                for sparse in attr.sparse_tensors:
                    yield from (sparse.values, sparse.indices)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from graph_tensors_of(sub)

    def graph_tensors_of(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from nodes_tensors(graph.node)

    yield from graph_tensors_of(model.graph)
    for function in model.functions:
        yield from nodes_tensors(function.node)


def check_external_data(pack: dict, read, size, what: str) -> None:
    """Every weight an .onnx graph of the pack keeps outside itself must be a file the pack lists: a graph whose
    external data points to `../../base/...` or `/etc/passwd` is refused, before onnxruntime would read it.
    read(rel) -> bytes and size(rel) -> int give a listed file (from the archive, or from the staging folder once
    extracted and checked by sha256). Raises UserError."""
    import onnx

    for rel in [r for r in pack["files"] if r.endswith(".onnx")]:
        if size(rel) > MAX_GRAPH_BYTES:
            raise UserError(f"{what}: graph {rel} is {size(rel)} bytes, too large for a graph file (its weights "
                            f"belong in {rel}.data); refused, export it again")  # fmt: skip
        try:
            model = onnx.load_model_from_string(read(rel))
        except Exception as e:  # noqa: BLE001 - any parser failure of a hostile file is one refusal line
            raise UserError(f"{what}: {rel} is not a readable ONNX graph ({str(e)[:120]}); refused, download or "
                            f"make the pack again") from None  # fmt: skip
        folder = rel.rpartition("/")[0]
        for tensor in graph_tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            location = location if isinstance(location, str) else repr(location)  # not UTF-8: protobuf gives bytes
            target = f"{folder}/{location}" if folder else location
            escapes = location.startswith("/") or "\\" in location or ".." in location.split("/")
            if escapes or target not in pack["files"]:
                raise UserError(f"{what}: graph {rel} reads weights from {location!r}, which is not a file of the "
                                f"pack; refused (a hostile or broken pack: get it from its publisher)")  # fmt: skip
