"""Training across processes launched by `torchrun` (torch.distributed: gloo on CPU, NCCL on CUDA).

Every trainer here (expert, compose, full-ft, lora) runs through one loop (training/trainer.py), which asks this
module who it is and hands the work that crosses processes to a strategy:
- `DataParallelPlan` (the default; also the single process): each rank builds the same model and the same deterministic
  data stream and takes its own rows of every global batch (`--batch-size` stays the global batch, so a run's result
  does not depend on how many processes computed it, and a checkpoint resumes at any world size); the trainable
  parameters' gradients are averaged over the ranks after each backward in one all_reduce of their flattened
  concatenation: what DistributedDataParallel does, done without its wrapper so that every loss function (the
  stay-out penalty's hooks, LoRA's peft model) sees the plain model. The frozen backbone has no gradient to send;
- `--fsdp` (training/fsdp.py): the same rows per rank, with the trainable layers sharded by FSDP2;
- `--placement split` (training/placement.py): every rank the whole batch, the backbone and the experts of each
  block on different ranks at the same time.
Rank 0 alone writes checkpoints (under --fsdp every rank writes its shards of them, training/sharded_checkpoint.py),
the run folder and model.json, and shows progress; every rank reads the same checkpoint when it resumes (one machine,
or a shared file system across several; under --fsdp, from a sharded checkpoint, only the parts its shards need).
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from mode_edge.config import ParallelConfig
from mode_edge.errors import RunStopped, UserError


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


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
"""How gloo's TCP transport says the other end of a pair went away (gloo raises a plain RuntimeError)."""


@contextlib.contextmanager
def peers_watched() -> Iterator[None]:
    """Raise RunStopped, one line, where a collective fails because another process of the group went away (it was
    interrupted, killed, or failed first: torchrun reports which): gloo's RuntimeError from its TCP transport (tested)
    or NCCL's DistBackendError (which also covers NCCL's own failures; not run here: no GPU), either of which would
    otherwise print a traceback on every rank left waiting. From then on this process ignores SIGTERM, which torchrun
    sends the survivors of a stopped process: it would cut the line (and the checkpoint it names) short."""
    try:
        yield
    except RuntimeError as e:
        text = str(e).strip()
        if not isinstance(e, dist.DistBackendError) and not ("gloo" in text and any(s in text for s in PEER_GONE)):
            raise
        with contextlib.suppress(ValueError):  # (only the main thread may set a handler; training runs there)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        first = (text.splitlines() or [type(e).__name__])[0]
        reason = first.split("] ", 1)[-1].split(". ", 1)[0].strip()[:160]  # ("[file:line] Read error ...: Conn...")
        raise RunStopped(f"another process of this run stopped, or the connection to it failed ({reason})") from None


def barrier() -> None:
    """Wait until every rank reaches this call (in one process: return)."""
    if dist.is_initialized():
        dist.barrier()


def check_batch(batch_size: int, size: int) -> None:
    """Raise UserError when a global batch of `batch_size` rows does not divide among `size` processes."""
    if batch_size % size:
        raise UserError(f"--batch-size {batch_size} does not divide among {size} processes; choose a multiple of "
                        f"{size} (it is the global batch, split across the processes)")  # fmt: skip


def rows_of(batch, rank: int, size: int):
    """This rank's rows of a global batch: windows (B, T+1), or a tuple of per-row tensors. Raises UserError when B
    does not divide among the ranks."""
    first = batch[0] if isinstance(batch, tuple) else batch
    check_batch(first.shape[0], size)
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
    sum_gradients(params, divide=size)


