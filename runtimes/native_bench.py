"""`mode-edge bench --runtime native`: the runs of runtimes/bench.py (the bare base, then each expert, one fixed
generation each, a fresh process each) through the native runtime's command line (runtimes/native), here or on a
device over ssh / adb (devices/transports.remote_native_bench). The prompt is tokenized here, on the workstation;
the device gets token ids. The JSON document has runtimes/bench.run_bench's shape, with "runtime": "native".
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from mode_edge.bundle import read_bundle
from mode_edge.devices.profiles import DeviceProfile
from mode_edge.errors import UserError
from mode_edge.names import check_names
from mode_edge.runtimes.bench import PROMPT

BINARY, LIBRARY = "mode-edge-native", "libmode_edge.so"


def native_build(folder: Path | None) -> Path:
    """The folder holding mode-edge-native and libmode_edge.so: `folder`, else the checkout's build/native (`make
    native`). Raises UserError when they are not there."""
    folder = Path(folder) if folder else Path(__file__).resolve().parents[1] / "build" / "native"
    if not (folder / BINARY).is_file() or not (folder / LIBRARY).is_file():
        raise UserError(f"{folder} holds no native runtime ({BINARY}, {LIBRARY}); build it with `make native` "
                        f"(`make native-arm64` for an aarch64 device) or pass --native-build FOLDER")  # fmt: skip
    return folder


def ort_library(path: Path | None) -> Path:
    """The libonnxruntime.so to run with: `path`, else $MODE_EDGE_ORT_LIB, else the onnxruntime wheel's own."""
    if path:
        return Path(path)
    if os.environ.get("MODE_EDGE_ORT_LIB"):
        return Path(os.environ["MODE_EDGE_ORT_LIB"])
    import onnxruntime

    found = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
    if not found:
        raise UserError("no libonnxruntime.so found in the onnxruntime package; pass --ort-lib PATH")
    return found[0]


def prompt_ids(bundle: Path) -> list[int]:
    """PROMPT as `mode-edge run` encodes it with the bundle's tokenizer (its prefix ids first)."""
    from mode_edge.runtimes.run import load_tokenizer

    tok = load_tokenizer(bundle)
    return [*tok.prefix_ids, *tok.encode(PROMPT, prefix=False)]


def selections(bundle: Path, experts: list[str] | None) -> list[list[str]]:
    """[] (the bare base), then each expert: `experts`, or every installed one."""
    names = sorted(read_bundle(bundle)["experts"]) if experts is None else check_names(experts, "--experts")
    return [[]] + [[e] for e in names]


def run_args(bundle: str, ids: list[int], selection: list[str], new_tokens: int, profile: DeviceProfile,
             json_path: str) -> list[str]:  # fmt: skip
    """The arguments after mode-edge-native for one configuration."""
    return ["run", bundle, "--ids", ",".join(map(str, ids)), "--experts", ",".join(selection) or "none",
            "--max-new-tokens", str(new_tokens), "--threads", str(profile.threads),
            "--budget-mb", str(profile.memory_budget_mb), "--json", json_path]  # fmt: skip


def document(profile: DeviceProfile, bundle: Path, new_tokens: int, runs: list[dict], machine: dict) -> dict:
    manifest = read_bundle(bundle)
    return {
        "device": profile.name,
        "machine": machine,
        "bundle": {"quantization": manifest["quantization"], "base": manifest["base"]["spec"]},
        "runtime": "native",
        "backend": "onnx",
        "threads": profile.threads,
        "prompt": PROMPT,
        "new_tokens": new_tokens,
        "runs": runs,
        "isolation": "one fresh process per configuration",
    }


def run_native_bench(bundle: Path, profile: DeviceProfile, experts: list[str] | None, new_tokens: int,
                     build: Path | None = None, ort_lib: Path | None = None) -> dict:  # fmt: skip
    """The benchmark on this machine with the native runtime; returns the JSON document."""
    import psutil

    binary, lib = native_build(build) / BINARY, ort_library(ort_lib)
    ids, runs = prompt_ids(bundle), []
    env = {**os.environ, "MODE_EDGE_ORT_LIB": str(lib)}
    with tempfile.TemporaryDirectory() as tmp:
        for selection in selections(bundle, experts):
            out = Path(tmp) / "profile.json"
            proc = subprocess.run([str(binary), *run_args(str(bundle), ids, selection, new_tokens, profile, str(out))],
                                  capture_output=True, text=True, env=env)  # fmt: skip
            if proc.returncode == 2:
                raise UserError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
            if proc.returncode != 0:
                raise RuntimeError(f"mode-edge-native failed for {selection or 'none'}:\n{proc.stderr[-3000:]}")
            runs.append({"selection": selection, **json.loads(out.read_text())})
    machine = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
               "ram_mb": psutil.virtual_memory().total >> 20}  # fmt: skip
    return document(profile, bundle, new_tokens, runs, machine)
