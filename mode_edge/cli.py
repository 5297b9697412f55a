"""The `mode-edge` command line. Subcommands are thin typed functions registered here; each imports its heavy
modules (torch, transformers) only when it runs, so device-side commands never load them."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import click

from mode_edge import cli_device, cli_ship, cli_trust
from mode_edge.errors import RunStopped, UserError
from mode_edge.files import output_file, require_absent, require_writable, write_output
from mode_edge.logs import VERBOSE_ENV
from mode_edge.logs import configure as configure_logging
from mode_edge.names import check_name, expert_list
from mode_edge.ranges import POSITIVE, SEED, Float, Int

BASE_HELP = "Backbone: 'smollm2' (built in), 'tiny' (tests), a Hugging Face checkpoint folder or a .gguf file."


class Group(click.Group):
    """Turns user mistakes (our UserError, click's bad or missing options) into one line on stderr and exit code 2,
    Ctrl-C into exit code 130, and a training run stopped by another of its processes into one line and code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if rank0():  # under torchrun every rank meets the same mistake: say it once
                click.secho(f"error: {e}", fg="red", err=True)
            else:  # ... and give rank 0 the time to say it (and to clean up) before torchrun, seeing this rank
                time.sleep(RANK0_GRACE_S)  # fail, stops the others
            sys.exit(2)
        except click.UsageError as e:
            usage_error(e, ctx.command_path)
        except KeyboardInterrupt as e:  # (a training run says where its checkpoint is: training/trainer.train_into)
            if rank0():
                click.echo(str(e) or "interrupted", err=True)
            sys.exit(130)
        except RunStopped as e:  # another torchrun process of the run stopped first (torchrun names it)
            if rank0():
                click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(1)
        except OSError as e:
            if e.errno not in ACCESS_FAILURES:
                raise
            if rank0():  # (outputs are written whole or not at all, and a training run keeps its checkpoint)
                click.secho(f"error: {access_failure(e)}", fg="red", err=True)
            else:
                time.sleep(RANK0_GRACE_S)
            sys.exit(2)

    def make_context(self, info_name, args, parent=None, **extra):
        try:  # the group's own options (`mode-edge --bogus`)
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            usage_error(e, info_name or "mode-edge")


ACCESS_FAILURES = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
"""Errors of a file or folder the command may not read or write, or a full disk: the user's to fix, in one line."""


def access_failure(e: OSError) -> str:
    """One line for a failure of `ACCESS_FAILURES`: the path, the system's reason, the fix."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there, or choose another --out"
    elif e.errno == errno.EROFS:
        fix = "choose an --out on a writable file system"
    else:
        fix = "change its permissions, or choose another --out"
    return f"could not access {e.filename or 'a file'} ({e.strerror}); {fix}, and run the command again"


def usage_error(e: click.UsageError, where: str):
    """click's usage errors (a bad or missing option) as one line, like ours, with where to find the help; a group
    called without a command still shows its help."""
    if type(e).__name__ == "NoArgsIsHelpError":
        raise e
    where = e.ctx.command_path if e.ctx else where
    message = re.sub(r"-----BEGIN[^']*", "(a PEM block, not shown)", e.format_message())  # a key pasted as an option
    if rank0():  # once under torchrun, as Group.invoke says a UserError (and the other ranks wait for it)
        click.secho(f"error: {message} (see `{where} --help`)", fg="red", err=True)
    else:
        time.sleep(RANK0_GRACE_S)
    sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mode-edge")
@click.option("-v", "--verbose", is_flag=True, envvar=VERBOSE_ENV,
              help="Also show the libraries' own log lines below WARNING (onnx_ir, onnxscript, torch, executorch, "
              "transformers ...) and their Python warnings.")  # fmt: skip
def main(verbose: bool):
    """Modular Domain Experts for small language models: train experts beside a frozen backbone, compose them,
    evaluate them, export them as quantized graphs, and ship them to phones and boards as domain packs."""
    configure_logging(verbose)


def csv_paths(value: str) -> list[Path]:
    return [Path(v) for v in value.split(",") if v.strip()]


def train_options(method: str):
    """Options shared by every training command (mode_edge.config.TrainConfig); the learning rate's default is the
    method's own (DEFAULT_LR)."""
    from mode_edge.config import DEFAULT_LR

    options = [
        click.option("--steps", type=POSITIVE, default=200, show_default=True, help="Optimizer steps."),
        click.option("--batch-size", type=POSITIVE, default=4, show_default=True,
                     help="Sequences per micro-batch; under torchrun the global batch, split across the processes "
                          "(data parallel, --fsdp)."),
        click.option("--seq-len", type=POSITIVE, default=256, show_default=True,
                     help="Tokens per sequence; at most the backbone's context (max positions)."),
        click.option("--grad-accum", type=POSITIVE, default=1, show_default=True,
                     help="Micro-batches per optimizer step."),
        click.option("--lr", type=Float(0, lo_open=True), default=DEFAULT_LR[method], show_default=True,
                     help="Peak learning rate of the weights that learn."),
        click.option("--warmup-steps", type=Int(0), default=20, show_default=True, help="Linear warm-up steps."),
        click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for initialisation and data order."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Where to train: cpu, or cuda where a GPU is present."),
        click.option("--checkpoint-every", type=POSITIVE, default=50, show_default=True,
                     help="Steps between resumable checkpoints; an interrupted run resumes when rerun with the same "
                          "options (this one may change; --steps may not: the learning-rate schedule spans them)."),
        click.option("--fsdp", is_flag=True,
                     help="Under torchrun: shard the trainable layers, their gradients and optimizer moments over the "
                          "processes (FSDP2) instead of a whole copy on each."),
    ]  # fmt: skip
    if method == "mode":  # (the baselines have no gates and no experts to place)
        options.append(click.option("--gate-lr", type=Float(0, lo_open=True), default=5e-3, show_default=True,
                                    help="Peak learning rate of gate rows."))  # fmt: skip
        options.append(click.option(
            "--placement", type=click.Choice(["data", "split"]), default="data", show_default=True,
            help="Under torchrun: data = each process its rows of every batch; split = each process the whole "
                 "batch, the backbone on rank 0 and the experts on the others, at the same time (2 to 1 + experts "
                 "processes)."))  # fmt: skip

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


