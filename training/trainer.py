"""The training loop shared by expert training and composition.

AdamW with linear warm-up and cosine decay, gradient accumulation, gradient clipping, and resumable checkpoints: the
trainable tensors and the optimizer moments go to safetensors (never pickle), the step and loss history to JSON.
Only the modules handed in as trainable learn; the backbone is frozen and never written.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mode_edge.config import TrainConfig
from mode_edge.errors import UserError
from mode_edge.files import write_json
from mode_edge.progress import training_progress
from mode_edge.training.model import MoDEModel

STATE_DIR = "train_state"


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at `step`: linear warm-up, then cosine down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(trainable: dict[str, torch.nn.Module], cfg: TrainConfig, train_layers: bool) -> list[dict]:
    """Gate rows get their own fast learning rate; layer matrices get weight decay; norms and biases do not."""
    gates, decay, no_decay = [], [], []
    for module in trainable.values():
        for name, p in module.named_parameters():
            if ".gate." in f".{name}":
                gates.append(p)
            elif not train_layers:
                continue
            elif p.ndim >= 2:
                decay.append(p)
            else:
                no_decay.append(p)
    groups = [{"params": gates, "lr": cfg.gate_lr, "weight_decay": 0.0, "base_lr": cfg.gate_lr}]
    if train_layers:
        groups += [
            {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "base_lr": cfg.lr},
        ]
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def _save_state(state_dir: Path, trainable, optimizer, step: int, history: list, signature: dict) -> None:
    state_dir.mkdir(exist_ok=True)
    tensors = {
        f"model.{p}.{k}": v.detach().cpu().contiguous() for p, m in trainable.items() for k, v in m.state_dict().items()
    }
    for i, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_file(tensors, str(state_dir / "state.tmp.safetensors"))
    (state_dir / "state.tmp.safetensors").replace(state_dir / "state.safetensors")
    write_json(state_dir / "state.json", {"step": step, "history": history, "signature": signature})


def _load_state(state_dir: Path, trainable, optimizer, signature: dict) -> tuple[int, list]:
    meta = json.loads((state_dir / "state.json").read_text())
    if meta["signature"] != signature:
        raise UserError(
            f"{state_dir.parent} holds an interrupted run with other settings; rerun with the same options "
            f"to resume it, or delete that folder to start afresh"
        )
    tensors = load_file(str(state_dir / "state.safetensors"))
    for prefix, module in trainable.items():
        sub = {k[len(f"model.{prefix}.") :]: v for k, v in tensors.items() if k.startswith(f"model.{prefix}.")}
        module.load_state_dict(sub, strict=True)
    opt_state = optimizer.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_state["state"].setdefault(int(i), {})[name] = v
    optimizer.load_state_dict(opt_state)
    return meta["step"], meta["history"]


def train(
    model: MoDEModel,
    trainable: dict[str, torch.nn.Module],
    batches: Iterator[torch.Tensor],
    cfg: TrainConfig,
    work: Path,
    *,
    train_layers: bool = True,
    signature: dict,
    label: str,
) -> dict:
    """Train `trainable` (expert modules by name) inside `model`; returns the loss history and throughput."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but this torch has no CUDA device; use --device cpu")
    model.to(device)
    groups = param_groups(trainable, cfg, train_layers)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    state_dir = work / STATE_DIR
    step, history = 0, []
    if (state_dir / "state.json").exists():
        step, history = _load_state(state_dir, trainable, optimizer, signature)
        for _ in range(step * cfg.grad_accum):  # replay the deterministic data order up to the checkpoint
            next(batches)
    params = [p for g in groups for p in g["params"]]
    for m in trainable.values():
        m.train()
    tokens, t0 = 0, time.perf_counter()
    with training_progress(label, cfg.steps, start=step) as advance:
        while step < cfg.steps:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, cfg)
            total = 0.0
            for _ in range(cfg.grad_accum):
                batch = next(batches).to(device)
                logits = model(batch[:, :-1])  # (B, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
                (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
                tokens += batch[:, 1:].numel()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(round(total, 5))
            advance(loss=total, tokens_per_s=tokens / (time.perf_counter() - t0))
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _save_state(state_dir, trainable, optimizer, step, history, signature)
    wall = time.perf_counter() - t0
    for m in trainable.values():
        m.eval().requires_grad_(False)
    model.to("cpu")
    return {
        "history": history,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / max(wall, 1e-9), 1),
    }


def clear_state(work: Path) -> None:
    import shutil

    shutil.rmtree(work / STATE_DIR, ignore_errors=True)


def training_record(stage: str, data: list[str], cfg: TrainConfig, result: dict, **extra) -> dict:
    """What a run records of how it was trained (the loss history goes to model.json)."""
    throughput = {k: result[k] for k in ("tokens", "wall_s", "tokens_per_s")}
    return {"stage": stage, **extra, "data": data, "config": cfg.to_dict(), **throughput}
