"""Expert names that are paths (or empty, '.', odd characters) are refused before any fetch, read or write, wherever
a name enters: run, plan, bench, pack, uninstall, export, eval, train, and the Session / Engine API."""

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mode_edge.errors import UserError
from mode_edge.names import check_name, check_names
from mode_edge.packs import make_pack
from tests.cli_runner import refused, tree

BAD = ["../../escaped", "../outside", "a/b", "/tmp/abs", ".", "..", "", "a\x00b", "tab\tname", "x" * 65]


@pytest.mark.parametrize("name", BAD)
def test_check_name_refuses_paths_and_odd_names(name):
    with pytest.raises(UserError, match="is not a plain name"):
        check_name(name)


@pytest.mark.parametrize("name", ["auto", "AUTO", "None"])
def test_the_reserved_words_are_named_as_such(name):
    with pytest.raises(UserError, match="is a reserved word, not an expert name"):
        check_name(name)


def test_plain_names_pass():
    for name in ("code", "math-v2", "law_2024", "a.b", "X1"):
        assert check_name(name) == name


def test_a_name_given_twice_is_refused_wherever_names_enter(bundle):
    """`--experts code,code` ran the expert twice in the gate's softmax: a different model, said nowhere."""
    from mode_edge.runtimes.session import Session

    assert check_names(["code", "prose"]) == ["code", "prose"]
    for args in (("run", "--bundle", bundle, "--prompt", "x"), ("bench", "--bundle", bundle)):
        refused(*args, "--experts", "code,prose,code", message=("--experts", "expert code is named twice"))
    with pytest.raises(UserError, match="named twice"):
        Session(bundle).select(["code", "code"])


class AnyPathServer(BaseHTTPRequestHandler):
    """Answers every path with the same pack, as the issue's hostile server does; logs what was asked."""

    pack, asked = b"", []

    def do_GET(self):
        self.asked.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.pack)))
        self.end_headers()
        self.wfile.write(self.pack)

    def log_message(self, *args):
        pass


def test_run_refuses_path_names_before_any_fetch(bundle, int8_bundle, tmp_path, monkeypatch):
    """The issue's examples: a URL source that serves any path, and a folder source next to an outside pack."""
    make_pack(int8_bundle, "code", tmp_path / "outside.modepack")
    (tmp_path / "src").mkdir()
    AnyPathServer.pack, AnyPathServer.asked = (tmp_path / "outside.modepack").read_bytes(), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), AnyPathServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/packs/"
    monkeypatch.chdir(tmp_path)
    before, outside = tree(bundle), tree(tmp_path)
    try:
        for name, source in [("../../escaped", url), ("../outside", str(tmp_path / "src")), ("a/b", url),
                             ("code,../x", url), ("/etc/passwd", str(tmp_path / "src"))]:  # fmt: skip
            refused("run", "--bundle", bundle, "--experts", name, "--pack-source", source, "--prompt", "x",
                    message=("--experts", "is not a plain name"))  # fmt: skip
    finally:
        server.shutdown()
    assert AnyPathServer.asked == []  # nothing fetched
    assert tree(bundle) == before and tree(tmp_path) == outside  # nothing written, inside or outside the bundle


def test_every_command_refuses_path_names(bundle, composed_run, prose_data, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree(bundle)
    cases = [
        ["plan", "--bundle", bundle, "--device", "host", "--experts", "../x"],
        ["plan", "--bundle", bundle, "--device", "host", "--experts", "code", "--loaded", "a/b"],
        ["bench", "--bundle", bundle, "--experts", "../../x"],
        ["pack", "--bundle", bundle, "--expert", "../x"],
        ["pack", "--bundle", bundle, "--expert", "."],
        ["uninstall", "--bundle", bundle, "../experts"],
        ["uninstall", "--bundle", bundle, ".."],
        ["export", "--model", composed_run, "--out", work / "b", "--experts", "code,../prose"],
        ["eval", "--model", composed_run, "--data", prose_data, "--experts", "../code"],
        ["train", "expert", "--base", "tiny", "--domain", "../x", "--data", prose_data, "--out", work / "r"],
        ["train", "expert", "--base", "tiny", "--domain", "", "--data", prose_data, "--out", work / "r"],
        ["run", "--bundle", bundle, "--experts", "ok,a\x01b", "--prompt", "x"],
    ]
    for args in cases:
        refused(*args, message="is not a plain name")
    assert tree(bundle) == before and list(work.iterdir()) == [] and not (tmp_path / "x.modepack").exists()


def test_api_and_files_refuse_path_names(bundle, composed_run, prose_data, tmp_path):
    from mode_edge.bundle import read_bundle
    from mode_edge.runtimes.engine import Engine
    from mode_edge.runtimes.session import Session

    session = Session(bundle, pack_source=str(tmp_path))
    for call in (lambda: session.select(["../x"]), lambda: session.plan(["a/b"]),
                 lambda: list(session.generate([1, 2], ["../../x"], 2)), lambda: Engine(bundle).load_expert("..")):
        with pytest.raises(UserError, match="is not a plain name"):  # fmt: skip
            call()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["experts"]["../evil"] = manifest["experts"]["code"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json .corrupt.*is not a plain name"):
        read_bundle(bundle)
    run = tmp_path / "run"
    shutil.copytree(composed_run, run)
    record = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**record, "experts": ["../../code"]}))
    refused("eval", "--model", run, "--data", prose_data, message="model.json (corrupt?)")
