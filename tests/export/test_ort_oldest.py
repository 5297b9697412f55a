"""The experts' graphs that export writes optimized by this onnxruntime (export/optimize_ahead.py) load and run on
the oldest onnxruntime the runtimes accept (pyproject's floor, 1.23; the native runtime's C API 23), in a fresh
process with that release's wheel first on the path, and compute what this onnxruntime computes. (onnxruntime 1.32
writes attributes at their defaults that 1.23 refuses as unknown: optimize_ahead drops them.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mode_edge.bundle import ONNX_OPTIMIZED_AHEAD, read_pack_manifest
from mode_edge.export.graphs import example_inputs, split
from mode_edge.export.pipeline import load_model
from mode_edge.integrity import KV_CACHE
from mode_edge.runtimes.backends import load_graph

OLDEST = "1.23.2"
ROOT = Path(__file__).resolve().parents[2]

RUN_OLDEST = """
import json, sys
import numpy as np
import onnxruntime as ort
assert ort.__version__ == sys.argv[1], ort.__version__
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the runtimes load these graphs
outputs = {}
for graph, feeds in json.loads(sys.argv[2]).items():
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    arrays = dict(np.load(feeds))
    outputs[graph] = [o.tolist() for o in session.run(None, arrays)[:1]]
print(json.dumps(outputs))
"""


def oldest_onnxruntime() -> Path:
    """onnxruntime OLDEST's wheel, unpacked once into build/ (pip from the package registry)."""
    target = ROOT / "build" / "ort-oldest" / OLDEST
    if not (target / "onnxruntime").is_dir():
        wheels, partial = target.with_name(OLDEST + ".wheel"), target.with_name(OLDEST + ".partial")
        pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "download", "--no-deps", f"onnxruntime=={OLDEST}", "-d", str(wheels)], check=True)
        subprocess.run([*pip, "install", "--no-deps", "--target", str(partial), *map(str, wheels.glob("*.whl"))],
                       check=True)  # fmt: skip
        os.replace(partial, target)
    return target


def test_optimized_expert_graphs_run_on_the_oldest_onnxruntime(int8_bundle, composed_run, tmp_path):
    backbone, model, _ = load_model(composed_run, ["code"])
    modules = split(model, KV_CACHE["onnx"])
    pack = read_pack_manifest(int8_bundle / "experts" / "code")
    feeds, ours = {}, {}
    torch.manual_seed(0)
    for name, component in pack["components"].items():
        assert component.get("onnx_optimized") == ONNX_OPTIMIZED_AHEAD, name  # (what this test is about)
        path = str(int8_bundle / "experts" / "code" / component["onnx"])
        module = modules[f"experts/code/{name}"]
        inputs = [t.numpy() for t in example_inputs(module, backbone.decoder.cfg, tokens=3, past=2)]
        feeds[path] = str(tmp_path / f"{name}.npz")
        np.savez(feeds[path], **dict(zip(component["inputs"]["onnx"], inputs)))
        ours[path] = load_graph(Path(path), optimized_ahead=True)(inputs)[0]
    env = {**os.environ, "PYTHONPATH": str(oldest_onnxruntime())}
    proc = subprocess.run([sys.executable, "-c", RUN_OLDEST, OLDEST, json.dumps(feeds)], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, ref in ours.items():
        got = np.array(theirs[path][0], dtype=np.float32)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max())), path
