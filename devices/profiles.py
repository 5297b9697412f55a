"""Device profiles: data files under devices/profiles/, one per target (RAM, cores, ISA, budget, threads, transport).

Pure Python: the runtime reads its profile on the device. `host` fills in this machine's cores and RAM when loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mode_edge.errors import UserError
from mode_edge.files import read_json
from mode_edge.ranges import check_number

PROFILES = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    ram_mb: int
    """Physical memory of the device."""
    cores: int
    isa: str
    """Instruction set and the extensions the int8/int4 kernels use."""
    memory_budget_mb: float
    """What the model may take on the device (base + loaded experts), MB (fractions allowed); the rest belongs to the
    OS and the app."""
    threads: int
    """Intra-op threads of the runtime: the big cores, not all cores."""
    transport: dict = field(default_factory=lambda: {"kind": "local"})
    """How `mode-edge bench` reaches the device: local, ssh (host, user, workdir) or adb (serial, workdir)."""
    export: dict = field(default_factory=dict)
    """Defaults of `mode-edge export --device`: quant, formats."""

    def __post_init__(self):
        for key in ("ram_mb", "cores", "threads"):
            check_number(f"device profile {self.name}: {key}", getattr(self, key), lo=1, integer=True)
        check_number(f"device profile {self.name}: memory_budget_mb", self.memory_budget_mb, lo=0, lo_open=True)
        if self.transport.get("kind") not in ("local", "ssh", "adb"):
            raise UserError(f"device profile {self.name}: transport kind must be local, ssh or adb")


def names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.json"))


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by name (devices/profiles/NAME.json) or from a JSON file of the same shape."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = PROFILES / f"{name_or_path}.json"
    if not path.is_file():
        raise UserError(f"no device profile {name_or_path!r}; known: {', '.join(names())} (or a .json file)")
    data = read_json(path, "no such device profile", "fix the profile's JSON or copy a profile from devices/profiles")
    if data.get("name") == "host":
        import psutil

        cores = os.cpu_count() or 1
        data.update(ram_mb=psutil.virtual_memory().total >> 20, cores=cores, isa=os.uname().machine,
                    threads=data.get("threads") or cores)  # fmt: skip
    try:
        return DeviceProfile(**data)
    except TypeError as e:
        raise UserError(f"device profile {path} does not have the expected fields ({e})") from None
