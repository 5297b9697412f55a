"""The native runtime cross-compiled for aarch64 (`make native-arm64`), run under qemu-aarch64-static against the
aarch64 onnxruntime wheel's library: the same tokens as the Python runtime on this x86 host, and logits within the
gap between two CPUs' kernels. fp32: 1e-4, strict enough to catch a wrong mix or cache. int8: the graphs quantize
their activations per block at accuracy level 4, which ARM and x86 kernels round differently (measured up to 0.0086
on the tiny model's logits of ~0.5), and ARM cores with and without dot-product instructions differ again, so
QEMU_CPU names one (cortex-a76) and the bound is 2e-2: the check that the quantized kernels run and agree on tokens.

Run by `make test-arm64` (it builds the binary and sets MODE_EDGE_ARM64 to the folder of the aarch64 libraries);
skipped in `make test`, whose machine need not have a cross compiler or qemu."""

from __future__ import annotations

import os
import subprocess
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
