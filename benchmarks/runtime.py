"""Device-runtime benchmark on the host CPU: the split runtime against a fused graph, memory with many packs
installed, what loading an expert adds, and how long an expert switch takes.

    python benchmarks/runtime.py --bundle runs/demo/bundle --model runs/demo/composed

1. Decode tokens/s of the split runtime with one expert against one fused ONNX graph of the same composed model
   (embed, blocks, that expert, gate, head in one graph; exported and quantized here like the bundle), interleaved.
2. Peak RSS generating with 1 expert selected when 8 are installed (7 copies of it under other names) against 1
   selected of 1 installed, each in a fresh process.
3. RSS added by loading an expert against its weight bytes on disk.
4. An expert switch with the base warm (evict one, load another) against reading that expert's files.
Every measurement runs in a worker process without torch (the parent imports torch only to build the reference).
Writes benchmarks/results/runtime.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PROMPT = list(range(10, 74))  # 64 token ids (valid in any vocabulary here): a fixed prefill for both runtimes


def worker_decode(bundle: str, fused: str, expert: str, new_tokens: int, repeats: int, threads: int,
                  default_options: bool = False) -> dict:
    """Decode tok/s of the split runtime and of the fused graph with the runtime's session options, interleaved,
    on the global thread pool `mode-edge run` uses; with `default_options`, of the fused graph alone with
    onnxruntime's default options (a spinning pool of its own, which cannot share a process with the global one)."""
    import numpy as np
    import onnxruntime as ort

    from mode_edge.integrity import POSITION_INPUTS
    from mode_edge.runtimes.backends import OnnxGraph, use_global_thread_pool
    from mode_edge.runtimes.session import Session

    if not default_options:
        use_global_thread_pool(threads)
    graph = OnnxGraph(Path(fused), threads)  # the runtime's session options
    if default_options:
        options = ort.SessionOptions()  # onnxruntime's defaults (spinning threads), the best case for one graph
        options.intra_op_num_threads = threads
        graph.session = ort.InferenceSession(fused, options, providers=["CPUExecutionProvider"])
    session = Session(Path(bundle), threads=threads)
    session.select([expert])
    engine = session.engine
    n_layers = (len(graph.inputs) - 1 - len(POSITION_INPUTS)) // 2

    def split_run():
        cache = engine.new_cache(len(PROMPT) + new_tokens)
        logits = engine.forward(np.array([PROMPT], dtype=np.int64), cache)  # every row, as the fused graph does
        t = time.perf_counter()
        for _ in range(new_tokens):
            logits = engine.forward(np.array([[int(logits[0, -1].argmax())]], dtype=np.int64), cache)
        return new_tokens / (time.perf_counter() - t)

    def fused_run():
        cache = engine.new_cache(len(PROMPT) + new_tokens)  # its buffers written in place, as the engine's

        def step(ids):
            positions = engine.positions(cache, ids.shape[1])
            kv = cache.buffers("fused", n_layers, *engine.kv_shape)
            (logits,) = graph.run_in_place([ids, *positions], kv, cache.bindings, "fused")
            cache.pos += ids.shape[1]
            return logits

        logits = step(np.array([PROMPT], dtype=np.int64))
        t = time.perf_counter()
        for _ in range(new_tokens):
            logits = step(np.array([[int(logits[0, -1].argmax())]], dtype=np.int64))
        return new_tokens / (time.perf_counter() - t)

    if default_options:
        fused_run()  # warm-up
        return {"fused_default_options_tps": [fused_run() for _ in range(repeats)]}
    split_run(), fused_run()  # warm-up
    split, fused_tps = [], []
    for _ in range(repeats):
        split.append(split_run())
        fused_tps.append(fused_run())
    return {"split_tps": split, "fused_tps": fused_tps}


def worker_peak(bundle: str, expert: str, threads: int) -> dict:
    from mode_edge.runtimes.backends import use_global_thread_pool
    from mode_edge.runtimes.engine import Sampling
    from mode_edge.runtimes.run import run

    use_global_thread_pool(threads)  # as `mode-edge run`
    _, summary, _ = run(Path(bundle), [expert], "def main():\n    ", 32, Sampling(), threads=threads)
    return {"peak_rss_mb": summary["memory"]["peak_rss_mb"], "phases": summary["memory"]["phases"]}


