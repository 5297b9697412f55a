"""A pack source read by a bundle that trusts keys: only what a signed, unexpired, not-replayed index lists is
fetched, never more bytes than it lists, through the real HTTP server on loopback and the real command line."""

import json
import shutil

import pytest

from mode_edge.bundle import read_bundle
from mode_edge.pack_index import make_index
from tests.cli_runner import invoke, refused
from tests.runtimes.test_fetch import PackServer, bundle, run_cli, server  # noqa: F401 - the fixtures
from tests.test_cli import assert_user_error


@pytest.fixture
def signed(bundle, server, tmp_path):  # noqa: F811 - the imported fixture
    """The bundle trusts the publisher's key; the served folder holds a signed code.modepack and a signed index."""
    publisher = tmp_path / "publisher"
    invoke("keys", "generate", "--out", publisher)
    invoke("keys", "generate", "--out", tmp_path / "stranger")
    served = PackServer.root / "code.modepack"
    shutil.move(served, tmp_path / "unsigned.modepack")
    shutil.copytree(bundle, tmp_path / "donor")  # re-install to sign the pack from a bundle that has it
    invoke("install", "--bundle", tmp_path / "donor", tmp_path / "unsigned.modepack")
    invoke("pack", "--bundle", tmp_path / "donor", "--expert", "code", "--out", served, "--sign", f"{publisher}.key")
    invoke("trust", "add", f"{publisher}.pub", "--bundle", bundle)
    return publisher


def test_a_source_without_a_signed_index_serves_nothing_to_a_bundle_that_trusts_keys(bundle, server, signed):
    assert_user_error(run_cli(bundle, "code", server, ok=False), "has no index.json")
    assert PackServer.log == []  # not one byte of a pack was served
    assert "code" not in read_bundle(bundle)["experts"]


def test_a_signed_index_lets_in_what_it_lists_and_nothing_else(bundle, server, signed, tmp_path):
    out = invoke("index", "--packs", PackServer.root, "--sign", f"{signed}.key").output
    assert "version 1, 1 pack," in out
    proc = run_cli(bundle, "code", server)
    assert f"installed code v1 from {server}, signed by" in proc.stderr  # said, not silent
    manifest = read_bundle(bundle)
    assert "code" in manifest["experts"] and manifest["index_versions"][server.rstrip("/")] == 1
    assert_user_error(run_cli(bundle, "law", server, ok=False), "does not list 'law'")


def test_an_index_signed_by_another_key_or_changed_after_signing_is_refused(bundle, server, signed, tmp_path):
    invoke("index", "--packs", PackServer.root, "--sign", f"{tmp_path / 'stranger'}.key")
    assert_user_error(run_cli(bundle, "code", server, ok=False), "not among the trusted keys")
    invoke("index", "--packs", PackServer.root, "--sign", f"{signed}.key")
    index = json.loads((PackServer.root / "index.json").read_text())
    index["expires"] = "2099-01-01T00:00:00Z"  # a longer life, claimed without the key
    (PackServer.root / "index.json").write_text(json.dumps(index))
    assert_user_error(run_cli(bundle, "code", server, ok=False), "does not match its content")
    assert "code" not in read_bundle(bundle)["experts"]


def test_an_expired_index_and_a_replayed_older_index_are_refused(bundle, server, signed, tmp_path):
    make_index(PackServer.root, f"{signed}.key", expires_days=-1)  # (the CLI takes no past expiry)
    assert_user_error(run_cli(bundle, "code", server, ok=False), "expired")
    invoke("index", "--packs", PackServer.root, "--sign", f"{signed}.key", "--version", "5")
    old = {n: (PackServer.root / n).read_bytes() for n in ("index.json", "index.json.sig")}
    invoke("index", "--packs", PackServer.root, "--sign", f"{signed}.key")  # version 6
    run_cli(bundle, "code", server)
    invoke("uninstall", "--bundle", bundle, "code")
    for name, data in old.items():  # an attacker replays the older, still unexpired, validly signed index
        (PackServer.root / name).write_bytes(data)
    assert_user_error(run_cli(bundle, "code", server, ok=False), "version 5, older than version 6 read before")
    refused("index", "--packs", PackServer.root, "--sign", f"{signed}.key", "--version", "3",
            message="does not rise")  # fmt: skip


