"""Keys pinned at run time (`mode-edge run --trust PUB`, `mode-edge-native run --trust PUB`, the C API's
trusted_keys): only packs carrying one's signature load, checked at every load against keys that live outside the
writable bundle. Both runtimes take the same keys, accept the same packs and refuse the same ones; the native one
verifies with OpenSSL what the Python one signed and verifies with `cryptography`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mode_edge import signing
from mode_edge.bundle import expert_folder, read_bundle
from mode_edge.files import sha256_file
from tests.cli_runner import invoke, refused
from tests.damage import flip
from tests.runtimes.test_native import run_native

PROMPT = "def add(a, b):"
IDS = [12, 40, 7, 101]


@pytest.fixture
def signed(bundle, tmp_path):
    """The bundle with its code expert replaced by the same pack signed by `publisher` (version 2); prose stays
    unsigned. The bundle itself trusts no keys, so install checks no signature: only the pinned keys do."""
    invoke("keys", "generate", "--out", tmp_path / "publisher")
    invoke("keys", "generate", "--out", tmp_path / "stranger")
    pack = tmp_path / "code.modepack"
    invoke("pack", "--bundle", bundle, "--expert", "code", "--out", pack, "--sign", tmp_path / "publisher.key",
           "--version", "2")  # fmt: skip
    invoke("install", "--bundle", bundle, pack, "--replace")
    return bundle, tmp_path / "publisher.pub", tmp_path / "stranger.pub"


def key_id(pub: Path) -> str:
    return signing.key_id(signing.parse_public(str(pub), "key"))


def python_run(bundle, *args) -> str:
    return invoke("run", "--bundle", bundle, "--prompt", PROMPT, "--max-new-tokens", "6", *args).stdout


def native_refused(native, bundle, *args) -> str:
    code, tokens, err, _ = run_native(native, bundle, IDS, "--max-new-tokens", "4", *args)
    assert code == 2 and not tokens and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def rewrite_records(bundle: Path, name: str) -> None:
    """What someone who can write into the bundle but holds no key does after changing a pack's files: every record
    made to match again (pack.json's sha256 of each file, the bundle manifest's sha256 of pack.json)."""
    manifest = read_bundle(bundle)
    folder = expert_folder(bundle, manifest, name)
    pack = json.loads((folder / "pack.json").read_text())
    for rel, rec in pack["files"].items():
        rec["sha256"] = sha256_file(folder / rel)
    (folder / "pack.json").write_text(json.dumps(pack, indent=2))
    manifest["experts"][name]["pack_sha256"] = sha256_file(folder / "pack.json")
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def test_a_pinned_key_loads_its_packs_in_both_runtimes_and_nothing_else(native, signed):
    bundle, publisher, stranger = signed
    assert python_run(bundle, "--experts", "code", "--trust", publisher) == python_run(bundle, "--experts", "code")
    code, tokens, err, _ = run_native(native, bundle, IDS, "--experts", "code", "--max-new-tokens", "4")
    code_t, tokens_t, err_t, _ = run_native(native, bundle, IDS, "--experts", "code", "--max-new-tokens", "4",
                                            "--trust", str(publisher))  # fmt: skip
    assert code == code_t == 0 and tokens == tokens_t and len(tokens) == 4, err + err_t
    key = publisher.read_text().strip()  # the .pub's line works as well as its path
    assert run_native(native, bundle, IDS, "--experts", "code", "--max-new-tokens", "4", "--trust", key)[1] == tokens

    # another key: named, with the fix; the prose pack is not signed at all
    line = refused("run", "--bundle", bundle, "--prompt", PROMPT, "--experts", "code", "--trust", stranger,
                   message=(f"signed by key {key_id(publisher)}", "not by a key"))  # fmt: skip
    assert key_id(stranger) in line
    assert key_id(stranger) in native_refused(native, bundle, "--experts", "code", "--trust", str(stranger))
    refused("run", "--bundle", bundle, "--prompt", PROMPT, "--experts", "prose", "--trust", publisher,
            message=("expert 'prose' is not signed", "pack.sig is missing"))  # fmt: skip
    assert "expert 'prose' is not signed" in native_refused(native, bundle, "--experts", "prose", "--trust",
                                                            str(publisher))  # fmt: skip
    # auto routes only among what loads: the unsigned pack is left out with one warning, in both runtimes
    result = invoke("run", "--bundle", bundle, "--prompt", PROMPT, "--max-new-tokens", "4", "--router", "gate",
                    "--trust", publisher)  # fmt: skip
    assert "expert 'prose' is not signed" in result.stderr and "[experts: code" in result.stderr, result.stderr
    code, tokens, err, profile = run_native(native, bundle, IDS, "--router", "gate", "--max-new-tokens", "4",
                                            "--trust", str(publisher), json_out=bundle.parent / "p.json")  # fmt: skip
    assert code == 0 and "expert 'prose' is not signed" in err and profile["experts"] == ["code"], err


def test_changed_weights_with_every_checksum_rewritten_run_unless_a_key_is_pinned(native, signed):
    """The attack pinned keys exist for: the weights changed inside the bundle and every record rewritten to match.
    The bundle's own checks pass (it runs without --trust); the pinned key's signature does not."""
    bundle, publisher, _ = signed
    folder = expert_folder(bundle, read_bundle(bundle), "code")
    pack = json.loads((folder / "pack.json").read_text())
    biggest = max(pack["files"], key=lambda rel: pack["files"][rel]["bytes"])
    flip(folder / biggest)
    rewrite_records(bundle, "code")
    python_run(bundle, "--experts", "code")  # the checksums agree: nothing else can tell
    assert run_native(native, bundle, IDS, "--experts", "code", "--max-new-tokens", "2")[0] == 0
    message = ("expert 'code'", "does not match its content")
    refused("run", "--bundle", bundle, "--prompt", PROMPT, "--experts", "code", "--trust", publisher, message=message)
    err = native_refused(native, bundle, "--experts", "code", "--trust", str(publisher))
    assert all(piece in err for piece in message), err

    # the version raised in pack.json (to get past rollback floors) breaks the signature too
    signed_version = json.loads((folder / "pack.json").read_text())
    signed_version["version"] = 9
    (folder / "pack.json").write_text(json.dumps(signed_version))
    rewrite_records(bundle, "code")
    refused("run", "--bundle", bundle, "--prompt", PROMPT, "--experts", "code", "--trust", publisher, message=message)
    err = native_refused(native, bundle, "--experts", "code", "--trust", str(publisher))
    assert "does not match its content" in err


def test_a_forged_hash_cache_does_not_let_changed_weights_past_a_pinned_key(native, signed):
    """The cache of verified hashes (.verified.json) lives in the writable bundle: with pinned keys it is not
    trusted, so weights changed in place with a forged cache entry (and pack.json, pack.sig untouched) are refused."""
    import os

    from mode_edge.integrity import CACHE, stamp

    bundle, publisher, _ = signed
    python_run(bundle, "--experts", "code")  # fills the cache
    folder = expert_folder(bundle, read_bundle(bundle), "code")
    pack = json.loads((folder / "pack.json").read_text())
    biggest = max(pack["files"], key=lambda rel: pack["files"][rel]["bytes"])
    flip(folder / biggest)
    cache = json.loads((folder / CACHE).read_text())
    cache[biggest] = [*stamp(folder / biggest), pack["files"][biggest]["sha256"]]
    (folder / CACHE).write_text(json.dumps(cache))
    os.utime(folder / biggest)
    cache[biggest] = [*stamp(folder / biggest), pack["files"][biggest]["sha256"]]
    (folder / CACHE).write_text(json.dumps(cache))
    python_run(bundle, "--experts", "code")  # without pinning the cache is believed (its documented limit)
    refused("run", "--bundle", bundle, "--prompt", PROMPT, "--experts", "code", "--trust", publisher,
            message="does not match its sha256")  # fmt: skip
    assert "does not match its sha256" in native_refused(native, bundle, "--experts", "code", "--trust",
                                                         str(publisher))  # fmt: skip


def test_bad_keys_and_signatures_are_one_line(native, signed, tmp_path):
    bundle, publisher, _ = signed
    private = publisher.with_suffix(".key")
    for key, piece in [(private, "is a private key"), (tmp_path / "missing.pub", "missing.pub"),
                       ("ed25519 AAAA", "not an ed25519 public key")]:  # fmt: skip
        refused("run", "--bundle", bundle, "--prompt", PROMPT, "--trust", key, message=piece)
        assert piece in native_refused(native, bundle, "--trust", str(key))
    assert "drop --no-verify" in native_refused(native, bundle, "--trust", str(publisher), "--no-verify")
    assert "--trust is empty" in native_refused(native, bundle, "--trust", " ")
    refused("run", "--bundle", bundle, "--prompt", PROMPT, "--trust", "", message="--trust")
    folder = expert_folder(bundle, read_bundle(bundle), "code")
    (folder / "pack.sig").write_text('{"algorithm": "ed25519", "key_id": "x", "signature": "not base64!"}')
    message = "is not an ed25519 signature"
    refused("run", "--bundle", bundle, "--prompt", PROMPT, "--experts", "code", "--trust", publisher, message=message)
    assert message in native_refused(native, bundle, "--experts", "code", "--trust", str(publisher))
