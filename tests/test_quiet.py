"""A quiet terminal: libraries' log lines below WARNING stay hidden unless `mode-edge --verbose`, an export shows one
line per stage, and `pip install -e .` builds without setuptools warnings about the package layout."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import cli

ROOT = Path(__file__).resolve().parents[1]


def library_lines(stderr: str) -> list[str]:
    """Lines that are not ours: log records of other libraries (ours are 'export: STAGE', 'exported ...')."""
    return [line for line in stderr.splitlines() if not line.startswith(("export: ", "exported "))]


def test_export_shows_one_line_per_stage_and_no_library_logs(composed_run, tmp_path):
    """The issue's example: an int8 export printed ~950 INFO lines from onnx_ir (onnxruntime's quantizer turns
    INFO logging on for the whole process when it is imported)."""
    proc = cli("export", "--model", composed_run, "--out", tmp_path / "b", "--quant", "int8")
    assert library_lines(proc.stderr) == [], proc.stderr[:2000]
    stages = [line for line in proc.stderr.splitlines() if line.startswith("export: ")]
    assert stages == ["export: load", "export: export", "export: quantize", "export: verify", "export: write"]


def test_the_executorch_backend_keeps_its_cpu_probe_to_itself(fp32_bundle):
    """ExecuTorch's XNNPACK delegate logs what it reads of /sys on its first load (five `[cpuinfo_utils.cpp:...]`
    lines on x86 hosts): held back (runtimes/backends.without_cpuinfo_notes), the rest of stderr passed on."""
    proc = cli("run", "--bundle", fp32_bundle, "--backend", "executorch", "--prompt", "def f(", "--max-new-tokens", "2")
    assert "cpuinfo_utils" not in proc.stderr, proc.stderr[:2000]


def test_verbose_shows_library_logs(composed_run, tmp_path):
    proc = cli("--verbose", "export", "--model", composed_run, "--out", tmp_path / "b", "--quant", "fp32")
    assert any(line.startswith("INFO onnx_ir") for line in library_lines(proc.stderr)), proc.stderr[:2000]


def test_quiet_and_verbose_logging_in_a_child_process():
    """The rule itself, for any library: INFO hidden, WARNING shown; --verbose (inherited by child processes through
    MODE_EDGE_VERBOSE) shows INFO; a library's own basicConfig(INFO) changes nothing."""
    code = ("import logging, warnings; from mode_edge.logs import configure; import sys; "
            "configure(sys.argv[1] == 'v'); logging.basicConfig(level=logging.INFO); "
            "logging.getLogger('onnx_ir.passes').info('lib-info'); "
            "logging.getLogger('onnxscript').warning('lib-warn'); "
            "logging.getLogger('torchao').warning('torchao-noise'); "
            "warnings.warn_explicit('lib-deprecated', DeprecationWarning, 'x.py', 1, module='torch.onnx')")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MODE_EDGE_VERBOSE"}
    quiet = subprocess.run([sys.executable, "-c", code, "q"], capture_output=True, text=True, env=env).stderr
    assert "lib-info" not in quiet and "lib-warn" in quiet and "lib-deprecated" not in quiet
    assert "torchao-noise" not in quiet  # its import-time notes about absent CUDA kernels (IMPORT_NOISE)
    loud = subprocess.run([sys.executable, "-c", code, "v"], capture_output=True, text=True, env=env).stderr
    assert "lib-info" in loud and "lib-warn" in loud
    assert "--verbose" in cli("--help").stdout


@pytest.mark.slow
def test_editable_install_has_no_setuptools_warnings(tmp_path):
    """`pip install -e .` in a fresh venv (setuptools comes from the package index, as pip builds in isolation)."""
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "v")], check=True)
    proc = subprocess.run([str(tmp_path / "v/bin/pip"), "install", "-v", "--no-deps", "-e", str(ROOT)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    layout = [line for line in out.splitlines() if "Warning" in line or "check.warn" in line or "deprecated" in line]
    assert layout == [], "\n".join(layout)
