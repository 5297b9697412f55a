"""Concurrent changes to one bundle, in real processes started together, many times: installs of different packs,
install against uninstall, and two runs fetching the same missing pack. Every process succeeds, the manifest stays
valid JSON and lists exactly what is on disk, and no temporary file is left."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mode_edge.bundle import expert_folder, read_bundle
from mode_edge.packs import make_pack, uninstall
from tests.damage import repack

NAMES = ["code", "prose", "code2", "prose2"]


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "mode_edge.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "150"})  # fmt: skip


def finish(procs):
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


@pytest.fixture
def setup(int8_bundle, tmp_path):
    """An empty bundle (no experts) and four packs of different names."""
    bundle, packs = tmp_path / "bundle", tmp_path / "packs"
    shutil.copytree(int8_bundle, bundle)
    packs.mkdir()
    for name in ("code", "prose"):
        make_pack(bundle, name, packs / f"{name}.modepack")
        repack(packs / f"{name}.modepack", packs / f"{name}2.modepack", name=f"{name}2")
        uninstall(bundle, name)
    return bundle, packs


def assert_consistent(bundle, expected):
    manifest = json.loads((bundle / "manifest.json").read_text())  # valid JSON, whatever happened
    assert sorted(manifest["experts"]) == sorted(expected)
    listed = sorted(expert_folder(bundle, manifest, n).name for n in manifest["experts"])
    assert sorted(p.name for p in (bundle / "experts").iterdir()) == listed  # no folder left behind
    assert not [p.name for p in bundle.iterdir() if p.name.endswith(".tmp")]


def test_concurrent_installs_of_different_packs_all_land(setup):
    bundle, packs = setup
    for trial in range(8):
        names = NAMES[: 2 + trial % 3]  # 2, 3 or 4 processes at once
        finish([start("install", "--bundle", bundle, packs / f"{n}.modepack") for n in names])
        assert_consistent(bundle, names)
        for n in names:
            uninstall(bundle, n)


def test_install_against_uninstall(setup):
    bundle, packs = setup
    finish([start("install", "--bundle", bundle, packs / "code.modepack")])
    for _ in range(5):
        finish([start("install", "--bundle", bundle, packs / "prose.modepack"), start("uninstall", "--bundle",
                                                                                        bundle, "code")])  # fmt: skip
        assert_consistent(bundle, ["prose"])
        finish([start("install", "--bundle", bundle, packs / "code.modepack"), start("uninstall", "--bundle",
                                                                                       bundle, "prose")])  # fmt: skip
        assert_consistent(bundle, ["code"])


def test_the_same_pack_installed_twice_at_once_is_two_successes(setup):
    bundle, packs = setup
    for _ in range(3):
        finish([start("install", "--bundle", bundle, packs / "code.modepack") for _ in range(3)])
        assert_consistent(bundle, ["code"])
        uninstall(bundle, "code")


def test_two_runs_fetch_the_same_missing_pack_at_once(setup):
    bundle, packs = setup
    for _ in range(3):
        finish([start("run", "--bundle", bundle, "--experts", "prose", "--pack-source", packs, "--prompt", "hi",
                      "--max-new-tokens", "1") for _ in range(2)])  # fmt: skip
        assert_consistent(bundle, ["prose"])
        assert read_bundle(bundle)["experts"]["prose"]["bytes"] > 0
        uninstall(bundle, "prose")