class Folder(click.Path):
    """A folder path option; "" (an unset shell variable) is refused rather than read as the current folder."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a folder", param, ctx)
        return super().convert(value, param, ctx)


FOLDER = Folder(path_type=Path)


RANK0_GRACE_S = 3.0
"""Seconds a torchrun worker other than rank 0 waits before leaving on a user mistake: torchrun stops every process
as soon as one fails, and rank 0, which meets the same mistake, must first print it and remove what it started."""


def rank0() -> bool:
    """Whether this process speaks for a torchrun job: rank 0 (RANK, as training/distributed.world reads it without
    importing torch), or a process that is not part of one (no WORLD_SIZE above 1)."""
    return os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") in ("", "0", "1")


def main_echo(text: str) -> None:
    """A training command's last line, from rank 0 only under torchrun (training/distributed.py)."""
    if rank0():
        click.echo(text)


def trained_line(what: str, record: dict, out: Path) -> None:
    """Every trainer's last line, in one form: what was trained, its tokens, time and throughput, where it went."""
    main_echo(f"{what}: {record['tokens']} tokens in {record['wall_s']:.0f}s ({record['tokens_per_s']:.0f} tok/s) "
              f"-> {out}")  # fmt: skip


def make_train_config(out: Path, stage: str, experts: int | None = None, **kw):
    """The TrainConfig and the ParallelConfig of a training command's options (`stage`: expert, compose, full-ft or
    lora; `experts`: how many the run trains, where known before loading, for --placement split's check), refusing
    before anything loads a batch the processes cannot share and a rerun over an interrupted run in OUT of another
    command or with other training options."""
    from mode_edge.config import ParallelConfig, TrainConfig

    parallel = ParallelConfig(fsdp=kw.pop("fsdp"), placement=kw.pop("placement", "data"))
    cfg = TrainConfig(**kw)
    # Checked before the backbone loads (the trainer checks again): a mistake costs one line, not a load first.
    from mode_edge.training.distributed import check_batch, world
    from mode_edge.training.trainer import check_device, check_options_unchanged

    check_device(cfg.device)

    size = world()[1]
    if parallel.placement == "split":
        from mode_edge.training.placement import check_processes

        check_processes(size, experts)
    else:  # (split placement gives every rank the whole batch)
        check_batch(cfg.batch_size, size)
    check_options_unchanged(out, stage, cfg)
    require_writable(out)
    return cfg, parallel


