"""The device half of the `mode-edge` command line: run, plan, bench. Registered on the main group by
mode_edge.cli; none of these imports torch or transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mode_edge.errors import UserError
from mode_edge.files import image_file, output_file, write_output
from mode_edge.names import expert_list
from mode_edge.ranges import POSITIVE, SEED, Float, Int
from mode_edge.text import CleanText

BUNDLE = click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
BACKEND = click.option(
    "--backend",
    type=click.Choice(["onnx", "executorch"]),
    default="onnx",
    show_default=True,
    help="Graph runtime: onnxruntime, or ExecuTorch's Python runtime where installed.",
)


@click.command("run", short_help="Generate text on this machine from a bundle.")
@BUNDLE
@click.option(
    "--experts",
    default="auto",
    show_default=True,
    help="Comma-separated expert names, 'auto' (route on the prompt) or 'none' (the bare base).",
)
@click.option("--prompt", type=CleanText(), required=True,
              help="Text to continue; bytes that are not UTF-8 become U+FFFD (with a warning).")
@click.option("--max-new-tokens", type=POSITIVE, default=64, show_default=True,
              help="Tokens to generate at most; prompt + these must fit the model's context.")
@click.option("--temperature", type=Float(0), default=0.0, show_default=True,
              help="Softmax temperature; 0: greedy (the likeliest token, no sampling).")
@click.option("--top-k", type=Int(0), default=0, show_default=True,
              help="Sample among the k likeliest tokens; 0 turns it off and a k above the vocabulary means all "
              "(as in Hugging Face).")
@click.option("--top-p", type=Float(0, 1, lo_open=True), default=1.0, show_default=True,
              help="Nucleus sampling: the smallest set of tokens holding this much probability; 1: all.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the sampler.")
@click.option("--route-top-k", type=POSITIVE, default=1, show_default=True,
              help="Experts 'auto' loads; more than are installed means all of them.")
@click.option("--router", type=click.Choice(["centroid", "logistic", "gate"]), default="centroid", show_default=True,
              help="How 'auto' chooses: centroid = nearest class among the packs' domains and general text (may "
                   "choose none: the bare backbone); logistic = each pack's own domain-vs-general classifier claims "
                   "with a positive logit (none when no pack claims); gate = the highest mean gate logit (always an "
                   "expert). Packs trained without --general carry no router and are routed only by gate.")
@BACKEND
@click.option("--device", default="host", show_default=True, help="Device profile: threads and memory budget.")
@click.option(
    "--pack-source",
    default=None,
    help="Folder or http(s) URL holding NAME.modepack files: selected experts that are not installed are "
    "downloaded (resuming a broken download), verified and installed first.",
)
@click.option("--chat", is_flag=True,
              help="--prompt is a user message: put it into the bundle's chat template (the checkpoint's, recorded at "
                   "export), stop at the end of the assistant's turn, print the reply alone; 'auto' routes on the "
                   "message, not the template.")
@click.option("--system", type=CleanText(), default=None, help="With --chat: a system message before the user's.")
@click.option("--trust", "trust", multiple=True, metavar="PUB",
              help="Load only packs signed by this key (a .pub file from `mode-edge keys generate`, or its line; "
                   "repeat for several): checked at every load, whatever the bundle's own trust store says. An app "
                   "pins its publisher's key this way, outside the writable bundle.")
@click.option("--profile", "show_profile", is_flag=True, help="Print the latency and memory profile afterwards.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, callback=output_file,
              help="Write the profile as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, callback=image_file,
              help="Write a PNG timeline (needs matplotlib).")
def run_cmd(bundle, experts, prompt, max_new_tokens, temperature, top_k, top_p, seed, route_top_k, router, backend,
            device, pack_source, chat, system, trust, show_profile, json_out, plot):  # fmt: skip
    """Load the base, select experts (or route to them), and print the continuation of --prompt as it is generated.
    Only the selected experts' graphs are loaded."""
    from mode_edge.devices.profiles import load_profile
    from mode_edge.runtimes.engine import Sampling
    from mode_edge.runtimes.profiler import plot_timeline, print_summary
    from mode_edge.runtimes.run import parse_experts, run
    from mode_edge.signing import pinned_keys

    trusted = pinned_keys(trust)  # before anything loads: a wrong key file is the only line printed
    prof = load_profile(device)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    _, summary, profile = run(bundle, parse_experts(experts), prompt, max_new_tokens, sampling, backend=backend,
                              threads=prof.threads, budget_mb=prof.memory_budget_mb, route_top_k=route_top_k,
                              router=router, pack_source=pack_source, on_text=emit, trusted_keys=trusted, chat=chat,
                              system=system)  # fmt: skip
    sys.stdout.write("\n")
    chosen = ", ".join(summary["experts"]) or "none"
    if summary.get("router"):  # --experts auto: say that the router chose them, and which router
        chosen += f", chosen by the {summary['router']} router"
    click.echo(f"[experts: {chosen}; {summary['new_tokens']} tokens, "
               f"{summary['decode_tokens_per_s'] or 0:.1f} tok/s decode]", err=True)  # fmt: skip
    if show_profile:
        print_summary(summary)
    if json_out:
        write_output(json_out, json.dumps(summary, indent=2) + "\n")
    if plot and not plot_timeline(profile, plot):
        click.echo("no plot: matplotlib is not installed here", err=True)


