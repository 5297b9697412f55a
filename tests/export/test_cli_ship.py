"""export, inspect, pack, install, uninstall and devices through the real command line, in subprocesses."""

import json

import onnx

from mode_edge.config import ExportConfig
from tests.damage import repack
from tests.test_cli import assert_user_error, cli


def test_export_inspect_pack_install_from_the_command_line(composed_run, tmp_path):
    bundle = tmp_path / "bundle"
    proc = cli("export", "--model", composed_run, "--out", bundle, "--quant", "int4", "--block-size", "16",
               "--experts", "code")  # fmt: skip
    assert "base/block0" in proc.stdout and "experts/code/block0" in proc.stdout
    info = json.loads(cli("inspect", bundle, "--json").stdout)
    assert info["quantization"] == {"scheme": "int4", "block_size": 16, "accuracy_level": "auto",
                                  "base_accuracy_level": "auto", "source_blocks": False,  # (no GGUF: nothing kept)
                                  "base_levels": {"embedding": 4}, "method": "rtn"}
    assert list(info["experts"]) == ["code"]
    assert info["formats"] == ["onnx"] and len(info["fingerprint"]) == 64
    # --base-accuracy-level auto: the tiny backbone has no GGUF, so its embedding is rounded here and the tied head
    # multiplies int8 activations as the rest does (a GGUF's own blocks keep level 0: test_source_blocks.py)
    head = onnx.load(bundle / "base" / "head.onnx", load_external_data=False)
    (matmul,) = [n for n in head.graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in matmul.attribute if a.name in ("bits", "accuracy_level")} == {
        "bits": 8, "accuracy_level": 4}

    pack = tmp_path / "code.modepack"
    assert "expert code" in cli("pack", "--bundle", bundle, "--expert", "code", "--out", pack).stdout
    assert "code" in cli("inspect", pack).stdout
    cli("install", "--bundle", bundle, pack)  # the same pack again: nothing to do, a success
    repack(pack, tmp_path / "other.modepack", parameters=1)  # another version of it
    assert_user_error(cli("install", "--bundle", bundle, tmp_path / "other.modepack", ok=False), "already installed")
    cli("uninstall", "--bundle", bundle, "code")
    assert_user_error(cli("uninstall", "--bundle", bundle, "code", ok=False), "not installed")
    cli("install", "--bundle", bundle, pack)
    assert list(json.loads(cli("inspect", bundle, "--json").stdout)["experts"]) == ["code"]


def test_options_that_change_nothing_say_so(composed_run, tmp_path):
    """--requantize-base on a backbone without GGUF blocks, and compute types for an fp32 bundle: a note each."""
    proc = cli("export", "--model", composed_run, "--out", tmp_path / "b", "--quant", "int4", "--requantize-base",
               "--experts", "code")  # fmt: skip
    assert "--requantize-base changes nothing here" in " ".join(proc.stderr.split())
    assert json.loads(cli("inspect", tmp_path / "b", "--json").stdout)["quantization"]["source_blocks"] is False
    proc = cli("export", "--model", composed_run, "--out", tmp_path / "f", "--base-accuracy-level", "4",
               "--quant", "fp32", "--experts", "code")  # fmt: skip
    assert "apply to int8, int4 and mixed bundles" in " ".join(proc.stderr.split())


def test_base_accuracy_levels():
    """(a source's own blocks, an embedding rounded here) compute types under each --base-accuracy-level and
    --accuracy-level."""
    assert ExportConfig(quant="int4").base_levels() == (0, 4)  # exact where exact; a rounded head as fast as the rest
    assert ExportConfig(quant="int4", accuracy_level=0).base_levels() == (0, 0)
    assert ExportConfig(quant="int4", accuracy_level=4).base_levels() == (0, 4)
    assert ExportConfig(quant="int4", base_accuracy_level=4).base_levels() == (4, 4)
    assert ExportConfig(quant="int4", base_accuracy_level=0).base_levels() == (0, 0)


def test_export_bad_input_is_one_line_and_leaves_nothing(composed_run, tmp_path):
    out = tmp_path / "b"
    assert_user_error(cli("export", "--model", tmp_path / "nope", "--out", out, ok=False), "does not exist")
    assert_user_error(cli("export", "--model", composed_run, "--out", out, "--format", "tflite", ok=False), "--format")
    assert_user_error(cli("export", "--model", composed_run, "--out", out, "--experts", "law", ok=False), "no expert")
    assert_user_error(cli("export", "--model", composed_run, "--out", out, "--device", "nokia", ok=False), "pixel-8")
    assert_user_error(cli("export", "--model", composed_run, "--out", out, "--context", "1025", ok=False),
                      "--context 1025 is not a context this backbone takes: at most 1024 tokens")  # fmt: skip
    assert_user_error(cli("export", "--model", composed_run, "--out", out, "--context", "32", ok=False), "--context")
    assert_user_error(cli("inspect", tmp_path, ok=False), "not a mode-edge bundle")
    assert not out.exists() and not (tmp_path / ".b.partial").exists()


def test_device_profiles():
    listing = cli("devices", "list").stdout
    for name in ("pixel-8", "galaxy-s24", "raspberry-pi-5", "jetson-orin-nano", "android-4gb", "host"):
        assert name in listing
    pi = json.loads(cli("devices", "show", "raspberry-pi-5").stdout)
    assert pi["transport"]["kind"] == "ssh" and pi["ram_mb"] == 8192 and pi["memory_budget_mb"] < pi["ram_mb"]
    assert json.loads(cli("devices", "show", "host").stdout)["cores"] >= 1