@main.group(cls=Group)
def data():
    """Prepare real text corpora for the built-in domains."""


@data.command("prepare")
@click.option(
    "--domain", required=True,
    help="code (Python stdlib), math (mathematics-dataset generator and the textbook Derivations of Applied "
    "Mathematics), math-prose (that textbook alone, in math's splits), english (KJV Bible), general (State of the "
    "Union addresses: the general text of `train expert --general`) or email (SpamAssassin's legitimate mail, 2002).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to create.")
@click.option("--limit", type=Int(20), default=None, help="Keep at most this many documents (a small slice).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def data_prepare(domain: str, out: Path, limit: int | None, overwrite: bool):
    """Build train / validation / test splits (by document) and dataset.json with sizes, source and licence."""
    from mode_edge.training.data import prepare

    meta = prepare(domain, out, limit=limit, overwrite=overwrite)
    sizes = ", ".join(f"{s} {v['documents']} docs / {v['characters'] / 1e6:.2f} MB" for s, v in meta["splits"].items())
    click.echo(f"{domain}: {sizes} -> {out}")


@main.group(cls=Group, short_help="Train experts, compositions and baselines.")
def train():
    """Train experts (stage 1), compose them (stage 2), and the baselines (full-ft, lora)."""


@train.command("expert", short_help="Stage 1: train one domain expert.")
@click.option("--base", default="smollm2", show_default=True, help=BASE_HELP)
@click.option("--domain", required=True, help="Name of the expert (usually its domain).")
@click.option(
    "--data", type=FOLDER, required=True, help="Corpus folder (prepared, or .txt/.jsonl files)."
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder to create.")
@click.option("--blocks", type=POSITIVE, default=3, show_default=True,
              help="MoDE blocks the backbone is cut into; must divide its layers.")
@click.option("--expert-layers", type=POSITIVE, default=2, show_default=True, help="Expert layers per block.")
@click.option(
    "--init",
    type=click.Choice(["copy", "random"]),
    default="copy",
    show_default=True,
    help="Expert layers start as copies of the block's last backbone layers, or random.",
)
@click.option("--general", type=FOLDER, default=None,
              help="General-text corpus (e.g. from `data prepare --domain general`): a share of each batch comes from "
                   "it and teaches the expert to stay out of text that is not its domain; it also fits the router "
                   "that lets `run --experts auto` tell this domain from general text.")
@click.option("--general-share", type=Float(0, 1, lo_open=True, hi_open=True), default=None,
              help="Fraction of training rows drawn from --general.  [default: 0.25]")
@click.option("--stay-out-weight", type=Float(0), default=None,
              help="Weight of the stay-out penalty on general rows against the domain's cross-entropy.  [default: 1]")
@click.option("--stay-out", "penalty", type=click.Choice(["kl", "delta"]), default=None,
              help="Penalty on general rows: kl = KL divergence from the frozen backbone's next-token distribution; "
                   "delta = relative L1 size of each block's change to the backbone's block output.  [default: delta]")
@click.option("--gate-init", type=click.Choice(["zero", "data"]), default=None,
              help="Gate rows start at zero (same weight on every token), or from the direction that tells the "
                   "domain's block inputs from --general's (nearly shut on general text, open as far as the data "
                   "tells the domain apart). Default: data with --general, zero without.")
@train_options("mode")
def train_expert_cmd(base, domain, data, out, blocks, expert_layers, init, general, general_share, stay_out_weight,
                     penalty, gate_init, **train_kw):  # fmt: skip
    """Train one domain expert beside the frozen backbone; saves only the expert's layers and gate rows."""
    from mode_edge.config import MoDELayout, StayOutConfig
    from mode_edge.training.data import load_corpus
    from mode_edge.training.train_expert import train_expert

    if train_kw["placement"] == "split":  # (before the backbone loads)
        from mode_edge.training.placement import check_stay_out

        check_stay_out(general is not None)
    cfg, parallel = make_train_config(out, "expert", experts=1, **train_kw)
    given = {"--general-share": general_share, "--stay-out-weight": stay_out_weight, "--stay-out": penalty}
    if general is None and any(v is not None for v in given.values()):
        named = ", ".join(k for k, v in given.items() if v is not None)
        raise UserError(f"{named} shape training on general text; pass --general DATA as well (or drop them)")
    if general is not None and Path(general).resolve() == Path(data).resolve():
        raise UserError("--general is the expert's own --data; pass a corpus of other, general text "
                        "(`mode-edge data prepare --domain general`)")  # fmt: skip
    gate_init = gate_init or ("data" if general else "zero")
    layout = MoDELayout(n_blocks=blocks, expert_layers=expert_layers, init=init, gate_init=gate_init)
    defaults = StayOutConfig()
    stay_out = StayOutConfig(share=defaults.share if general_share is None else general_share,
                             weight=defaults.weight if stay_out_weight is None else stay_out_weight,
                             penalty=penalty or defaults.penalty)  # fmt: skip
    check_name(domain, "--domain")
    require_absent(out)
    corpus = load_corpus(data)  # fail on bad data before the backbone's load
    general_corpus = load_corpus(general) if general else None
    backbone = load_base(base)
    record = train_expert(backbone, domain, corpus, out, layout, cfg, general_corpus, stay_out, parallel)
    trained_line(f"expert {domain}", record, out)


@train.command("compose", short_help="Stage 2: compose experts, train the gate.")
@click.option("--base", default=None, help=BASE_HELP + " Default: the base the first expert was trained on.")
@click.option("--experts", required=True, help="Comma-separated run folders of trained experts.")
@click.option("--data", required=True, help="Comma-separated corpus folders; batches mix them evenly.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder to create.")
@click.option("--freeze-experts", is_flag=True, help="Train the gate rows only.")
@train_options("mode")
def train_compose_cmd(base, experts, data, out, freeze_experts, **train_kw):
    """Compose trained experts and fine-tune the gate (and, by default, the experts) on mixed data."""
    from mode_edge.training.compose import compose
    from mode_edge.training.data import load_corpus
    from mode_edge.training.runs import run_expert_names

    expert_runs = csv_paths(experts)
    if not expert_runs:
        raise UserError("--experts needs at least one expert run folder")
    cfg, parallel = make_train_config(out, "compose", experts=len(run_expert_names(expert_runs)), **train_kw)
    require_absent(out)
    corpora = [load_corpus(d) for d in csv_paths(data)]
    backbone = load_base(base or base_of(expert_runs[0]))
    record = compose(backbone, expert_runs, corpora, out, cfg, freeze_experts, parallel)
    trained_line("composed", record, out)


@train.command("full-ft", short_help="Baseline: full fine-tuning.")
@click.option("--base", default="smollm2", show_default=True, help=BASE_HELP)
@click.option("--data", required=True, help="Comma-separated corpus folders; batches mix them evenly.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder to create.")
@train_options("full-ft")
def train_full_ft_cmd(base, data, out, **train_kw):
    """Baseline: fine-tune every backbone weight (on a copy) on the mixed data."""
    from mode_edge.training.baselines import train_full_ft
    from mode_edge.training.data import load_corpus

    cfg, parallel = make_train_config(out, "full-ft", **train_kw)
    require_absent(out)
    corpora = [load_corpus(d) for d in csv_paths(data)]
    record = train_full_ft(load_base(base), corpora, out, cfg, parallel)
    trained_line("full-ft", record, out)


@train.command("lora", short_help="Baseline: LoRA adapters (peft).")
@click.option("--base", default="smollm2", show_default=True, help=BASE_HELP)
@click.option("--data", required=True, help="Comma-separated corpus folders; batches mix them evenly.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder to create.")
@click.option("--rank", type=POSITIVE, default=16, show_default=True, help="Adapter rank.")
@click.option("--alpha", type=Float(0, lo_open=True), default=32.0, show_default=True,
              help="Adapter scale numerator (alpha / rank).")
@click.option("--targets", default="q_proj,k_proj,v_proj,o_proj", show_default=True,
              help="Linear layers that get adapters (attention only by default, as in the paper).")  # fmt: skip
@train_options("lora")
def train_lora_cmd(base, data, out, rank, alpha, targets, **train_kw):
    """Baseline: LoRA adapters (peft) on the frozen backbone, trained on the mixed data."""
    from mode_edge.training.baselines import LoraSettings, train_lora
    from mode_edge.training.data import load_corpus

    cfg, parallel = make_train_config(out, "lora", **train_kw)
    settings = LoraSettings(rank, alpha, tuple(t for t in targets.split(",") if t))
    require_absent(out)
    corpora = [load_corpus(d) for d in csv_paths(data)]
    record = train_lora(load_base(base), corpora, out, cfg, settings, parallel)
    trained_line(f"lora ({record['trainable_parameters']} trainable parameters)", record, out)


def base_of(run: Path) -> str:
    from mode_edge.training.runs import read_model_record

    return read_model_record(run)["base"]["spec"]


def load_base(spec: str, context: int | None = None):
    from mode_edge.progress import console
    from mode_edge.training.backbones import load_backbone

    with console.status(f"loading backbone {spec}"):
        return load_backbone(spec, context)


@main.command("eval", short_help="Held-out accuracy and perplexity per domain.")
@click.option("--model", "run", type=click.Path(path_type=Path), default=None,
              help="Run folder (expert or composed); with --routing, one run or several comma-separated expert runs "
                   "(experts trained apart, routed without any composition).")
@click.option("--base", default=None, help=BASE_HELP + " Default: the run's base.")
@click.option("--data", required=True, help="Comma-separated corpus folders, one per domain.")
@click.option(
    "--experts", default=None, help="Subset of the run's experts, comma-separated; 'none' for the bare backbone."
)
@click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True)
@click.option("--max-tokens", type=POSITIVE, default=8192, show_default=True, help="Held-out tokens per domain.")
@click.option("--seq-len", type=POSITIVE, default=256, show_default=True,
              help="Tokens per window; at most the backbone's context (max positions).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, callback=output_file,
              help="Also write the results here.")
@click.option("--routing", is_flag=True,
              help="Evaluate prompt routing instead: for held-out prompts of each domain (16, 64 and 256 tokens), "
                   "which expert (or none) each router picks, the confusion matrix, and the accuracy of the routed "
                   "model on the continuation beside the oracle choice and the composition of all experts. An "
                   "expert is expected for its own domain (same name), none for the others. Reads the test split; "
                   "--split, --max-tokens and --seq-len do not apply (see --prompts).")
@click.option("--prompts", type=click.IntRange(min=1), default=48, show_default=True,
              help="With --routing: held-out prompts per domain (one per document).")
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="Score an exported bundle through the device runtime (its graphs and quantization) instead of a "
                   "run: all its experts, or --experts. With --model RUN as well, that run is the reference: its "
                   "PyTorch accuracy, the paired change and the top-1 agreement stand beside the bundle's. With "
                   "--routing: route with the routers in its packs.")