@click.command("bench", short_help="Benchmark a bundle here or on a device (ssh, adb).")
@BUNDLE
@click.option(
    "--device",
    default="host",
    show_default=True,
    help="Device profile (`mode-edge devices list`) or a profile .json; its transport says where it runs.",
)
@click.option("--experts", default=None, help="Comma-separated experts to run one at a time (default: every one).")
@click.option("--new-tokens", type=POSITIVE, default=32, show_default=True, help="Tokens generated per run.")
@BACKEND
@click.option("--runtime", type=click.Choice(["python", "native"]), default="python", show_default=True,
              help="python: the torch-free Python runtime; native: the C++ runtime (runtimes/native, `make native`), "
                   "which needs no Python on the device (ONNX only).")  # fmt: skip
@click.option("--native-build", type=click.Path(path_type=Path), default=None,
              help="--runtime native: the folder holding mode-edge-native and libmode_edge.so for the device "
                   "(default: build/native; build/native-arm64 from `make native-arm64` for an aarch64 board).")
@click.option("--ort-lib", type=click.Path(path_type=Path), default=None,
              help="--runtime native: the libonnxruntime.so to run with (pushed to a device; default: "
                   "$MODE_EDGE_ORT_LIB, else the onnxruntime wheel's).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, callback=output_file,
              help="Write the results here.")
def bench_cmd(bundle, device, experts, new_tokens, backend, runtime, native_build, ort_lib, json_out):
    """Generate --new-tokens with the bare base and with each expert, profiling latency and memory. On a device
    with an ssh or adb transport, the bundle and the runtime are pushed there, the benchmark runs there, and the
    JSON comes back."""
    from mode_edge.devices.profiles import load_profile
    from mode_edge.runtimes.bench import print_bench, run_bench

    names = None if experts is None else expert_list(experts, "--experts")
    profile = load_profile(device)
    if runtime == "native":
        if backend != "onnx":
            raise UserError("--runtime native runs ONNX graphs; leave out --backend executorch")
        from mode_edge.bundle import read_bundle

        read_bundle(bundle)  # a clear error here rather than on the device
        if profile.transport["kind"] == "local":
            from mode_edge.runtimes.native_bench import run_native_bench

            result = run_native_bench(bundle, profile, names, new_tokens, native_build, ort_lib)
        else:
            from mode_edge.devices.transports import remote_native_bench

            result = remote_native_bench(profile, bundle, names, new_tokens, native_build, ort_lib)
    elif native_build or ort_lib:
        raise UserError("--native-build and --ort-lib are for --runtime native")
    elif profile.transport["kind"] == "local":
        result = run_bench(bundle, profile, names, new_tokens, backend)
    else:
        from mode_edge.bundle import read_bundle
        from mode_edge.devices.transports import remote_bench

        read_bundle(bundle)  # a clear error here rather than on the device
        result = remote_bench(profile, bundle, names, new_tokens)
    print_bench(result)
    if json_out:
        write_output(json_out, json.dumps(result, indent=2) + "\n")


