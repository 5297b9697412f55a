"""Pack sources: a real HTTP server on loopback with ETags, Range and If-Range (honoured, or ignored like a broken
server). A broken download resumes only onto the same version; a stale `.part` of an older version never spoils a
download; a served pack with another name or base is refused and leaves nothing behind."""

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mode_edge.bundle import read_bundle
from mode_edge.packs import make_pack, uninstall
from mode_edge.runtimes.session import Session
from tests.damage import repack
from tests.test_cli import assert_user_error, cli


class PackServer(BaseHTTPRequestHandler):
    """Serves files from `root` with a strong ETag (the sha256) and Range; the first GET is cut after `cut` bytes
    (0: not cut). `any_path`: every path gets that file. `honour_if_range`: False plays a server that ignores it."""

    root = None
    cut = 0
    any_path = None
    honour_if_range = True
    send_length = True
    log: list = []

    def do_GET(self):
        path = self.root / (self.any_path or self.path.lstrip("/"))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        partial = rng is not None and (if_range in (None, etag) or not self.honour_if_range)
        start = int(rng.split("=")[1].split("-")[0]) if partial else 0
        self.log.append((rng, if_range, 206 if partial else 200))
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("ETag", etag)
        if self.send_length:  # without it, the end of the connection ends the body (HTTP/1.0)
            self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        first = len(self.log) == 1 and self.cut
        self.wfile.write(data[start : self.cut] if first else data[start:])
        if first:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    PackServer.root, PackServer.log, PackServer.cut = tmp_path / "served", [], 0
    PackServer.any_path, PackServer.honour_if_range, PackServer.send_length = None, True, True
    PackServer.root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), PackServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture
def bundle(int8_bundle, tmp_path, server):
    """A bundle whose `code` expert is served as code.modepack and not installed."""
    bundle = tmp_path / "bundle"
    shutil.copytree(int8_bundle, bundle)
    make_pack(bundle, "code", PackServer.root / "code.modepack")
    make_pack(bundle, "prose", tmp_path / "prose.modepack")
    uninstall(bundle, "code")
    return bundle


