"""`mode-edge export`: a trained MoDE run -> a bundle of per-component graphs, one domain pack per expert.

Stages, in order (each shown as a progress step):
    load       the run's record, its backbone and the selected experts, checked against each other
    transform  the model cut into graphs (export/graphs.py): embed, backbone blocks, expert blocks with gate, head
    export     each graph to fp32 ONNX (torch.onnx, dynamo) and/or ExecuTorch (.pte, XNNPACK; torchao quantizes
               before lowering, so a .pte is exported at its final precision)
    calibrate  --quant-method gptq: GPTQ blocks of every linear layer without source blocks, from its inputs while
               the model reads each expert's training text (export/calibrate.py)
    quantize   ONNX graphs to int8 / int4 / mixed with onnxruntime.quantization; a GGUF backbone's weights keep
               their own blocks, GPTQ's blocks are written as they are, the embedding is rounded once to 8 bits
               (export/source_blocks.py), and --quant mixed keeps some layers at 8 bits (export/mixed_precision.py)
    verify     every fp32 graph against its PyTorch module (max abs diff), quantized ones reported against fp32
    write      a tied embedding stored once; gates, tokenizer, per-expert pack.json, manifest.json with every
               file's bytes and sha256; the bundle appears under --out only when complete
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from mode_edge.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    GRAPH_SUFFIX,
    ONNX_OPTIMIZED_AHEAD,
    PACK_FORMAT,
    bundle_lock,
    records,
    write_manifest,
)
from mode_edge.config import ExportConfig
from mode_edge.errors import UserError
from mode_edge.export.accuracy_levels import CANDIDATES
from mode_edge.export.graphs import example_inputs, graph_layers, io_names, split
from mode_edge.files import as_plain_write, atomic_dir, require_absent, write_json
from mode_edge.integrity import KV_CACHE
from mode_edge.packs import expert_entry
from mode_edge.progress import console, stage_progress
from mode_edge.training.backbones import Backbone, check_backbone_context, load_backbone
from mode_edge.training.model import MoDEModel
from mode_edge.training.router import routing_tensors
from mode_edge.training.runs import check_same_blocks, load_run_experts, read_model_record


def check_run(run: Path, only: list[str] | None) -> dict:
    """The cheap checks of the run's record, before anything heavy loads."""
    record = read_model_record(run)
    if record.get("layout") is None:
        raise UserError(
            f"{run} is a {record.get('kind')} baseline run; export takes a MoDE run (`mode-edge train expert|compose`)"
        )
    unknown = [n for n in only or [] if n not in record["experts"]]
    if unknown:
        raise UserError(f"{run} has no expert named {', '.join(unknown)}; it has: {', '.join(record['experts'])}")
    return record


def load_model(run: Path, only: list[str] | None, context: int | None = None) -> tuple[Backbone, MoDEModel, dict]:
    """(backbone built for `context` tokens (None: its default), the run's MoDE model over it with the experts
    `only` (None: all), the run's record with "routers")."""
    record = check_run(run, only)
    backbone = load_backbone(record["base"]["spec"], context)
    loaded = load_run_experts(run, backbone, only)
    layout = check_same_blocks(loaded)
    model = MoDEModel(backbone.decoder, layout, {e.name: e.expert for e in loaded}).eval()
    return backbone, model, {**record, "routers": {e.name: e.router for e in loaded}}  # routers: checked on load


def graph_files(rel: str, fmt: str, shared: set[str] = frozenset()) -> list[str]:
    """A graph's files in one format; an ONNX graph in `shared` keeps its weights in another graph's file."""
    if fmt != "onnx":
        return [rel + ".pte"]
    return [rel + ".onnx"] + [rel + ".onnx.data"] * (rel not in shared)


