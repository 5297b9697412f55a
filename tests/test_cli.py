"""The `mode-edge` command line end to end, in real subprocesses: data prepare -> train expert -> compose -> eval,
and the one-line errors (exit code 2, no traceback, no partial output) for bad input."""

import json
import os
import subprocess
import sys

import pytest

TRAIN = ["--base", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1"]


def cli(*args, cwd=None, ok=True):
    env = {**os.environ, "COLUMNS": "150"}
    proc = subprocess.run(
        [sys.executable, "-m", "mode_edge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_user_error(proc, message):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, prose_data):
    root = tmp_path_factory.mktemp("cli")
    cli("data", "prepare", "--domain", "code", "--out", root / "code", "--limit", "30")
    cli("train", "expert", "--domain", "code", "--data", root / "code", "--out", root / "e-code", *TRAIN)
    cli("train", "expert", "--domain", "prose", "--data", prose_data, "--out", root / "e-prose", *TRAIN)
    cli(
        "train",
        "compose",
        "--experts",
        f"{root / 'e-code'},{root / 'e-prose'}",
        "--data",
        f"{root / 'code'},{prose_data}",
        "--out",
        root / "composed",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--freeze-experts",
    )
    return root, prose_data


def test_end_to_end_workflow(workflow):
    root, prose = workflow
    data = f"{root / 'code'},{prose}"
    full = cli(
        "eval",
        "--model",
        root / "composed",
        "--data",
        data,
        "--seq-len",
        "32",
        "--max-tokens",
        "128",
        "--json",
        root / "composed.json",
    )
    assert "code+prose" in full.stdout + full.stderr
    assert "code+prose: mean gate weight" in full.stdout  # the gate table, a column per expert
    report = json.loads((root / "composed.json").read_text())
    assert report["experts"] == ["code", "prose"] and report["base"] == "tiny"
    assert set(report["domains"]) == {"code", "prose"}
    assert set(report["domains"]["code"]["gates"]) == {"backbone", "code", "prose"}
    cli(
        "eval",
        "--model",
        root / "composed",
        "--data",
        data,
        "--experts",
        "none",
        "--seq-len",
        "32",
        "--max-tokens",
        "128",
        "--json",
        root / "bare.json",
    )
    cli(
        "eval", "--base", "tiny", "--data", data, "--seq-len", "32", "--max-tokens", "128", "--json", root / "base.json"
    )
    bare, base = (json.loads((root / n).read_text()) for n in ("bare.json", "base.json"))
    assert bare["experts"] == [] and bare["domains"] == base["domains"]
    assert report["domains"]["code"]["loss"] != bare["domains"]["code"]["loss"]  # the experts change the model
    cli(
        "eval",
        "--model",
        root / "composed",
        "--data",
        root / "code",
        "--experts",
        "code",
        "--seq-len",
        "32",
        "--max-tokens",
        "128",
        "--json",
        root / "sub.json",
    )
    assert json.loads((root / "sub.json").read_text())["experts"] == ["code"]


def test_help_explains_every_command():
    for args in (
        ["--help"],
        ["data", "prepare", "--help"],
        ["train", "expert", "--help"],
        ["train", "compose", "--help"],
        ["eval", "--help"],
        ["demo", "--help"],
    ):
        out = cli(*args).stdout
        assert "Usage:" in out and "--help" in out
    assert "--freeze-experts" in cli("train", "compose", "--help").stdout


def test_bad_input_gets_one_line_and_exit_code_2(workflow, tmp_path):
    root, prose = workflow
    cases = [
        (["data", "prepare", "--domain", "poetry", "--out", tmp_path / "p"], "unknown domain 'poetry'"),
        (
            ["train", "expert", "--domain", "x", "--data", tmp_path / "missing", "--out", tmp_path / "o1", *TRAIN],
            "does not exist; run `mode-edge data prepare",
        ),
        (
            ["train", "expert", "--domain", "x", "--data", tmp_path, "--out", tmp_path / "o2", *TRAIN],
            "holds no documents",
        ),
        (
            [
                "train",
                "expert",
                "--domain",
                "x",
                "--data",
                prose,
                "--out",
                tmp_path / "o3",
                "--base",
                tmp_path / "nope",
            ],
            "is not a checkpoint",
        ),
        (
            ["train", "expert", "--domain", "x", "--data", prose, "--out", tmp_path / "o4", *TRAIN, "--blocks", "4"],
            "--blocks 4 does not divide the backbone's 6 layers",
        ),
        (["eval", "--model", tmp_path / "norun", "--data", prose], "does not exist"),
        (["eval", "--model", root / "composed", "--data", prose, "--experts", "math"], "has no expert named math"),
    ]
    for args, message in cases:
        assert_user_error(cli(*args, ok=False), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written left behind


def test_corrupt_expert_and_expert_from_another_base(workflow, tmp_path, hf_checkpoint):
    import shutil

    root, prose = workflow
    other_base, _ = hf_checkpoint
    proc = cli(
        "train",
        "compose",
        "--base",
        other_base,
        "--experts",
        root / "e-code",
        "--data",
        prose,
        "--out",
        tmp_path / "c1",
        ok=False,
    )
    assert_user_error(proc, "was trained on base 'tiny'")
    assert "fingerprint" in proc.stderr
    run = tmp_path / "broken"
    shutil.copytree(root / "e-code", run)
    (run / "experts/code/expert.safetensors").write_bytes(b"\x00" * 100)
    assert_user_error(cli("eval", "--model", run, "--data", prose, ok=False), "expert.safetensors has 100 bytes")
    assert not (tmp_path / "c1").exists() and not (tmp_path / ".c1.partial").exists()
