"""A serving session: the base loaded once, experts loaded on demand and evicted least-recently-used within the
device's memory budget, prompt routing over every installed pack (runtimes/routing.py), which may answer "none".

Budget accounting uses each component's weight bytes on disk (what it costs to hold it resident); the memory
profiler measures what loading really adds. No torch: numpy + onnxruntime.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from safetensors.numpy import load_file

from mode_edge.bundle import expert_folder, reinstall_fix, total_bytes
from mode_edge.errors import UserError
from mode_edge.integrity import checked_load
from mode_edge.names import check_names
from mode_edge.ranges import check_number, check_optional
from mode_edge.runtimes import routing
from mode_edge.runtimes.engine import Engine, Sampling, generate
from mode_edge.runtimes.routing import ROUTERS

MB = 1 << 20


def plan_budget(manifest: dict, budget_mb: float | None, names: list[str], loaded: list[str]):
    """(load, evict, fits) for holding `names` with `loaded` resident (least recently used first), by weight bytes."""
    size = {n: manifest["experts"][n]["bytes"] for n in {*names, *loaded}}
    base = total_bytes(manifest["files"])
    budget = None if budget_mb is None else budget_mb * MB
    if budget is not None and base + sum(size[n] for n in names) > budget:
        return [], [], False
    load = [n for n in names if n not in loaded]
    used = base + sum(size[n] for n in loaded) + sum(size[n] for n in load)
    evict = []
    for victim in loaded:
        if budget is None or used <= budget:
            break
        if victim not in names:
            evict.append(victim)
            used -= size[victim]
    return load, evict, True


def warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Session:
    """A loaded base with experts selected, routed and evicted on demand.

    Every installed expert is checked before its gate rows are read; a damaged one is reported once through `warn`
    (one line), kept out of routing and selection (`damaged`), and everything else runs. Asking for it by name is a
    UserError naming the damaged file and the fix. With `trusted_keys` (signing.pinned_keys: keys the caller pins,
    `mode-edge run --trust`), an expert not signed by one of them fails its checks in the same way."""

    def __init__(self, bundle: Path, backend: str = "onnx", threads: int | None = None,
                 budget_mb: float | None = None, verify: bool = True, pack_source: str | None = None,
                 warn: Callable[[str], None] = warn_stderr, trusted_keys: dict | None = None):  # fmt: skip
        check_optional("memory budget (MB)", budget_mb, lo=0, lo_open=True)
        self.bundle = Path(bundle)
        self.budget = None if budget_mb is None else int(budget_mb * MB)
        self.engine = Engine(self.bundle, backend=backend, threads=threads, verify=verify, trusted_keys=trusted_keys)
        self.base_bytes = total_bytes(self.engine.manifest["files"])
        if self.budget is not None and self.base_bytes > self.budget:
            raise UserError(
                f"the base alone needs {self.base_bytes / MB:.0f} MB, more than the memory budget of "
                f"{self.budget / MB:.0f} MB; export with a smaller --quant (int4) or use a device with a larger budget"
            )
        self.verify, self.pack_source = verify, pack_source
        self.lru: OrderedDict[str, None] = OrderedDict()  # loaded experts, least recently used first
        self.loader = lambda name, load: load()
        """Wraps every expert load: the profiler times it and measures the memory it adds."""
        self.warn = warn
        self.damaged: dict[str, str] = {}
        """Installed experts that failed their checks, with the one-line reason."""
        self.gates = self._gates()
        self.warned_unrouted: set[str] = set()
        self.last_scores: dict[str, float] | None = None
        """The routing scores of the last `route` call, by expert."""
        self.last_router: str | None = None
        """The router that made the last `route` call's choice (gate when the asked one fell back to it)."""

    def _gates(self) -> dict[str, dict[str, np.ndarray]]:
        """Gate rows of every installed expert that passes its checks; the others go to `damaged`, warned once."""
        gates, damaged = {}, {}
        for name in self.engine.installed:
            try:
                gates[name] = self._gate(name)
            except UserError as e:
                damaged[name] = str(e)
                if name not in self.damaged:
                    self.warn(f"{e}; it is left out until then")
        self.damaged = damaged
        return gates

    def _gate(self, name: str) -> dict[str, np.ndarray]:
        folder = expert_folder(self.bundle, self.engine.manifest, name)
        pack = self.engine.check_expert(name, self.verify)
        path = folder / pack["gate"]
        gate = checked_load(path, lambda: load_file(str(path)), reinstall_fix(folder))
        n = self.engine.n_blocks
        rows = all(k in gate for k in ("weight", "bias", "eps"))
        if not rows or gate["weight"].shape[0] < n or gate["bias"].size < n:
            raise UserError(f"expert {name!r} is damaged: {path} lacks its gate rows; {reinstall_fix(folder)}")
        if routing.has_router(gate) and any(gate[k].shape != gate["weight"].shape for k in routing.ROUTER_KEYS[:5]):
            raise UserError(f"expert {name!r} is damaged: {path} holds router tensors of the wrong shape; "
                            f"{reinstall_fix(folder)}")  # fmt: skip
        return gate

    def refresh(self) -> None:
        """Re-read the manifest after an install or uninstall; the base stays loaded. A loaded expert whose installed
        pack changed (another pack.json sha256) or went away is evicted: it kept running on what it had loaded
        (onnxruntime holds the weights in memory), and the next select loads what is installed now."""
        from mode_edge.bundle import read_bundle

        before = self.engine.manifest["experts"]
        now = read_bundle(self.bundle)["experts"]
        changed = [n for n in self.lru if n not in now or now[n].get("pack_sha256") != before[n].get("pack_sha256")]
        self.engine.manifest["experts"] = now
        self.gates = self._gates()
        for name in [n for n in self.lru if n in changed or n not in self.gates]:
            self.evict(name)

    @property
    def loaded(self) -> list[str]:
        return list(self.lru)

    def expert_bytes(self, name: str) -> int:
        if name in self.damaged:
            raise UserError(self.damaged[name])
        if name not in self.engine.manifest["experts"]:
            raise UserError(
                f"expert {name!r} is not installed in {self.bundle} (installed: "
                f"{', '.join(self.engine.installed) or 'none'}); install its pack (`mode-edge install`; `mode-edge "
                f"run --pack-source` fetches and installs it)"
            )
        return self.engine.manifest["experts"][name]["bytes"]

    def plan(self, names: list[str]) -> tuple[list[str], list[str]]:
        """What selecting `names` would load and evict (least recently used first), without doing it."""
        check_names(names)
        for n in names:
            self.expert_bytes(n)  # a clear error for an expert that is not installed
        budget = None if self.budget is None else self.budget / MB
        load, evict, fits = plan_budget(self.engine.manifest, budget, names, list(self.lru))
        if not fits:
            need = sum(self.expert_bytes(n) for n in names)
            raise UserError(
                f"base ({self.base_bytes / MB:.0f} MB) + experts {', '.join(names)} ({need / MB:.0f} MB) exceed "
                f"the memory budget of {self.budget / MB:.0f} MB; select fewer experts"
            )
        return load, evict

    def fetch_missing(self, names: list[str]) -> None:
        """Install selected packs that are missing (or damaged) from the pack source (folder or URL), verified,
        atomically."""
        check_names(names)
        # a damaged installed pack is fetched again too: installing the same pack over it repairs it
        missing = [n for n in names if n not in self.engine.manifest["experts"] or n in self.damaged]
        if not missing or self.pack_source is None:
            return
        from mode_edge.runtimes.fetch import fetch_and_install

        for name in missing:
            fetch_and_install(self.bundle, self.pack_source, name)
        self.refresh()
        for name in missing:  # said once, on stderr: a pack that arrived from the network is worth knowing about
            entry = self.engine.manifest["experts"].get(name, {})
            signer = f", signed by {entry['signed_by']}" if entry.get("signed_by") else ""
            print(f"installed {name} v{entry.get('version', 1)} from {self.pack_source}{signer}", file=sys.stderr)

    def select(self, names: list[str]) -> list[str]:
        """Make exactly `names` the active experts, loading what is missing; returns the evicted ones."""
        check_names(names)  # before any fetch, read or write
        self.fetch_missing(names)
        load, evict = self.plan(names)
        for name in evict:
            self.evict(name)
        for name in load:
            self.loader(name, lambda name=name: self.engine.load_expert(name, verify=self.verify))
            self.lru[name] = None
        for name in names:
            self.lru.move_to_end(name)
        self.engine.active = list(names)
        return evict

    def evict(self, name: str) -> None:
        self.engine.unload_expert(name)
        self.lru.pop(name, None)

    def route(self, prompt: list[int], top_k: int = 1, router: str = "centroid") -> list[str]:
        """The experts this prompt should run with: at most top_k installed experts, or [] when general text wins
        (the bare backbone). One backbone-only pass over the prompt; see runtimes/routing.py for the routers."""
        if not prompt:
            raise UserError("the prompt is empty; routing needs at least one token")
        if router not in ROUTERS:
            raise UserError(f"--router must be one of {', '.join(ROUTERS)}, got {router!r}")
        check_number("--route-top-k", top_k, lo=1, integer=True)  # above the installed count: all of them
        if not self.gates:
            return []
        self._warn_unrouted(router)
        inputs = self.engine.block_inputs(np.array([prompt], dtype=np.int64))  # per block (1, T, d)
        choices, scores = routing.route(inputs, self.gates, router, top_k)
        self.last_scores = {name: float(v[0]) for name, v in scores.items()}
        self.last_router = routing.effective_router(router, self.gates)
        return choices[0]

    def check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse (UserError) a prompt whose tokens and the new ones would not fit the model's context."""
        check_number("--max-new-tokens", max_new_tokens, lo=1, integer=True)
        limit = self.engine.context
        if prompt_tokens + max_new_tokens > limit:
            raise UserError(f"prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} exceed the model's "
                            f"context of {limit} tokens; shorten one of them")  # fmt: skip

    def _warn_unrouted(self, router: str) -> None:
        """Say once which installed packs the router cannot judge (trained without --general: no router inside)."""
        if router == "gate":
            return
        lacking = sorted(n for n, g in self.gates.items() if not routing.has_router(g))
        new = [n for n in lacking if n not in self.warned_unrouted]
        if new:
            which, it = routing.without_router(new)
            fate = ("routing falls back to gate rows for every pack" if len(lacking) == len(self.gates)
                    else f"the {router} router never picks {it}")  # fmt: skip
            self.warn(f"{which}: {fate}")
            self.warned_unrouted.update(new)

    def generate(self, prompt: list[int], experts: list[str] | str = "auto", max_new_tokens: int = 64,
                 sampling: Sampling | None = None, top_k_experts: int = 1, timer=None,
                 router: str = "centroid", stop_ids: Iterable[int] = (),
                 route_prompt: list[int] | None = None) -> Iterator[int]:  # fmt: skip
        """Token ids as they come, until max_new_tokens, the bundle's EOS or a token of `stop_ids` (a chat
        template's end of turn: ChatTemplate.stop_ids). `experts`: a list of names, 'auto' (route on
        `route_prompt`, by default the prompt: a chat prompt routes on the user's message, not on the template's
        boilerplate) or 'none'."""
        self.check_context(len(prompt), max_new_tokens)  # before routing, which reads the whole prompt
        if experts == "auto":
            experts = self.route(prompt if route_prompt is None else route_prompt, top_k_experts, router)
        elif experts == "none":
            experts = []
        elif isinstance(experts, str):
            raise UserError(f"experts must be a list of names, 'auto' or 'none', got {experts!r}")
        self.select(list(experts))
        eos = self.engine.manifest["tokenizer"].get("eos_id")
        stops = {*stop_ids, *([] if eos is None else [eos])}
        return generate(self.engine, prompt, max_new_tokens, sampling, stop=stops, timer=timer)
