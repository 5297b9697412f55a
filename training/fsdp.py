"""`--fsdp`: data parallel with the trainable layers sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`; PyTorch's
per-parameter sharding, https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html).

Each rank holds 1/N of every trainable layer's weights, gradients and AdamW moments, and gathers a layer's weights
for its forward and backward only (ZeRO stage 3, Rajbhandari et al., arXiv 1910.02054). The units are the modules
whose parameters all learn: each expert layer (MoDE), each layer and then the rest of the model (full fine-tuning),
each LoRA A and B matrix (peft). The frozen backbone is not wrapped: it has no gradient to reduce, and every rank
keeps it whole. What no unit holds (the gate rows, d + 1 numbers per block and expert) stays replicated, with its
gradients averaged as in plain data parallel.

FSDP swaps the parameters (and the classes) of the modules it shards, while the trainers' save callbacks and the
stay-out loss hold the model's own modules. So the sharded modules belong to a replica: a deep copy of the model's
module tree over the same tensors, whose units are then sharded. The model's trainable tensors are released while the
replica trains, and on `finish` every rank gathers the trained weights back into them.
"""

from __future__ import annotations

import copy
import itertools
from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from mode_edge.training.distributed import DataParallelPlan, average_gradients
from mode_edge.training.model import Decoder, DecoderLayer

UNIT_KINDS = (DecoderLayer, Decoder)
"""Modules sharded as one unit when all their parameters learn: a unit's forward must be called by the model (an
Expert's is not: MoDE blocks call its layers and gates), and a layer is FSDP's usual unit of gathering."""


def shard_units(model: nn.Module, trainable: set[int]) -> list[nn.Module]:
    """The modules of `model` to shard, children before parents (FSDP2 shards inner units first): those of
    UNIT_KINDS, and peft's LoRA A / B layers, whose parameters not yet in a unit are all in `trainable` (ids) and
    have at least one dimension (FSDP shards along the first)."""
    units, claimed = [], set()
    for name, module in reversed(list(model.named_modules())):  # reversed pre-order: children before parents
        lora = name.split(".")[-2:-1] in (["lora_A"], ["lora_B"])
        if not (isinstance(module, UNIT_KINDS) or lora):
            continue
        own = [p for p in module.parameters() if id(p) not in claimed]
        if own and all(id(p) in trainable and p.ndim for p in own):
            units.append(module)
            claimed.update(id(p) for p in own)
    return units


def total_grad_norm(params: list[nn.Parameter]) -> float:
    """The L2 norm of all gradients, sharded (DTensor) and replicated alike: torch's own norm of each kind, the
    sharded kind's made whole (collective)."""
    sharded = [p.grad for p in params if isinstance(p.grad, DTensor)]
    plain = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    square = 0.0
    if sharded:
        square += float(torch.nn.utils.get_total_norm(sharded).full_tensor()) ** 2
    if plain:
        square += float(torch.nn.utils.get_total_norm(plain)) ** 2
    return square**0.5


class FSDPPlan(DataParallelPlan):
    """DataParallelPlan with the trainable layers sharded (see the module's docstring); each rank writes its own shards
    of a checkpoint."""

    writes_shards = True

    def prepare(self, model: nn.Module, params: dict[str, nn.Parameter], loss_fn: Callable):
        super().prepare(model, params, loss_fn)  # rank 0's values everywhere, before each rank keeps its shard
        self.params = params
        tensors = itertools.chain(model.parameters(), model.buffers())
        replica = copy.deepcopy(model, memo={id(t): t for t in tensors})  # new modules, the same tensors
        owners = {id(p): (m, local) for m in replica.modules() for local, p in m._parameters.items() if p is not None}
        mesh = init_device_mesh(self.device.type, (self.size,))
        for unit in shard_units(replica, {id(p) for p in params.values()}):
            # Each unit is a root of its own (the frozen model around them is not wrapped), and FSDP keeps a root's
            # weights gathered from forward to backward unless told otherwise: all of them at once, at the peak.
            fully_shard(unit, mesh=mesh, reshard_after_forward=True)
        self.trained = {n: owners[id(p)][0]._parameters[owners[id(p)][1]] for n, p in params.items()}
        self.replicated = {n: p for n, p in self.trained.items() if not isinstance(p, DTensor)}
        for n, p in params.items():
            if isinstance(self.trained[n], DTensor):
                p.data = p.data.new_empty(0)  # the replica's shard holds it now; `finish` gathers it back
        return replica, self.trained

    def sync(self, params: dict[str, nn.Parameter]) -> None:
        if self.replicated:  # (the sharded gradients were reduce-scattered, averaged, during backward)
            average_gradients(self.replicated, self.size)

    def clip(self, params: dict[str, nn.Parameter], max_norm: float) -> None:
        total = total_grad_norm(list(params.values()))
        coef = min(1.0, max_norm / (total + 1e-6))  # as torch.nn.utils.clip_grad_norm_ computes it
        for p in params.values():  # (a python number: torch's foreach scaling refuses sharded and plain together)
            if p.grad is not None:
                p.grad.mul_(coef)

    def whole(self, t: torch.Tensor, keep: bool) -> torch.Tensor | None:
        return super().whole(t.full_tensor() if isinstance(t, DTensor) else t, keep)  # (gathering is collective)

    def load_optimizer_value(self, param: nn.Parameter, value: torch.Tensor) -> torch.Tensor:
        if not isinstance(param, DTensor):
            return value
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)

    def finish(self) -> None:
        with torch.no_grad():
            for n, p in self.trained.items():  # (collective: every rank, in the same order)
                if isinstance(p, DTensor):
                    self.params[n].data = p.full_tensor()
        self.trained = self.replicated = {}
