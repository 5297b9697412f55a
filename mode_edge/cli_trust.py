"""Signed packs on the command line: keys generate; trust add | list | remove; verify (mode_edge/signing.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mode_edge.errors import UserError
from mode_edge.ranges import Float, Int


@click.group("keys", short_help="Signing keys for domain packs: generate.")
def keys():
    """ed25519 keys that sign domain packs (`mode-edge pack --sign NAME.key`)."""


@keys.command("generate")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Path and name of the key pair: writes OUT.key (private, owner-only) and OUT.pub.")  # fmt: skip
def keys_generate(out):
    """Make a new ed25519 key pair. Keep OUT.key secret (it signs packs); hand OUT.pub to whoever installs them
    (`mode-edge trust add OUT.pub --bundle B`)."""
    from mode_edge.signing import generate_key

    kid = generate_key(out)
    click.echo(f"key {kid}: private {out}.key (keep it secret), public {out}.pub (give it to `mode-edge trust add`)")


@click.group("trust", short_help="A bundle's trust store: add, list, remove signing keys.")
def trust():
    """Keys whose signed packs a bundle installs. A bundle that trusts at least one key refuses unsigned packs and
    packs signed by other keys (`mode-edge install --allow-unsigned` overrides, for development only)."""


@trust.command("add")
@click.argument("pubkey")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
@click.option("--label", default=None, help="A name to show for the key (default: the .pub file's name).")
@click.option("--role", type=click.Choice(["all", "packs", "index"]), default="all", show_default=True,
              help="What the key may sign: packs, the index of a pack source, or both. Keep the pack key offline "
                   "and give the server's index key the index role only: if it is stolen, it cannot sign a pack.")
def trust_add_cmd(pubkey, bundle, label, role):
    """Trust PUBKEY (a .pub file from `mode-edge keys generate`, or its line 'ed25519 BASE64') to sign packs
    and/or a pack source's index. Adding a trusted key again sets its roles to --role (e.g. narrows it to index)."""
    from mode_edge.signing import ROLES
    from mode_edge.trust import trust_add

    kid, added = trust_add(bundle, pubkey, label, ROLES if role == "all" else (role,))
    if added:
        signs = "packs and indexes" if role == "all" else {"packs": "packs only", "index": "indexes only"}[role]
        click.echo(f"{bundle} trusts key {kid}; it may sign {signs}; from now on it installs only signed packs")
        warn_no_pack_key(bundle)
    else:
        click.echo(f"{bundle} already trusts key {kid} for {role if role != 'all' else 'packs and indexes'}; "
                   f"nothing changed")  # fmt: skip


@trust.command("list")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def trust_list_cmd(bundle, as_json):
    """The keys BUNDLE trusts, and the signer and version of each installed pack."""
    from mode_edge.bundle import read_bundle
    from mode_edge.signing import key_roles, trusted_keys

    manifest = read_bundle(bundle)
    keys_ = trusted_keys(manifest)
    installed = {n: {"version": e.get("version", 1), "signed_by": e.get("signed_by")}
                 for n, e in sorted(manifest["experts"].items())}  # fmt: skip
    if as_json:
        keys_ = {kid: {**k, "roles": list(key_roles(k))} for kid, k in keys_.items()}
        click.echo(json.dumps({"keys": keys_, "installed": installed}, indent=2))
        return
    if not keys_:
        click.echo(f"{bundle} trusts no keys: it installs any intact pack (add one with `mode-edge trust add`)")
    for kid, k in sorted(keys_.items()):
        click.echo(f"{kid}  {k.get('label', '')}  signs {' and '.join(key_roles(k)) or 'nothing'}")
    for name, e in installed.items():
        click.echo(f"installed {name} v{e['version']}: " + (f"signed by {e['signed_by']}" if e["signed_by"]
                                                           else "not checked against a key"))  # fmt: skip


