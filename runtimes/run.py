"""`mode-edge run`: one prompt through a Session, tokens printed as they come, with a latency and memory profile."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from mode_edge.bundle import REEXPORT, read_bundle, total_bytes
from mode_edge.chat import chat_template
from mode_edge.errors import UserError
from mode_edge.integrity import checked_load
from mode_edge.names import check_names, split_names
from mode_edge.ranges import check_number
from mode_edge.runtimes import backends
from mode_edge.runtimes.engine import Sampling
from mode_edge.runtimes.profiler import Profile, Sampler
from mode_edge.runtimes.session import Session, warn_stderr
from mode_edge.tokenizer import TextTokenizer


def load_tokenizer(bundle: Path) -> TextTokenizer:
    """The bundle's tokenizer, encoding as training did: `prefix_ids` from the manifest (absent in older bundles,
    whose models were trained without one: no prefix). Its file is verified with the base's files when the session
    starts."""
    manifest = read_bundle(bundle)
    entry = manifest["tokenizer"]
    path = Path(bundle) / entry["file"]
    tok = checked_load(path, lambda: Tokenizer.from_file(str(path)), REEXPORT)
    prefix = entry.get("prefix_ids", [])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if not isinstance(prefix, list) or not all(isinstance(i, int) and 0 <= i < vocab for i in prefix):
        raise UserError(f"{bundle}/manifest.json has an invalid tokenizer.prefix_ids {prefix!r}; re-export the bundle")
    return TextTokenizer(tok, eos_id=entry["eos_id"], prefix_ids=tuple(prefix))


def parse_experts(value: str) -> list[str] | str:
    """`--experts`: 'auto', 'none', or comma-separated expert names (each checked before any file is touched)."""
    if not value.strip(" ,"):
        raise UserError("--experts is empty; give auto, none or comma-separated expert names")
    return split_names(value, "--experts", keywords=("auto", "none"))


def run(
    bundle: Path, experts: list[str] | str, prompt: str, max_new_tokens: int, sampling: Sampling,
    backend: str = "onnx", threads: int | None = None, budget_mb: float | None = None, route_top_k: int = 1,
    router: str = "centroid", pack_source: str | None = None, on_text: Callable[[str], None] | None = None,
    trusted_keys: dict | None = None, chat: bool = False, system: str | None = None,
) -> tuple[str, dict, Profile]:  # fmt: skip
    """Generate; returns the new text, the profile summary (the chosen experts, and the router when --experts auto
    chose them) and the raw profile. trusted_keys: keys pinned for loading packs (Session). chat: `prompt` is a
    user message (and `system` a system message) put into the bundle's chat template; generation stops at the
    template's end of turn too, routing reads the user's message alone, and the text returned is the reply. In a
    process of its own (backends.OWN_PROCESS: the `mode-edge` command, a bench worker) every ONNX session runs on
    one global thread pool (backends.use_global_thread_pool)."""
    check_number("--max-new-tokens", max_new_tokens, lo=1, integer=True)
    check_number("--route-top-k", route_top_k, lo=1, integer=True)
    if system is not None and not chat:
        raise UserError("--system is a chat message: pass --chat too (or put the text into --prompt)")
    template = chat_template(bundle) if chat else None
    if isinstance(experts, str):  # 'auto', 'none' or comma-separated names, as on the command line
        experts = parse_experts(experts)
    else:
        experts = check_names(experts, "--experts")
    if backend == "onnx" and backends.OWN_PROCESS:
        backends.use_global_thread_pool(threads)
    profile = Profile()
    profile.mark("start")
    warnings: list[str] = []  # damaged packs, reported once the selection stands (asking for one is the error alone)
    with Sampler(profile):
        base_bytes = total_bytes(read_bundle(bundle)["files"])
        session = profile.load(
            "base", lambda: Session(bundle, backend, threads, budget_mb, pack_source=pack_source,
                                    warn=warnings.append, trusted_keys=trusted_keys), base_bytes  # fmt: skip
        )
        session.loader = lambda name, load: profile.load(f"expert {name}", load, session.expert_bytes(name))
        tokenizer = load_tokenizer(bundle)
        ids = tokenizer.encode(prompt, prefix=False)
        if not ids:
            raise UserError("the prompt is empty (no tokens); pass some text with --prompt")
        ids = route_ids = [*tokenizer.prefix_ids, *ids]  # the checkpoint's BOS, as in training
        if template is not None:  # the template writes its own BOS where it wants one
            ids = template.encode(tokenizer, prompt, system)
        profile.prompt_tokens = len(ids)
        session.check_context(len(ids), max_new_tokens)  # before routing: a refusal is the only line printed
        t = time.perf_counter()
        chosen = (session.route(route_ids, route_top_k, router) if experts == "auto"
                  else [] if experts == "none" else experts)  # fmt: skip
        profile.route_s = time.perf_counter() - t if experts == "auto" else 0.0
        session.select(chosen)
        for message in warnings:  # (a damaged pack that --pack-source replaced meanwhile is not damaged any more)
            repaired = [n for n in session.gates if message.startswith(f"expert {n!r} is damaged")]
            if not repaired:
                warn_stderr(message)
        profile.mark("experts selected")
        out: list[int] = []
        text = ""
        t = time.perf_counter()
        stops = template.stop_ids if template is not None else ()
        for token in session.generate(ids, chosen, max_new_tokens, sampling, timer=profile.timer, stop_ids=stops):
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
    summary = {"experts": chosen, "router": session.last_router if experts == "auto" else None,
               "route_scores": session.last_scores, "backend": backend,
               "new_tokens": len(out), **profile.summary()}  # fmt: skip
    return final, summary, profile