def sum_gradients(params: dict[str, torch.nn.Parameter], divide: int = 1) -> None:
    """Replace each parameter's gradient (None: zeros) by its sum over the ranks, divided by `divide`: one
    all_reduce of the flattened gradients."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if divide != 1:
        flat /= divide
    offset = 0
    for p, g in zip(params.values(), grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def average(value: float, size: int, device: torch.device) -> float:
    """The mean of a number over the ranks (the step's loss, for a history that is the global batch's)."""
    return sum(gathered(value, size, device)) / size


def gathered(value: float, size: int, device: torch.device) -> list[float]:
    """A number from every rank, in rank order (each rank's peak RSS, for the run's record)."""
    mine = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    parts = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine)
    return [float(t.item()) for t in parts]


def batch_tokens(batch) -> int:
    """Tokens a batch of windows (B, T+1) (or a tuple led by them) trains on: B x T."""
    first = batch[0] if isinstance(batch, tuple) else batch
    return first[:, 1:].numel()


class DataParallelPlan:
    """Replicated weights, rows of each global batch split over the ranks, gradients averaged (one process: plain
    training). The trainer calls, in order: `prepare` once, then per step `rows`, `forward_backward` (per
    micro-batch), `sync`, `mean`, `clip` and the optimizer step; `full` and `optimizer_state` on every rank for a
    checkpoint (unless the strategy `writes_shards`); `finish` after the last step. Subclasses: training/fsdp.py,
    training/placement.py."""

    writes_shards = False
    """Whether every rank writes its own part of a checkpoint (training/sharded_checkpoint.py) instead of rank 0
    writing whole tensors that `full` and `optimizer_state` gather, and reads back only its own part of such a
    checkpoint when the run resumes (instead of reading it whole, as from a single file)."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device

    def prepare(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], loss_fn: Callable):
        """(module to call, parameters to optimise): here the model and `params` themselves, rank 0's values on every
        rank."""
        if self.size > 1:
            broadcast_parameters(params)
        return model, params

    def rows(self, batch):
        return rows_of(batch, self.rank, self.size) if self.size > 1 else batch

    def tokens(self, rows) -> int:
        """Tokens the whole group trained on when this rank trained on `rows`."""
        return batch_tokens(rows) * self.size

    def forward_backward(self, model, batch, loss_fn: Callable, scale: float) -> float:
        """Accumulate the gradient of scale x loss_fn(model, batch); returns the loss."""
        loss = loss_fn(model, batch)
        (loss * scale).backward()
        return loss.item()

    def sync(self, params: dict[str, torch.nn.Parameter]) -> None:
        if self.size > 1:
            average_gradients(params, self.size)

    def mean(self, value: float) -> float:
        """The step's loss over the group (what the history records)."""
        return average(value, self.size, self.device) if self.size > 1 else value

    def clip(self, params: dict[str, torch.nn.Parameter], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)

    def whole(self, t: torch.Tensor, keep: bool) -> torch.Tensor | None:
        """One tensor of a checkpoint, whole, on the CPU where `keep`; None elsewhere (a strategy that spreads weights
        gathers it first, collectively, and a rank that does not keep it drops it at once)."""
        return t.detach().cpu() if keep else None

    def full(self, params: dict[str, torch.nn.Parameter], keep: bool) -> dict[str, torch.Tensor]:
        """The parameters' whole values where `keep` (rank 0, writing a checkpoint), {} elsewhere. Every rank calls
        it, in the same order: no rank holds the whole model beside its share for long."""
        wholes = {n: self.whole(p, keep) for n, p in params.items()}
        return wholes if keep else {}

    def optimizer_state(self, optimizer: torch.optim.Optimizer, params: dict, keep: bool) -> dict[int, dict]:
        """The optimizer's per-parameter state as whole tensors, by parameter index, where `keep`; as `full`."""
        state = optimizer.state_dict()["state"]
        wholes = {i: {k: self.whole(torch.as_tensor(v), keep) for k, v in s.items()} for i, s in state.items()}
        return wholes if keep else {}

    def holds_state(self, name: str) -> bool:
        """Whether this rank's optimizer keeps state for parameter `name` (every rank, in data parallel)."""
        return True

    def load_optimizer_value(self, param: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
        """A checkpoint's whole optimizer tensor of `param`, as this strategy's optimizer holds it."""
        return value

    def finish(self) -> None:
        """After the last step: the model's own modules hold the trained weights (on rank 0 at least, which saves
        the run)."""


def strategy(parallel: ParallelConfig, rank: int, size: int, device: torch.device) -> DataParallelPlan:
    """The strategy for a run's options and world (in one process --fsdp has nothing to shard: plain training)."""
    if parallel.placement == "split":
        from mode_edge.training.placement import SplitPlan

        return SplitPlan(rank, size, device)
    if parallel.fsdp and size > 1:
        from mode_edge.training.fsdp import FSDPPlan

        return FSDPPlan(rank, size, device)
    return DataParallelPlan(rank, size, device)