@cli_device.BACKEND
def eval_cmd(run, base, data, experts, split, max_tokens, seq_len, json_out, routing, prompts, bundle, backend):
    """Next-token accuracy and perplexity per domain on the held-out split, with 95% intervals from resampling
    documents; for a MoDE model also the mean gate weight of the backbone and each expert per domain (per block in
    the --json file). With --bundle: the same scores for what ships. With --routing: prompt routing accuracy and the
    routed model's accuracy."""
    from mode_edge.training.data import load_corpus
    from mode_edge.training.evaluate import build_model, evaluate, print_gates, print_scores

    if bundle is not None and not routing:
        eval_bundle(bundle, run, base, data, experts, split, max_tokens, seq_len, json_out, backend)
        return
    if bundle is not None:
        if run is not None:
            raise UserError("--routing --bundle evaluates the bundle's own routers; leave out --model")
        from mode_edge.training.eval_routing import BundleSide, evaluate_routing, print_routing

        corpora = [load_corpus(d) for d in csv_paths(data)]
        result = evaluate_routing(BundleSide(bundle), corpora, prompts)
        print_routing(result)
        if json_out:
            write_output(json_out, json.dumps({"bundle": str(bundle), "routing": result}, indent=2) + "\n")
        return
    if routing and run is None:
        raise UserError("--routing needs --model RUN (or RUN,RUN,...), MoDE runs with the experts to route to, "
                        "or --bundle BUNDLE")  # fmt: skip
    if run is None and base is None:
        raise UserError("pass --model RUN (a trained run) or --base B (to evaluate the bare backbone)")
    if not routing and run is not None and "," in str(run) and not Path(run).exists():
        raise UserError("--model takes one run folder; several comma-separated runs only with --routing")
    subset = None if experts is None else expert_list(experts, "--experts")
    corpora = [load_corpus(d) for d in csv_paths(data)]  # fail on bad data before the backbone's load
    runs = csv_paths(str(run)) if routing else [run]
    backbone = load_base(base or base_of(runs[0]))
    if routing:
        from mode_edge.training.eval_routing import print_routing, routing_for_run

        result = routing_for_run(backbone, runs, subset, corpora, prompts)
        print_routing(result)
        if json_out:
            write_output(json_out, json.dumps({"model": str(run), "routing": result}, indent=2) + "\n")
        return
    model, names, label = build_model(backbone, run, subset)
    results = evaluate(backbone, model, corpora, seq_len=seq_len, max_tokens=max_tokens, split=split)
    report = {
        "model": str(run) if run else None,
        "label": label,
        "base": backbone.spec,
        "experts": names,
        "split": split,
        "domains": results,
    }
    print_scores({label: results})
    print_gates({label: results})
    if json_out:
        write_output(json_out, json.dumps(report, indent=2) + "\n")


