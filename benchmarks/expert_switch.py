"""Where an expert switch's time goes, and what was tried to cut it: creating the expert's onnxruntime sessions (one
per block graph) as the Python runtime creates them (runtimes/backends.OnnxGraph: the process's global thread pool,
the shared arena, prepacking on the pool), in a process that has loaded the base and generated 16 tokens with the
expert, as a switch finds it.

    python benchmarks/expert_switch.py --bundle B [--expert code] [--threads 2] [--repeats 9]

Variants, interleaved, medians:
- shipped: the pack's graphs as the runtime loads them (optimization off for graphs its manifest records as
  optimized at export, `onnx_optimized`; on for the rest): what a switch does;
- optimized when loaded: the same files with onnxruntime's optimizer on (for a pack exported before the experts'
  graphs were optimized at export, the shipped figure; for one exported with it, the optimizer run again over the
  fused graph, which takes less than over the exported one: not the figure before);
- optimized ahead: the graphs as onnxruntime's optimizer leaves them at ORT_ENABLE_EXTENDED (the highest level
  whose output does not depend on the machine: export/optimize_ahead.py), saved into a temporary folder and
  loaded with optimization off (for a pack exported with it, the same graphs as shipped, saved again);
- prepacked ahead: optimized at the runtime's level, with the prepacked weights saved beside them
  (session.save_external_prepacked_constant_initializers), loaded with optimization off;
- side by side: shipped, one Python thread per graph (onnxruntime releases the GIL while it builds a session);
- no prepacking: shipped, with session.disable_prepacking: not an option (decode would be far slower), the share
  of the time that prepacking takes;
and the time to read the expert's files from the page cache, as `benchmarks/peers.py` takes it.
Run it on idle cores. Writes benchmarks/results/expert_switch.{json,md} (or --name's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved, machine, median, write  # noqa: E402


@contextlib.contextmanager
def changed_sessions(config: dict[str, str]):
    """Meanwhile every onnxruntime session (as OnnxGraph makes it) also gets the session `config` entries, on top
    of the runtime's own options."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def session(path, options, providers):
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        return real(path, options, providers=providers)

    ort.InferenceSession = session
    try:
        yield
    finally:
        ort.InferenceSession = real


def saved_ahead(graphs: list[Path], out: Path, level, prepacked: bool) -> list[Path]:
    """Each graph as onnxruntime's optimizer leaves it at `level` (export/optimize_ahead.save_optimized), saved into
    `out` (with, given `prepacked`, its prepacked weights); the saved graphs' paths."""
    from mode_edge.export.optimize_ahead import save_optimized

    out.mkdir(parents=True)
    for path in graphs:
        save_optimized(path, out / path.name, level, prepacked)
    return [out / path.name for path in graphs]


def graph_bytes(graphs: list[Path]) -> int:
    """Bytes on disk of the graphs and their weights files."""
    return sum(f.stat().st_size for g in graphs for f in g.parent.glob(g.name + "*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--expert", default="code")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--name", default="expert_switch", help="Results file name in benchmarks/results/ (no suffix).")
    args = ap.parse_args()

    import onnxruntime as ort

    from mode_edge.bundle import ONNX_OPTIMIZED_AHEAD, expert_folder, read_bundle
    from mode_edge.runtimes.backends import OnnxGraph, use_global_thread_pool
    from mode_edge.runtimes.session import Session

    use_global_thread_pool(args.threads)  # as `mode-edge run` and the peers benchmark's worker
    session = Session(args.bundle, threads=args.threads)
    session.select([args.expert])
    cache = session.engine.new_cache(32)
    token = np.array([[1]], dtype=np.int64)
    for _ in range(16):  # the pool and the arena as a switch finds them
        session.engine.forward(token, cache)
    folder = expert_folder(args.bundle, read_bundle(args.bundle), args.expert)
    pack = json.loads((folder / "pack.json").read_text())
    components = [pack["components"][f"block{i}"] for i in range(session.engine.n_blocks)]
    graphs = [folder / c["onnx"] for c in components]
    ahead = [c.get("onnx_optimized") == ONNX_OPTIMIZED_AHEAD for c in components]
    files = [folder / rel for rel in pack["files"]]

    def create(paths: list[Path], optimized: list[bool]) -> None:
        [OnnxGraph(p, args.threads, o) for p, o in zip(paths, optimized)]

    def without_prepacking():
        with changed_sessions({"session.disable_prepacking": "1"}):
            create(graphs, ahead)

    on, off = [False] * len(graphs), [True] * len(graphs)
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(len(graphs)) as pool:
        extended = saved_ahead(graphs, Path(tmp) / "extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, False)
        prepacked = saved_ahead(graphs, Path(tmp) / "prepacked", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, True)
        variants = {
            "shipped": lambda: create(graphs, ahead),
            "optimized when loaded": lambda: create(graphs, on),
            "optimized ahead": lambda: create(extended, off),
            "prepacked ahead": lambda: create(prepacked, off),
            "side by side": lambda: list(pool.map(lambda g: OnnxGraph(g[0], args.threads, g[1]), zip(graphs, ahead))),
            "no prepacking": without_prepacking,
            "read its files": lambda: [f.read_bytes() for f in files],
        }
        times = interleaved(variants, args.repeats)
        disk = {"shipped": graph_bytes(graphs), "optimized ahead": graph_bytes(extended),
                "prepacked ahead": graph_bytes(prepacked)}  # fmt: skip
    ms = {name: 1000 * median(t) for name, t in times.items()}
    rows = [f"| {name} | {v:.2f} | {v / ms['shipped']:.2f}x | {disk[name] / 1e6:.1f} |" if name in disk
            else f"| {name} | {v:.2f} | {v / ms['shipped']:.2f}x | |" for name, v in ms.items()]  # fmt: skip
    markdown = (
        f"# Creating expert {args.expert}'s {len(graphs)} onnxruntime sessions ({args.bundle}, {args.threads} "
        f"threads, global pool, medians of {args.repeats} interleaved)\n\n"
        "| variant | ms | against shipped | graph MB on disk |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    data = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "ms": ms, "runs_s": times,
            "disk_bytes": disk}  # fmt: skip
    write(args.name, data, markdown)


if __name__ == "__main__":
    main()