@pytest.mark.parametrize("send_length", [True, False])
def test_a_server_that_sends_more_than_the_index_lists_is_cut_off(bundle, server, signed, tmp_path, send_length):
    invoke("index", "--packs", PackServer.root, "--sign", f"{signed}.key")
    served = PackServer.root / "code.modepack"
    served.write_bytes(served.read_bytes() + b"\0" * (1 << 20))  # swapped for a larger file after signing
    PackServer.send_length = send_length  # without a length, the stream itself is cut at the listed size
    message = "more than the" if send_length else "sent more than the"
    assert_user_error(run_cli(bundle, "code", server, ok=False), message)
    assert not list((bundle / ".downloads").glob("code.modepack*")) and "code" not in read_bundle(bundle)["experts"]


def test_a_folder_source_is_held_to_its_index_too(bundle, signed, tmp_path):
    folder = PackServer.root
    invoke("index", "--packs", folder, "--sign", f"{signed}.key")
    (folder / "code.modepack").write_bytes((folder / "code.modepack").read_bytes()[:-512])
    assert_user_error(run_cli(bundle, "code", str(folder), ok=False), "size and sha256")
    assert "code" not in read_bundle(bundle)["experts"]


def test_an_index_version_issued_twice_with_other_content_is_refused(bundle, server, signed, tmp_path):
    """A publisher that signs from a stale folder can issue a version twice; a device that read one refuses the
    other (the same bytes again are fine: a device re-reads the index it has)."""
    invoke("index", "--packs", PackServer.root, "--sign", f"{signed}.key", "--version", "4")
    run_cli(bundle, "code", server)
    invoke("uninstall", "--bundle", bundle, "code")
    run_cli(bundle, "code", server)  # the same index again
    invoke("uninstall", "--bundle", bundle, "code")
    (PackServer.root / "index.json").unlink()  # the folder's record lost: version 4 is issued again
    invoke("index", "--packs", PackServer.root, "--sign", f"{signed}.key", "--version", "4", "--expires-days", "9")
    assert_user_error(run_cli(bundle, "code", server, ok=False), "version issued twice")
    assert "code" not in read_bundle(bundle)["experts"]


def test_a_pack_source_that_is_no_folder_or_url_is_named(bundle, tmp_path):
    assert_user_error(run_cli(bundle, "code", "ftp://127.0.0.1/packs/", ok=False), "ftp:// scheme is not supported")
    assert_user_error(run_cli(bundle, "code", str(tmp_path / "nowhere"), ok=False), "is not a folder")


