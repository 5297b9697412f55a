"""The shipping half of the `mode-edge` command line: export, pack, install, uninstall, inspect, devices.
mode_edge.cli registers COMMANDS on the main group; torch is imported only by `export`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mode_edge.config import QUANT_METHODS
from mode_edge.errors import UserError
from mode_edge.files import output_file
from mode_edge.names import check_name, split_names
from mode_edge.ranges import Int


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.command("export", short_help="Trained MoDE run -> quantized per-component graphs (a bundle).")
@click.option("--model", "run", type=click.Path(path_type=Path), required=True, help="MoDE run (expert or composed).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to create.")
@click.option(
    "--format",
    "formats",
    default=None,
    help="Comma-separated graph formats: onnx, executorch. Default: the device profile's, else onnx.",
)
@click.option(
    "--quant",
    type=click.Choice(["fp32", "int8", "int4", "mixed"]),
    default=None,
    help="Weight precision. mixed: int4 with the value and down projections of some layers at 8 bits (llama.cpp's "
    "Q4_K_M rule; ONNX only). Default: the device profile's, else int8.",
)
@click.option("--block-size", type=Int(16, 256), default=32, show_default=True,
              help="Weights per int8 / int4 quantization group: 16, 32, 64, 128 or 256.")
@click.option("--accuracy-level", type=click.Choice(["auto", "0", "1", "2", "3", "4"]), default="auto",
              show_default=True,
              help="ONNX int8 / int4: compute type of the rounded weights' MatMulNBits: 0 fp32, 4 int8 activations "
                   "per block (fastest on CPUs with dot-product instructions, and lossier); auto measures both on "
                   "each graph against fp32 and keeps 4 unless its error is over 2x level 0's (recorded in the "
                   "manifest).")
@click.option("--base-accuracy-level", type=click.Choice(["auto", "0", "1", "2", "3", "4"]), default="auto",
              show_default=True,
              help="ONNX int8 / int4: compute type of the base's own blocks (a GGUF's, the 8-bit head): 0 keeps "
                   "the base exactly the trained model, 4 multiplies in int8 (faster, not exact); auto is 0 for a "
                   "GGUF's own blocks and 4 (or --accuracy-level's number) for a head rounded here "
                   "(--requantize-base, a checkpoint without GGUF).")
@click.option("--source-blocks/--requantize-base", default=True, show_default=True,
              help="int8 / int4 / mixed, backbone from a GGUF file: write its Q4_0 / Q4_1 / Q8_0 weights from the "
                   "file's own blocks (exactly the trained model; .pte graphs take the 4-bit ones), or round them "
                   "again.")
@click.option("--quant-method", type=click.Choice(QUANT_METHODS), default="auto", show_default=True,
              help="int4 / mixed: how 4-bit weights without source blocks (the experts) are rounded: rtn "
                   "round-to-nearest, kquant llama.cpp's scale/minimum search (ONNX only), gptq calibrated on each "
                   "expert's training text; auto is gptq when the texts are at hand and --block-size is 32, else rtn "
                   "(said in the log).")
@click.option("--calibration-data", type=click.Path(path_type=Path), default=None,
              help="--quant-method gptq: a prepared corpus to calibrate on (default: each expert's training text).")
@click.option("--pte-context", type=Int(64, None), default=2048, show_default=True,
              help="ExecuTorch: the longest context the .pte graphs hold (at most the backbone's); ExecuTorch "
                   "plans their memory for it up front.")
@click.option("--context", type=Int(64, None), default=None,
              help="The bundle's context in tokens, the longest its runtimes cache. Default: the backbone's, up to "
                   "8192 (a LongRoPE backbone's original context: Phi-3.5 / 4-mini's 4,096). Past a LongRoPE "
                   "backbone's original context the bundle takes its long factors at every position, as llama.cpp "
                   "does for such a context (the .pte graphs too, though --pte-context may hold them shorter).")
@click.option("--device", default=None, help="Device profile whose defaults to use (`mode-edge devices list`).")
@click.option("--experts", default=None, help="Comma-separated subset of the run's experts (default: all).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export_cmd(run, out, formats, quant, block_size, accuracy_level, base_accuracy_level, source_blocks, quant_method,
               calibration_data, pte_context, context, device, experts, overwrite):  # fmt: skip
    """Split the model into graphs (embed, backbone blocks, each expert's blocks with its gate, head), export them to
    ONNX and/or ExecuTorch, quantize, check each against PyTorch, and write OUT/manifest.json with every file's size
    and sha256. Each expert lands in OUT/experts/NAME, ready for `mode-edge pack`."""
    from mode_edge.config import ExportConfig
    from mode_edge.devices.profiles import load_profile

    defaults = load_profile(device).export if device else {}
    fmts = tuple(f for f in (formats or ",".join(defaults.get("formats", ["onnx"]))).split(",") if f)
    cfg = ExportConfig(
        formats=fmts, quant=quant or defaults.get("quant", "int8"), block_size=block_size,
        experts=split_names(experts, "--experts") if experts else None, overwrite=overwrite,
        accuracy_level=accuracy_level if accuracy_level == "auto" else int(accuracy_level),
        base_accuracy_level=base_accuracy_level if base_accuracy_level == "auto" else int(base_accuracy_level),
        source_blocks=source_blocks,
        quant_method=quant_method, pte_context=pte_context, context=context,
        calibration_data=str(calibration_data) if calibration_data else None,
    )  # fmt: skip
    if cfg.quant == "fp32" and (accuracy_level != "auto" or base_accuracy_level != "auto"):
        from mode_edge.progress import console

        console.print("note: --accuracy-level and --base-accuracy-level apply to int8, int4 and mixed bundles; an fp32 "
                      "bundle has no quantized weights")  # fmt: skip
    given = click.get_current_context().get_parameter_source("pte_context") == click.core.ParameterSource.COMMANDLINE
    if given and context is not None and "executorch" in cfg.formats and pte_context > context:
        from mode_edge.progress import console

        console.print(f"note: the .pte graphs hold the bundle's context, {context} tokens: --pte-context "
                      f"{pte_context} is more than that")  # fmt: skip
    if calibration_data is not None and not Path(calibration_data).is_dir():
        raise UserError(f"--calibration-data {calibration_data} is not a folder; pass a corpus from `mode-edge data "
                        f"prepare` or a folder of .txt / .jsonl files")  # fmt: skip
    if Path(out).exists() and not Path(out).is_dir():  # --overwrite replaces a bundle folder, never a file
        raise UserError(f"--out {out} is a file; a bundle is a folder: name a new one (or an old bundle's folder "
                        f"with --overwrite)")  # fmt: skip
    if not overwrite and Path(out).exists():
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    from mode_edge.export.pipeline import export_bundle
    from mode_edge.packs import describe

    export_bundle(run, out, cfg)
    print_description(describe(out))


@click.command("pack", short_help="Cut one expert out of a bundle as a domain pack.")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
@click.option("--expert", required=True, help="Name of the installed expert.")
@click.option("--out", type=click.Path(path_type=Path), default=None, callback=output_file,
              help="Archive to write (default: NAME.modepack; a missing folder is created).")
@click.option("--sign", "key", type=click.Path(path_type=Path), default=None,
              help="Sign the pack with this private key (NAME.key from `mode-edge keys generate`).")
@click.option("--version", type=Int(1, None), default=None,
              help="The pack's version (default: the installed one). Raise it for every release: a bundle refuses "
                   "a version older than one it has installed.")
def pack_cmd(bundle, expert, out, key, version):
    """Write NAME.modepack: the expert's graphs, gate rows, manifest and checksums in one archive, signed with
    --sign."""
    from mode_edge.bundle import pack_version
    from mode_edge.packs import make_pack

    out = out or Path(f"{check_name(expert, '--expert')}.modepack")
    pack = make_pack(bundle, expert, out, key, version)
    signed = ", signed" if key else ""
    click.echo(f"{out}: expert {expert} v{pack_version(pack)}, {len(pack['files'])} files, "
               f"{human_bytes(out.stat().st_size)}{signed}")  # fmt: skip
    if key and version is None:
        click.echo(f"note: signed as version {pack_version(pack)}, the installed one; give each new release a higher "
                   f"--version (devices refuse versions below the highest they have installed)")  # fmt: skip


@click.command("install", short_help="Install a domain pack into a bundle.")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
@click.option("--replace", is_flag=True, help="Replace an installed expert of the same name.")
@click.option("--allow-unsigned", is_flag=True,
              help="DEVELOPMENT ONLY: install an unsigned pack, or one signed by an untrusted key, into a bundle "
                   "that trusts keys.")
@click.option("--allow-downgrade", is_flag=True,
              help="Install a pack older than the highest version of its name installed before.")
@click.argument("pack", type=click.Path(path_type=Path))
def install_cmd(bundle, replace, allow_unsigned, allow_downgrade, pack):
    """Check PACK (format version, base fingerprint, signature against the bundle's trust store, version, every size
    and sha256, archive members) and add its expert to the bundle atomically. A refused pack changes nothing."""
    from mode_edge.packs import install

    manifest = install(bundle, pack, replace=replace, allow_unsigned=allow_unsigned, allow_downgrade=allow_downgrade)
    click.echo(f"installed expert {manifest['name']} into {bundle}")


@click.command("uninstall", short_help="Remove one expert from a bundle.")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
@click.argument("name")
def uninstall_cmd(bundle, name):
    """Remove expert NAME; the base and the other experts are not touched."""
    from mode_edge.packs import uninstall

    uninstall(bundle, check_name(name, "NAME"))
    click.echo(f"removed expert {name} from {bundle}")


@click.command("inspect", short_help="Show what a bundle or a pack holds.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect_cmd(path, as_json):
    """Components and their bytes on disk, quantization, formats and base fingerprint of a bundle or a .modepack."""
    from mode_edge.packs import describe

    info = describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        print_description(info)


def print_description(info: dict) -> None:
    from rich.table import Table

    from mode_edge.bundle import quant_label
    from mode_edge.progress import results_console

    context = f", context {info['context']}" if info.get("context") else ""
    results_console.print(
        f"{info['kind']} {info['path']}: {quant_label(info['quantization'])}, {', '.join(info['formats'])}{context}, "
        f"base fingerprint {info['fingerprint'][:16]}"
    )
    if info["kind"] == "pack":
        claims = info.get("signature_claims_key")
        signed = f"its signature names key {claims} (check it: `mode-edge verify --key`)" if claims else "unsigned"
        results_console.print(f"pack {info['name']} v{info['version']}, {signed}")
    table = Table("component", "bytes")
    for comp, n in info["components"].items():
        table.add_row(comp, human_bytes(n))
    for name, e in info.get("experts", {}).items():
        if "damaged" in e:
            table.add_row(f"experts/{name}", "[red]damaged")
            click.echo(f"warning: {e['damaged']}", err=True)
        own = e.get("scheme")
        differs = f" ({own})" if own and info["kind"] == "bundle" and own != info["quantization"].get("scheme") else ""
        for comp, n in e["components"].items():
            table.add_row(f"experts/{name}/{comp}{differs}", human_bytes(n))
    total = info.get("bytes", info.get("base_bytes", 0)) + sum(e["bytes"] for e in info.get("experts", {}).values())
    what = "gate rows" if info["kind"] == "pack" else "tokenizer, gates, manifests"
    table.add_row(f"[bold]total (with {what})", f"[bold]{human_bytes(total)}")
    results_console.print(table)


@click.group("devices", short_help="Device profiles: list, show.")
def devices():
    """Profiles of target devices: RAM, cores, ISA, model memory budget, threads, transport."""


@devices.command("list")
def devices_list():
    """The known profiles; `mode-edge devices show NAME` gives one in full."""
    from rich.table import Table

    from mode_edge.devices.profiles import load_profile, names
    from mode_edge.progress import results_console

    table = Table("name", "RAM", "model budget", "threads", "transport")
    for n in names():
        p = load_profile(n)
        table.add_row(n, f"{p.ram_mb} MB", f"{p.memory_budget_mb} MB", str(p.threads), p.transport["kind"])
    results_console.print(table)


@devices.command("show")
@click.argument("name")
def devices_show(name):
    """One profile in full, as JSON."""
    from dataclasses import asdict

    from mode_edge.devices.profiles import load_profile

    click.echo(json.dumps(asdict(load_profile(name)), indent=2))


COMMANDS = [export_cmd, pack_cmd, install_cmd, uninstall_cmd, inspect_cmd, devices]
