"""Data-parallel training across processes launched by `torchrun` (torch.distributed: gloo on CPU, NCCL on CUDA).

Every trainer here (expert, compose, full-ft, lora) runs through one loop (training/trainer.py), which asks this
module who it is. Under `torchrun --nproc-per-node N`, RANK and WORLD_SIZE are set; each rank then:
- builds the same model and the same deterministic data stream, and takes its own rows of every global batch
  (`--batch-size` stays the global batch, so a run's result does not depend on how many processes computed it, and a
  checkpoint resumes at any world size);
- averages the trainable parameters' gradients over the ranks after each backward, in one all_reduce of their
  flattened concatenation: what DistributedDataParallel does, done without its wrapper so that every loss function
  (the stay-out penalty's hooks, LoRA's peft model) sees the plain model. Only trainable parameters take part: the
  frozen backbone has no gradient to send (its activations' gradients stay local to each rank's backward);
- leaves writing (checkpoints, the run folder, model.json) and progress to rank 0; every rank reads the same
  checkpoint when it resumes (one machine, or a shared file system across several).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist

from mode_edge.errors import UserError


def world() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's RANK and WORLD_SIZE, (0, 1) without them. Raises UserError
    for values that do not describe a process group."""
    try:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError("RANK and WORLD_SIZE must be integers (torchrun sets them); unset them to train in one "
                        "process") from None  # fmt: skip
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK {rank} and WORLD_SIZE {size} do not describe a process group; launch with torchrun")
    return rank, size


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """Join torchrun's process group for the duration (gloo on CPU, NCCL on CUDA), yielding (rank, world size);
    nothing to join in a single process. A group made here is left here."""
    rank, size = world()
    made = size > 1 and not dist.is_initialized()
    if made:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank, size
    finally:
        if made:
            dist.destroy_process_group()


def rows_of(batch, rank: int, size: int):
    """This rank's rows of a global batch: windows (B, T+1), or a tuple of per-row tensors. Raises UserError when B
    does not divide among the ranks."""
    first = batch[0] if isinstance(batch, tuple) else batch
    if first.shape[0] % size:
        raise UserError(f"--batch-size {first.shape[0]} does not divide among {size} processes; choose a multiple of "
                        f"{size} (it is the global batch, split across the processes)")  # fmt: skip
    n = first.shape[0] // size
    pick = slice(rank * n, (rank + 1) * n)
    return tuple(t[pick] for t in batch) if isinstance(batch, tuple) else batch[pick]


def broadcast_parameters(params: dict[str, torch.nn.Parameter]) -> None:
    """Make every rank start from rank 0's trainable weights (as DistributedDataParallel does at construction)."""
    with torch.no_grad():
        for p in params.values():
            dist.broadcast(p.data, src=0)


def average_gradients(params: dict[str, torch.nn.Parameter], size: int) -> None:
    """Replace each trainable parameter's gradient (B_rank rows' mean) by its mean over the ranks: with equal rows
    per rank, the gradient of the global batch's mean loss. One all_reduce of the flattened gradients."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for p, g in zip(params.values(), grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def average(value: float, size: int, device: torch.device) -> float:
    """The mean of a number over the ranks (the step's loss, for a history that is the global batch's)."""
    t = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / size
