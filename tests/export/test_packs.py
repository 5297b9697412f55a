"""Domain packs: cut, install, uninstall, inspect; and every way a bad pack is refused with nothing changed."""

import hashlib
import io
import json
import shutil
import tarfile

import pytest

from mode_edge.bundle import expert_folder, read_bundle
from mode_edge.errors import UserError
from mode_edge.packs import describe, install, make_pack, uninstall
from mode_edge.runtimes.engine import Engine, generate
from tests.damage import repack


@pytest.fixture
def code_pack(int8_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("packs") / "code.modepack"
    if not out.exists():
        make_pack(int8_bundle, "code", out)
    return out


def tree(folder):
    """Every file under the folder with its content hash: 'nothing changed' means this is equal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def members(pack):
    with tarfile.open(pack) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def write_tar(path, files: dict, extra=()):
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def test_pack_uninstall_install_round_trip(bundle, code_pack, tmp_path):
    prompt = [5, 6, 7, 8]
    engine = Engine(bundle)
    engine.load_expert("code")
    before = list(generate(engine, prompt, 8))
    prose_files = tree(bundle / "experts" / "prose")

    uninstall(bundle, "code")
    assert sorted(read_bundle(bundle)["experts"]) == ["prose"]
    assert sorted(p.name for p in (bundle / "experts").iterdir()) == ["prose"]
    assert tree(bundle / "experts" / "prose") == prose_files  # the other pack is never touched
    with pytest.raises(UserError, match="not installed"):
        Engine(bundle).load_expert("code")

    install(bundle, code_pack)
    assert sorted(read_bundle(bundle)["experts"]) == ["code", "prose"]
    engine = Engine(bundle)
    engine.load_expert("code")
    assert list(generate(engine, prompt, 8)) == before
    manifest = (bundle / "manifest.json").read_bytes()
    install(bundle, code_pack)  # the same pack again: a success that changes nothing
    assert (bundle / "manifest.json").read_bytes() == manifest
    other = tmp_path / "other.modepack"
    repack(code_pack, other, parameters=1)  # another version of `code`
    with pytest.raises(UserError, match="already installed"):
        install(bundle, other)
    install(bundle, other, replace=True)

    info = describe(code_pack)
    assert info["kind"] == "pack" and info["name"] == "code" and set(info["components"]) == {"block0", "block1"}
    assert info["bytes"] == sum(len(v) for k, v in members(code_pack).items() if k != "pack.json")
    assert set(describe(bundle)["experts"]) == {"code", "prose"}


def test_folders_left_by_interrupted_installs_are_removed_by_the_next(bundle, code_pack):
    uninstall(bundle, "code")
    orphans = ["code", "code@0badf00d", ".code.installing-x"]  # folders the manifest does not point at
    for orphan in orphans:
        shutil.copytree(bundle / "experts" / "prose", bundle / "experts" / orphan)
    install(bundle, code_pack)
    manifest = read_bundle(bundle)
    folder = expert_folder(bundle, manifest, "code")
    assert folder.name.startswith("code@") and json.loads((folder / "pack.json").read_text())["name"] == "code"
    listed = {expert_folder(bundle, manifest, n).name for n in manifest["experts"]}
    assert {p.name for p in (bundle / "experts").iterdir()} == listed == {"prose", folder.name}
    Engine(bundle).load_expert("code")


def tamper(code_pack, tmp_path, edit_manifest=None, edit_files=None, extra=()):
    files = members(code_pack)
    manifest = json.loads(files["pack.json"])
    if edit_manifest:
        edit_manifest(manifest)
    files["pack.json"] = json.dumps(manifest).encode()
    if edit_files:
        edit_files(files)
    return write_tar(tmp_path / "bad.modepack", files, extra)


def flip_byte(files):
    data = bytearray(files["block0.onnx.data"])
    data[len(data) // 2] ^= 0xFF
    files["block0.onnx.data"] = bytes(data)


def symlink_member():
    info = tarfile.TarInfo("block9.onnx")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


CASES = {
    "checksum": (dict(edit_files=flip_byte), "sha256"),
    "fingerprint": (dict(edit_manifest=lambda m: m.update(base_fingerprint="0" * 64)), "base fingerprint"),
    "version": (dict(edit_manifest=lambda m: m.update(format_version=99)), "format version 99"),
    "old-version": (dict(edit_manifest=lambda m: m.update(format_version=1)),
                    "format version 1; .*older mode-edge: export it again"),
    "kv-cache": (dict(edit_manifest=lambda m: m.update(kv_cache={"onnx": "concat"})), "kv_cache is missing or"),
    "outside": (
        dict(
            edit_manifest=lambda m: m["files"].update({"../evil.py": {"bytes": 3, "sha256": "a" * 64}}),
            edit_files=lambda f: f.update({"../evil.py": b"bad"}),
        ),
        "outside",
    ),  # fmt: skip
    "absolute": (dict(edit_files=lambda f: f.update({"/tmp/evil": b"x"})), "outside"),
    "link": (dict(extra=[symlink_member()]), "not a regular file"),
    "missing": (dict(edit_files=lambda f: f.pop("block1.onnx")), "missing block1.onnx"),
    "unlisted": (dict(edit_files=lambda f: f.update({"extra.bin": b"x"})), "unlisted"),
    "size": (dict(edit_manifest=lambda m: m["files"]["gate.safetensors"].update(bytes=1 << 50)), "absurd size"),
    "negative": (dict(edit_manifest=lambda m: m["files"]["gate.safetensors"].update(bytes=-1)), "absurd size"),
    "truncated-member": (dict(edit_files=lambda f: f.update({"block0.onnx": f["block0.onnx"][:100]})), "bytes"),
    "name": (dict(edit_manifest=lambda m: m.update(name="../../x")), "is not a plain name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_pack_is_refused_and_nothing_changes(bundle, code_pack, tmp_path, case):
    kwargs, message = CASES[case]
    bad = tamper(code_pack, tmp_path, **kwargs)
    uninstall(bundle, "code")
    before = tree(bundle)
    with pytest.raises(UserError, match=message):
        install(bundle, bad)
    assert tree(bundle) == before
    assert not (tmp_path / "evil.py").exists() and not (bundle / "evil.py").exists()


def test_a_truncated_archive_and_a_non_archive_are_refused(bundle, code_pack, tmp_path):
    raw = code_pack.read_bytes()
    cut = tmp_path / "cut.modepack"
    cut.write_bytes(raw[: len(raw) // 2])
    before = tree(bundle)
    with pytest.raises(UserError, match="truncated or corrupt|missing|bytes"):
        install(bundle, cut, replace=True)
    junk = tmp_path / "junk.modepack"
    junk.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(UserError, match="not a readable archive|not a mode-edge pack"):
        install(bundle, junk, replace=True)
    assert tree(bundle) == before


def test_a_pack_of_another_quantization_is_refused(bundle, code_pack):
    manifest = read_bundle(bundle)
    manifest["quantization"] = {"scheme": "int4", "block_size": 32}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    uninstall(bundle, "code")
    with pytest.raises(UserError, match=r"quantized int8 \(block 32\), the bundle int4"):
        install(bundle, code_pack)


def test_a_pack_computed_at_another_accuracy_level_still_fits(bundle, code_pack):
    """accuracy_level is each graph's compute type, not the weights' format: it need not match the bundle's."""
    manifest = read_bundle(bundle)
    manifest["quantization"] = {**manifest["quantization"], "accuracy_level": 0}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    uninstall(bundle, "code")
    install(bundle, code_pack)
    assert "code" in read_bundle(bundle)["experts"]


def test_a_corrupted_installed_file_is_refused_at_load(bundle):
    path = bundle / "experts/prose/block1.onnx.data"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="block1.onnx.data has .* bytes.*cut short.*reinstall its pack"):
        Engine(bundle).load_expert("prose")