@trust.command("remove")
@click.argument("key")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
@click.option("--allow-no-keys", is_flag=True,
              help="Remove even the last key, which turns signature checks off (the bundle then installs any "
                   "intact pack). To rotate keys, add the new one first instead.")  # fmt: skip
def trust_remove_cmd(key, bundle, allow_no_keys):
    """Stop trusting KEY (its id from `trust list`, a unique prefix, or its .pub). Installed packs stay. The last
    key is kept unless --allow-no-keys: to rotate, `trust add` the new key, then remove the old."""
    from mode_edge.trust import trust_remove

    kid, remaining = trust_remove(bundle, key, allow_no_keys)
    if remaining:
        click.echo(f"{bundle} no longer trusts key {kid}")
        warn_no_pack_key(bundle)
    else:
        click.echo(f"{bundle} no longer trusts key {kid}; it trusts no key now and installs any intact pack, signed "
                   f"or not", err=True)  # fmt: skip


def warn_no_pack_key(bundle) -> None:
    """Say so when the trust store holds keys but none that may sign packs: every pack is refused until one is."""
    from mode_edge.bundle import read_bundle
    from mode_edge.signing import key_roles, trusted_keys
    from mode_edge.trust import warn

    keys_ = trusted_keys(read_bundle(bundle))
    if keys_ and not any("packs" in key_roles(k) for k in keys_.values()):
        warn(f"{bundle} trusts no key to sign packs, so it refuses every pack until one is added "
             f"(`mode-edge trust add PUB --bundle {bundle} --role packs`)")


@click.command("verify", short_help="Check a pack's files and signature without installing it.")
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="Check that the pack fits this bundle and its signature against the bundle's trust store.")
@click.option("--key", default=None, help="Check the signature against this public key (.pub or its line).")
def verify_cmd(pack, bundle, key):
    """Check PACK as `install` would: the archive, every file's sha256, with --bundle that it was made for that
    bundle (base, quantization, formats, .pte shapes) and is not older than what it installed of its name, and
    (with --bundle or --key) that it is signed by a trusted key. Exit 0 when it passes, 2 with one line when it
    does not."""
    from mode_edge.trust import verify_pack

    if bundle is not None and key is not None:
        raise UserError("pass --bundle or --key, not both")
    info = verify_pack(pack, bundle, key)
    if info["signed_by"]:
        signed = f"signed by {info['signed_by']}, trusted by {info['trusted_by']}"
    elif info["claims_key"]:
        signed = f"its signature names key {info['claims_key']} (not checked: pass --bundle or --key)"
    else:
        signed = "unsigned"
    click.echo(f"{pack}: pack {info['name']} v{info['version']}, files intact, {signed}")


@click.command("index", short_help="Sign the index of a folder of packs: what a pack source serves.")
@click.option("--packs", type=click.Path(path_type=Path), required=True,
              help="Folder of NAME.modepack files, served as it is (a web server's folder, or a --pack-source path).")
@click.option("--sign", "key", type=click.Path(path_type=Path), required=True,
              help="Private key to sign the index with (NAME.key from `mode-edge keys generate`).")
@click.option("--expires-days", type=Float(0.001, 3650), default=30.0, show_default=True,
              help="Devices refuse the index after this many days: publish a fresh one before.")
@click.option("--version", type=Int(1, None), default=None,
              help="The index's version (default: one above the index already in PACKS, which is the publisher's "
                   "record: keep it, never restore an older one); it must rise every time.")
def index_cmd(packs, key, expires_days, version):
    """Write PACKS/index.json (every pack's name, version, size and sha256, and an expiry) and its signature
    PACKS/index.json.sig. A bundle that trusts keys fetches from a pack source only what such an index lists."""
    from mode_edge.pack_index import make_index

    index = make_index(packs, key, expires_days, version)
    n = len(index["packs"])
    click.echo(f"{packs}/index.json: version {index['version']}, {n} pack{'s' * (n != 1)}, expires "
               f"{index['expires']}")  # fmt: skip


COMMANDS = [keys, trust, verify_cmd, index_cmd]
