"""Signed domain packs: ed25519 keys, a pack's signature, a bundle's trust store.

A pack's checksums prove it is whole, not who made it: anyone who can place a file on a pack source can write
checksums. So a pack may carry PACK_SIGNATURE beside pack.json: an ed25519 signature (RFC 8032, through the
`cryptography` library) over a small canonical statement of the pack's name, its version and the sha256 of its
pack.json, which lists every file by size and sha256. A bundle that trusts keys (its manifest's "trust" block,
`mode-edge trust add`) installs only packs signed by one of them; the pack's version must not fall below the highest
version of that name the bundle has installed (rollback protection, remembered across uninstalls). The scheme
follows TUF's split of metadata and targets (signed metadata that pins every target file by hash) in miniature,
with TUF's separation of roles: each trusted key signs packs, a source's index, or both (ROLES). The index key must
stay online to re-sign the index before it expires; stolen, a key trusted for the index only cannot get a pack
installed that the pack key did not sign. It can still list an older signed version of a pack (refused as a rollback
where the device installed a newer one before) or withhold new ones until the index expires.

Key files (`mode-edge keys generate --out NAME`): NAME.key, the private key as unencrypted PKCS#8 PEM, readable by its
owner only; NAME.pub, one line "ed25519 <base64 of the 32 raw bytes>", the form `trust add` takes. A key is named by
its id: the first 16 hex digits of the sha256 of its raw public bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from mode_edge.errors import UserError
from mode_edge.files import is_file

PACK_SIGNATURE = "pack.sig"
"""The signature's member in a .modepack archive and its file in an installed expert's folder."""
SIGNED_DOMAIN = "mode-edge-pack-signature-v1"
"""Written into every signed statement, so that a signature over a pack can never pass for one over anything else."""
KEY_PREFIX = "ed25519"
MAX_SIGNATURE_BYTES = 4096
ROLES = ("packs", "index")
"""What a trusted key may sign: domain packs, and a pack source's index. A key trusted without a "roles" entry (a
trust store written before roles existed) signs both."""


def key_id(public_raw: bytes) -> str:
    """16 hex digits naming a public key (32 raw bytes)."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def generate_key(out: Path) -> str:
    """Write OUT.key (private, mode 0600) and OUT.pub; returns the key id. Refuses to overwrite either file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not str(out).strip() or not Path(out).name:
        raise UserError("--out is empty; give the key pair's name, e.g. keys/publisher (writes keys/publisher.key "
                        "and keys/publisher.pub)")  # fmt: skip
    out = Path(out)
    private_path, public_path = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise UserError(f"{path} already exists; choose another --out (a key is never overwritten)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; --out names the key pair (keys/publisher writes "
                        f"keys/publisher.key and keys/publisher.pub)")  # fmt: skip
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: its folder cannot be created ({e.strerror}); choose another --out") from None
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_text(public_line(raw) + "\n")
    return key_id(raw)


def public_line(raw: bytes) -> str:
    """A public key (32 raw bytes) as a .pub file's line: "ed25519 BASE64"."""
    return f"{KEY_PREFIX} {base64.b64encode(raw).decode()}"


def parse_public(text: str, what: str) -> bytes:
    """The 32 raw bytes of a public key given as "ed25519 BASE64" (a .pub file's line) or the file's path. Errors
    name the file, never the text given inline (it may be a private key pasted by mistake)."""
    text = text.strip()
    label = "the key text given"
    expected = f"pass a .pub file from `mode-edge keys generate` or its line '{KEY_PREFIX} BASE64'"
    if not text.startswith(KEY_PREFIX + " ") and "-----BEGIN" not in text:
        label = text if len(text) <= 120 else text[:117] + "..."  # a path: safe to show
        if is_file(text):
            try:
                text = Path(text).read_text().strip()
            except (OSError, UnicodeDecodeError):
                raise UserError(f"{what} {label} is not a readable text file; {expected}") from None
        elif "/" in text or text.endswith((".pub", ".key")):
            raise UserError(f"{what} {label} does not exist; {expected}")
        else:
            label = "the key text given"
    if "PRIVATE KEY-----" in text:
        raise UserError(f"{what} {label} is a private key: keep it secret and pass its public half, the .pub file")
    kind, _, b64 = text.partition(" ")
    try:
        raw = base64.b64decode(b64.strip(), validate=True) if kind == KEY_PREFIX else b""
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise UserError(f"{what} {label} is not an ed25519 public key; {expected}")
    return raw