def test_a_pack_whose_pte_graphs_take_another_context_is_refused():
    """.pte graphs are exported for a bounded context (their memory is planned for it): a pack's must match."""
    from mode_edge.bundle import check_pack_fits

    quant = {"scheme": "fp32"}
    kv = {"onnx": "buffer", "executorch": "concat"}
    bundle = {"base": {"fingerprint": "f" * 64}, "quantization": quant, "formats": ["onnx", "executorch"],
              "kv_cache": kv, "executorch": {"tokens_per_call": 64, "context": 1024}}  # fmt: skip
    fits = {"base_fingerprint": "f" * 64, "quantization": quant, "formats": ["onnx", "executorch"], "kv_cache": kv,
            "executorch": dict(bundle["executorch"])}  # fmt: skip
    check_pack_fits(fits, bundle, "pack p")
    with pytest.raises(UserError, match="a context of 512, the bundle's take 64 tokens a call and a context of 1024"):
        check_pack_fits({**fits, "executorch": {"tokens_per_call": 64, "context": 512}}, bundle, "pack p")
    with pytest.raises(UserError, match="any length"):
        check_pack_fits({k: v for k, v in fits.items() if k != "executorch"}, bundle, "pack p")
    check_pack_fits({**fits, "executorch": None}, {**bundle, "formats": ["onnx"]}, "pack p")  # onnx only: no matter
    # a .pte computes its rotary angles inside: LongRoPE's long factors (export --context past the original) differ
    import dataclasses

    from mode_edge.config import ExportConfig
    from mode_edge.export.pipeline import pte_limits
    from mode_edge.training.backbones import TINY_CONFIG

    def limits(factors: str) -> dict:
        scaling = {"rope_type": "longrope", factors: [2.0] * 8, "attention_factor": 1.1}
        return pte_limits(ExportConfig(pte_context=1024), dataclasses.replace(TINY_CONFIG, rope_scaling=scaling))

    check_pack_fits({**fits, "executorch": limits("short_factor")}, bundle, "pack p")
    with pytest.raises(UserError, match="a context of 1024, LongRoPE's long factors, the bundle's take 64 tokens a "
                                        "call and a context of 1024; export the expert with the bundle's --context"):
        check_pack_fits({**fits, "executorch": limits("long_factor")}, bundle, "pack p")


@pytest.mark.parametrize("location", ["../../base/block0.onnx.data", "/etc/passwd", "block1.onnx.data/../x",
                                      "not-in-the-pack.data"])  # fmt: skip
def test_a_graph_whose_weights_point_outside_the_pack_is_refused_before_onnxruntime_reads_it(
    bundle, code_pack, tmp_path, location
):
    """A consistent hostile pack: its graph's external-data path is rewritten and the manifest records the new
    graph's true size and sha256, so only the path check can catch it."""
    import onnx

    files = members(code_pack)
    graph = onnx.load_model_from_string(files["block0.onnx"])
    tensor = next(t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = location
    files["block0.onnx"] = graph.SerializeToString()
    manifest = json.loads(files["pack.json"])
    manifest["files"]["block0.onnx"] = {"bytes": len(files["block0.onnx"]),
                                        "sha256": hashlib.sha256(files["block0.onnx"]).hexdigest()}  # fmt: skip
    files["pack.json"] = json.dumps(manifest).encode()
    bad = write_tar(tmp_path / "bad.modepack", files)
    uninstall(bundle, "code")
    before = tree(bundle)
    with pytest.raises(UserError, match="not a file of the pack"):
        install(bundle, bad)
    assert tree(bundle) == before
