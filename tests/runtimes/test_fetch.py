"""Pack sources: a real HTTP server on loopback that breaks the first download midway; the runtime resumes it
with a Range request, verifies and installs the pack, and generates with it."""

import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mode_edge.errors import UserError
from mode_edge.packs import make_pack, uninstall
from mode_edge.runtimes.session import Session


class PackServer(BaseHTTPRequestHandler):
    """Serves files from `root` with Range support; the first GET of each file is cut after `cut` bytes."""

    root = None
    cut = 0
    log: list = []

    def do_GET(self):
        path = self.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        self.log.append(rng)
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        first = len(self.log) == 1
        self.wfile.write(data[start : self.cut] if first else data[start:])
        if first:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    PackServer.root, PackServer.log = tmp_path / "served", []
    PackServer.root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), PackServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def test_a_missing_pack_is_downloaded_with_resume_verified_and_installed(int8_bundle, tmp_path, server):
    bundle = tmp_path / "bundle"
    shutil.copytree(int8_bundle, bundle)
    pack = make_pack(bundle, "code", PackServer.root / "code.modepack")
    assert pack["name"] == "code"
    expected = list(Session(bundle).generate([4, 5, 6], ["code"], 6))
    uninstall(bundle, "code")
    PackServer.cut = (PackServer.root / "code.modepack").stat().st_size // 3

    url = f"http://127.0.0.1:{server.server_address[1]}/"
    session = Session(bundle, pack_source=url)
    assert list(session.generate([4, 5, 6], ["code"], 6)) == expected
    assert PackServer.log[0] is None and PackServer.log[1] == f"bytes={PackServer.cut}-"  # resumed, not restarted
    assert "code" in session.engine.installed and not list((bundle / ".downloads").glob("*.modepack*"))
    with pytest.raises(UserError, match="has no law.modepack"):
        session.select(["law"])


def test_a_folder_pack_source(int8_bundle, tmp_path):
    bundle, packs = tmp_path / "bundle", tmp_path / "packs"
    shutil.copytree(int8_bundle, bundle)
    packs.mkdir()
    make_pack(bundle, "prose", packs / "prose.modepack")
    uninstall(bundle, "prose")
    session = Session(bundle, pack_source=str(packs))
    session.select(["prose"])
    assert session.loaded == ["prose"] and (packs / "prose.modepack").exists()
