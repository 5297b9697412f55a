"""`mode-edge run`: one prompt through a Session, tokens printed as they come, with a latency and memory profile."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from mode_edge.bundle import REEXPORT, read_bundle, total_bytes
from mode_edge.errors import UserError
from mode_edge.integrity import checked_load
from mode_edge.runtimes.engine import Sampling
from mode_edge.runtimes.profiler import Profile, Sampler
from mode_edge.runtimes.session import Session, warn_stderr
from mode_edge.tokenizer import TextTokenizer


def load_tokenizer(bundle: Path) -> TextTokenizer:
    """The bundle's tokenizer (its file is verified with the base's files when the session starts)."""
    manifest = read_bundle(bundle)
    path = Path(bundle) / manifest["tokenizer"]["file"]
    tok = checked_load(path, lambda: Tokenizer.from_file(str(path)), REEXPORT)
    return TextTokenizer(tok, eos_id=manifest["tokenizer"]["eos_id"])


def parse_experts(value: str) -> list[str] | str:
    if value in ("auto", "none"):
        return value
    return [e for e in value.split(",") if e]


def run(
    bundle: Path, experts: list[str] | str, prompt: str, max_new_tokens: int, sampling: Sampling,
    backend: str = "onnx", threads: int | None = None, budget_mb: float | None = None, route_top_k: int = 1,
    pack_source: str | None = None, on_text: Callable[[str], None] | None = None,
) -> tuple[str, dict, Profile]:  # fmt: skip
    """Generate; returns the new text, the profile summary (with the chosen experts) and the raw profile."""
    profile = Profile()
    profile.mark("start")
    warnings: list[str] = []  # damaged packs, reported once the selection stands (asking for one is the error alone)
    with Sampler(profile):
        base_bytes = total_bytes(read_bundle(bundle)["files"])
        session = profile.load(
            "base", lambda: Session(bundle, backend, threads, budget_mb, pack_source=pack_source,
                                    warn=warnings.append), base_bytes  # fmt: skip
        )
        session.loader = lambda name, load: profile.load(f"expert {name}", load, session.expert_bytes(name))
        tokenizer = load_tokenizer(bundle)
        ids = tokenizer.encode(prompt)
        if not ids:
            raise UserError("the prompt is empty (no tokens); pass some text with --prompt")
        profile.prompt_tokens = len(ids)
        t = time.perf_counter()
        chosen = session.route(ids, route_top_k) if experts == "auto" else [] if experts == "none" else experts
        profile.route_s = time.perf_counter() - t if experts == "auto" else 0.0
        session.select(chosen)
        for message in warnings:
            warn_stderr(message)
        profile.mark("experts selected")
        out: list[int] = []
        text = ""
        t = time.perf_counter()
        for token in session.generate(ids, chosen, max_new_tokens, sampling, timer=profile.timer):
            now = time.perf_counter()
            profile.token_s.append(now - t)
            if len(profile.token_s) == 1:
                profile.prefill_s = now - t
                profile.mark("prefill done")
            out.append(token)
            new = tokenizer.decode(out)
            if on_text and new.startswith(text) and not new.endswith("\ufffd"):  # whole characters only
                on_text(new[len(text) :])
                text = new
            t = time.perf_counter()  # printing is not the model's time
        profile.mark("decode done")
    final = tokenizer.decode(out)
    if on_text and final != text and final.startswith(text):
        on_text(final[len(text) :])
    summary = {"experts": chosen, "route_scores": session.last_scores, "backend": backend,
               "new_tokens": len(out), **profile.summary()}  # fmt: skip
    return final, summary, profile