def worker_switch(bundle: str, a: str, b: str, threads: int, repeats: int) -> dict:
    from mode_edge.bundle import expert_folder, read_bundle
    from mode_edge.runtimes.backends import use_global_thread_pool
    from mode_edge.runtimes.profiler import rss_pss
    from mode_edge.runtimes.session import MB, Session

    use_global_thread_pool(threads)  # as `mode-edge run`
    probe = Session(Path(bundle), threads=threads, verify=False)
    budget = (probe.base_bytes + 1.5 * probe.expert_bytes(a)) / MB  # room for one expert: every switch evicts
    del probe
    session = Session(Path(bundle), threads=threads, budget_mb=budget)
    before = rss_pss()[0]
    session.select([a])
    added = rss_pss()[0] - before
    switch, read = [], []
    folder = expert_folder(bundle, read_bundle(bundle), b)
    files = [folder / rel for rel in json.loads((folder / "pack.json").read_text())["files"]]
    for i in range(repeats):
        t = time.perf_counter()
        session.select([b if i % 2 == 0 else a])
        switch.append(time.perf_counter() - t)
        t = time.perf_counter()
        for f in files:
            f.read_bytes()
        read.append(time.perf_counter() - t)
    return {"rss_added": added, "disk_bytes": session.expert_bytes(a), "switch_s": switch, "read_s": read}


def in_worker(kind: str, **kw) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(kw)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result.pop("torch_loaded"):
        raise RuntimeError(f"worker {kind} imported torch; the measurement would be wrong")
    return result


def build_fused(model_run: Path, expert: str, quantization: dict, out: Path) -> Path:
    """The run's model with one expert as one ONNX graph, quantized as the bundle was (its manifest's
    `quantization`): the same source blocks (a GGUF's own, the 8-bit embedding, GPTQ's or mixed's blocks) at the
    same accuracy levels, so that split and fused compute the same model and differ only in the graph cut."""
    from mode_edge.config import ExportConfig
    from mode_edge.export.graphs import FusedGraph
    from mode_edge.export.onnx_graphs import export_onnx, quantize_onnx
    from mode_edge.export.pipeline import check_run, load_model, measure_inputs, resolve_quant_method, source_blocks
    from mode_edge.progress import stage_progress

    backbone, model, _ = load_model(model_run, [expert])
    graph = FusedGraph(model.eval(), "buffer")
    fp32 = out / "fp32" / "fused.onnx"
    export_onnx(graph, backbone.decoder.cfg, fp32)
    if quantization["scheme"] == "fp32":
        return fp32
    cfg = ExportConfig(quant=quantization["scheme"], block_size=quantization["block_size"],
                       accuracy_level=quantization["accuracy_level"],
                       base_accuracy_level=quantization.get("base_accuracy_level", 0),
                       source_blocks=quantization.get("source_blocks", True),
                       quant_method=quantization.get("method", "rtn"))  # fmt: skip
    cfg, corpora = resolve_quant_method(model_run, check_run(model_run, [expert]), cfg)
    with stage_progress("fused graph") as progress:
        source, method = source_blocks(backbone, model, cfg, progress, corpora)
    measure = measure_inputs(graph, backbone.decoder.cfg) if cfg.accuracy_level == "auto" else None
    quantize_onnx(fp32, out / "fused.onnx", cfg.quant, cfg.block_size, cfg.accuracy_level, source, method, measure)
    return out / "fused.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("runs/demo/bundle"))
    ap.add_argument("--model", type=Path, default=Path("runs/demo/composed"), help="The run the bundle came from.")
    ap.add_argument("--expert", default="code")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from common import machine, write

    from mode_edge.bundle import read_bundle
    from mode_edge.packs import install_copy, uninstall

    manifest = read_bundle(args.bundle)
    work = Path(tempfile.mkdtemp(prefix="runtime-bench-"))
    try:
        fused = build_fused(args.model, args.expert, manifest["quantization"], work)
        one, eight = work / "one", work / "eight"
        shutil.copytree(args.bundle, one)
        for name in [n for n in manifest["experts"] if n != args.expert]:
            uninstall(one, name)
        shutil.copytree(one, eight)
        for i in range(7):
            install_copy(eight, args.expert, f"{args.expert}-copy{i}")

        common = dict(bundle=str(one), fused=str(fused), expert=args.expert, new_tokens=args.new_tokens,
                      repeats=args.repeats, threads=args.threads)  # fmt: skip
        decode = {**in_worker("decode", **common), **in_worker("decode", **common, default_options=True)}
        peaks = {"1 of 1": [], "1 of 8": []}
        for _ in range(args.repeats):  # alternated, so that machine noise hits both alike
            peaks["1 of 1"].append(in_worker("peak", bundle=str(one), expert=args.expert, threads=args.threads))
            peaks["1 of 8"].append(in_worker("peak", bundle=str(eight), expert=args.expert, threads=args.threads))
        switch = in_worker("switch", bundle=str(eight), a=args.expert, b=f"{args.expert}-copy0",
                           threads=args.threads, repeats=10)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    peak = {k: med([p["peak_rss_mb"] for p in v]) for k, v in peaks.items()}
    result = {
        "machine": machine(), "bundle": str(args.bundle), "quantization": manifest["quantization"],
        "expert": args.expert, "threads": args.threads, "new_tokens": args.new_tokens,
        "decode": {**decode, "split_median": med(decode["split_tps"]), "fused_median": med(decode["fused_tps"]),
                   "ratio": med(decode["split_tps"]) / med(decode["fused_tps"]),
                   "fused_default_median": med(decode["fused_default_options_tps"]),
                   "ratio_to_default": med(decode["split_tps"]) / med(decode["fused_default_options_tps"])},
        "peak_rss_mb": {**peak, "ratio_8_to_1": peak["1 of 8"] / peak["1 of 1"]},
        "expert_load": {"rss_added_mb": switch["rss_added"] / 2**20, "disk_mb": switch["disk_bytes"] / 2**20,
                        "ratio": switch["rss_added"] / switch["disk_bytes"]},
        "switch": {"median_ms": 1000 * med(switch["switch_s"]), "read_files_median_ms": 1000 * med(switch["read_s"])},
    }  # fmt: skip
    write("runtime", result, markdown(result))


