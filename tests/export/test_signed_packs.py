"""Signed packs through the command line: keys, the trust store, signatures that must verify, rollback protection.
Every refusal is one line, exit code 2, and leaves the bundle as it was."""

import io
import json
import os
import tarfile

import pytest

from mode_edge.bundle import expert_folder, read_bundle
from tests.cli_runner import invoke, refused, tree
from tests.damage import repack


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: the publisher's (trusted by the bundle in most tests) and a stranger's."""
    invoke("keys", "generate", "--out", tmp_path / "publisher")
    invoke("keys", "generate", "--out", tmp_path / "stranger")
    return tmp_path / "publisher", tmp_path / "stranger"


def with_member(src, out, name, data: bytes):
    """A copy of the archive `src` with member `name` replaced (or added) by `data`."""
    with tarfile.open(src) as tar, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as new:
        for m in tar.getmembers():
            if m.name != name:
                new.addfile(m, tar.extractfile(m))
        info = tarfile.TarInfo(name)
        info.size = len(data)
        new.addfile(info, io.BytesIO(data))
    return out


def member(pack, name) -> bytes:
    with tarfile.open(pack) as tar:
        return tar.extractfile(name).read()


def test_keys_generate_writes_an_owner_only_private_key_and_never_overwrites(keys, tmp_path):
    publisher, _ = keys
    assert os.stat(f"{publisher}.key").st_mode & 0o777 == 0o600
    assert open(f"{publisher}.pub").read().startswith("ed25519 ")
    refused("keys", "generate", "--out", publisher, message="already exists")
    refused("keys", "generate", "--out", tmp_path, message="is a folder")  # --out names the pair, not a folder
    invoke("keys", "generate", "--out", tmp_path / "new" / "folder" / "k")  # a missing folder is made
    assert (tmp_path / "new" / "folder" / "k.pub").is_file()


def test_key_mix_ups_and_missing_files_are_named_in_one_line(bundle, keys, tmp_path):
    """Each wrong key argument names what was given and what is wanted; no library text, no traceback."""
    publisher, _ = keys
    refused("trust", "add", tmp_path / "missing.pub", "--bundle", bundle, message=("missing.pub does not exist", ".pub"))
    refused("trust", "add", f"{publisher}.key", "--bundle", bundle, message="is a private key")
    pem = open(f"{publisher}.key").read()  # pasted inline by mistake: named, never echoed
    line = refused("trust", "add", "--bundle", bundle, "--", pem, message=("the key text given", "is a private key"))
    assert "BEGIN" not in line and pem.splitlines()[1][:16] not in line
    line = refused("trust", "add", pem, "--bundle", bundle, message="a PEM block, not shown")  # taken for an option
    assert pem.splitlines()[1][:16] not in line
    line = refused("trust", "add", "ed25519 AAAA", "--bundle", bundle, message="the key text given")
    refused("verify", tmp_path / "none.modepack", "--key", f"{publisher}.key", message="is a private key")
    refused("pack", "--bundle", bundle, "--expert", "code", "--out", tmp_path / "p.modepack",
            "--sign", f"{publisher}.pub", message="is a public key")  # fmt: skip
    (tmp_path / "junk.key").write_text("not a key")
    refused("pack", "--bundle", bundle, "--expert", "code", "--out", tmp_path / "p.modepack",
            "--sign", tmp_path / "junk.key", message="not an unencrypted PEM private key")  # fmt: skip
    assert not (tmp_path / "p.modepack").exists()
    refused("verify", tmp_path, message="is a folder")
    refused("index", "--packs", tmp_path / "nowhere", "--sign", f"{publisher}.key", message="is not a folder")


def test_outputs_go_into_new_folders_and_a_folder_is_never_taken_for_a_file(bundle, tmp_path):
    invoke("pack", "--bundle", bundle, "--expert", "code", "--out", tmp_path / "site" / "new" / "code.modepack")
    assert (tmp_path / "site" / "new" / "code.modepack").is_file()
    refused("pack", "--bundle", bundle, "--expert", "code", "--out", tmp_path / "site", message="is a folder")
    refused("eval", "--bundle", bundle, "--data", tmp_path, "--json", tmp_path / "site",
            message="--json")  # before any evaluation starts


def test_the_last_trusted_key_is_removed_only_on_request(bundle, keys):
    publisher, stranger = keys
    invoke("trust", "add", f"{publisher}.pub", "--bundle", bundle)
    assert "already trusts" in invoke("trust", "add", f"{publisher}.pub", "--bundle", bundle).output
    refused("trust", "remove", f"{publisher}.pub", "--bundle", bundle, message=("last key", "--allow-no-keys"))
    invoke("trust", "add", f"{stranger}.pub", "--bundle", bundle)  # rotation: the new key first
    invoke("trust", "remove", f"{publisher}.pub", "--bundle", bundle)
    invoke("trust", "remove", f"{stranger}.pub", "--bundle", bundle, "--allow-no-keys")
    assert read_bundle(bundle)["trust"]["keys"] == {}


def test_installing_the_installed_pack_again_still_checks_the_archive(bundle, tmp_path):
    invoke("pack", "--bundle", bundle, "--expert", "code", "--out", tmp_path / "code.modepack")
    with tarfile.open(tmp_path / "code.modepack") as tar:
        weights = next(m for m in tar.getmembers() if m.name.endswith(".onnx.data"))
    data = bytearray((tmp_path / "code.modepack").read_bytes())
    data[weights.offset_data + weights.size // 2] ^= 0xFF  # a weight byte: pack.json, and so its sha256, unchanged
    (tmp_path / "bad.modepack").write_bytes(bytes(data))
    invoke("install", "--bundle", bundle, tmp_path / "code.modepack")  # the same pack, whole: a success
    before = tree(bundle)
    refused("install", "--bundle", bundle, tmp_path / "bad.modepack", "--replace", message="sha256")
    assert tree(bundle) == before


def test_a_bundle_that_trusts_a_key_installs_only_what_that_key_signed(bundle, keys, tmp_path, fp32_bundle):
    publisher, stranger = keys
    invoke("uninstall", "--bundle", bundle, "code")
    invoke("pack", "--bundle", bundle, "--expert", "prose", "--out", tmp_path / "unsigned.modepack")
    out = invoke("pack", "--bundle", bundle, "--expert", "prose", "--out", tmp_path / "signed.modepack",
                 "--sign", f"{publisher}.key").output  # fmt: skip
    assert "signed" in out
    invoke("pack", "--bundle", bundle, "--expert", "prose", "--out", tmp_path / "stranger.modepack",
           "--sign", f"{stranger}.key")  # fmt: skip
    invoke("uninstall", "--bundle", bundle, "prose")

    # no trust store: any intact pack installs, as before
    invoke("install", "--bundle", bundle, tmp_path / "unsigned.modepack")
    invoke("uninstall", "--bundle", bundle, "prose")
    kid = invoke("trust", "add", f"{publisher}.pub", "--bundle", bundle).output.split("key ")[1].split(";")[0]
    assert kid in invoke("trust", "list", "--bundle", bundle).output
    before = tree(bundle)
    refused("install", "--bundle", bundle, tmp_path / "unsigned.modepack", message=("not signed", kid, "--sign"))
    refused("install", "--bundle", bundle, tmp_path / "stranger.modepack",
            message=("not among the trusted keys", "trust add"))  # fmt: skip
    assert tree(bundle) == before

    invoke("verify", tmp_path / "signed.modepack", "--bundle", bundle)
    refused("verify", tmp_path / "stranger.modepack", "--bundle", bundle, message="not among the trusted keys")
    refused("verify", tmp_path / "signed.modepack", "--key", f"{stranger}.pub", message="not by the key given")
    # a bundle the pack was not made for (fp32): refused as install refuses it
    refused("verify", tmp_path / "signed.modepack", "--bundle", fp32_bundle, message="is quantized int8")
    assert "unsigned" in invoke("verify", tmp_path / "unsigned.modepack").output
    assert "(not checked" in invoke("verify", tmp_path / "stranger.modepack").output  # a claim, not a signer

    invoke("install", "--bundle", bundle, tmp_path / "signed.modepack")
    entry = read_bundle(bundle)["experts"]["prose"]
    assert entry["signed_by"] == kid and entry["version"] == 1
    assert (expert_folder(bundle, read_bundle(bundle), "prose") / "pack.sig").is_file()
    # re-shipping the installed pack keeps its signature
    invoke("pack", "--bundle", bundle, "--expert", "prose", "--out", tmp_path / "again.modepack")
    assert member(tmp_path / "again.modepack", "pack.sig") == member(tmp_path / "signed.modepack", "pack.sig")

    invoke("uninstall", "--bundle", bundle, "prose")
    out = invoke("install", "--bundle", bundle, tmp_path / "unsigned.modepack", "--allow-unsigned").output
    assert "WARNING" in out and "UNSIGNED" in out
    assert read_bundle(bundle)["experts"]["prose"]["signed_by"] is None
    invoke("trust", "remove", kid[:6], "--bundle", bundle, "--allow-no-keys")
    assert "trusts no keys" in invoke("trust", "list", "--bundle", bundle).output


def test_a_pack_changed_after_signing_is_refused_even_when_unsigned_packs_are_allowed(bundle, keys, tmp_path):
    publisher, _ = keys
    signed = tmp_path / "signed.modepack"
    invoke("pack", "--bundle", bundle, "--expert", "code", "--out", signed, "--sign", f"{publisher}.key")
    invoke("pack", "--bundle", bundle, "--expert", "prose", "--out", tmp_path / "prose.modepack",
           "--sign", f"{publisher}.key")  # fmt: skip
    invoke("uninstall", "--bundle", bundle, "code")
    invoke("trust", "add", f"{publisher}.pub", "--bundle", bundle)
    before = tree(bundle)
    repack(signed, tmp_path / "edited.modepack", parameters=1)  # pack.json edited, pack.sig kept
    repack(signed, tmp_path / "bumped.modepack", version=9)  # a version claimed that was never signed
    replayed = with_member(signed, tmp_path / "replayed.modepack", "pack.sig", member(tmp_path / "prose.modepack",
                                                                                      "pack.sig"))  # fmt: skip
    for bad in ("edited", "bumped", "replayed"):
        for extra in ((), ("--allow-unsigned",)):
            refused("install", "--bundle", bundle, tmp_path / f"{bad}.modepack", *extra,
                    message="does not match its content")  # fmt: skip
    garbage = with_member(signed, tmp_path / "garbage.modepack", "pack.sig", b'{"algorithm": "ed25519"}')
    refused("install", "--bundle", bundle, garbage, message="not an ed25519 signature")
    huge = with_member(signed, tmp_path / "huge.modepack", "pack.sig", b" " * 100_000)
    refused("install", "--bundle", bundle, huge, message="too large")
    assert tree(bundle) == before
    invoke("install", "--bundle", bundle, signed)


def test_an_older_version_is_refused_as_a_rollback_even_after_an_uninstall(bundle, keys, tmp_path):
    publisher, _ = keys
    v1, v2 = tmp_path / "v1.modepack", tmp_path / "v2.modepack"
    invoke("pack", "--bundle", bundle, "--expert", "code", "--out", v1, "--sign", f"{publisher}.key")
    invoke("pack", "--bundle", bundle, "--expert", "code", "--out", tmp_path / "u1.modepack")  # unsigned, version 1
    out = invoke("pack", "--bundle", bundle, "--expert", "code", "--out", v2, "--sign", f"{publisher}.key",
                 "--version", "2").output  # fmt: skip
    assert "v2" in out and json.loads(member(v2, "pack.json"))["version"] == 2
    assert "pack code v2, its signature names key" in invoke("inspect", v2).output  # a claim, shown as one
    assert "pack code v1, unsigned" in invoke("inspect", tmp_path / "u1.modepack").output
    invoke("trust", "add", f"{publisher}.pub", "--bundle", bundle)
    invoke("install", "--bundle", bundle, v2, "--replace")
    assert read_bundle(bundle)["pack_versions"]["code"] == 2
    before = tree(bundle)
    refused("install", "--bundle", bundle, v1, "--replace", message=("version 1", "version 2", "rollback"))
    invoke("uninstall", "--bundle", bundle, "code")
    refused("install", "--bundle", bundle, v1, message="rollback")  # the highest version outlives the uninstall
    rollback = invoke("install", "--bundle", bundle, tmp_path / "u1.modepack", "--allow-unsigned", ok=False)
    assert "rollback" in rollback.output and "WARNING" not in rollback.output  # refused before any warning
    invoke("install", "--bundle", bundle, v1, "--allow-downgrade")
    assert read_bundle(bundle)["experts"]["code"]["version"] == 1
    assert read_bundle(bundle)["pack_versions"]["code"] == 2
    assert before != tree(bundle)
    refused("pack", "--bundle", bundle, "--expert", "code", "--version", "0", message="--version")
