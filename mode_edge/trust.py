"""A bundle's trust store (the keys whose packs it installs) and the checks of `mode-edge verify`.

The store lives in the bundle manifest ("trust": {"keys": {KEY_ID: {"public_key", "label"}}}), written atomically
under the bundle's lock like every other manifest change. Pure Python plus `cryptography`: a device manages its
trust store without torch.
"""

from __future__ import annotations

from pathlib import Path

from mode_edge.bundle import bundle_lock, read_bundle, write_manifest
from mode_edge.errors import UserError
from mode_edge.signing import PACK_SIGNATURE, check_signature, key_id, parse_public, public_line, read_signature
from mode_edge.signing import statement
from mode_edge.signing import trusted_keys


def trust_add(bundle: Path, public_key: str, label: str | None = None) -> str:
    """Trust PUBLIC_KEY (a .pub file or its line) for packs installed into BUNDLE; returns its key id. Adding a
    key already trusted changes nothing."""
    raw = parse_public(public_key, "PUBKEY")
    kid = key_id(raw)
    read_bundle(bundle)
    with bundle_lock(bundle):
        manifest = read_bundle(bundle)
        keys = manifest.setdefault("trust", {}).setdefault("keys", {})
        if kid not in keys:
            name = label or (Path(public_key).stem if Path(public_key).is_file() else kid)
            keys[kid] = {"public_key": public_line(raw), "label": name}
            write_manifest(bundle, manifest)
    return kid


def trust_remove(bundle: Path, key: str) -> str:
    """Stop trusting KEY (its id, a unique prefix of it, or its .pub); returns the id removed. Installed packs stay
    installed; new installs of its packs are refused."""
    read_bundle(bundle)
    with bundle_lock(bundle):
        manifest = read_bundle(bundle)
        keys = trusted_keys(manifest)
        kid = resolve_key(keys, key, bundle)
        del manifest["trust"]["keys"][kid]
        write_manifest(bundle, manifest)
    return kid


def resolve_key(keys: dict, key: str, bundle: Path) -> str:
    if key.startswith("ed25519 ") or Path(key).is_file():
        kid = key_id(parse_public(key, "KEY"))
        hits = [kid] if kid in keys else []
    else:
        hits = [k for k in keys if key and k.startswith(key)]
    if len(hits) != 1:
        what = "matches several keys" if hits else "is not trusted"
        raise UserError(f"key {key} {what} in {bundle} (trusted: {', '.join(sorted(keys)) or 'none'}); pass a key "
                        f"id from `mode-edge trust list`")  # fmt: skip
    return hits[0]


def verify_pack(path: Path, bundle: Path | None = None, public_key: str | None = None) -> dict:
    """Check a .modepack: archive members and every file's sha256 (as `install` does) and its signature against
    the trust store of BUNDLE or against one PUBLIC_KEY. Returns {name, version, signed_by, trusted_by}. Raises
    UserError for a damaged pack, a missing signature where a key is given, or a signature that does not verify."""
    from mode_edge.packs import member_bytes, member_sha256, pack_version, read_pack, verify_members

    pack, members = read_pack(path)
    verify_members(path, pack, members)
    if bundle is not None:
        trusted, source = trusted_keys(read_bundle(bundle)), f"bundle {bundle}"
    elif public_key is not None:
        raw = parse_public(public_key, "--key")
        trusted, source = {key_id(raw): {"public_key": public_line(raw)}}, f"key {key_id(raw)}"
    else:
        trusted, source = {}, None
    info = {"name": pack["name"], "version": pack_version(pack), "signed_by": None, "trusted_by": None}
    if PACK_SIGNATURE not in members:
        if trusted:
            raise UserError(f"pack {path} is not signed; {source} takes only signed packs (`mode-edge pack --sign`)")
        return info
    signature = read_signature(member_bytes(path, members[PACK_SIGNATURE]), f"pack {path}")
    info["signed_by"] = signature["key_id"]
    if source is not None:
        if not trusted:
            raise UserError(f"{source} trusts no keys, so the signature of pack {path} cannot be checked against it; "
                            f"add the publisher's key with `mode-edge trust add`")  # fmt: skip
        sha = member_sha256(path, members["pack.json"])
        check_signature(signature, trusted, statement(pack["name"], info["version"], sha), f"pack {path}")
        info["trusted_by"] = source
    return info