def load_private(path: Path):
    """The Ed25519PrivateKey in PATH (a .key file from `keys generate`). Raises UserError for anything else."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if path.is_dir():
        raise UserError(f"signing key {path} is a folder; pass the NAME.key file `mode-edge keys generate` wrote")
    if not path.is_file():
        raise UserError(f"signing key {path} does not exist; make one with `mode-edge keys generate --out NAME`")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"signing key {path} could not be read ({e.strerror}); check its permissions") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        if data.startswith(KEY_PREFIX.encode() + b" "):
            raise UserError(f"{path} is a public key; signing takes the private key, the .key file beside it from "
                            f"`mode-edge keys generate`") from None  # fmt: skip
        raise UserError(f"{path} is not an unencrypted PEM private key; pass the .key file from `mode-edge keys "
                        f"generate`") from None  # fmt: skip
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path} holds a {type(key).__name__}, not an ed25519 key; make one with `mode-edge keys "
                        f"generate`")  # fmt: skip
    return key


def statement(name: str, version: int, pack_sha256: str) -> dict:
    """What a pack signature covers: its name, version and pack.json's sha256 (which pins every file)."""
    return {"domain": SIGNED_DOMAIN, "name": name, "version": version, "pack_sha256": pack_sha256}


def canonical(body: dict) -> bytes:
    """The signed bytes of a statement: canonical JSON (sorted keys, no spaces). Every statement names its domain
    (a pack's, an index's), so a signature over one kind can never pass for the other."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(key_path: Path, body: dict) -> bytes:
    """A signature file's content (PACK_SIGNATURE, or an index's): JSON {algorithm, key_id, signature (base64)}
    over `canonical(body)`."""
    from cryptography.hazmat.primitives import serialization

    key = load_private(key_path)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = key.sign(canonical(body))
    doc = {"algorithm": KEY_PREFIX, "key_id": key_id(raw), "signature": base64.b64encode(signature).decode()}
    return json.dumps(doc, indent=2).encode()


def read_signature(raw: bytes, what: str) -> dict:
    """A PACK_SIGNATURE's content, shape-checked: {algorithm, key_id, signature (64 raw bytes)}."""
    try:
        doc = json.loads(raw) if len(raw) <= MAX_SIGNATURE_BYTES else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = None
    ok = isinstance(doc, dict) and doc.get("algorithm") == KEY_PREFIX and isinstance(doc.get("key_id"), str)
    try:
        signature = base64.b64decode(doc.get("signature"), validate=True) if ok else b""
    except (binascii.Error, TypeError, ValueError):
        signature = b""
    if len(signature) != 64:
        raise UserError(f"{what}: its signature is not an ed25519 signature; it is corrupt or forged: get it "
                        f"again from its publisher")  # fmt: skip
    return {"key_id": doc["key_id"], "signature": signature}


def key_roles(entry: dict) -> tuple[str, ...]:
    """The ROLES a trust store entry grants: all of them when it has no "roles" (a store written before roles), none
    when "roles" is not a list (a damaged store grants nothing rather than everything)."""
    if not isinstance(entry, dict):
        return ()
    if "roles" not in entry:
        return ROLES
    roles = entry["roles"]
    return tuple(r for r in ROLES if r in roles) if isinstance(roles, list) else ()


