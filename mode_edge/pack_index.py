"""A pack source's signed index: which packs it serves, their versions, sizes and sha256, until when.

A bundle that trusts keys fetches nothing from a pack source (`--pack-source`) until it has read the source's
index.json and its signature index.json.sig, signed by a key it trusts for the "index" role; then it downloads only
a pack the index lists, never more bytes than the index says, and installs it only if its sha256 matches. Like
TUF's timestamp and snapshot roles, in miniature: the index expires (an attacker who replays a stale index can only
freeze a device until the expiry), and it carries a version that may never go down for a source (a replayed older
index is refused, remembered in the bundle manifest's "index_versions"). Written by `mode-edge index --packs DIR
--sign KEY`.

    {"format": "mode-edge-pack-index", "format_version": 1, "version": 7, "expires": "2026-12-29T00:00:00Z",
     "packs": {"law": {"version": 3, "bytes": 13731840, "sha256": "...", "base_fingerprint": "..."}}}
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

from mode_edge.errors import UserError
from mode_edge.files import sha256_file
from mode_edge.integrity import is_int
from mode_edge.names import check_name
from mode_edge.signing import check_signature, read_signature, sign

INDEX_FILE, INDEX_SIGNATURE = "index.json", "index.json.sig"
INDEX_FORMAT, INDEX_VERSION = "mode-edge-pack-index", 1
INDEX_DOMAIN = "mode-edge-index-signature-v1"
MAX_INDEX_BYTES = 1 << 20
"""An index lists names and hashes: a megabyte holds thousands of packs; a larger answer is not an index."""


def index_statement(index_sha256: str) -> dict:
    """What an index signature covers: the sha256 of index.json's bytes."""
    return {"domain": INDEX_DOMAIN, "index_sha256": index_sha256}


def make_index(packs: Path, key: Path, expires_days: float = 30.0, version: int | None = None) -> dict:
    """Write PACKS/index.json and PACKS/index.json.sig for every *.modepack in PACKS; returns the index.

    version: the index's version (default: one above the index already there, else 1); it must rise with every
    new index, or devices that read the old one refuse the new. Every pack is checked as `install` would (archive
    and every file's sha256) before it is listed. The signature is written before the index, each by one rename: a
    device that reads between the two sees a pair that does not verify and fetches nothing (it tries again later).
    Raises UserError for a folder without packs, a damaged or misnamed pack, or a version that does not rise."""
    from mode_edge.bundle import pack_version
    from mode_edge.packs import read_pack, verify_members

    packs = Path(packs)
    if not packs.is_dir():
        raise UserError(f"--packs {packs} is not a folder; pass the folder that holds the NAME.modepack files")
    archives = sorted(packs.glob("*.modepack"))
    if not archives:
        raise UserError(f"{packs} holds no .modepack files; put the packs to serve there (`mode-edge pack`)")
    entries: dict[str, dict] = {}
    for path in archives:
        pack, members = read_pack(path)
        verify_members(path, pack, members)
        if path.name != f"{pack['name']}.modepack":
            raise UserError(f"{path} holds the pack {pack['name']!r}; a pack source serves NAME.modepack, rename it")
        entries[pack["name"]] = {"version": pack_version(pack), "bytes": path.stat().st_size,
                                 "sha256": sha256_file(path), "base_fingerprint": pack["base_fingerprint"]}  # fmt: skip
    previous = _previous_version(packs / INDEX_FILE)
    if version is None:
        version = previous + 1
    elif version <= previous:
        raise UserError(f"--version {version} does not rise above the index already in {packs} (version "
                        f"{previous}); devices that read that one would refuse it")  # fmt: skip
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=expires_days)
    index = {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "version": version,
             "expires": expires.strftime("%Y-%m-%dT%H:%M:%SZ"), "packs": entries}  # fmt: skip
    raw = json.dumps(index, indent=2).encode()
    signature = sign(key, index_statement(hashlib.sha256(raw).hexdigest()))
    for name, data in ((INDEX_SIGNATURE, signature), (INDEX_FILE, raw)):
        tmp = packs / f".{name}.partial"
        tmp.write_bytes(data)
        os.replace(tmp, packs / name)
    return index


def _previous_version(path: Path) -> int:
    try:
        version = json.loads(path.read_text()).get("version")
        return version if is_int(version) and version > 0 else 0
    except (OSError, ValueError, AttributeError, RecursionError):
        return 0


def read_index(raw: bytes, signature_raw: bytes, trusted: dict, seen_version: int, source: str,
               now: dt.datetime | None = None) -> dict:  # fmt: skip
    """The index of `source`, checked: signed by a key trusted for the index role, of the right format, not
    expired, and not older than `seen_version` (the highest this bundle has read from the source). Raises UserError
    naming what fails."""
    what = f"the index of pack source {source}"
    if len(raw) > MAX_INDEX_BYTES:
        raise UserError(f"{what} is larger than {MAX_INDEX_BYTES} bytes; refused, nothing fetched")
    signature = read_signature(signature_raw, what)
    check_signature(signature, trusted, index_statement(hashlib.sha256(raw).hexdigest()), what, "index")
    try:
        index = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        index = None
    check_index_shape(index, what)
    now = now or dt.datetime.now(dt.timezone.utc)
    expires = dt.datetime.strptime(index["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    if expires <= now:
        raise UserError(f"{what} expired at {index['expires']}; nothing fetched. The source must publish a fresh "
                        f"index (`mode-edge index --packs DIR --sign KEY`)")  # fmt: skip
    check_not_replayed(index, hashlib.sha256(raw).hexdigest(), seen_version, None, what)
    return index


def check_not_replayed(index: dict, digest: str, seen_version: int, seen_digest: str | None, what: str) -> None:
    """An index may not be older than the highest version this bundle has read from its source (a replay), nor that
    same version with other bytes (`digest`: its sha256 against `seen_digest`; a version issued twice)."""
    if index["version"] < seen_version:
        raise UserError(f"{what} is version {index['version']}, older than version {seen_version} read before; "
                        f"refused as a replay, nothing fetched: the source serves a stale index; its publisher "
                        f"must publish a newer one (`mode-edge index`)")  # fmt: skip
    if index["version"] == seen_version and seen_digest not in (None, digest):
        raise UserError(f"{what} is version {seen_version} like the one read before, with other content (a version "
                        f"issued twice); refused, nothing fetched: its publisher must publish a newer version "
                        f"(`mode-edge index`)")  # fmt: skip


def check_index_shape(index, what: str) -> None:
    """The fields read from an index, with their types (a signed index is still parsed with care)."""
    ok = isinstance(index, dict) and index.get("format") == INDEX_FORMAT
    ok = ok and index.get("format_version") == INDEX_VERSION and is_int(index.get("version")) and index["version"] > 0
    try:
        dt.datetime.strptime(index.get("expires"), "%Y-%m-%dT%H:%M:%SZ") if ok else None
    except (TypeError, ValueError):
        ok = False
    packs = index.get("packs") if ok else None
    ok = ok and isinstance(packs, dict)
    for name, entry in (packs or {}).items() if ok else ():
        check_name(name, what)
        ok = ok and isinstance(entry, dict) and is_int(entry.get("version")) and entry["version"] >= 1
        ok = ok and is_int(entry.get("bytes")) and 0 < entry["bytes"] <= 64 << 30
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        ok = ok and isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)
    if not ok:
        raise UserError(f"{what} is not a valid pack index (format {INDEX_FORMAT} version {INDEX_VERSION}); refused")
