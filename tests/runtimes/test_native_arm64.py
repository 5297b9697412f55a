"""The native runtime cross-compiled for aarch64 (`make native-arm64`), run under qemu-aarch64-static against the
aarch64 onnxruntime wheel's library: the same tokens as the Python runtime on this x86 host, and logits within the
gap between two CPUs' kernels. fp32: 1e-4, strict enough to catch a wrong mix or cache. int8: the graphs quantize
their activations per block at accuracy level 4, which ARM and x86 kernels round differently (measured up to 0.0086
on the tiny model's logits of ~0.5), and ARM cores with and without dot-product instructions differ again, so
QEMU_CPU names one (cortex-a76) and the bound is 2e-2: the check that the quantized kernels run and agree on tokens.

The Python runtime runs there too: bookworm's arm64 python3.11 with aarch64 wheels (runtimes/native/arm64_python.sh),
`mode-edge run` under qemu, the same text as on this host.

Run by `make test-arm64` (it builds the binary and the userland and sets MODE_EDGE_ARM64 to their cache folder);
skipped in `make test`, whose machine need not have a cross compiler or qemu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mode_edge.runtimes.session import Session
from tests.runtimes.test_native import PROMPTS, ROOT, python_logits

CACHE = os.environ.get("MODE_EDGE_ARM64")
pytestmark = pytest.mark.skipif(not CACHE, reason="run by `make test-arm64` (cross compiler and qemu)")


def run_arm64(bundle: Path, ids: list[int], experts: str, new_tokens: int, logits: Path) -> list[int]:
    cache = Path(CACHE)
    env = {**os.environ, "QEMU_LD_PREFIX": "/usr/aarch64-linux-gnu", "QEMU_CPU": "cortex-a76",
           "LD_LIBRARY_PATH": str(cache / "sysroot/usr/lib/aarch64-linux-gnu"),
           "MODE_EDGE_ORT_LIB": str(next(cache.glob("onnxruntime-*/libonnxruntime.so")))}  # fmt: skip
    cmd = ["qemu-aarch64-static", str(ROOT / "build/native-arm64/mode-edge-native"), "run", str(bundle),
           "--ids", ",".join(map(str, ids)), "--experts", experts, "--max-new-tokens", str(new_tokens),
           "--threads", "2", "--logits", str(logits)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return [int(t) for t in proc.stdout.split()]


@pytest.mark.parametrize("which", ["fp32", "int8"])
@pytest.mark.parametrize("experts", ["none", "code,prose"])
def test_aarch64_native_runtime_matches_the_python_runtime(fp32_bundle, int8_bundle, which, experts, tmp_path):
    bundle = fp32_bundle if which == "fp32" else int8_bundle
    session = Session(bundle, threads=2)
    names = [] if experts == "none" else experts.split(",")
    for n in (9, 300):
        prompt = PROMPTS[n]
        got = run_arm64(bundle, prompt, experts, 16, tmp_path / "logits.bin")
        assert got == list(session.generate(prompt, names, 16)), f"{n}-token prompt"
        logits = np.fromfile(tmp_path / "logits.bin", dtype=np.float32).reshape(len(got), -1)
        np.testing.assert_allclose(logits, python_logits(session, prompt, names, got), rtol=0,
                                   atol=1e-4 if which == "fp32" else 2e-2, err_msg=f"{n}-token prompt")  # fmt: skip


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_the_python_runtime_on_an_arm64_userland_says_what_it_says_here(fp32_bundle, int8_bundle, which, tmp_path):
    """`mode-edge run` from the device half of the package (devices/transports.runtime_tree: no torch exists there),
    on arm64 python3.11 under qemu, prints the text this host's `mode-edge run` prints, with the same routing."""
    from mode_edge.devices.transports import runtime_tree

    bundle = fp32_bundle if which == "fp32" else int8_bundle
    cache, runtime = Path(CACHE), runtime_tree(tmp_path / "runtime")
    env = {**os.environ, "QEMU_LD_PREFIX": str(cache / "python-root"), "QEMU_CPU": "cortex-a76",
           "PYTHONPATH": f"{runtime}:{cache / 'python-site'}"}  # fmt: skip
    for experts in ("code", "auto"):
        args = ["run", "--bundle", str(bundle), "--experts", experts, "--prompt", "import os\nfor name in",
                "--max-new-tokens", "12"]  # fmt: skip
        arm = subprocess.run(["qemu-aarch64-static", str(cache / "python-root/usr/bin/python3.11"), "-m",
                              "mode_edge.cli", *args, "--json", "arm.json"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)  # fmt: skip
        here = subprocess.run([sys.executable, "-m", "mode_edge.cli", *args, "--json", "here.json"], cwd=tmp_path,
                              capture_output=True, text=True)  # fmt: skip
        assert arm.returncode == 0 and here.returncode == 0, arm.stderr[-2000:] + here.stderr[-2000:]
        assert arm.stdout == here.stdout
        arm_profile, here_profile = (json.loads((tmp_path / f).read_text()) for f in ("arm.json", "here.json"))
        assert arm_profile["experts"] == here_profile["experts"] and arm_profile["new_tokens"] == 12