def eval_bundle(bundle, run, base, data, experts, split, max_tokens, seq_len, json_out, backend) -> None:
    """`eval --bundle`: the bundle's scores through the runtime, beside the run it came from when --model is given."""
    from mode_edge.training.data import load_corpus
    from mode_edge.training.eval_bundle import BundleModel, evaluate_bundle, print_bundle_scores
    from mode_edge.training.evaluate import build_model

    if base is not None:
        raise UserError("--base does not apply to --bundle: the bundle holds its base; pass --model RUN as reference")
    if run is not None and "," in str(run) and not Path(run).exists():
        raise UserError("--model takes one run folder as the reference of --bundle")
    subset = None if experts is None else expert_list(experts, "--experts")
    corpora = [load_corpus(d) for d in csv_paths(data)]
    model = BundleModel(bundle, subset, backend)
    reference = None
    if run is not None:
        from mode_edge.training.runs import read_model_record

        shipped = model.session.engine.manifest["base"]["fingerprint"]
        if read_model_record(run)["base"]["fingerprint"] != shipped:
            raise UserError(f"{run} was trained on another backbone than {bundle} holds; pass the run it was "
                            "exported from")  # fmt: skip
        context = model.session.engine.manifest["base"]["decoder"]["max_seq_len"]  # (--context at export)
        reference, _, _ = build_model(load_base(base_of(run), context), run, model.experts)
        reference.eval()
    results = evaluate_bundle(model, corpora, reference, seq_len=seq_len, max_tokens=max_tokens, split=split)
    label = f"{bundle} ({'+'.join(model.experts) or 'base only'}, {backend})"
    print_bundle_scores(results, label)
    if json_out:
        report = {"bundle": str(bundle), "backend": backend, "experts": model.experts, "reference": str(run) if run
                  else None, "split": split, "domains": results}  # fmt: skip
        write_output(json_out, json.dumps(report, indent=2) + "\n")


