"""Fetch a domain pack that is not installed from a pack source: a folder, or an HTTP(S) URL with NAME.modepack
files under it. A broken download resumes where it stopped (HTTP Range) on the next try; the pack is verified by
`install` before anything in the bundle changes. Standard library only."""

from __future__ import annotations

import http.client
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from mode_edge.errors import UserError

CHUNK = 1 << 16


def fetch_pack(source: str, name: str, downloads: Path, retries: int = 3, timeout_s: float = 30.0) -> Path:
    """The local path of NAME.modepack from `source`, downloading it into `downloads` if the source is a URL."""
    if not source.startswith(("http://", "https://")):
        path = Path(source) / f"{name}.modepack"
        if not path.is_file():
            raise UserError(f"pack source {source} has no {name}.modepack")
        return path
    downloads.mkdir(parents=True, exist_ok=True)
    final, part = downloads / f"{name}.modepack", downloads / f"{name}.modepack.part"
    url = source.rstrip("/") + f"/{name}.modepack"
    for attempt in range(retries + 1):
        try:
            download(url, part, timeout_s)
            part.replace(final)
            return final
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


def download(url: str, part: Path, timeout_s: float) -> None:
    """Append the rest of `url` to `part`; a server that ignores the Range header sends it whole, so start over."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the part is complete
            return
        raise
    with response:
        if response.status == 200:
            have = 0
        total = response.headers.get("Content-Length")
        expected = None if total is None else have + int(total)
        with open(part, "ab" if have else "wb") as f:
            shutil.copyfileobj(response, f, CHUNK)
    if expected is not None and part.stat().st_size != expected:
        raise ConnectionError(f"connection closed after {part.stat().st_size} of {expected} bytes")
