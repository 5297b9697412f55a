"""`mode-edge run` end to end in a subprocess: streamed text, the profile as table, JSON and PNG; bad input."""

import json

from tests.test_cli import assert_user_error, cli


def test_run_prints_text_and_writes_the_profile(int8_bundle, tmp_path):
    out, png = tmp_path / "profile.json", tmp_path / "timeline.png"
    proc = cli("run", "--bundle", int8_bundle, "--experts", "code", "--prompt", "def f(x):", "--max-new-tokens", "8",
               "--profile", "--json", out, "--plot", png)  # fmt: skip
    assert "generation profile" in proc.stdout and "memory by phase" in proc.stdout
    assert "[experts: code; 8 tokens" in proc.stderr
    summary = json.loads(out.read_text())
    assert summary["experts"] == ["code"] and summary["new_tokens"] == 8 and summary["decode_tokens"] == 7
    assert set(summary["graph_s"]) == {"embed", "backbone", "experts", "gate+mix", "head"}
    assert summary["memory"]["added_by"]["expert code"]["disk_mb"] > 0
    assert [p["phase"] for p in summary["memory"]["phases"]][:3] == ["start", "loaded base", "loaded expert code"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    auto = cli("run", "--bundle", int8_bundle, "--prompt", "The", "--max-new-tokens", "2", "--temperature", "0.7",
               "--top-p", "0.9", "--json", out)  # fmt: skip
    routed = json.loads(out.read_text())
    # these packs carry no router (trained without --general): centroid, the default, fell back to the gate rows
    assert routed["route_scores"].keys() == {"code", "prose"} and routed["router"] == "gate"
    assert "chosen by the gate router; 2 tokens" in auto.stderr  # the summary says auto chose them, and how
    cli("run", "--bundle", int8_bundle, "--experts", "none", "--prompt", "The", "--max-new-tokens", "2", "--json", out)
    assert json.loads(out.read_text())["router"] is None


def test_run_bad_input(int8_bundle, tmp_path):
    assert_user_error(cli("run", "--bundle", int8_bundle, "--experts", "law", "--prompt", "x", ok=False),
                      "not installed")  # fmt: skip
    assert_user_error(cli("run", "--bundle", tmp_path, "--prompt", "x", ok=False), "not a mode-edge bundle")
    (tmp_path / "manifest.json").write_text("{}")  # the bundle's manifest given for its folder
    assert_user_error(cli("run", "--bundle", tmp_path / "manifest.json", "--prompt", "x", ok=False),
                      "is a file; a bundle is the folder")  # fmt: skip
    assert_user_error(cli("inspect", tmp_path / "nothing-here", ok=False), "does not exist; pass a bundle folder")
    assert_user_error(cli("run", "--bundle", int8_bundle, "--prompt", "", ok=False), "prompt is empty")
    assert_user_error(cli("run", "--bundle", int8_bundle, "--prompt", "x", "--top-p", "0", ok=False), "--top-p")
    assert_user_error(cli("run", "--bundle", int8_bundle, "--prompt", "x", "--max-new-tokens", "5000", ok=False),
                      "context")  # fmt: skip
    assert_user_error(cli("run", "--bundle", int8_bundle, "--prompt", "x", "--backend", "executorch", ok=False),
                      "no executorch graphs")  # fmt: skip


def test_paths_of_the_wrong_kind_are_named_with_the_fix(int8_bundle, tmp_path):
    """A bundle's manifest given for the bundle, a folder for a signing key or a pack file: one line each."""
    assert_user_error(cli("inspect", int8_bundle / "manifest.json", ok=False),
                      f"is a bundle's manifest; pass the bundle's folder, {int8_bundle}")  # fmt: skip
    assert_user_error(cli("pack", "--bundle", int8_bundle, "--expert", "code", "--out", tmp_path, ok=False),
                      "for example " + str(tmp_path / "NAME.modepack"))  # fmt: skip
    signed = tmp_path / "code.modepack"
    assert_user_error(cli("pack", "--bundle", int8_bundle, "--expert", "code", "--out", signed, "--sign", tmp_path,
                          ok=False), "is a folder; pass the NAME.key file")  # fmt: skip
    assert not signed.exists()