def stale_part(bundle, tmp_path, etag='"old-version"'):
    """What an interrupted download of an older version of code.modepack left: its first half and its ETag."""
    downloads = bundle / ".downloads"
    downloads.mkdir(exist_ok=True)
    repack(PackServer.root / "code.modepack", tmp_path / "old.modepack", parameters=1, created="last year")
    old = (tmp_path / "old.modepack").read_bytes()
    (downloads / "code.modepack.part").write_bytes(old[: len(old) // 2])
    return downloads / "code.modepack.part"


def run_cli(bundle, experts, source, ok=True):
    return cli("run", "--bundle", bundle, "--experts", experts, "--pack-source", source, "--prompt", "hi",
               "--max-new-tokens", "2", ok=ok)  # fmt: skip


def test_a_broken_download_resumes_with_if_range_and_installs(bundle, server):
    PackServer.cut = (PackServer.root / "code.modepack").stat().st_size // 3
    session = Session(bundle, pack_source=server)
    session.select(["code"])
    (_, _, first), (rng, if_range, second) = PackServer.log
    assert first == 200 and rng == f"bytes={PackServer.cut}-" and if_range.startswith('"') and second == 206
    assert "code" in session.engine.installed
    assert not list((bundle / ".downloads").glob("*.modepack*"))


@pytest.mark.parametrize("with_meta", [True, False])
def test_a_stale_part_of_an_older_version_is_not_resumed_onto(bundle, server, tmp_path, with_meta):
    part = stale_part(bundle, tmp_path)
    have = part.stat().st_size
    if with_meta:  # the ETag saved by the older download: the server answers 200 (changed), so start from zero
        part.with_name(part.name + ".json").write_text(json.dumps({"url": server + "code.modepack",
                                                                     "etag": '"old-version"'}))  # fmt: skip
    run_cli(bundle, "code", server)
    assert "code" in read_bundle(bundle)["experts"]
    if with_meta:
        assert PackServer.log == [(f"bytes={have}-", '"old-version"', 200)]
    else:  # no validator: the old bytes prove nothing, no Range is sent
        assert PackServer.log == [(None, None, 200)]
    assert not list((bundle / ".downloads").glob("code.modepack*"))


def test_a_server_that_ignores_if_range_costs_one_more_download_not_a_refusal(bundle, server, tmp_path):
    part = stale_part(bundle, tmp_path)
    part.with_name(part.name + ".json").write_text(json.dumps({"url": server + "code.modepack", "etag": '"x"'}))
    PackServer.honour_if_range = False
    run_cli(bundle, "code", server)
    assert [entry[2] for entry in PackServer.log] == [206, 200]  # resumed onto old bytes, refused, then from zero
    assert "code" in read_bundle(bundle)["experts"]


def test_a_served_pack_with_another_name_is_refused_and_nothing_is_left(bundle, server):
    PackServer.any_path = "code.modepack"  # a server that answers any path with this pack
    before = read_bundle(bundle)["experts"]
    assert_user_error(run_cli(bundle, "law", server, ok=False), "a pack named 'code'")
    assert read_bundle(bundle)["experts"] == before
    assert not (bundle / "experts" / "code").exists() and not list((bundle / ".downloads").glob("*.modepack*"))


def test_a_served_pack_for_another_base_is_refused(bundle, server):
    repack(PackServer.root / "code.modepack", PackServer.root / "law.modepack", name="law", base_fingerprint="f" * 64)
    assert_user_error(run_cli(bundle, "law", server, ok=False), "was made for base ffffffffffffffff")
    assert "law" not in read_bundle(bundle)["experts"] and not (bundle / "experts" / "law").exists()
    assert not list((bundle / ".downloads").glob("*.modepack*"))


def test_a_folder_source_with_a_misnamed_pack_is_refused(bundle, tmp_path):
    packs = tmp_path / "packs"
    packs.mkdir()
    shutil.copy(PackServer.root / "code.modepack", packs / "law.modepack")
    assert_user_error(run_cli(bundle, "law", str(packs), ok=False), "a pack named 'code'")
    assert (packs / "law.modepack").exists() and "code" not in read_bundle(bundle)["experts"]


def test_a_folder_pack_source(bundle, tmp_path):
    uninstall(bundle, "prose")
    session = Session(bundle, pack_source=str(tmp_path))
    session.select(["prose"])
    assert session.loaded == ["prose"] and (tmp_path / "prose.modepack").exists()


def test_with_a_known_size_and_sha256_a_resume_is_checked_and_repeated_from_zero(bundle, server, tmp_path):
    from mode_edge.files import sha256_file
    from mode_edge.runtimes.fetch import fetch_pack

    served = PackServer.root / "code.modepack"
    expected = {"bytes": served.stat().st_size, "sha256": sha256_file(served)}
    part = stale_part(bundle, tmp_path)  # no validator saved: only the known checksum can tell
    have = part.stat().st_size
    path, _ = fetch_pack(server, "code", bundle / ".downloads", expected=expected)
    assert PackServer.log[0] == (f"bytes={have}-", None, 206)
    assert sha256_file(path) == expected["sha256"]
    assert [e[2] for e in PackServer.log] == [206, 200]  # resumed onto the old half, caught, fetched whole
    PackServer.log.clear()
    path.unlink()  # (fetch_and_install removes it once installed)
    served.write_bytes(served.read_bytes()[:-512])  # the server now serves a damaged pack: refused, nothing kept
    with pytest.raises(Exception, match="size and sha256"):
        fetch_pack(server, "code", bundle / ".downloads", expected=expected, fresh=True)
    assert not list((bundle / ".downloads").glob("code.modepack*"))
