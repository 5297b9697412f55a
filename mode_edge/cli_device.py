"""The device half of the `mode-edge` command line: run, plan, bench. Registered on the main group by
mode_edge.cli; none of these imports torch or transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

BUNDLE = click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle folder.")


@click.command("run", short_help="Generate text on this machine from a bundle.")
@BUNDLE
@click.option(
    "--experts",
    default="auto",
    show_default=True,
    help="Comma-separated expert names, 'auto' (route on the prompt) or 'none' (the bare base).",
)
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k likeliest tokens (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--route-top-k", type=int, default=1, show_default=True, help="Experts 'auto' loads.")
@click.option("--backend", type=click.Choice(["onnx", "executorch"]), default="onnx", show_default=True)
@click.option("--device", default="host", show_default=True, help="Device profile: threads and memory budget.")
@click.option(
    "--pack-source",
    default=None,
    help="Folder or http(s) URL holding NAME.modepack files: selected experts that are not installed are "
    "downloaded (resuming a broken download), verified and installed first.",
)
@click.option("--profile", "show_profile", is_flag=True, help="Print the latency and memory profile afterwards.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the profile as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a PNG timeline (needs matplotlib).")
def run_cmd(bundle, experts, prompt, max_new_tokens, temperature, top_k, top_p, seed, route_top_k, backend, device,
            pack_source, show_profile, json_out, plot):  # fmt: skip
    """Load the base, select experts (or route to them), and print the continuation of --prompt as it is generated.
    Only the selected experts' graphs are loaded."""
    from mode_edge.devices.profiles import load_profile
    from mode_edge.runtimes.engine import Sampling
    from mode_edge.runtimes.profiler import plot_timeline, print_summary
    from mode_edge.runtimes.run import parse_experts, run

    prof = load_profile(device)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    _, summary, profile = run(bundle, parse_experts(experts), prompt, max_new_tokens, sampling, backend=backend,
                              threads=prof.threads, budget_mb=prof.memory_budget_mb, route_top_k=route_top_k,
                              pack_source=pack_source, on_text=emit)  # fmt: skip
    sys.stdout.write("\n")
    click.echo(f"[experts: {', '.join(summary['experts']) or 'none'}; {summary['new_tokens']} tokens, "
               f"{summary['decode_tokens_per_s'] or 0:.1f} tok/s decode]", err=True)  # fmt: skip
    if show_profile:
        print_summary(summary)
    if json_out:
        Path(json_out).write_text(json.dumps(summary, indent=2) + "\n")
    if plot and not plot_timeline(profile, plot):
        click.echo("no plot: matplotlib is not installed here", err=True)


COMMANDS = [run_cmd]
