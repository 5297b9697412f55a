"""Damaged .modepack archives, cut at the start, inside a header, in the middle, one byte short, or with a byte
flipped in a header, in pack.json or in a weight file: install and inspect refuse with one line naming the pack, exit
2, and the bundle is left exactly as it was."""

import shutil
import tarfile

import pytest

from mode_edge.errors import UserError
from mode_edge.packs import describe, install, make_pack, uninstall
from tests.damage import cut, flip, offsets
from tests.test_cli import assert_user_error, cli


@pytest.fixture
def setup(int8_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(int8_bundle, bundle)
    pack = make_pack(bundle, "code", tmp_path / "code.modepack") and tmp_path / "code.modepack"
    uninstall(bundle, "code")
    return bundle, pack


def member_offsets(pack):
    """Byte offsets of pack.json's content and of the last weight file's content inside the archive."""
    with tarfile.open(pack) as tar:
        members = {m.name: m for m in tar.getmembers()}
    return members["pack.json"].offset_data + 5, members["gate.safetensors"].offset_data + 100


def snapshot(bundle):
    return {str(p.relative_to(bundle)): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["empty", "header", "middle", "one-short", "flip-header", "flip-pack.json",
                                 "flip-weights"])  # fmt: skip
def test_a_damaged_pack_is_refused_and_the_bundle_is_untouched(setup, how):
    bundle, pack = setup
    size = pack.stat().st_size
    in_json, in_weights = member_offsets(pack)
    if how.startswith("flip"):
        flip(pack, {"flip-header": 10, "flip-pack.json": in_json, "flip-weights": in_weights}[how])
    else:
        cut(pack, {**offsets(size), "header": 300}[how])
    before = snapshot(bundle)
    with pytest.raises(UserError, match=str(pack)) as e:
        install(bundle, pack)
    assert "\n" not in str(e.value)
    assert snapshot(bundle) == before and not [p for p in (bundle / "experts").iterdir() if p.name.startswith(".")]
    with pytest.raises(UserError, match=str(pack)):
        describe(pack)


def test_damaged_packs_through_the_cli(setup, tmp_path):
    bundle, pack = setup
    short = tmp_path / "short.modepack"
    shutil.copy(pack, short)
    cut(short, short.stat().st_size // 2)
    assert_user_error(cli("install", "--bundle", bundle, short, ok=False), "short.modepack")
    assert_user_error(cli("inspect", short, ok=False), "short.modepack")
    _, in_weights = member_offsets(pack)
    flip(pack, in_weights)
    assert_user_error(cli("install", "--bundle", bundle, pack, ok=False), "does not match its sha256")
    assert "code" not in cli("inspect", bundle).stdout.split("experts")[-1]
