"""Transports: run `mode-edge bench` where the device is, and bring its JSON back.

    local  in this process
    ssh    boards (Raspberry Pi, Jetson): copy the bundle, the runtime and the profile to WORKDIR through ssh, run
           the benchmark with the board's python, copy the JSON back
    adb    Android phones: adb push to WORKDIR (/data/local/tmp/mode-edge), run with the phone's python through
           `adb shell`, adb pull the JSON back

The runtime travels as source (mode_edge without its training and export halves: pure Python); the device needs a
Python 3.10+ with the bare install's dependencies (numpy, onnxruntime, tokenizers, safetensors, psutil, click, rich),
found as `transport.python` of the profile (default `python3`). See README "Benchmark on a device". With
`--runtime native` (remote_native_bench) the native build and onnxruntime's library travel instead: no Python there.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from mode_edge.devices.profiles import DeviceProfile
from mode_edge.errors import UserError
from mode_edge.files import read_json

RUNTIME_PARTS = ("mode_edge", "mode_edge/runtimes", "mode_edge/devices")
SKIP = {"cli_ship.py"}  # the export commands need torch; the device never runs them


def runtime_tree(dest: Path) -> Path:
    """Copy the device-side packages (as imported here, editable or installed) into dest/mode_edge."""
    import mode_edge
    import mode_edge.devices
    import mode_edge.runtimes

    for pkg, module in zip(RUNTIME_PARTS, (mode_edge, mode_edge.runtimes, mode_edge.devices)):
        src = Path(module.__file__).parent
        (dest / pkg).mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.py"):
            shutil.copy2(f, dest / pkg / f.name)
    shutil.copytree(Path(mode_edge.devices.__file__).parent / "profiles", dest / "mode_edge/devices/profiles",
                    dirs_exist_ok=True)  # fmt: skip
    return dest


def remote_profile(profile: DeviceProfile) -> dict:
    """The profile as the device runs it: local to itself."""
    return asdict(replace(profile, transport={"kind": "local"}))


def bench_command(python: str, workdir: str, experts: list[str] | None, new_tokens: int) -> str:
    args = [python, "-m", "mode_edge.cli", "bench", "--bundle", f"{workdir}/bundle", "--device",
            f"{workdir}/profile.json", "--json", f"{workdir}/result.json", "--new-tokens", str(new_tokens)]  # fmt: skip
    if experts is not None:
        args += ["--experts", ",".join(experts) or "none"]
    quoted = " ".join(a if a.startswith("~") else shlex.quote(a) for a in args)
    return f"cd {workdir} && PYTHONPATH={workdir}/runtime {quoted}"


def run_checked(cmd: list[str], what: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} is not installed here; it is needed to {what}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise UserError(f"could not {what} (`{' '.join(cmd[:3])} ...` exit {proc.returncode}): " + " | ".join(tail))
    return proc


class Remote:
    """What a transport does: put files in the workdir, run a shell command there, get a file back."""

    def push(self, local: Path, remote: str) -> None: ...

    def shell(self, command: str, what: str) -> str: ...

    def pull(self, remote: str, local: Path) -> None: ...


class Ssh(Remote):
    """Files travel through the ssh channel itself (`cat`), so a board needs no sftp server, only a shell."""

    def __init__(self, t: dict):
        self.target = f"{t['user']}@{t['host']}" if t.get("user") else t["host"]
        self.opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15"] + [str(o) for o in t.get("options", [])]
        self.port = t.get("port")

    def ssh(self, *args):
        return ["ssh", *self.opts, *(["-p", str(self.port)] if self.port else []), self.target, *args]

    def push(self, local, remote):
        with open(local, "rb") as f:
            proc = subprocess.run(self.ssh(f"cat > {remote}"), stdin=f, capture_output=True, timeout=3600)
        if proc.returncode != 0:
            raise UserError(f"could not copy {local.name} to {self.target}: {proc.stderr.decode().strip()[-300:]}")

    def shell(self, command, what):
        return run_checked(self.ssh(command), what).stdout

    def pull(self, remote, local):
        with open(local, "wb") as f:
            proc = subprocess.run(self.ssh(f"cat {remote}"), stdout=f, stderr=subprocess.PIPE, timeout=600)
        if proc.returncode != 0:
            raise UserError(f"could not copy {remote} back from {self.target}: {proc.stderr.decode().strip()[-300:]}")


class Adb(Remote):
    def __init__(self, t: dict):
        self.prefix = ["adb", *(["-s", t["serial"]] if t.get("serial") else [])]

    def push(self, local, remote):
        run_checked([*self.prefix, "push", str(local), remote], f"adb push {local.name}")

    def shell(self, command, what):
        return run_checked([*self.prefix, "shell", command], what).stdout

    def pull(self, remote, local):
        run_checked([*self.prefix, "pull", remote, str(local)], f"adb pull {remote}")


def remote_bench(profile: DeviceProfile, bundle: Path, experts: list[str] | None, new_tokens: int) -> dict:
    """Push bundle + runtime + profile to the device, run the benchmark there, return its JSON."""
    t = profile.transport
    remote = Ssh(t) if t["kind"] == "ssh" else Adb(t)
    workdir, python = t.get("workdir", "mode-edge"), t.get("python", "python3")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "profile.json").write_text(json.dumps(remote_profile(profile), indent=2))
        with tarfile.open(tmp / "payload.tar", "w") as tar:  # one archive: one round trip, however many files
            tar.add(runtime_tree(tmp / "runtime"), arcname="runtime", filter=lambda i: None if i.name.endswith(
                tuple(SKIP)) else i)  # fmt: skip
            tar.add(bundle, arcname="bundle")
            tar.add(tmp / "profile.json", arcname="profile.json")
        remote.shell(f"mkdir -p {workdir} && rm -rf {workdir}/bundle {workdir}/runtime", f"prepare {workdir}")
        remote.push(tmp / "payload.tar", f"{workdir}/payload.tar")
        remote.shell(f"cd {workdir} && tar xf payload.tar && rm payload.tar", "unpack on the device")
        remote.shell(bench_command(python, workdir, experts, new_tokens), f"run the benchmark on {profile.name}")
        remote.pull(f"{workdir}/result.json", tmp / "result.json")
        return read_json(tmp / "result.json", "the benchmark on the device wrote no result; rerun it",
                         "the result came back damaged; rerun the benchmark")  # fmt: skip


def remote_native_bench(profile: DeviceProfile, bundle: Path, experts: list[str] | None, new_tokens: int,
                        build: Path | None = None, ort_lib: Path | None = None) -> dict:  # fmt: skip
    """The native runtime's benchmark on the device: push the bundle, the native build (mode-edge-native,
    libmode_edge.so, built for the device: `make native-arm64` for an aarch64 board) and the device's
    libonnxruntime.so, run one configuration per process there on token ids tokenized here, pull each profile back.
    No Python is needed on the device."""
    from mode_edge.runtimes.native_bench import (
        BINARY,
        LIBRARY,
        document,
        native_build,
        ort_library,
        prompt_ids,
        run_args,
        selections,
    )

    t = profile.transport
    remote = Ssh(t) if t["kind"] == "ssh" else Adb(t)
    workdir = t.get("workdir", "mode-edge")
    build, lib = native_build(build), ort_library(ort_lib)
    ids, runs = prompt_ids(bundle), []
    todo = selections(bundle, experts)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with tarfile.open(tmp / "payload.tar", "w") as tar:  # one archive: one round trip, however many files
            tar.add(bundle, arcname="bundle")
            tar.add(build / BINARY, arcname=f"native/{BINARY}")
            tar.add(build / LIBRARY, arcname=f"native/{LIBRARY}")
            tar.add(lib, arcname="native/libonnxruntime.so")
        remote.shell(f"mkdir -p {workdir} && rm -rf {workdir}/bundle {workdir}/native", f"prepare {workdir}")
        remote.push(tmp / "payload.tar", f"{workdir}/payload.tar")
        remote.shell(f"cd {workdir} && tar xf payload.tar && rm payload.tar", "unpack on the device")
        env = f"cd {workdir} && MODE_EDGE_ORT_LIB=native/libonnxruntime.so LD_LIBRARY_PATH=native"
        for i, selection in enumerate(todo):
            args = " ".join(shlex.quote(a) for a in run_args("bundle", ids, selection, new_tokens, profile,
                                                             f"result{i}.json"))  # fmt: skip
            remote.shell(f"{env} ./native/{BINARY} {args} > /dev/null", f"run the native benchmark on {profile.name}")
            remote.pull(f"{workdir}/result{i}.json", tmp / "result.json")
            profile_json = read_json(tmp / "result.json", "the device wrote no result; rerun it",
                                     "the result came back damaged; rerun it")  # fmt: skip
            runs.append({"selection": selection, **profile_json})
        uname = remote.shell("uname -srm && (nproc || getconf _NPROCESSORS_ONLN)", "read the device's machine").split()
    machine = {"platform": " ".join(uname[:-2]), "machine": uname[-2] if len(uname) > 1 else "?",
               "cpus": int(uname[-1]) if uname and uname[-1].isdigit() else None}  # fmt: skip
    return document(profile, bundle, new_tokens, runs, machine)