def test_a_key_signs_only_what_its_role_allows(bundle, server, signed, tmp_path):
    """TUF's separation of roles: the server's online key may sign the index only, the publisher's offline key packs
    only. An index signed by the pack key, and a pack signed by the index key, are refused; the two together
    install; trust list shows each key's roles."""
    online = tmp_path / "online"
    invoke("keys", "generate", "--out", online)
    invoke("trust", "add", f"{online}.pub", "--bundle", bundle, "--role", "index")
    invoke("trust", "remove", f"{signed}.pub", "--bundle", bundle)  # (the online key keeps the store non-empty)
    invoke("trust", "add", f"{signed}.pub", "--bundle", bundle, "--role", "packs")
    listed = invoke("trust", "list", "--bundle", bundle).output
    assert "publisher  signs packs\n" in listed and "online  signs index\n" in listed

    invoke("index", "--packs", PackServer.root, "--sign", f"{signed}.key")  # the pack key signing the index
    assert_user_error(run_cli(bundle, "code", server, ok=False), "to sign packs only, not index; if its holder")
    assert len(PackServer.log) == 2 and "code" not in read_bundle(bundle)["experts"]  # index.json and .sig: no pack
    invoke("index", "--packs", PackServer.root, "--sign", f"{online}.key")
    proc = run_cli(bundle, "code", server)  # index by the online key, pack by the publisher's: installed
    assert "signed by" in proc.stderr and "code" in read_bundle(bundle)["experts"]

    by_online = tmp_path / "by-online.modepack"  # a stolen online key cannot sign a pack in
    invoke("pack", "--bundle", tmp_path / "donor", "--expert", "code", "--out", by_online, "--sign", f"{online}.key",
           "--version", "2")  # fmt: skip
    before = (bundle / "manifest.json").read_bytes()
    refused("install", "--bundle", bundle, "--replace", by_online,
            message=("to sign index only, not packs", "--role all"))  # fmt: skip
    assert (bundle / "manifest.json").read_bytes() == before
    refused("verify", by_online, "--bundle", bundle, message="to sign index only, not packs")
    assert "changed" not in invoke("trust", "add", f"{online}.pub", "--bundle", bundle, "--role", "all").output
    assert "online  signs packs and index\n" in invoke("trust", "list", "--bundle", bundle).output
    invoke("install", "--bundle", bundle, "--replace", by_online)  # now it may


def test_adding_a_trusted_key_again_sets_its_roles_even_from_a_store_written_before_roles(bundle, tmp_path):
    """A key recorded without roles signs both; `trust add --role index` narrows it (the README's recipe), and the
    narrowed key's pack is refused."""
    from mode_edge.bundle import write_manifest

    server = tmp_path / "server"
    invoke("keys", "generate", "--out", server)
    invoke("trust", "add", f"{server}.pub", "--bundle", bundle)
    manifest = read_bundle(bundle)
    for entry in manifest["trust"]["keys"].values():
        del entry["roles"]  # as an older mode-edge wrote it
    write_manifest(bundle, manifest)
    assert "server  signs packs and index\n" in invoke("trust", "list", "--bundle", bundle).output
    out = invoke("trust", "add", f"{server}.pub", "--bundle", bundle, "--role", "index").output
    assert "may sign indexes only" in out and "trusts no key to sign packs" in " ".join(out.split())
    assert "server  signs index\n" in invoke("trust", "list", "--bundle", bundle).output
    assert "nothing changed" in invoke("trust", "add", f"{server}.pub", "--bundle", bundle, "--role", "index").output
    signed = tmp_path / "signed.modepack"
    invoke("pack", "--bundle", bundle, "--expert", "prose", "--out", tmp_path / "unsigned.modepack")
    invoke("pack", "--bundle", bundle, "--expert", "prose", "--out", signed, "--sign", f"{server}.key", "--version", "2")
    refused("install", "--bundle", bundle, "--replace", signed, message="to sign index only, not packs")
    refused("install", "--bundle", bundle, "--replace", tmp_path / "unsigned.modepack",
            message=("trusts none (only index keys)", "--role packs"))  # fmt: skip
    manifest = read_bundle(bundle)
    next(iter(manifest["trust"]["keys"].values()))["roles"] = "packs"  # not a list: a damaged store
    write_manifest(bundle, manifest)
    refused("trust", "list", "--bundle", bundle, message="trust.keys is missing or malformed")


def test_a_trusted_key_recorded_without_roles_signs_both():
    """Trust stores written before roles existed name none: their keys keep signing packs and indexes alike."""
    from mode_edge.signing import ROLES, key_roles

    assert key_roles({"public_key": "ed25519 x"}) == ROLES == ("packs", "index")
    assert key_roles({"roles": ["index"]}) == ("index",) and key_roles({"roles": ["packs", "bogus"]}) == ("packs",)
    assert key_roles({"roles": "index"}) == ()  # a damaged entry grants nothing
