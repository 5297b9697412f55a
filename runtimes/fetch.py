"""Fetch a domain pack that is not installed from a pack source: a folder, or an HTTP(S) URL with NAME.modepack
files under it, and install it. Standard library only (plus the bundle's file lock).

A broken download resumes where it stopped (HTTP Range) on the next try, but only onto bytes of the same version:
the ETag (or Last-Modified) of the first answer is kept beside the `.part` file and sent back as If-Range, so a server
whose file changed answers 200 with the whole new file; without a validator the download starts from zero, unless the
caller knows the pack's size and sha256 in advance (then a wrong resume is caught and repeated from zero). A pack that
fails its checks after a resumed download is downloaded once more from zero before it is refused. The fetched pack
must carry the name and base fingerprint that were asked for; otherwise it is refused and removed, nothing installed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from mode_edge.errors import UserError
from mode_edge.signing import MAX_SIGNATURE_BYTES, trusted_keys

CHUNK = 1 << 16


def fetch_and_install(bundle: Path, source: str, name: str, expected: dict | None = None, **kw) -> None:
    """Fetch NAME.modepack from `source` and install it into `bundle`, unless another process installed it first.

    One download per pack at a time (a lock on BUNDLE/.downloads/NAME.lock); the install itself takes the bundle's
    lock. `expected`: {'bytes', 'sha256'} of the archive when known in advance (e.g. from a pack index)."""
    from filelock import FileLock

    from mode_edge.bundle import read_bundle
    from mode_edge.packs import install, installed_intact

    check_source(source)
    bundle, downloads = Path(bundle), Path(bundle) / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with FileLock(str(downloads / f"{name}.lock")):
        if name in read_bundle(bundle)["experts"] and installed_intact(bundle, name):
            return  # a concurrent run fetched and installed it meanwhile
        repair = name in read_bundle(bundle)["experts"]  # installed but damaged: the fetched pack replaces it
        if trusted_keys(read_bundle(bundle)):  # a bundle that trusts keys fetches only what a signed index lists
            expected = listed_pack(bundle, source, name, kw.get("timeout_s", 30.0))
            kw = {**kw, "limit": expected["bytes"]}
        path, resumed = fetch_pack(source, name, downloads, expected=expected, **kw)
        try:
            check_fetched(path, name, read_bundle(bundle), source)
            install(bundle, path, replace=repair)
            return
        except UserError:
            if not resumed:
                raise
        finally:
            if path.parent == downloads:
                path.unlink(missing_ok=True)
        # Bytes of another version may have been resumed onto: download once more, from zero, before refusing.
        path, _ = fetch_pack(source, name, downloads, expected=expected, fresh=True, **kw)
        try:
            check_fetched(path, name, read_bundle(bundle), source)
            install(bundle, path, replace=repair)
        finally:
            if path.parent == downloads:
                path.unlink(missing_ok=True)


def check_source(source: str) -> None:
    """A pack source is an http(s) URL or an existing folder; anything else is one line before any work."""
    scheme = source.split("://", 1)[0] if "://" in source else None
    if scheme is not None and scheme not in ("http", "https"):  # (lower case only, as the fetchers test it)
        raise UserError(f"--pack-source {source}: the {scheme}:// scheme is not supported; pass an http:// or "
                        f"https:// URL, or a folder")  # fmt: skip
    if scheme is None and not Path(source).is_dir():
        raise UserError(f"--pack-source {source} is not a folder (nor an http:// or https:// URL); pass the folder "
                        f"or URL that serves NAME.modepack files")  # fmt: skip


def listed_pack(bundle: Path, source: str, name: str, timeout_s: float) -> dict:
    """{'bytes', 'sha256'} of NAME.modepack as the source's signed index lists it (mode_edge/pack_index.py), after
    the index is checked against the bundle's trust store, its expiry and the highest index version this bundle
    has read from the source (which it then remembers). Raises UserError for any failure, before any pack byte
    is fetched."""
    from mode_edge.bundle import bundle_lock, read_bundle, write_manifest
    from mode_edge.pack_index import INDEX_FILE, INDEX_SIGNATURE, MAX_INDEX_BYTES, check_not_replayed, read_index

    manifest = read_bundle(bundle)
    raw = read_small(source, INDEX_FILE, MAX_INDEX_BYTES, timeout_s)
    signature = read_small(source, INDEX_SIGNATURE, MAX_SIGNATURE_BYTES, timeout_s)
    key = source.rstrip("/")  # one source however it is written
    seen = manifest.get("index_versions", {}).get(key, 0)
    index = read_index(raw, signature, trusted_keys(manifest), seen, source)
    digest = hashlib.sha256(raw).hexdigest()
    with bundle_lock(bundle):  # compared and remembered under the lock: two fetches at once see each other
        manifest = read_bundle(bundle)
        versions, digests = manifest.setdefault("index_versions", {}), manifest.setdefault("index_digests", {})
        seen = versions.get(key, 0)
        check_not_replayed(index, digest, seen, digests.get(key), f"the index of pack source {source}")
        if index["version"] > seen or key not in digests:
            versions[key], digests[key] = index["version"], digest
            write_manifest(bundle, manifest)
    entry = index["packs"].get(name)
    if entry is None:
        raise UserError(f"pack source {source}: its signed index does not list {name!r} (it lists "
                        f"{', '.join(sorted(index['packs'])) or 'nothing'}); nothing fetched")  # fmt: skip
    if entry.get("base_fingerprint") != manifest["base"]["fingerprint"]:
        raise UserError(f"pack source {source}: its index lists {name!r} for another base; nothing fetched: point "
                        f"--pack-source at this base's packs")  # fmt: skip
    return {"bytes": entry["bytes"], "sha256": entry["sha256"]}


def read_small(source: str, name: str, limit: int, timeout_s: float) -> bytes:
    """SOURCE/NAME (a folder or an HTTP(S) URL), refused beyond `limit` bytes; raises UserError when absent."""
    if not source.startswith(("http://", "https://")):
        path = Path(source) / name
        if not path.is_file():
            raise UserError(f"pack source {source} has no {name}; a bundle that trusts keys fetches only from a "
                            f"source with a signed index (`mode-edge index --packs DIR --sign KEY`)")  # fmt: skip
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise UserError(f"pack source {source}: {name} is larger than {limit} bytes; refused")
        return data
    url = source.rstrip("/") + "/" + name
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            data = response.read(limit + 1)
    except urllib.error.HTTPError as e:
        raise UserError(f"pack source {source} has no {name} (HTTP {e.code}); a bundle that trusts keys fetches only "
                        f"from a source with a signed index (`mode-edge index`)") from None  # fmt: skip
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
        raise UserError(f"could not read {url} ({e}); check the pack source and the network") from None
    if len(data) > limit:
        raise UserError(f"pack source {source}: {name} is larger than {limit} bytes; refused")
    return data


def check_fetched(path: Path, name: str, bundle_manifest: dict, source: str) -> None:
    """The pack at `path` is the one asked for: its own name and base fingerprint; otherwise a refusal."""
    from mode_edge.packs import read_pack

    pack, _ = read_pack(path)
    if pack["name"] != name:
        raise UserError(f"pack source {source} answered {name}.modepack with a pack named {pack['name']!r}; refused "
                        "and nothing installed: fix the pack source")  # fmt: skip
    want, got = bundle_manifest["base"]["fingerprint"], str(pack.get("base_fingerprint"))
    if got != want:
        raise UserError(f"pack source {source}: {name}.modepack was made for base {got[:16]}, this bundle's base is "
                        f"{want[:16]}; refused and nothing installed: point --pack-source at this base's "
                        "packs")  # fmt: skip


def fetch_pack(source: str, name: str, downloads: Path, retries: int = 3, timeout_s: float = 30.0,
               expected: dict | None = None, fresh: bool = False,
               limit: int | None = None) -> tuple[Path, bool]:  # fmt: skip
    """The local path of NAME.modepack from `source` and whether a download resumed earlier bytes.

    A URL source downloads into `downloads` (NAME.modepack.part, with its validators in NAME.modepack.part.json);
    `fresh` discards what an earlier try left; `limit` refuses a pack of more bytes (what a signed index lists)
    before they are written."""
    if not source.startswith(("http://", "https://")):
        path = Path(source) / f"{name}.modepack"
        if not path.is_file():
            raise UserError(f"pack source {source} has no {name}.modepack")
        if expected is not None and not matches(path, expected):
            raise UserError(f"pack source {source}: {name}.modepack does not have the size and sha256 its index "
                            f"lists; refused, nothing installed")  # fmt: skip
        return path, False
    downloads.mkdir(parents=True, exist_ok=True)
    final, part = downloads / f"{name}.modepack", downloads / f"{name}.modepack.part"
    meta = part.with_name(part.name + ".json")
    url = source.rstrip("/") + f"/{name}.modepack"
    if fresh:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
    resumed = False
    for attempt in range(retries + 1):
        try:
            kept = download(url, part, meta, timeout_s, trust_resume=expected is not None, limit=limit)
            resumed |= kept
            if expected is not None and not matches(part, expected):
                part.unlink()
                meta.unlink(missing_ok=True)
                if kept:  # resumed onto bytes of another version: once more, from zero
                    download(url, part, meta, timeout_s, limit=limit)
                if not kept or not matches(part, expected):
                    part.unlink(missing_ok=True)
                    raise UserError(f"{url} does not have the size and sha256 it should have; the pack source "
                                    "serves a damaged or different pack")  # fmt: skip
                resumed = False
            part.replace(final)
            meta.unlink(missing_ok=True)
            return final, resumed
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code == 404:
                raise UserError(f"pack source {source} has no {name}.modepack (HTTP 404)") from None
            if attempt == retries:
                raise UserError(
                    f"could not download {url} ({e}); {part.stat().st_size if part.exists() else 0} bytes are kept "
                    "and the next try resumes from there"
                ) from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def matches(path: Path, expected: dict) -> bool:
    from mode_edge.files import sha256_file

    return path.stat().st_size == expected["bytes"] and sha256_file(path) == expected["sha256"]


def validator(meta: Path, url: str) -> str | None:
    """The strong ETag or Last-Modified the server sent for the bytes in the .part file, if any."""
    try:
        saved = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("url") != url:
        return None
    etag = saved.get("etag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):  # If-Range takes strong validators only
        return etag
    modified = saved.get("last_modified")
    return modified if isinstance(modified, str) and modified else None


def download(url: str, part: Path, meta: Path, timeout_s: float, trust_resume: bool = False,
             limit: int | None = None) -> bool:  # fmt: skip
    """Fetch `url` into `part`, resuming only onto the same version; returns whether earlier bytes were kept.

    Resumes with Range + If-Range when a validator of the part's version is saved (a 200 answer means the file
    changed: start from zero), or with Range alone when `trust_resume` (the caller checks size and sha256 after).
    With `limit`, a file that is or grows larger than `limit` bytes is refused (UserError) and its bytes removed."""
    have = part.stat().st_size if part.exists() else 0
    check = validator(meta, url) if have else None
    if have and check is None and not trust_resume:
        have = 0  # nothing proves the bytes we have belong to the version the server has now
    headers = {"Range": f"bytes={have}-"} if have else {}
    if have and check is not None:
        headers["If-Range"] = check
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the part is complete (the pack's checks still follow)
            return True
        raise
    with response:
        if response.status == 206 and not content_range_starts_at(response.headers.get("Content-Range"), have):
            raise ConnectionError(f"the server answered a range that does not start at byte {have}")
        if response.status != 206:
            have = 0  # 200: the whole file, a new version or a server without ranges
        if have == 0:
            meta.write_text(json.dumps({"url": url, "etag": response.headers.get("ETag"),
                                        "last_modified": response.headers.get("Last-Modified")}))  # fmt: skip
        total = response.headers.get("Content-Length")
        expected = have + int(total) if total is not None and total.strip().isdigit() else None  # else: unknown
        if limit is not None and expected is not None and expected > limit:
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise UserError(f"{url} is {expected} bytes, more than the {limit} its signed index lists; refused")
        with open(part, "ab" if have else "wb") as f:
            if limit is None:
                shutil.copyfileobj(response, f, CHUNK)
            else:
                written = have
                while block := response.read(CHUNK):
                    written += len(block)
                    if written > limit:
                        break
                    f.write(block)
        if limit is not None and written > limit:
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            raise UserError(f"{url} sent more than the {limit} bytes its signed index lists; refused")
    if expected is not None and part.stat().st_size != expected:
        raise ConnectionError(f"connection closed after {part.stat().st_size} of {expected} bytes")
    return have > 0


def content_range_starts_at(value: str | None, start: int) -> bool:
    try:
        return value is not None and int(value.split()[1].split("-")[0]) == start
    except (IndexError, ValueError):
        return False
