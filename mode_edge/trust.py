"""A bundle's trust store (the keys whose packs it installs) and the checks of `mode-edge verify`.

The store lives in the bundle manifest ("trust": {"keys": {KEY_ID: {"public_key", "label", "roles"}}}), written
atomically under the bundle's lock like every other manifest change. Pure Python plus `cryptography`: a device
manages its trust store without torch.
"""

from __future__ import annotations

from pathlib import Path

from mode_edge.bundle import bundle_lock, pack_version, read_bundle, write_manifest
from mode_edge.errors import UserError
from mode_edge.files import is_file
from mode_edge.signing import (
    PACK_SIGNATURE,
    ROLES,
    check_signature,
    key_id,
    key_roles,
    parse_public,
    public_line,
    read_signature,
    statement,
    trusted_keys,
)  # fmt: skip


def trust_add(bundle: Path, public_key: str, label: str | None = None, roles: tuple[str, ...] = ROLES,
              ) -> tuple[str, bool]:  # fmt: skip
    """Trust PUBLIC_KEY (a .pub file or its line) to sign exactly `roles` (of signing.ROLES: packs installed into
    BUNDLE, the index of a pack source it reads); returns its key id and whether the store changed (a key already
    trusted gets these roles instead of its own, so adding it again with --role index narrows a key that signed
    both). Raises UserError for an unknown role."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise UserError(f"--role must be {', '.join(ROLES)} or all, got {', '.join(unknown) or 'nothing'}")
    raw = parse_public(public_key, "public key")
    kid = key_id(raw)
    read_bundle(bundle)
    with bundle_lock(bundle):
        manifest = read_bundle(bundle)
        keys = manifest.setdefault("trust", {}).setdefault("keys", {})
        granted = [r for r in ROLES if r in roles]
        same_label = label is None or keys.get(kid, {}).get("label") == label
        if kid in keys and list(key_roles(keys[kid])) == granted and same_label:
            return kid, False
        name = label or keys.get(kid, {}).get("label") or (Path(public_key).stem if is_file(public_key) else kid)
        keys[kid] = {"public_key": public_line(raw), "label": name, "roles": granted}
        write_manifest(bundle, manifest)
    return kid, True


def trust_remove(bundle: Path, key: str, allow_no_keys: bool = False) -> tuple[str, int]:
    """Stop trusting KEY (its id, a unique prefix of it, or its .pub); returns the id removed and how many keys the
    bundle still trusts. Installed packs stay installed; new installs of its packs are refused. Removing the last
    key would turn signature checks off (a bundle that trusts no key installs any intact pack), so it is refused
    unless allow_no_keys."""
    read_bundle(bundle)
    with bundle_lock(bundle):
        manifest = read_bundle(bundle)
        keys = trusted_keys(manifest)
        kid = resolve_key(keys, key, bundle)
        if len(keys) == 1 and not allow_no_keys:
            raise UserError(f"{kid} is the last key {bundle} trusts: without it the bundle installs any intact pack, "
                            f"signed or not. To replace it, `mode-edge trust add` the new key first; to turn "
                            f"signature checks off, pass --allow-no-keys")  # fmt: skip
        del manifest["trust"]["keys"][kid]
        write_manifest(bundle, manifest)
    return kid, len(trusted_keys(manifest))


def resolve_key(keys: dict, key: str, bundle: Path) -> str:
    """The one trusted key id that KEY names (an id, a unique prefix, or a public key). Raises UserError."""
    if key.startswith("ed25519 ") or is_file(key):
        kid = key_id(parse_public(key, "key"))
        hits = [kid] if kid in keys else []
    else:
        hits = [k for k in keys if key and k.startswith(key)]
    if len(hits) != 1:
        what = "matches several keys" if hits else "is not trusted"
        raise UserError(f"key {key} {what} in {bundle} (trusted: {', '.join(sorted(keys)) or 'none'}); pass a key "
                        f"id from `mode-edge trust list`")  # fmt: skip
    return hits[0]


def verify_pack(path: Path, bundle: Path | None = None, public_key: str | None = None) -> dict:
    """Check a .modepack: archive members and every file's sha256 (as `install` does), that it fits BUNDLE (its
    base, quantization, formats and .pte shapes: `check_pack_fits`; not older than what BUNDLE installed of its name:
    `check_not_older`) and its signature against the trust store of
    BUNDLE or against one PUBLIC_KEY. Returns {name, version, signed_by, trusted_by} (signed_by: a key whose
    signature verified; claims_key: the key a pack.sig names, not checked without a key). Raises UserError for a
    damaged pack, one made for another bundle, a missing signature where a key is given, or a signature that does
    not verify."""
    from mode_edge.bundle import check_pack_fits
    from mode_edge.packs import member_bytes, read_pack_and_sha, verify_members

    manifest = read_bundle(bundle) if bundle is not None else None
    if bundle is not None:  # the cheap arguments first: a wrong key is named before a large pack is read
        trusted, source = trusted_keys(manifest), f"bundle {bundle}"
    elif public_key is not None:
        raw = parse_public(public_key, "--key")
        trusted, source = {key_id(raw): {"public_key": public_line(raw)}}, f"key {key_id(raw)}"
    else:
        trusted, source = {}, None
    pack, members, sha = read_pack_and_sha(path)
    if manifest is not None:  # before the members are hashed, as install checks them
        check_pack_fits(pack, manifest, f"pack {path}")
        check_not_older(pack, manifest, False, f"pack {path}")
    verify_members(path, pack, members)
    info = {"name": pack["name"], "version": pack_version(pack), "signed_by": None, "trusted_by": None,
            "claims_key": None}
    if PACK_SIGNATURE not in members:
        if trusted:
            raise UserError(f"pack {path} is not signed; {source} takes only signed packs (`mode-edge pack --sign`)")
        return info
    signature = read_signature(member_bytes(path, members[PACK_SIGNATURE]), f"pack {path}")
    info["claims_key"] = signature["key_id"]
    if bundle is None and public_key is not None and signature["key_id"] not in trusted:  # --key: no trust store
        raise UserError(f"pack {path} is signed by key {signature['key_id']}, not by the key given "
                        f"({next(iter(trusted))}); check that you have its publisher's .pub")  # fmt: skip
    if source is not None:
        if not trusted:
            raise UserError(f"{source} trusts no keys, so the signature of pack {path} cannot be checked against it; "
                            f"add the publisher's key with `mode-edge trust add`")  # fmt: skip
        check_signature(signature, trusted, statement(pack["name"], info["version"], sha), f"pack {path}", "packs")
        info["signed_by"], info["trusted_by"] = signature["key_id"], source
    return info


def check_trust(pack: dict, signature_raw: bytes | None, pack_sha: str, manifest: dict, allow_unsigned: bool,
                what: str) -> str | None:  # fmt: skip
    """The key id that signed the pack (signature_raw: its pack.sig, None when unsigned; pack_sha: the sha256 of
    the pack.json bytes parsed), checked against the bundle's trust store; None for a pack let in unchecked (the
    bundle trusts no keys, or allow_unsigned). Raises UserError for what the store does not let in."""
    trusted = trusted_keys(manifest)
    if not trusted:
        return None
    if signature_raw is None:
        if allow_unsigned:
            warn(f"installing the UNSIGNED {what} into a bundle that trusts only signed packs (--allow-unsigned: "
                 f"for development only)")  # fmt: skip
            return None
        signers = sorted(k for k, entry in trusted.items() if "packs" in key_roles(entry))
        raise UserError(f"{what} is not signed, and this bundle trusts only packs signed by "
                        + (f"its pack keys ({', '.join(signers)}); sign it with `mode-edge pack --sign KEY`"
                           if signers else "a pack key, and it trusts none (only index keys): add the publisher's "
                           "with `mode-edge trust add PUB --bundle BUNDLE --role packs`")
                        + " (or, for development only, pass --allow-unsigned)")  # fmt: skip
    signature = read_signature(signature_raw, what)
    if signature["key_id"] not in trusted and allow_unsigned:
        warn(f"installing {what}, signed by the UNTRUSTED key {signature['key_id']} (--allow-unsigned: for "
             f"development only)")  # fmt: skip
        return None
    return check_signature(signature, trusted, statement(pack["name"], pack_version(pack), pack_sha), what, "packs")


def check_not_older(pack: dict, manifest: dict, allow_downgrade: bool, what: str) -> None:
    """Rollback protection: a pack's version may not fall below the highest of its name this bundle has installed."""
    highest = manifest.get("pack_versions", {}).get(pack["name"], 0)
    if pack_version(pack) < highest and not allow_downgrade:
        raise UserError(f"{what} is version {pack_version(pack)}, older than version {highest} installed before; "
                        f"refused as a rollback. Get the current pack, or pass --allow-downgrade if you mean it")


def warn(message: str) -> None:
    """One loud line on stderr: something is let through that the bundle's policy would refuse."""
    from mode_edge.progress import console

    console.print(f"[bold red]WARNING[/]: {message}")
