"""`mode-edge bench` through the ssh transport against a real sshd on loopback (CI installs openssh-server), and
the host benchmark and `plan` from the command line."""

import getpass
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import assert_user_error, cli

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path):
    if not SSHD.exists():
        pytest.skip("openssh-server is not installed (.ci/run installs it)")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    shutil.copy(keys / "client.pub", keys / "authorized_keys")
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin yes\n"
        f"StrictModes no\nUsePAM no\nPidFile {tmp_path / 'sshd.pid'}\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd insists on
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"sshd did not start: {proc.stderr.read()}")
            time.sleep(0.05)
    yield port, keys / "client"
    proc.terminate()
    proc.wait(timeout=10)


def board_profile(sshd, tmp_path) -> Path:
    """TMP/pi.json: the raspberry-pi-5 profile with 1 thread and an ssh transport to the loopback sshd, whose
    workdir (returned) is TMP/board and whose python is this one."""
    port, key = sshd
    workdir = tmp_path / "board"
    profile = json.loads(cli("devices", "show", "raspberry-pi-5").stdout)
    profile["transport"] = {
        "kind": "ssh", "host": "127.0.0.1", "port": port, "user": getpass.getuser(), "workdir": str(workdir),
        "python": sys.executable,
        "options": ["-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"],
    }  # fmt: skip
    profile["threads"] = 1
    (tmp_path / "pi.json").write_text(json.dumps(profile))
    return workdir


def test_bench_over_ssh_runs_on_the_remote_and_brings_the_json_back(sshd, int8_bundle, tmp_path):
    workdir = board_profile(sshd, tmp_path)
    out = tmp_path / "result.json"
    proc = cli("bench", "--bundle", int8_bundle, "--device", tmp_path / "pi.json", "--experts", "code",
               "--new-tokens", "4", "--json", out)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["device"] == "raspberry-pi-5" and result["threads"] == 1
    assert [r["selection"] for r in result["runs"]] == [[], ["code"]]
    assert all(r["new_tokens"] == 4 and r["decode_tokens_per_s"] > 0 for r in result["runs"])
    assert (workdir / "bundle" / "manifest.json").exists() and (workdir / "result.json").exists()
    assert not (workdir / "runtime" / "mode_edge" / "training").exists()  # only the device half travels
    assert "bench on raspberry-pi-5" in proc.stdout


def test_unreachable_ssh_device_is_a_clear_error(int8_bundle, tmp_path):
    profile = json.loads(cli("devices", "show", "raspberry-pi-5").stdout)
    profile["transport"].update(host="127.0.0.1", port=free_port(), options=["-o", "ConnectTimeout=2"])
    (tmp_path / "pi.json").write_text(json.dumps(profile))
    proc = cli("bench", "--bundle", int8_bundle, "--device", tmp_path / "pi.json", ok=False)
    assert_user_error(proc, "could not prepare")


def test_host_bench_and_plan(int8_bundle, tmp_path):
    out = tmp_path / "host.json"
    cli("bench", "--bundle", int8_bundle, "--new-tokens", "4", "--json", out)
    result = json.loads(out.read_text())
    assert [r["selection"] for r in result["runs"]] == [[], ["code"], ["prose"]]
    assert result["runs"][1]["memory"]["added_by"]["expert code"]["disk_mb"] > 0
    proc = cli("plan", "--bundle", int8_bundle, "--device", "android-4gb", "--experts", "code", "--loaded", "prose")
    assert "load: code; evict: nothing; fits" in proc.stdout
    tight = json.loads(cli("devices", "show", "android-4gb").stdout)
    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    base = sum(f["bytes"] for f in manifest["files"].values())
    tight["memory_budget_mb"] = (base + 1.5 * manifest["experts"]["code"]["bytes"]) / 2**20
    (tmp_path / "tight.json").write_text(json.dumps(tight))
    proc = cli("plan", "--bundle", int8_bundle, "--device", tmp_path / "tight.json", "--experts", "code",
               "--loaded", "prose")  # fmt: skip
    assert "load: code; evict: prose; fits" in proc.stdout
    proc = cli(
        "plan", "--bundle", int8_bundle, "--device", tmp_path / "tight.json", "--experts", "code,prose", ok=False
    )
    assert proc.returncode == 1 and "does NOT fit" in proc.stdout


def test_native_bench_over_ssh_needs_no_python_on_the_board(sshd, native, int8_bundle, tmp_path):
    """--runtime native pushes the bundle, the native build and onnxruntime's library (no Python runtime), runs
    each configuration there on token ids tokenized here, and brings every profile back."""
    workdir = board_profile(sshd, tmp_path)
    out = tmp_path / "result.json"
    proc = cli("bench", "--bundle", int8_bundle, "--device", tmp_path / "pi.json", "--runtime", "native",
               "--experts", "code", "--new-tokens", "4", "--json", out)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["runtime"] == "native" and result["threads"] == 1 and result["machine"]["machine"] == "x86_64"
    assert [r["selection"] for r in result["runs"]] == [[], ["code"]]
    assert [r["experts"] for r in result["runs"]] == [[], ["code"]]
    assert all(r["new_tokens"] == 4 and r["decode_tokens_per_s"] > 0 and r["runtime"] == "native"
               for r in result["runs"])  # fmt: skip
    assert (workdir / "native" / "mode-edge-native").exists() and not (workdir / "runtime").exists()
    assert "native runtime" in proc.stdout


def test_host_bench_with_the_native_runtime(native, int8_bundle, tmp_path):
    out = tmp_path / "native.json"
    cli("bench", "--bundle", int8_bundle, "--runtime", "native", "--new-tokens", "4", "--json", out)
    result = json.loads(out.read_text())
    assert result["runtime"] == "native" and [r["selection"] for r in result["runs"]] == [[], ["code"], ["prose"]]
    assert result["runs"][1]["memory"]["added_by"]["expert code"]["disk_mb"] > 0
    assert all(r["new_tokens"] == 4 for r in result["runs"])
    assert_user_error(cli("bench", "--bundle", int8_bundle, "--runtime", "native", "--backend", "executorch",
                          ok=False), "--runtime native runs ONNX graphs")  # fmt: skip
    assert_user_error(cli("bench", "--bundle", int8_bundle, "--runtime", "native", "--native-build", tmp_path,
                          ok=False), "holds no native runtime")  # fmt: skip
    assert_user_error(cli("bench", "--bundle", int8_bundle, "--ort-lib", tmp_path, ok=False),
                      "are for --runtime native")