def check_signature(signature: dict, trusted: dict, body: dict, what: str, role: str | None = None) -> str:
    """The id of the trusted key whose signature this is, over `canonical(body)`. trusted: key id ->
    {"public_key": "ed25519 BASE64", "roles": [...], ...} (a bundle's trust store); role: one of ROLES that the key
    must hold (None: any key of the store). Raises UserError for an unknown key, a key not trusted for `role`, or a
    signature that does not verify (content changed after signing)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    kid = signature["key_id"]
    if kid not in trusted:
        raise UserError(f"{what} is signed by key {kid[:16]}, which is not among the trusted keys "
                        f"({', '.join(sorted(trusted)) or 'none'}); if you trust its publisher, add their .pub to "
                        f"the bundle with `mode-edge trust add PUB --bundle BUNDLE --role {role or 'all'}`")
    held = key_roles(trusted[kid])
    if role is not None and role not in held:
        granted = f"{' and '.join(held)} only" if held else "nothing"
        raise UserError(f"{what} is signed by key {kid}, which this bundle trusts to sign {granted}, not {role}; "
                        f"if its holder may sign {role} too, `mode-edge trust add PUB --bundle BUNDLE --role all`")
    raw = parse_public(trusted[kid]["public_key"], f"trusted key {kid}")
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature["signature"], canonical(body))
    except InvalidSignature:
        raise UserError(f"{what}: its signature by key {kid} does not match its content (changed after signing, "
                        f"or forged); refused. Get it again from its publisher") from None  # fmt: skip
    return kid


def pinned_keys(keys: list[str] | tuple[str, ...]) -> dict:
    """Keys a run pins for loading packs (`mode-edge run --trust PUB`, an app's own copy of its publisher's key):
    key id -> {"public_key": "ed25519 BASE64"}, each given as a .pub file or its line. Unlike the bundle's trust
    store, which only install consults and which lives in the writable bundle, pinned keys come from outside it, so
    a pack placed into the bundle behind install's back (manifest edited too) still has to carry their signature.
    Raises UserError for what is not a public key."""
    out = {}
    for key in keys:
        if not key.strip():
            raise UserError("--trust is empty; give a .pub file from `mode-edge keys generate` or its line")
        raw = parse_public(key, "--trust")
        out[key_id(raw)] = {"public_key": public_line(raw)}
    return out


def check_installed_signature(folder: Path, name: str, pack: dict, pack_sha: str, keys: dict, fix: str) -> str:
    """The id of the pinned key (`pinned_keys`) whose signature the installed expert NAME carries in
    FOLDER/PACK_SIGNATURE, over its name (as the bundle lists it), version and pack.json sha256 (PACK_SHA: the
    bytes just checked against the bundle manifest; pack.json pins every other file by sha256, which the caller
    verifies). Raises UserError naming the key and the fix for a missing, foreign or non-matching signature."""
    from mode_edge.bundle import pack_version  # not at the top: bundle imports this module (through integrity)

    path, what = Path(folder) / PACK_SIGNATURE, f"expert {name!r}"
    pinned = ", ".join(sorted(keys))
    if not is_file(path):
        raise UserError(f"{what} is not signed ({path} is missing), and this run loads only packs signed by "
                        f"{pinned} (--trust); install its signed pack, or drop --trust")  # fmt: skip
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SIGNATURE_BYTES + 1)
    except OSError as e:
        raise UserError(f"{what}: {path} cannot be read ({e.strerror}); {fix}") from None
    signature = read_signature(raw, f"{what} ({path})")
    if signature["key_id"] not in keys:
        raise UserError(f"{what} is signed by key {signature['key_id'][:16]}, not by a key this run trusts "
                        f"({pinned}, --trust); install the pack its publisher signed, or pass their .pub to "
                        f"--trust")  # fmt: skip
    return check_signature(signature, keys, statement(name, pack_version(pack), pack_sha), what)


def trusted_keys(manifest: dict) -> dict:
    """A bundle manifest's trust store: key id -> {"public_key", "label", "roles"} (every key, whatever it signs:
    `key_roles` says which); {} when it trusts no keys."""
    trust = manifest.get("trust")
    keys = trust.get("keys") if isinstance(trust, dict) else None
    return keys if isinstance(keys, dict) else {}