@main.command("reproduce", short_help="Compare MoDE with full fine-tuning and LoRA.")
@click.option("--base", default="smollm2", show_default=True, help=BASE_HELP)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for data, runs, table and plots.")
@click.option(
    "--preset",
    type=click.Choice(["tiny", "quick", "paper", "gpu"]),
    default="quick",
    show_default=True,
    help="Data and token budget: tiny (tests), quick (~30 min on 2 cores), paper (all data, ~4 h on 2 cores; --sweep "
    "adds ~4 h), gpu (10x paper's tokens, trained with --device cuda).",
)
@click.option("--sweep", is_flag=True, help="Also MoDE at 1 and 4 expert layers per block, LoRA at ranks 8/64/512, "
              "and stay-out experts at stage-1 learning rates 1e-4 and 3e-4.")
def reproduce_cmd(base, out, preset, sweep):
    """The paper's comparison on our data: backbone, full fine-tuning, LoRA, MoDE experts and compositions, with
    the same token budget each. Writes OUT/table.md, OUT/table.csv and OUT/plots/*.png; a rerun skips finished rows."""
    from mode_edge.training.reproduce import reproduce

    reproduce(load_base(base), out, preset, sweep)
    click.echo((Path(out) / "table.md").read_text())


@main.command("demo", short_help="Run the whole pipeline on the built-in backbone.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--quick", is_flag=True, help="A small slice and few steps: the whole pipeline in about 3 minutes.")
@click.option("--base", default="smollm2", show_default=True, help=BASE_HELP)
def demo_cmd(out, quick, base):
    """Data prepare -> train code and math experts -> compose -> eval; prints base vs composed per domain.
    Finished steps are reused when rerun."""
    from mode_edge.training.demo import run_demo

    run_demo(out, quick=quick, base=base)