def markdown(r: dict) -> str:
    d, p, e, s = r["decode"], r["peak_rss_mb"], r["expert_load"], r["switch"]
    return "\n".join([
        f"# Device runtime on the host CPU ({r['quantization']['scheme']}, {r['threads']} threads, expert "
        f"{r['expert']})", "",
        "| measure | value | target |", "|---|---|---|",
        f"| decode tok/s, split runtime, 1 expert | {d['split_median']:.1f} | |",
        f"| decode tok/s, one fused ONNX graph | {d['fused_median']:.1f} | |",
        f"| split / fused | {d['ratio']:.3f} | >= 0.9 |",
        f"| decode tok/s, fused graph with onnxruntime's default options (spinning threads) | "
        f"{d['fused_default_median']:.1f} | |",
        f"| split / fused with default options | {d['ratio_to_default']:.3f} | |",
        f"| peak RSS MB, 1 selected of 1 installed | {p['1 of 1']:.1f} | |",
        f"| peak RSS MB, 1 selected of 8 installed | {p['1 of 8']:.1f} | |",
        f"| 8 installed / 1 installed | {p['ratio_8_to_1']:.4f} | within 2% |",
        f"| RSS added by loading the expert, MB | {e['rss_added_mb']:.1f} | |",
        f"| its weight bytes on disk, MB | {e['disk_mb']:.1f} | |",
        f"| added / on disk | {e['ratio']:.3f} | <= 1.15 |",
        f"| expert switch with a warm base, ms | {s['median_ms']:.1f} | milliseconds |",
        f"| reading that expert's files, ms | {s['read_files_median_ms']:.1f} | |",
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        result = {"decode": worker_decode, "peak": worker_peak, "switch": worker_switch}[sys.argv[2]](
            **json.loads(sys.argv[3])
        )
        print(json.dumps({**result, "torch_loaded": "torch" in sys.modules}))
    else:
        main()