def max_abs_diff(graph: torch.nn.Module, run_graph, inputs: tuple) -> float:
    with torch.no_grad():
        ref = graph(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = run_graph([t.numpy() for t in inputs])
    return max(float(np.abs(r.float().numpy() - g).max()) for r, g in zip(ref, got))


def export_graph(rel: str, graph, fmt: str, dcfg, work: Path, fp32: Path, cfg: ExportConfig, progress,
                 source=None, planned: dict | None = None, compute: dict | None = None,
                 optimized: set[str] | None = None) -> dict[str, int]:  # fmt: skip
    """One graph in one format at the bundle's precision; an ONNX graph passes through fp32 first (kept in `fp32`
    for the verify stage), a .pte's planned activation bytes go to `planned`, an ONNX graph's measured compute type
    (--accuracy-level auto) to `compute`, and REL to `optimized` when its ONNX graph is written optimized by
    onnxruntime (`optimizes_at_export`; given `optimized`). Returns the count of weights written from the source's
    blocks, by block type."""
    progress.show(f"export {rel} ({fmt})")
    if fmt == "executorch":
        from mode_edge.export.executorch_graphs import export_pte

        context = pte_limits(cfg, dcfg)["context"]
        counts: dict[str, int] = {}
        nbytes = export_pte(graph, dcfg, work / (rel + ".pte"), cfg.quant, cfg.block_size, context, source, counts)
        if planned is not None:
            planned[rel] = nbytes
        return counts
    from mode_edge.export.onnx_graphs import export_onnx, quantize_onnx
    from mode_edge.export.optimize_ahead import optimize_ahead

    target = work / (rel + ".onnx") if cfg.quant == "fp32" else fp32 / (rel + ".onnx")
    export_onnx(graph, dcfg, target)
    counts: dict[str, int] = {}
    if cfg.quant != "fp32":
        progress.show(f"quantize {rel} ({cfg.quant})")
        measure = measure_inputs(graph, dcfg) if cfg.accuracy_level == "auto" else None
        counts, chosen = quantize_onnx(target, work / (rel + ".onnx"), cfg.quant, cfg.block_size,
                                       cfg.accuracy_level, source, cfg.quant_method, measure)  # fmt: skip
        if chosen is not None and compute is not None:
            compute[rel] = chosen
    if optimized is not None and optimizes_at_export(rel):
        why = optimize_ahead(work / (rel + ".onnx"))
        if why is None:
            optimized.add(rel)
        else:  # (it still loads, optimized by the runtime: only an expert switch takes longer)
            console.print(f"{rel} is written as exported, not optimized for onnxruntime: {why}")
    return counts


def optimizes_at_export(rel: str) -> bool:
    """Whether the ONNX graph of component REL is offered to onnxruntime's optimizer at export
    (export/optimize_ahead.py): the experts' blocks, whose sessions an expert switch creates. (The base's graphs
    load once; optimized, their fp16 scales would be stored as the fp32 the optimizer folds them to.)"""
    return rel.startswith("experts/")


def measure_inputs(graph, dcfg, seed: int = 0) -> tuple[list[dict], dict]:
    """What --accuracy-level auto measures a graph on (export/accuracy_levels.py): two prefills of 16 tokens after
    16 cached positions and one decode step after 64, standard-normal hidden states and caches (the block's norm
    shapes them as it does real ones), seeded; as name -> array feeds."""
    names = io_names(graph)[0]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        prefill = [example_inputs(graph, dcfg, tokens=16, past=16) for _ in range(2)]
        decode = example_inputs(graph, dcfg, tokens=1, past=64)
    feed = lambda inputs: {n: t.numpy() for n, t in zip(names, inputs)}  # noqa: E731
    return [feed(p) for p in prefill], feed(decode)


def pte_limits(cfg: ExportConfig, dcfg) -> dict[str, int | str]:
    """What the .pte graphs take (the manifest's and every pack's "executorch"): tokens a call, cached positions, and
    "longrope_factors": "long" where they turn by LongRoPE's long factors (`export --context` past the original
    context): a .pte computes its rotary angles inside, so a pack of the other factor set must not install."""
    from mode_edge.export.executorch_graphs import PTE_TOKENS_PER_CALL
    from mode_edge.rope import longrope_set

    limits = {"tokens_per_call": PTE_TOKENS_PER_CALL, "context": min(cfg.pte_context, dcfg.max_seq_len)}
    if longrope_set(dcfg.rope_scaling) == "long":
        limits["longrope_factors"] = "long"
    return limits


def source_blocks(backbone: Backbone, model: MoDEModel, cfg: ExportConfig, progress, corpora: dict[str, Path],
                  fallback: bool = False) -> tuple[object, str]:  # fmt: skip
    """Where the quantized ONNX bundle's weights come from when not rounded by onnxruntime's quantizer, asked in
    order: the blocks of the GGUF file the backbone was loaded from (exactly the trained weights; the .pte graphs
    take the 4-bit ones, export/executorch_graphs.SourceBlockLinear); with --quant
    mixed, the 8-bit blocks of the layers that get more bits (export/mixed_precision.py); with calibration
    `corpora` ({expert: corpus}, --quant-method gptq), GPTQ's blocks of every other linear layer
    (export/calibrate.py); the embedding rounded once to 8 bits (for the embed graph and a tied head alike). None
    for fp32 bundles. Returns (the source, the rounding method in the end): with `fallback` (gptq
    chosen by --quant-method auto), a calibration that fails (an unreadable or too small corpus) falls back to rtn,
    said in one line."""
    if cfg.quant == "fp32":
        return None, cfg.quant_method
    from mode_edge.export.source_blocks import EmbeddingBlocks, FirstOf, SourceBlocks
    from mode_edge.training.backbones import resolve_spec

    source_level, embedding_level = cfg.base_levels()
    embedding = EmbeddingBlocks(backbone.decoder.embed_tokens.weight.detach().numpy(), embedding_level)
    gguf = None
    if not cfg.source_blocks and (backbone.spec == "tiny" or resolve_spec(backbone.spec)[1] is None):
        console.print("note: --requantize-base changes nothing here: the backbone was not loaded from a GGUF file, so "
                      "it has no blocks to keep and is rounded either way")  # fmt: skip
    if cfg.source_blocks and backbone.spec != "tiny":
        directory, gguf_file = resolve_spec(backbone.spec)
        if gguf_file is not None:
            gguf = SourceBlocks(directory / gguf_file, source_level)
            if gguf.other_types:
                console.print(f"{gguf_file}: weights stored as {', '.join(sorted(gguf.other_types))} are "
                              f"dequantized and rounded again to {cfg.quant}; Q4_0, Q4_1 and Q8_0 weights are "
                              f"written from their own blocks")  # fmt: skip
    more_bits = None
    if cfg.quant == "mixed":
        from mode_edge.export.mixed_precision import MoreBits

        more_bits = MoreBits(model, cfg.accuracy_level)
    calibrated, method = None, cfg.quant_method
    if corpora:
        from mode_edge.export.calibrate import calibrate, calibration_shape, calibration_windows

        windows, tokens = calibration_shape(backbone.decoder.cfg.max_seq_len)
        progress.show(f"calibrate on {windows} windows of {tokens} tokens per expert")
        in_gguf = (lambda w: gguf.find(w) is not None) if gguf is not None else (lambda w: False)
        written = (lambda w: in_gguf(w) or more_bits.holds(w)) if more_bits is not None else in_gguf
        level = CANDIDATES[0] if cfg.accuracy_level == "auto" else cfg.accuracy_level  # auto: chosen per graph after
        try:
            texts = {n: calibration_windows(c, backbone.tokenizer, windows, tokens) for n, c in corpora.items()}
            calibrated = calibrate(model, texts, level, skip=written, progress=progress)
            if fallback:  # what auto chose, said as its fallbacks are
                on = "--calibration-data" if cfg.calibration_data else "each expert's training text"
                console.print(f"--quant-method auto: the experts' 4-bit weights are calibrated by GPTQ on {on}")
        except UserError as e:
            if not fallback:
                raise
            console.print(f"--quant-method auto: the experts are rounded to nearest, GPTQ could not calibrate: {e}")
            method = "rtn"
    return FirstOf(gguf, more_bits, calibrated, embedding), method


def resolve_quant_method(run: Path, record: dict, cfg: ExportConfig) -> tuple[ExportConfig, dict[str, Path]]:
    """cfg with --quant-method auto made concrete (gptq if it can run, else rtn, said in one line), and the corpus
    each expert is calibrated on ({} unless gptq). Raises UserError when an explicit gptq finds a text gone."""
    if cfg.quant not in ("int4", "mixed"):
        return dataclasses.replace(cfg, quant_method="rtn"), {}
    if cfg.quant_method == "gptq":
        return cfg, calibration_texts(run, record, cfg)
    if cfg.quant_method == "kquant" and "executorch" in cfg.formats:  # (ExecuTorch alone is refused by ExportConfig)
        console.print("--quant-method kquant rounds the ONNX graphs' experts; the .pte graphs' are rounded to "
                      "nearest by torchao")  # fmt: skip
    if cfg.quant_method != "auto":
        return cfg, {}
    if cfg.block_size != 32:
        console.print(f"--quant-method auto: the experts are rounded to nearest (GPTQ writes blocks of 32, not "
                      f"{cfg.block_size})")  # fmt: skip
        return dataclasses.replace(cfg, quant_method="rtn"), {}
    try:
        corpora = calibration_texts(run, record, cfg)
    except UserError as e:
        console.print(f"--quant-method auto: the experts are rounded to nearest, not by GPTQ: {e}")
        return dataclasses.replace(cfg, quant_method="rtn"), {}
    return dataclasses.replace(cfg, quant_method="gptq"), corpora


def calibration_texts(run: Path, record: dict, cfg: ExportConfig) -> dict[str, Path]:
    """The corpus each exported expert is calibrated on: --calibration-data, else its own training text as its
    record (RUN/experts/NAME/expert.json) names it. Raises UserError when one is gone."""
    from mode_edge.export.calibrate import training_text
    from mode_edge.files import read_json

    override = Path(cfg.calibration_data) if cfg.calibration_data else None
    fix = "restore the run folder or retrain the expert"
    return {
        name: training_text(read_json(Path(run) / "experts" / name / "expert.json", fix), override)
        for name in cfg.experts or record["experts"]
    }


def export_bundle(run: Path, out: Path, cfg: ExportConfig) -> dict:
    """Export RUN into the bundle OUT; returns the manifest."""
    started = time.perf_counter()
    record = check_run(run, cfg.experts)
    check_backbone_context(record["base"]["spec"], cfg.context)
    auto = cfg.quant_method == "auto"
    cfg, corpora = resolve_quant_method(run, record, cfg)  # before the progress starts: a missing corpus is one line
    if not cfg.overwrite:
        require_absent(out)
    with stage_progress("export") as progress:
        progress.show("load")
        backbone, model, record = load_model(run, cfg.experts, cfg.context)
        routers = record["routers"]
        graphs = {fmt: split(model, KV_CACHE[fmt]) for fmt in cfg.formats}  # each format's cache interface
        names = list(graphs[cfg.formats[0]])
        dcfg = backbone.decoder.cfg
        progress.show("load the source's blocks")
        source, method = source_blocks(backbone, model, cfg, progress, corpora, fallback=auto)
        cfg = dataclasses.replace(cfg, quant_method=method)
        exact: dict[str, dict[str, dict[str, int]]] = {}  # format -> graph -> block type -> weights
        steps = len(names) * (len(cfg.formats) + 1)
        progress.start(steps)
        verify: dict[str, dict] = {}
        planned: dict[str, int] = {}
        compute: dict[str, dict] = {}
        optimized: set[str] = set()
        # Over an existing bundle, hold its lock so that no install or uninstall runs into the swap.
        exists = Path(out).is_dir() and (Path(out) / "manifest.json").is_file()
        lock = bundle_lock(out) if exists else contextlib.nullcontext()
        with lock, atomic_dir(out, overwrite=cfg.overwrite) as work:
            fp32 = work / ".fp32"
            for rel in names:
                for fmt in cfg.formats:
                    graph = graphs[fmt][rel]
                    counts = export_graph(rel, graph, fmt, dcfg, work, fp32, cfg, progress, source, planned, compute,
                                          optimized)  # fmt: skip
                    if counts:
                        exact.setdefault(fmt, {})[rel] = counts
                    progress.advance()
                progress.show(f"verify {rel}")
                verify[rel] = verify_graph(graphs, dcfg, work, fp32, rel, cfg, rel in optimized)
                progress.advance()
            shared = share_embedding(work, dcfg, cfg, progress)
            if shared:  # the embed graph now reads the head's weights file: check it again
                verify["base/embed"] = verify_graph(graphs, dcfg, work, fp32, "base/embed", cfg)
            shutil.rmtree(fp32, ignore_errors=True)
            progress.show("write")
            # The record says whether the base *is* its GGUF's blocks, not only whether they were looked for.
            from mode_edge.export.source_blocks import BLOCK_BYTES  # (the GGUF block types)

            written = {kind for graphs_counts in exact.values() for counts in graphs_counts.values() for kind in counts}
            cfg = dataclasses.replace(cfg, source_blocks=bool(written & set(BLOCK_BYTES)))
            manifest = write_bundle(work, backbone, model, record, graphs, cfg, verify, routers, shared, compute,
                                    optimized)  # fmt: skip
            wall = time.perf_counter() - started
            manifest["export"]["wall_s"] = round(wall, 1)
            if exact.get("onnx"):
                manifest["export"]["block_sources"] = exact["onnx"]
            if exact.get("executorch"):
                manifest["export"]["pte_block_sources"] = exact["executorch"]
            if planned:
                manifest["export"]["pte_planned_bytes"] = planned
            write_manifest(work, manifest)
    console.print(f"exported {run} -> {out} ({cfg.quant}, {', '.join(cfg.formats)}) in {wall:.0f} s")
    return manifest


def share_embedding(work: Path, dcfg, cfg: ExportConfig, progress) -> set[str]:
    """A tied model's ONNX embedding stored once, in the head's weights file, where both hold the same blocks
    (export/onnx_graphs.share_tied_embedding); returns the graphs whose own weights file is gone."""
    if "onnx" not in cfg.formats or cfg.quant == "fp32" or not dcfg.tie_embeddings:
        return set()
    from mode_edge.export.onnx_graphs import share_tied_embedding

    progress.show("write the tied embedding once")
    saved = share_tied_embedding(work / "base/embed.onnx", work / "base/head.onnx")
    return {"base/embed"} if saved else set()


def verify_graph(graphs: dict[str, dict], dcfg, work: Path, fp32: Path, rel: str, cfg: ExportConfig,
                 optimized: bool = False) -> dict:  # fmt: skip
    """Max abs diff of each format's exported graph REL against PyTorch (`graphs`: format -> component -> module) on
    a prefill after a short cache; `optimized`: its ONNX graph was optimized at export, and loads as the runtimes
    load it, with optimization off."""
    from mode_edge.runtimes.backends import load_graph

    out = {}
    for fmt in cfg.formats:
        graph = graphs[fmt][rel]
        inputs = example_inputs(graph, dcfg)
        path = work / (rel + GRAPH_SUFFIX[fmt])
        out[fmt] = max_abs_diff(graph, load_graph(path, threads=1, optimized_ahead=optimized and fmt == "onnx"), inputs)
        if fmt == "onnx" and cfg.quant != "fp32":
            out["onnx-fp32"] = max_abs_diff(graph, load_graph(fp32 / (rel + ".onnx"), threads=1), inputs)
    return out


def write_bundle(work: Path, backbone: Backbone, model: MoDEModel, record: dict, graphs, cfg, verify,
                 routers: dict[str, dict | None], shared: set[str] = frozenset(),
                 compute: dict[str, dict] | None = None, optimized: set[str] = frozenset()) -> dict:  # fmt: skip
    """The bundle manifest (and each expert's pack.json, written here) for the graphs exported into WORK (`graphs`:
    format -> component -> module); `compute`: each ONNX graph's measured compute type (--accuracy-level auto),
    recorded on its component; `optimized`: the components whose ONNX graph was written optimized by onnxruntime
    (their `onnx_optimized`)."""
    fingerprint = record["base"]["fingerprint"]
    limits = {"executorch": pte_limits(cfg, backbone.decoder.cfg)} if "executorch" in cfg.formats else {}
    backbone.tokenizer.save(work / "tokenizer.json")
    components = {}
    for rel in graphs[cfg.formats[0]]:
        io = {fmt: io_names(graphs[fmt][rel]) for fmt in cfg.formats}
        components[rel] = {
            "layers": graph_layers(graphs[cfg.formats[0]][rel]),
            "inputs": {fmt: names[0] for fmt, names in io.items()},
            "outputs": {fmt: names[1] for fmt, names in io.items()},
            **{fmt: rel + GRAPH_SUFFIX[fmt] for fmt in cfg.formats},
            **({"onnx_weights_in": "base/head.onnx.data"} if rel in shared else {}),
            **({"onnx_compute": compute[rel]} if compute and rel in compute else {}),
            **({"onnx_optimized": ONNX_OPTIMIZED_AHEAD} if rel in optimized else {}),
        }  # fmt: skip
    experts = {}
    for name in model.experts:
        folder = work / "experts" / name
        save_file(routing_tensors(model.experts[name], routers[name]), str(folder / "gate.safetensors"))
        as_plain_write(folder / "gate.safetensors")
        own = {k.split("/", 2)[2]: v for k, v in components.items() if k.startswith(f"experts/{name}/")}
        files = ["gate.safetensors"] + [f for c in own for fmt in cfg.formats for f in graph_files(c, fmt)]
        pack = {
            "format": PACK_FORMAT, "format_version": BUNDLE_VERSION, "name": name, "version": 1,
            "base_fingerprint": fingerprint, "quantization": quant_record(cfg), "formats": list(cfg.formats),
            "kv_cache": {fmt: KV_CACHE[fmt] for fmt in cfg.formats}, **limits,
            "parameters": sum(p.numel() for p in model.experts[name].parameters()),
            "components": {c: {**v, **{f: c + GRAPH_SUFFIX[f] for f in cfg.formats}} for c, v in own.items()},
            "gate": "gate.safetensors", "files": records(folder, files),
        }  # fmt: skip
        write_json(folder / "pack.json", pack)
        experts[name] = expert_entry(folder, pack)
    base_files = ["tokenizer.json"] + [
        f for c in components if c.startswith("base/") for fmt in cfg.formats for f in graph_files(c, fmt, shared)
    ]
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "base": {
            "spec": record["base"]["spec"],
            "fingerprint": fingerprint,
            "decoder": backbone.decoder.cfg.to_dict(),
            "layout": record["layout"],
            "block_ranges": model.ranges,
        },  # fmt: skip
        "tokenizer": {"file": "tokenizer.json", "eos_id": backbone.tokenizer.eos_id,
                      "prefix_ids": list(backbone.tokenizer.prefix_ids),
                      **chat_entry(backbone.tokenizer)},  # fmt: skip
        "quantization": quant_record(cfg),
        "formats": list(cfg.formats),
        "kv_cache": {fmt: KV_CACHE[fmt] for fmt in cfg.formats},
        **limits,
        "components": {k: v for k, v in components.items() if k.startswith("base/")},
        "files": records(work, base_files),
        "experts": experts,
        "export": {"source": str(run_label(record)), "verify_max_abs_diff": verify},
    }


def chat_entry(tokenizer) -> dict:
    """{"chat": the chat template record (mode_edge/chat.chat_record)} for a tokenizer with a template, else {}."""
    from mode_edge.chat import chat_record

    chat = chat_record(tokenizer.chat_template, tokenizer.special_tokens, tokenizer)
    return {"chat": chat} if chat else {}


def quant_record(cfg: ExportConfig) -> dict:
    if cfg.quant == "fp32":
        return {"scheme": "fp32"}
    method = {"method": cfg.quant_method} if cfg.quant in ("int4", "mixed") else {}
    source, embedding = cfg.base_levels()
    levels = {"source_blocks": source, "embedding": embedding} if cfg.source_blocks else {"embedding": embedding}
    return {"scheme": cfg.quant, "block_size": cfg.block_size, "accuracy_level": cfg.accuracy_level,
            "base_accuracy_level": cfg.base_accuracy_level, "source_blocks": cfg.source_blocks,
            "base_levels": levels, **method}


def run_label(record: dict) -> str:
    return f"{record.get('kind')} run, experts {', '.join(record.get('experts', [])) or 'none'}"
