"""Installs, uninstalls and fetch-and-installs killed (SIGKILL, no cleanup) at every file-system step, in real
processes: after each kill the bundle opens, verifies and generates, every expert it lists is whole (the old one or
the new one), and a retry of the same command completes and leaves no folder behind. The kill points are the calls of os.replace,
os.fsync, os.mkdir, os.unlink, shutil.rmtree and open (before and after each), counted in the child process;
MODE_EDGE_KILL_STRIDE (default 3) tests every n-th point in `make test`, 1 tests them all."""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from mode_edge.bundle import expert_folder, read_bundle
from mode_edge.packs import installed_intact, make_pack, uninstall
from mode_edge.runtimes.engine import Engine, generate
from tests.damage import repack

STRIDE = int(os.environ.get("MODE_EDGE_KILL_STRIDE", "3"))

DRIVER = r"""
import builtins, os, shutil, signal, sys
from pathlib import Path

kill_at, op, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
count = 0


def step():
    global count
    count += 1
    if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def hooked(module, name):
    real = getattr(module, name)

    def call(*a, **k):
        step()
        result = real(*a, **k)
        step()
        return result

    setattr(module, name, call)


from mode_edge.packs import install, uninstall  # imported before the hooks: their own start-up is not counted
from mode_edge.runtimes.fetch import fetch_and_install

for module, name in [(os, "replace"), (os, "fsync"), (os, "mkdir"), (os, "unlink"), (shutil, "rmtree"),
                     (builtins, "open")]:
    hooked(module, name)
if op == "install":
    install(Path(args[0]), Path(args[1]), replace=True)
elif op == "uninstall":
    uninstall(Path(args[0]), args[1])
else:
    fetch_and_install(Path(args[0]), args[1], args[2])
print("STEPS", count)
"""


def run(kill_at: int, op: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, str(kill_at), op, *map(str, args)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def check_usable(bundle):
    """The bundle opens and verifies; every listed expert is whole (the manifest write commits an install, so a kill
    leaves the old expert or the new one, never a listed but missing or half-written one) and loads; it generates."""
    manifest = read_bundle(bundle)
    engine = Engine(bundle)
    for name in manifest["experts"]:
        assert installed_intact(bundle, name), f"{name} listed but not whole"
        engine.load_expert(name)
    assert len(list(generate(engine, [5, 6, 7], 2))) == 2


def check_no_leftovers(bundle):
    """After a completed retry, experts/ holds exactly the folders the manifest points at."""
    manifest = read_bundle(bundle)
    listed = {expert_folder(bundle, manifest, n).name for n in manifest["experts"]}
    assert {p.name for p in (bundle / "experts").iterdir()} == listed


@pytest.fixture
def start(int8_bundle, tmp_path):
    """A pristine bundle without `code`, the code pack, and a second version of it (for replacing)."""
    pristine, packs = tmp_path / "pristine", tmp_path / "packs"
    shutil.copytree(int8_bundle, pristine)
    packs.mkdir()
    make_pack(pristine, "code", packs / "code.modepack")
    repack(packs / "code.modepack", packs / "code-v2.modepack", parameters=1)
    uninstall(pristine, "code")
    return pristine, packs


def kill_everywhere(pristine, tmp_path, op, args, prepare=None, done=None):
    """Run `op` killed at every STRIDE-th step until a run ends before its kill point; check the bundle after each
    kill and after a retry (`done` says what the retry must have achieved). Returns the steps of a whole run."""
    steps, kill_at, kills = None, 1, 0
    while steps is None or kill_at <= steps:
        bundle = tmp_path / f"bundle-{kill_at}"
        shutil.copytree(pristine, bundle)
        if prepare:
            prepare(bundle)
        proc = run(kill_at, op, bundle, *args(bundle))
        if proc.returncode == 0:  # ran to the end before the kill point
            steps = int(proc.stdout.split("STEPS")[1])
        else:
            assert proc.returncode == -signal.SIGKILL, proc.stderr
            kills += 1
            check_usable(bundle)
            if op != "uninstall" or "code" in read_bundle(bundle)["experts"]:  # (removing nothing is an error)
                retry = run(0, op, bundle, *args(bundle))
                assert retry.returncode == 0, retry.stderr
                check_no_leftovers(bundle)
            check_usable(bundle)
            done(bundle)
        shutil.rmtree(bundle)
        kill_at += STRIDE
    assert kills == len(range(1, steps + 1, STRIDE))  # every chosen point before the end killed the process
    return steps


def test_an_install_killed_at_any_step_leaves_a_usable_bundle_and_a_retry_completes(start, tmp_path):
    pristine, packs = start

    def installed(bundle):
        assert "code" in read_bundle(bundle)["experts"] and installed_intact(bundle, "code")

    steps = kill_everywhere(pristine, tmp_path, "install", lambda b: [packs / "code.modepack"], done=installed)
    assert steps > 20  # the hooks saw the install's file-system work


def test_a_replacing_install_killed_at_any_step_leaves_a_usable_bundle(start, tmp_path):
    pristine, packs = start

    def with_v1(bundle):
        assert run(0, "install", bundle, packs / "code.modepack").returncode == 0

    def replaced(bundle):
        assert read_bundle(bundle)["experts"]["code"]["pack_sha256"] and installed_intact(bundle, "code")

    kill_everywhere(pristine, tmp_path, "install", lambda b: [packs / "code-v2.modepack"], prepare=with_v1,
                    done=replaced)  # fmt: skip


def test_an_uninstall_killed_at_any_step_leaves_a_usable_bundle(start, tmp_path):
    pristine, packs = start

    def with_code(bundle):
        assert run(0, "install", bundle, packs / "code.modepack").returncode == 0

    def removed(bundle):
        assert "code" not in read_bundle(bundle)["experts"]

    kill_everywhere(pristine, tmp_path, "uninstall", lambda b: ["code"], prepare=with_code, done=removed)


def test_a_fetch_and_install_killed_at_any_step_leaves_a_usable_bundle(start, tmp_path):
    pristine, packs = start

    def installed(bundle):
        assert installed_intact(bundle, "code")

    kill_everywhere(pristine, tmp_path, "fetch", lambda b: [packs, "code"], done=installed)