@click.command("plan", short_help="What fits in a device's memory budget.")
@BUNDLE
@click.option("--device", required=True, help="Device profile or a profile .json.")
@click.option("--experts", required=True, help="Comma-separated experts to hold at once.")
@click.option("--loaded", default="", help="Experts already loaded, least recently used first (to see evictions).")
def plan_cmd(bundle, device, experts, loaded):
    """Bytes of the base and of each expert against the profile's budget: what would load, what would be evicted,
    or why it does not fit."""
    from mode_edge.bundle import read_bundle, total_bytes
    from mode_edge.devices.profiles import load_profile
    from mode_edge.runtimes.session import MB, plan_budget

    names, warm = expert_list(experts, "--experts"), expert_list(loaded, "--loaded")
    profile = load_profile(device)
    manifest = read_bundle(bundle)
    unknown = [n for n in names + warm if n not in manifest["experts"]]
    if unknown:
        raise UserError(f"{bundle} has no expert {', '.join(unknown)}; installed: {', '.join(manifest['experts'])}")
    load, evict, fits = plan_budget(manifest, profile.memory_budget_mb, names, warm)
    base = total_bytes(manifest["files"])
    click.echo(f"{profile.name}: budget {profile.memory_budget_mb} MB; base {base / MB:.1f} MB")
    for n in names:
        click.echo(f"  {n}: {manifest['experts'][n]['bytes'] / MB:.1f} MB" + ("  (loaded)" if n in warm else ""))
    click.echo(f"load: {', '.join(load) or 'nothing'}; evict: {', '.join(evict) or 'nothing'}; "
               + ("fits" if fits else "does NOT fit"))  # fmt: skip
    if not fits:
        raise SystemExit(1)


@click.command("tokenize", short_help="A prompt's token ids under a bundle's tokenizer, or the text of ids.")
@BUNDLE
@click.option("--prompt", type=CleanText(), default=None,
              help="Text to encode as `mode-edge run` encodes a prompt (the bundle's prefix ids first).")
@click.option("--decode", "ids", default=None,
              help="Token ids to turn into text, comma- or space-separated (as mode-edge-native prints them).")
@click.option("--chat", is_flag=True,
              help="Encode --prompt as a user message in the bundle's chat template, as `mode-edge run --chat` does "
                   "(for `mode-edge-native run --chat`; route it with --route-ids of the plain --prompt's ids).")
@click.option("--system", type=CleanText(), default=None, help="With --chat: a system message before the user's.")
def tokenize_cmd(bundle, prompt, ids, chat, system):
    """For the native runtime (runtimes/native), which works on token ids: prints the prompt's ids on one line,
    comma-separated (for `mode-edge-native run --ids` or --ids-file), or the text of --decode's ids."""
    from mode_edge.chat import chat_template
    from mode_edge.runtimes.run import load_tokenizer

    if (prompt is None) == (ids is None):
        raise UserError("give exactly one of --prompt TEXT (to encode) and --decode IDS (to decode)")
    if (chat or system is not None) and prompt is None:
        raise UserError("--chat and --system encode a --prompt; --decode prints the text of ids as they are")
    if system is not None and not chat:
        raise UserError("--system is a chat message: pass --chat too (or put the text into --prompt)")
    tokenizer = load_tokenizer(bundle)
    if prompt is not None:
        encoded = tokenizer.encode(prompt, prefix=False)
        if not encoded:
            raise UserError("the prompt is empty (no tokens); pass some text with --prompt")
        template = chat_template(bundle) if chat else None
        ids_ = template.encode(tokenizer, prompt, system) if template else [*tokenizer.prefix_ids, *encoded]
        click.echo(",".join(map(str, ids_)))
        return
    words = ids.replace(",", " ").split()
    if not words or not all(w.isascii() and w.isdigit() and int(w) < tokenizer.vocab_size for w in words):
        raise UserError(f"--decode takes token ids 0 .. {tokenizer.vocab_size - 1}, comma- or space-separated; "
                        f"got {ids[:60]!r}")  # fmt: skip
    click.echo(tokenizer.decode([int(w) for w in words]))


COMMANDS = [run_cmd, bench_cmd, plan_cmd, tokenize_cmd]
