"""Fuzzing the parsers that read what others wrote: the pack reader (archive bytes), pack.json and the bundle
manifest (JSON values of any type in any field), and a pack source's index. The only outcomes allowed: success, or a
UserError (the CLI's one-line refusal); never another exception, a file outside the bundle, or a changed bundle
after a refusal. Hypothesis generates the inputs from a fixed seed (derandomized), MODE_EDGE_FUZZ_EXAMPLES per test
(`make test`: a few hundred to two thousand; `make fuzz`: many more)."""

import copy
import hashlib
import io
import json
import os
import shutil
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mode_edge.bundle import read_bundle
from mode_edge.errors import UserError
from mode_edge.pack_index import index_statement, read_index
from mode_edge.packs import describe, install, make_pack, read_pack, uninstall, verify_members
from mode_edge.signing import generate_key, key_id, parse_public, public_line, sign
from tests.cli_runner import tree

SCALE = float(os.environ.get("MODE_EDGE_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))  # fmt: skip


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def paths(value, prefix=()):
    """Every key path into a JSON value (dicts and lists), the root included."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


def replaced(value, path, new):
    """A deep copy of `value` with the node at `path` replaced by `new` (or deleted when new is DELETE)."""
    out = copy.deepcopy(value)
    if not path:
        return None if new is DELETE else new
    node = out
    for key in path[:-1]:
        node = node[key]
    if new is DELETE and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = None if new is DELETE else new
    return out


DELETE = object()


@pytest.fixture(scope="module")
def world(int8_bundle, tmp_path_factory):
    """A bundle without its code expert, that expert's pack (bytes and members), and a scratch folder."""
    root = tmp_path_factory.mktemp("fuzz")
    bundle = root / "bundle"
    shutil.copytree(int8_bundle, bundle)
    make_pack(bundle, "code", root / "code.modepack")
    uninstall(bundle, "code")
    with tarfile.open(root / "code.modepack") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return World({"root": root, "bundle": bundle, "pack": (root / "code.modepack").read_bytes(), "members": members})


class World(dict):
    """The fixture's dict, shown by name only in a failure report (not its megabytes of pack bytes)."""

    def __repr__(self):
        return "world"


def write_members(path, members: dict):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def refused_or_done(action, bundle, outside):
    """Run `action`; a UserError must leave the bundle as it was; nothing may appear outside the bundle."""
    before = tree(bundle)
    around = sorted(p.name for p in outside.iterdir())
    try:
        action()
    except UserError as e:
        assert "\n" not in str(e).strip(), str(e)
        assert tree(bundle) == before
        return False
    finally:
        assert sorted(p.name for p in outside.iterdir()) == around
    return True


BYTE_EDITS = st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=8)


@given(edits=BYTE_EDITS, cut=st.none() | st.integers(0, 10**9))
@fuzz_settings(1500)
def test_the_pack_reader_takes_any_bytes(world, edits, cut):
    data = bytearray(world["pack"])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = world["root"] / "scratch" / "fuzzed.modepack"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(bytes(data))
    try:
        pack, members = read_pack(path)
        verify_members(path, pack, members)
    except UserError as e:
        assert "\n" not in str(e).strip()


@given(data=st.data())
@fuzz_settings(150)
def test_a_pack_json_with_any_values_installs_cleanly_or_is_refused_with_nothing_changed(world, data):
    pack = json.loads(world["members"]["pack.json"])
    path = data.draw(st.sampled_from(list(paths(pack))))
    new = data.draw(JSON | st.just(DELETE))
    members = {**world["members"], "pack.json": json.dumps(replaced(pack, path, new)).encode()}
    archive = world["root"] / "scratch" / "edited.modepack"
    archive.parent.mkdir(exist_ok=True)
    write_members(archive, members)
    bundle = world["bundle"]
    if refused_or_done(lambda: install(bundle, archive), bundle, world["root"]):
        uninstall(bundle, json.loads(members["pack.json"])["name"])


@given(data=st.data())
@fuzz_settings(300)
def test_a_bundle_manifest_with_any_values_is_read_or_refused(world, data):
    bundle = world["root"] / "manifest-fuzz"
    if not bundle.exists():
        shutil.copytree(world["bundle"], bundle)
    original = json.loads((world["bundle"] / "manifest.json").read_text())
    path = data.draw(st.sampled_from(list(paths(original))))
    new = data.draw(JSON | st.just(DELETE))
    (bundle / "manifest.json").write_text(json.dumps(replaced(original, path, new)))
    archive = world["root"] / "code.modepack"

    def use():
        read_bundle(bundle)
        describe(bundle)
        install(bundle, archive)
        uninstall(bundle, "code")

    refused_or_done(use, bundle, world["root"])


@given(data=st.data())
@fuzz_settings(600)
def test_a_signed_index_with_any_values_is_read_or_refused(world, data):
    """The index parser behind a valid signature: the fuzzed index is signed by the trusted key, so every field
    check is reached, not only the signature."""
    keys = world["root"] / "keys"
    if not keys.exists():
        keys.mkdir()
        generate_key(keys / "k")
    public = parse_public(str(keys / "k.pub"), "k")
    trusted = {key_id(public): {"public_key": public_line(public)}}
    good = {"format": "mode-edge-pack-index", "format_version": 1, "version": 3, "expires": "2999-01-01T00:00:00Z",
            "packs": {"code": {"version": 1, "bytes": 10, "sha256": "0" * 64, "base_fingerprint": "f" * 64}}}
    path = data.draw(st.sampled_from(list(paths(good))))
    new = data.draw(JSON | st.just(DELETE))
    raw = json.dumps(replaced(good, path, new)).encode()
    signature = sign(keys / "k.key", index_statement(hashlib.sha256(raw).hexdigest()))
    try:
        index = read_index(raw, signature, trusted, 2, "fuzz")
        assert index["version"] >= 2 and isinstance(index["packs"], dict)
    except UserError as e:
        assert "\n" not in str(e).strip()


@given(value=JSON, raw=st.binary(max_size=200))
@fuzz_settings(600)
def test_a_signature_file_of_any_content_is_read_or_refused(value, raw):
    from mode_edge.signing import read_signature

    for data in (json.dumps(value).encode(), raw, json.dumps({"algorithm": "ed25519", "key_id": value}).encode(),
                 json.dumps({"algorithm": "ed25519", "key_id": "k", "signature": value}).encode()):  # fmt: skip
        try:
            signature = read_signature(data, "pack")
            assert len(signature["signature"]) == 64 and isinstance(signature["key_id"], str)
        except UserError as e:
            assert "\n" not in str(e).strip()