for command in cli_ship.COMMANDS + cli_trust.COMMANDS + cli_device.COMMANDS:  # export, pack, install, ...; run
    main.add_command(command)


def terminated(signum, frame) -> None:
    """SIGTERM (what `timeout`, job schedulers and torchrun send) ends a command as Ctrl-C does: a training run says
    which checkpoint a rerun resumes from, an export or install removes what it had half written; exit code 130."""
    raise KeyboardInterrupt


def entry() -> None:
    """The `mode-edge` console script (and `python -m mode_edge.cli`): main() in a process of its own, where `mode-edge
    run` puts every onnxruntime session on one global thread pool (runtimes/run.run). Tests drive main() inside their
    own process, where other onnxruntime sessions run too, and keep a pool per session."""
    from mode_edge.runtimes import backends

    backends.OWN_PROCESS = True
    signal.signal(signal.SIGTERM, terminated)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return main()
    # A torchrun worker leaves without the interpreter's finalization: torch 2.13's gloo teardown at exit aborts now
    # and then (SIGABRT, "terminate called without an active exception": 3 of some 200 worker exits in this project's
    # tests, after the process group was destroyed and the run written), and torchrun then kills the other ranks and
    # reports a finished run as failed. Everything is written and the process group is gone by this point.
    try:
        main()
        code = 0
    except SystemExit as e:  # (click ends every command with one)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
