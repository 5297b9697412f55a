"""Damaged bundles: every file type the runtime reads, cut at the start, in the middle and one byte short, or with one
byte flipped. A damaged pack is one warning and stays out while everything else runs; asking for it, or any damage
to the base, is one line naming the file and the fix, exit 2, never a traceback."""

import json
import os

import pytest

from mode_edge.bundle import expert_folder, read_bundle
from mode_edge.errors import UserError
from mode_edge.runtimes.engine import Engine
from mode_edge.runtimes.session import Session
from tests.damage import DAMAGES, cut, damage, flip
from tests.test_cli import assert_user_error, cli

EXPERT_FILES = ["gate.safetensors", "block0.onnx", "block0.onnx.data", "block1.onnx", "pack.json"]
BASE_FILES = ["manifest.json", "tokenizer.json", "base/embed.onnx", "base/block0.onnx", "base/block0.onnx.data",
              "base/head.onnx.data"]  # fmt: skip


@pytest.fixture
def bundle(bundle):
    Session(bundle)  # a first start records what it verified, so the checks below also cover that cache
    return bundle


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("rel", EXPERT_FILES)
def test_a_damaged_pack_is_left_out_and_everything_else_runs(bundle, rel, how):
    damage(bundle / "experts" / "code" / rel, how)
    warned = []
    session = Session(bundle, warn=warned.append)
    assert len(warned) == 1 and "'code' is damaged" in warned[0] and "reinstall its pack" in warned[0]
    assert rel in warned[0] and "\n" not in warned[0]
    assert set(session.gates) == {"prose"} and set(session.damaged) == {"code"}
    assert list(session.generate([4, 5, 6], "none", 3)) and list(session.generate([4, 5, 6], ["prose"], 3))
    assert session.route([4, 5, 6], top_k=2) == ["prose"]
    with pytest.raises(UserError, match=f"'code' is damaged: .*{rel}.*reinstall its pack"):
        session.select(["code"])


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("rel", BASE_FILES)
def test_a_damaged_base_file_is_one_line_naming_it(bundle, rel, how):
    damage(bundle / rel, how)
    with pytest.raises(UserError) as e:
        Engine(bundle)
        Session(bundle).generate([4, 5], "none", 2)
    message = str(e.value)
    assert rel.split("/")[-1] in message and "\n" not in message
    assert "export the bundle again" in message or "mode-edge export" in message


def test_the_issue_example_through_the_cli(bundle):
    """A truncated gate file: runs with no expert, another expert, or routing still work; asking for it is exit 2."""
    cut(bundle / "experts" / "code" / "gate.safetensors", 100)
    for experts in ("none", "prose", "auto"):
        proc = cli("run", "--bundle", bundle, "--experts", experts, "--prompt", "hi", "--max-new-tokens", "2")
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:") and "damaged" in line]
        assert len(warnings) == 1 and "gate.safetensors has 100 bytes" in warnings[0]
        assert "Traceback" not in proc.stderr
    proc = cli("run", "--bundle", bundle, "--experts", "code", "--prompt", "hi", ok=False)
    assert_user_error(proc, "gate.safetensors has 100 bytes")
    assert "mode-edge install --bundle" in proc.stderr
    proc = cli("bench", "--bundle", bundle, "--new-tokens", "2")  # every expert: the damaged one is skipped
    assert "prose" in proc.stdout and "gate.safetensors" in proc.stderr
    # asked for by name it is the error alone, not first a warning from the base-only run as well
    assert_user_error(cli("bench", "--bundle", bundle, "--experts", "code", "--new-tokens", "2", ok=False),
                      "gate.safetensors has 100 bytes")  # fmt: skip


def test_inspect_shows_a_damaged_pack_and_the_rest(bundle):
    flip(bundle / "experts" / "code" / "pack.json")
    proc = cli("inspect", bundle)
    assert "damaged" in proc.stdout and "experts/prose/block0" in proc.stdout
    assert proc.stderr.count("warning: expert 'code' is damaged") == 1


def test_a_damaged_pack_is_repaired_from_the_pack_source(bundle, tmp_path):
    from mode_edge.packs import make_pack

    packs = tmp_path / "packs"
    packs.mkdir()
    make_pack(bundle, "code", packs / "code.modepack")
    def code(rel):
        return expert_folder(bundle, read_bundle(bundle), "code") / rel

    before = code("gate.safetensors").read_bytes()
    cut(code("gate.safetensors"), 10)
    proc = cli("run", "--bundle", bundle, "--experts", "code", "--pack-source", packs, "--prompt", "hi",
               "--max-new-tokens", "2")  # fmt: skip
    assert code("gate.safetensors").read_bytes() == before
    assert "warning:" not in proc.stderr  # repaired before the selection stood: no stale warning about it
    cut(code("block1.onnx"), 10)  # the same through install: the fix the error names
    cli("install", "--bundle", bundle, packs / "code.modepack")
    assert not Session(bundle).damaged
    # an installed pack's folder is experts/code@ID: found the same through a path relative to the working folder
    proc = cli("run", "--bundle", bundle.name, "--experts", "code", "--prompt", "hi", "--max-new-tokens", "2",
               cwd=bundle.parent)  # fmt: skip
    assert "warning" not in (proc.stdout + proc.stderr).lower()


def test_a_flipped_byte_is_caught_after_the_first_verified_start_even_with_its_time_restored(bundle):
    path = bundle / "experts" / "prose" / "block0.onnx.data"
    st = path.stat()
    flip(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the ctime tells
    proc = cli("run", "--bundle", bundle, "--experts", "prose", "--prompt", "hi", ok=False)
    assert_user_error(proc, "block0.onnx.data does not match its sha256")
    assert_user_error(cli("pack", "--bundle", bundle, "--expert", "prose", "--out", bundle.parent / "p.modepack",
                          ok=False), "does not match its sha256")  # fmt: skip
    assert not (bundle.parent / "p.modepack").exists()


@pytest.mark.parametrize("command", [["run", "--prompt", "hi"], ["inspect"], ["plan", "--device", "host",
                                                                               "--experts", "code"]])  # fmt: skip
def test_a_manifest_that_is_valid_json_but_damaged_is_one_line_for_every_command(bundle, command):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["experts"]["code"]["bytes"] = "many"
    del manifest["components"]["base/head"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    args = [*command[:1], bundle, *command[1:]] if command[0] == "inspect" else [command[0], "--bundle", bundle,
                                                                                   *command[1:]]  # fmt: skip
    assert_user_error(cli(*args, ok=False), "manifest.json is damaged")
