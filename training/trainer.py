"""The training loop shared by MoDE expert training, composition and the baselines (full fine-tuning, LoRA).

AdamW with linear warm-up and cosine decay, gradient accumulation, gradient clipping, and resumable checkpoints: the
trainable tensors and the optimizer moments go to safetensors (never pickle), the step and loss history to JSON.
Only the parameters handed in learn; everything else (the frozen backbone above all) is never written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mode_edge.config import ParallelConfig, TrainConfig
from mode_edge.errors import RunStopped, UserError
from mode_edge.files import (
    atomic_dir,
    fsync_folder,
    partial_path,
    read_json,
    remove_path,
    write_atomically,
    write_json,
)
from mode_edge.integrity import check_file, checked_load, file_record, is_int
from mode_edge.memory import PeakRSS
from mode_edge.progress import console, training_progress
from mode_edge.training import distributed, sharded_checkpoint
from mode_edge.training.sharded_checkpoint import checkpoint_tensors

STATE_DIR = "train_state"
NOTHING_DONE = {"step": 0, "history": [], "tokens": 0, "wall_s": 0.0, "peak_rss_mb": 0.0, "launches": []}
"""What a run has spent before its first step; a checkpoint holds the same keys for the steps before it
(`launches`: each launch's first step, processes and strategy)."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at `step`: linear warm-up, then cosine down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of token windows (B, T+1): the ordinary language-model loss."""
    logits = model(batch[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def _to(batch, device: torch.device):
    """A batch is token windows (B, T+1), or a tuple whose first item they are (with per-row tensors after them)."""
    return tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else batch.to(device)


def is_gate(name: str) -> bool:
    return ".gate." in f".{name}"


def param_groups(params: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """Gate rows get their own fast learning rate; matrices get weight decay; norms and biases do not."""
    gates = [p for n, p in params.items() if is_gate(n)]
    decay = [p for n, p in params.items() if not is_gate(n) and p.ndim >= 2]
    no_decay = [p for n, p in params.items() if not is_gate(n) and p.ndim < 2]
    groups = [
        {"params": gates, "lr": cfg.gate_lr, "weight_decay": 0.0, "base_lr": cfg.gate_lr},
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    return [g for g in groups if g["params"]]


def _state_tensors(plan: distributed.DataParallelPlan, params, optimizer) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: every trainable tensor and optimizer moment, whole, on rank 0 ({} on the others).
    Every rank calls it: gathering is collective under --fsdp and --placement split."""
    keep = plan.rank == 0
    tensors = checkpoint_tensors(plan.full(params, keep), plan.optimizer_state(optimizer, params, keep))
    return {k: t.contiguous() for k, t in tensors.items()}


def _save_state(state_dir: Path, tensors: dict[str, torch.Tensor], done: dict, signature: dict) -> None:
    """`done`: the step reached, the loss history, and the tokens, wall seconds and peak RSS spent so far.

    An interruption at any point (a power cut too) keeps a whole checkpoint: the new weights go to a file of their own
    (named by the step), on disk before state.json names it (one atomic rename of the record switches checkpoints),
    and the previous checkpoint's file is removed only after that; a half-written file is removed on the way out
    (`write_atomically`), or by the next checkpoint where the process was killed outright."""
    state_dir.mkdir(exist_ok=True)
    name = f"state-{done['step']}.safetensors"
    write_atomically(state_dir / name, lambda tmp: save_file(tensors, str(tmp)))
    _switch_to(state_dir, name, file_record(state_dir / name), done, signature)


def _save_sharded_state(state_dir: Path, plan: distributed.DataParallelPlan, trained: dict, optimizer, done: dict,
                        signature: dict) -> None:  # fmt: skip
    """`_save_state` for a strategy that writes its shards (--fsdp; training/sharded_checkpoint.py): every rank calls
    it. The shards go to a hidden folder, renamed to `state-N.shards` once every rank's file is on disk (and found
    there by rank 0), before state.json names it. An interrupt leaves the previous checkpoint named; rank 0 removes
    the hidden folder, and the next checkpoint whatever a rank still writing (or a killed process) left of it."""
    name = f"state-{done['step']}{sharded_checkpoint.SUFFIX}"
    tmp, folder = state_dir / f".{name}.tmp", state_dir / name
    if plan.rank == 0:
        state_dir.mkdir(exist_ok=True)
        remove_path(tmp)
    distributed.barrier()  # (no rank writes into the folder before rank 0 has emptied it)
    tensors = checkpoint_tensors({n: p.detach() for n, p in trained.items()}, optimizer.state_dict()["state"])
    try:
        written = sharded_checkpoint.save_shards(tmp, tensors)
        if plan.rank == 0:
            sharded_checkpoint.check_written(tmp, written)
            fsync_folder(tmp)
            remove_path(folder)  # (one a killed run renamed but never named)
            os.replace(tmp, folder)
            fsync_folder(state_dir)
            _switch_to(state_dir, name, sharded_checkpoint.folder_record(folder), done, signature)
    except BaseException:
        if plan.rank == 0:
            remove_path(tmp)
        raise


def _switch_to(state_dir: Path, name: str, weights: dict, done: dict, signature: dict) -> None:
    """Make state.json name the checkpoint `name` (recorded as `weights`), then remove every other checkpoint and
    what killed writes left."""
    write_json(state_dir / "state.json", {**done, "signature": signature, "weights": weights, "weights_file": name})
    patterns = ("*.safetensors", f"*{sharded_checkpoint.SUFFIX}", ".*.tmp")
    for path in [path for pattern in patterns for path in state_dir.glob(pattern)]:
        if path.name != name:
            remove_path(path)


def _weights_file(state_dir: Path, meta: dict) -> Path | None:
    """The weights a checkpoint record names, a file or a folder of shards (checkpoints written before records named
    them: state.safetensors), or None where the name is not a plain file name."""
    name = meta.get("weights_file", "state.safetensors")
    kinds = (".safetensors", sharded_checkpoint.SUFFIX)
    plain = isinstance(name, str) and name.endswith(kinds) and Path(name).name == name and not name.startswith(".")
    return state_dir / name if plain else None


RESUMABLE = ("checkpoint_every",)
"""Training settings a resumed run may change: they do not change what it computes."""


def check_same_settings(work: Path, saved: dict, now: dict) -> None:
    """Raise UserError, naming what differs, when the run interrupted in `work` had other settings."""
    changed = changed_settings(saved, now)
    if changed:
        raise UserError(f"{work} holds an interrupted run with other settings ({'; '.join(changed)}); rerun with the "
                        f"same options to resume it, or delete that folder to start afresh")  # fmt: skip


def check_options_unchanged(out: Path, stage: str, cfg: TrainConfig) -> None:
    """Raise UserError when OUT's partial folder holds a run interrupted in another command (`stage`: expert,
    compose, full-ft, lora) or with other training options than `cfg`'s: the part of `check_same_settings` a command
    can do before the backbone loads (the rest of the run's signature, the backbone's fingerprint among it, is
    checked after)."""
    saved = saved_state(partial_path(out)).get("signature")
    if isinstance(saved, dict):
        now = {"stage": stage, "train": cfg.to_dict()}
        check_same_settings(partial_path(out), {k: saved.get(k) for k in now}, now)


SIGNATURE_OPTIONS = {
    "name": "--domain",
    "base": "--base",
    "data": "--data",
    "general": "--general",
    "stay_out": "--stay-out, --stay-out-weight, --general-share",
    "experts": "--experts",
    "freeze": "--freeze-experts",
    "lora": "--rank, --alpha, --targets",
    "n_blocks": "--blocks",
    "gate_bias": "the gate's initial bias",
}
"""The options (or what else) that set each part of a run's signature, for the refusal of a rerun that differs;
a training setting or a layout field not listed is its own option (`lr`: --lr, `expert_layers`: --expert-layers)."""


def changed_settings(saved: dict, now: dict) -> list[str]:
    """Where two runs' signatures differ, as the options that set them (SIGNATURE_OPTIONS; `train` and `layout` field
    by field) with the interrupted run's value and the new one where they read in a few words; RESUMABLE settings
    aside; another command alone where the commands differ. The backbone's fingerprint covers its cut into blocks,
    so a changed layout does not also name --base."""
    if saved.get("stage") != now.get("stage"):  # (another command: its other options, defaults among them, differ)
        return [f"the command: it was train {saved.get('stage')}, now train {now.get('stage')}"]
    changed = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key in ("train", "layout") and isinstance(a, dict) and isinstance(b, dict):
            fields = [k for k in sorted(set(a) | set(b)) if k not in RESUMABLE and a.get(k) != b.get(k)]
            options = [SIGNATURE_OPTIONS.get(k, f"--{k.replace('_', '-')}") for k in fields]
            changed += [_change(option, a.get(k), b.get(k)) for option, k in zip(options, fields)]
        elif key == "base" and a != b and saved.get("layout") == now.get("layout"):
            changed.append("--base")  # (a fingerprint: its value says nothing to read)
        elif key != "base" and a != b:
            changed.append(_change(SIGNATURE_OPTIONS.get(key, key), a, b))
    return changed


def _change(option: str, then, now) -> str:
    """`option`, with its value in the interrupted run and now where both read in a few words (a number, a word, a
    path, a list of them): what a rerun that resumes must give."""

    def plain(v) -> bool:
        return v is None or isinstance(v, (bool, int, float, str)) or (
            isinstance(v, list) and all(isinstance(x, (int, float, str)) for x in v))  # fmt: skip

    def shown(v) -> str:
        return "none" if v is None or v == [] else ",".join(map(str, v)) if isinstance(v, list) else str(v)

    return f"{option}: {shown(then)} then, {shown(now)} now" if plain(then) and plain(now) else option


def _afresh(work: Path) -> str:
    """The fix a refused checkpoint's message ends with: its run folder is the user's to delete, never ours."""
    return f"delete {work} to start the run afresh"


def _checked_record(state_dir: Path, signature: dict) -> tuple[dict, Path]:
    """The checkpoint record of `state_dir` and the weights it names (a file, or a folder of shards), checked first:
    complete, the files as recorded, the run's settings unchanged. A damaged one is refused with the folder to delete
    (it is never deleted for the user: it holds their progress)."""
    fix = _afresh(state_dir.parent)
    meta = read_json(state_dir / "state.json", fix, fix)
    weights = _weights_file(state_dir, meta)
    sharded = weights is not None and weights.suffix == sharded_checkpoint.SUFFIX
    found = weights is not None and (weights.is_dir() if sharded else weights.is_file()) and not weights.is_symlink()
    if not found or not isinstance(meta.get("signature"), dict) or not is_int(meta.get("step")):
        raise UserError(f"the checkpoint in {state_dir} is incomplete or damaged; {fix}")
    if sharded:
        sharded_checkpoint.check_folder(weights, meta.get("weights"), fix)
    else:
        check_file(weights, meta.get("weights"), fix)
    check_same_settings(state_dir.parent, meta["signature"], signature)
    return meta, weights


def _spent_before(state_dir: Path, meta: dict, step_counts: set[float]) -> dict:
    """What the run spent before its checkpoint (NOTHING_DONE's keys), once the record's step and loss history are
    found to agree with the optimizer's step count in the weights (`step_counts`: every parameter's); raises
    UserError where they do not (a record edited by hand, or another run's)."""
    step, history = meta["step"], meta.get("history")
    if step < 1 or not isinstance(history, list) or len(history) != step or step_counts != {float(step)}:
        losses = len(history) if isinstance(history, list) else "no"
        counted = ", ".join(f"{c:g}" for c in sorted(step_counts)) or "none"
        raise UserError(f"the checkpoint record {state_dir / 'state.json'} does not match its weights (it says step "
                        f"{step}, with {losses} losses, where the optimizer counted {counted}); "
                        f"{_afresh(state_dir.parent)}")  # fmt: skip
    spent = {k: v for k, v in meta.items() if k not in ("signature", "weights", "weights_file")}
    return {**NOTHING_DONE, **spent}


def _load_state(state_dir: Path, meta: dict, weights: Path, params) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """Resume from the checkpoint `_checked_record` found, read whole by this process: copies the weights into
    `params`; returns what the run spent before it and the optimizer's state by parameter index (whole tensors, for
    `_load_optimizer`)."""
    fix = _afresh(state_dir.parent)
    sharded = weights.suffix == sharded_checkpoint.SUFFIX
    read = (lambda: sharded_checkpoint.load_whole(weights)) if sharded else (lambda: load_file(str(weights)))
    tensors = checked_load(weights, read, fix)
    if any(f"param.{n}" not in tensors or tensors[f"param.{n}"].shape != p.shape for n, p in params.items()):
        raise UserError(f"{weights} does not hold this run's weights; {fix}")
    counts = {float(t) for key, t in tensors.items() if key.startswith("opt.") and key.endswith(".step")}
    before = _spent_before(state_dir, meta, counts)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            moments.setdefault(int(i), {})[name] = v
    return before, moments


def _load_own_shards(state_dir: Path, meta: dict, folder: Path, trained: dict, optimizer) -> dict:
    """Resume an --fsdp run from a sharded checkpoint with each rank reading only the parts of it its own shards
    need, straight into its sharded weights and AdamW state (collective; DCP reshards between world sizes): no rank
    holds a whole trainable tensor or moment. Returns what the run spent before the checkpoint."""
    fix = _afresh(state_dir.parent)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {"step": torch.zeros((), dtype=torch.float32), **{m: torch.zeros_like(p) for m in MOMENTS}}
             for i, p in enumerate(ordered)}  # fmt: skip
    targets = checkpoint_tensors({n: p.detach() for n, p in trained.items()}, state)
    stored = checked_load(folder, lambda: sharded_checkpoint.shapes(folder), fix)
    held = {i for i in state if f"opt.{i}.step" in stored}  # (AdamW keeps no state for a weight that had no gradient)
    expected = {k for k in targets if k.startswith("param.")} | {f"opt.{i}.{m}" for i in held for m in state[i]}
    if set(stored) != expected or any(tuple(targets[k].shape) != stored[k] for k in stored):
        raise UserError(f"{folder} does not hold this run's weights; {fix}")
    checked_load(folder, lambda: sharded_checkpoint.load_into(folder, {k: targets[k] for k in stored}), fix)
    before = _spent_before(state_dir, meta, {float(state[i]["step"]) for i in held})
    for i in held:
        optimizer.state[ordered[i]].update(state[i])
    return before


MOMENTS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter state beside its step count."""


def _load_optimizer(optimizer: torch.optim.Optimizer, moments: dict, params: dict,
                    plan: distributed.DataParallelPlan, fix: str) -> None:  # fmt: skip
    """Put a checkpoint's optimizer state (whole tensors by parameter index) into `optimizer` over `params`, laid
    out as the strategy holds them (sharded under --fsdp; only the rank's own experts under --placement split): a
    checkpoint resumes under any strategy and world size."""
    names = {id(p): n for n, p in params.items()}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    state = optimizer.state_dict()
    mismatch = UserError(f"the checkpoint's optimizer state does not match this run's weights; {fix}")
    for i, values in moments.items():
        if not 0 <= i < len(ordered):
            raise mismatch
        if not plan.holds_state(names[id(ordered[i])]):
            continue
        whole = {"step": (), **dict.fromkeys(MOMENTS, tuple(ordered[i].shape))}  # (a DTensor's shape is the whole's)
        if {k: tuple(v.shape) for k, v in values.items()} != whole:
            raise mismatch
        state["state"][i] = {k: plan.load_optimizer_value(ordered[i], v) if v.ndim else v for k, v in values.items()}
    optimizer.load_state_dict(state)


def check_device(device: str) -> None:
    """Raise UserError for --device cuda where this torch sees no CUDA device."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but this torch has no CUDA device; use --device cpu")


def train(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    batches: Iterator[torch.Tensor],
    cfg: TrainConfig,
    work: Path,
    *,
    signature: dict,
    label: str,
    loss_fn: Callable = lm_loss,
    parallel: ParallelConfig = ParallelConfig(),
) -> dict:
    """Train the named `params` of `model` (a token-ids -> logits module) on `loss_fn(model, batch)`; returns loss
    history and throughput. Under torchrun, over the processes as `parallel` says (training/distributed.py): data
    parallel by default, the same result as one process with the same global batch; checkpoints written by rank 0
    (under --fsdp: each rank its shards)."""
    check_device(cfg.device)
    device = torch.device(cfg.device)
    rank, size = distributed.world()
    if device.type == "cuda" and size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
        torch.cuda.set_device(device)  # (FSDP and NCCL take the current device for this process's)
    with distributed.process_group(device), distributed.peers_watched():
        plan = distributed.strategy(parallel, rank, size, device)
        launch = {"processes": size, **parallel.to_dict(), "fsdp": parallel.fsdp and size > 1}  # (as it trained)
        result = _train(model, params, batches, cfg, work, device, plan, signature=signature, label=label,
                        loss_fn=loss_fn, launch=launch)  # fmt: skip
        if size > 1:
            result["parallel"] = {**launch, "peak_rss_mb": distributed.gathered(result["peak_rss_mb"], size, device)}
    return result


def _train(model, params, batches, cfg: TrainConfig, work: Path, device: torch.device,
           plan: distributed.DataParallelPlan, *, signature: dict, label: str, loss_fn: Callable,
           launch: dict) -> dict:  # fmt: skip
    model.to(device)
    for p in params.values():
        p.requires_grad_(True)
    state_dir = work / STATE_DIR
    before, moments = NOTHING_DONE, {}  # what a resumed run spent before its checkpoint, so the record is the run's
    meta, weights = _checked_record(state_dir, signature) if (state_dir / "state.json").exists() else ({}, None)
    own_shards = weights is not None and weights.suffix == sharded_checkpoint.SUFFIX and plan.writes_shards
    if weights is not None and not own_shards:  # (whole, into the model, before a strategy spreads it)
        before, moments = _load_state(state_dir, meta, weights, params)
    module, trained = plan.prepare(model, params, loss_fn)
    optimizer = torch.optim.AdamW(param_groups(trained, cfg), betas=(0.9, 0.95), eps=1e-8)
    if own_shards:
        before = _load_own_shards(state_dir, meta, weights, trained, optimizer)
    elif moments:
        _load_optimizer(optimizer, moments, trained, plan, _afresh(work))
        moments.clear()  # (the moments of weights this rank does not hold would otherwise stay for the whole run)
    for _ in range(before["step"] * cfg.grad_accum):  # replay the deterministic data order up to the checkpoint
        next(batches)
    step, history = before["step"], list(before["history"])
    tokens, t0 = 0, time.perf_counter()
    launches = [*before["launches"], {"from_step": step, **launch}]  # a resumed run records every launch

    def spent(peak_mb: float) -> dict:
        wall = before["wall_s"] + time.perf_counter() - t0
        return {"step": step, "history": history, "tokens": before["tokens"] + tokens, "wall_s": round(wall, 2),
                "peak_rss_mb": round(max(before["peak_rss_mb"], peak_mb), 1), "launches": launches}  # fmt: skip

    first = plan.rank == 0
    progress = training_progress(label, cfg.steps, start=step) if first else nullcontext(lambda **_: None)
    with PeakRSS() as memory, progress as advance:
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, cfg)
            total = 0.0
            for _ in range(cfg.grad_accum):
                rows = _to(plan.rows(next(batches)), device)
                total += plan.forward_backward(module, rows, loss_fn, 1 / cfg.grad_accum) / cfg.grad_accum
                tokens += plan.tokens(rows)
            plan.sync(trained)
            total = plan.mean(total)
            plan.clip(trained, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(round(total, 5))
            advance(loss=total, tokens_per_s=tokens / (time.perf_counter() - t0))
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                if plan.writes_shards:  # (every rank writes its own)
                    _save_sharded_state(state_dir, plan, trained, optimizer, spent(memory.peak_mb), signature)
                else:
                    tensors = _state_tensors(plan, trained, optimizer)  # (every rank: gathering may be collective)
                    if first:
                        _save_state(state_dir, tensors, spent(memory.peak_mb), signature)
                # No rank goes on before rank 0 has made the checkpoint the one to resume from: a process that stops
                # in the next step (torchrun then stops the others) would otherwise cut rank 0's writing short.
                distributed.barrier()
    plan.finish()
    result = spent(memory.peak_mb)
    for p in params.values():
        p.requires_grad_(False)
    model.to("cpu")
    del result["step"]
    return {**result, "tokens_per_s": round(result["tokens"] / max(result["wall_s"], 1e-9), 1)}


def train_into(
    out: Path,
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    batches: Iterator[torch.Tensor],
    cfg: TrainConfig,
    *,
    signature: dict,
    label: str,
    save: Callable[[Path, dict], None],
    loss_fn: Callable = lm_loss,
    parallel: ParallelConfig = ParallelConfig(),
    header: str | None = None,
) -> dict:
    """Train, then let `save(work, result)` write the run, which appears as `out` only when complete. An interrupted
    run keeps its checkpoint in the hidden partial folder, and the same call with the same settings resumes it.
    Under torchrun only rank 0 writes (but for each rank's shards of a checkpoint under --fsdp); the other ranks train
    beside it, reading its checkpoint to resume. `header`: a line rank 0 shows before training starts (what the run
    trains on)."""
    if distributed.world()[0] != 0:
        return train(model, params, batches, cfg, partial_path(out), signature=signature, label=label,
                     loss_fn=loss_fn, parallel=parallel)  # fmt: skip
    partial = partial_path(out)
    saved = saved_state(partial)
    if isinstance(saved.get("signature"), dict):  # refused before anything is said (a damaged state: on loading)
        check_same_settings(partial, saved["signature"], signature)
    if header:
        console.print(header, soft_wrap=True)
    if parallel.fsdp and distributed.world()[1] == 1:
        console.print("note: --fsdp shards over torchrun's processes; in one process it trains as without it",
                      soft_wrap=True)  # fmt: skip
    if cfg.warmup_steps > cfg.steps:
        console.print(f"note: --warmup-steps {cfg.warmup_steps} is longer than the run's --steps {cfg.steps}: the "
                      f"learning rate stays below --lr (at most {cfg.steps / cfg.warmup_steps:.0%} of it)",
                      soft_wrap=True)  # fmt: skip
    if partial.exists():
        step = saved["step"] if is_int(saved.get("step")) else None  # (the state.json read above)
        if step is not None:
            console.print(f"resuming the interrupted run in {partial} from its checkpoint of step {step} of "
                          f"{cfg.steps}", soft_wrap=True)  # fmt: skip
        elif not (partial / STATE_DIR / "state.json").exists():  # (an unreadable one is refused on loading)
            console.print(f"the interrupted run in {partial} saved no checkpoint: training starts from step 0 there",
                          soft_wrap=True)  # fmt: skip
    with atomic_dir(out, keep_partial_on_error=True) as work:
        try:
            result = train(model, params, batches, cfg, work, signature=signature, label=label, loss_fn=loss_fn,
                           parallel=parallel)
        except (KeyboardInterrupt, RunStopped) as e:  # say what a rerun will find (the command line prints it)
            saved, why = checkpoint_step(work), str(e) if isinstance(e, RunStopped) else "interrupted"
            raise type(e)(
                f"{why}; the checkpoint of step {saved} of {cfg.steps} is kept in {partial}: rerun the same command "
                f"to resume from it" if saved is not None else f"{why} before the first checkpoint (one every "
                f"{cfg.checkpoint_every} steps): a rerun of the same command starts from step 0"
            ) from None
        save(work, result)
    # (after the rename: where it fails, the partial folder keeps the last checkpoint, and a rerun resumes from it)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)  # absent when no checkpoint was due
    return result


def saved_state(work: Path) -> dict:
    """The checkpoint record (state.json) a run folder (its partial folder) holds, or {} where it holds none or an
    unreadable one (which resuming then refuses with its own message)."""
    try:
        meta = json.loads((work / STATE_DIR / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def checkpoint_step(work: Path) -> int | None:
    """The step of the checkpoint in a run folder, or None (see `saved_state`)."""
    step = saved_state(work).get("step")
    return step if is_int(step) else None


def training_record(stage: str, data: list[str], cfg: TrainConfig, result: dict, **extra) -> dict:
    """What a run records of how it was trained (the loss history goes to model.json)."""
    throughput = {k: result[k] for k in ("tokens", "wall_s", "tokens_per_s", "peak_rss_mb", "parallel") if k in result}
    if len(result.get("launches", ())) > 1:  # resumed: each launch's first step, processes and strategy
        throughput["launches"] = result["launches"]
    return {"stage": stage, **extra, "data": data, "config": cfg.to_dict(), **throughput}


def named_params(modules: dict[str, torch.nn.Module], keep=lambda name: True) -> dict[str, torch.nn.Parameter]:
    """Parameters of several modules under `prefix.name`, optionally filtered by name."""
    return {f"{prefix}.{n}": p for prefix, m in modules.items() for n, p in m.named_parameters() if keep(n)}
