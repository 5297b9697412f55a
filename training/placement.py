"""`--placement split`: the MoDE paper's placement of backbone and experts on different ranks (arXiv 2410.07490 §3.4:
within a block, the backbone slice and the experts only meet at the gate's weighted sum, so they can run on different
devices at the same time).

Every rank trains on the whole global batch. In each block, rank 0 runs the backbone slice and the other ranks the
experts (expert k on rank 1 + k mod (N - 1)); each rank computes the gate (a few numbers per token) and its share of
the weighted sum, and the shares meet in one all_reduce (the last block's in a reduce to rank 0, which alone runs the
output head and the loss). Backward runs the same way in reverse, with the collectives of Megatron-LM's tensor
parallel regions (Shoeybi et al., arXiv 1909.08053): a block's input gradient is the sum of every rank's part (an
all_reduce), the merged output's gradient is the same on every rank (no communication), and the head's gradient
comes from rank 0 (a broadcast).

The frozen backbone needs no weight gradients, and autograd computes none for it: rank 0's backward through a later
block's slice is input-gradient matmuls only, and through the first block's slice (whose input is the frozen
embedding) nothing at all. The other ranks never run the output head (a 49152 x 576 matmul in SmolLM2, forward and
backward, as much as eight of its layers).

Each expert's weights learn on their own rank only; the gate rows are replicated and their gradients summed over the
ranks (each rank holds the part that flows through its own branches). Each rank keeps only the weights it computes
with: the expert ranks drop the backbone's layers (and an untied output head) and the experts of other ranks, rank 0
the experts it will receive (all that learn; frozen ones, under --freeze-experts, it keeps, as it saves them); the
embedding, the final norm, the rotary tables and the gates stay on every rank. Checkpoints send every expert's
weights and AdamW moments from its rank to rank 0, which writes them all, and the end of training its weights.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from mode_edge.errors import UserError
from mode_edge.training.distributed import DataParallelPlan, batch_tokens, sum_gradients
from mode_edge.training.model import MoDEModel, run_layers

ADAMW_STATE = ("exp_avg", "exp_avg_sq", "step")
"""What torch's AdamW keeps per parameter (amsgrad off, as the trainers make it), in the order rank 0 receives it."""


def check_stay_out(stay_out: bool) -> None:
    """Refuse the stay-out penalty (`train expert --general`), which reads the backbone's block outputs on every
    rank."""
    if stay_out:
        raise UserError("--placement split trains with the language-model loss; drop --general (the stay-out "
                        "penalty reads the backbone's block outputs on every rank), or use --placement "
                        "data")  # fmt: skip


def check_processes(size: int, n_experts: int | None = None) -> None:
    """Refuse a world the placement cannot fill: rank 0 and at least one expert rank, no rank without an expert.
    `n_experts` None: not known yet (only the lower bound is checked)."""
    if size < 2 or (n_experts is not None and size > 1 + n_experts):
        experts = "the experts" if n_experts is None else f"the {n_experts} expert(s)"
        launch = "exactly 2" if n_experts == 1 else f"2 to {'1 + experts' if n_experts is None else 1 + n_experts}"
        raise UserError(f"--placement split puts the backbone on one process and {experts} on the others: launch "
                        f"{launch} processes (torchrun --nproc-per-node), not {size}")  # fmt: skip


def expert_of(name: str) -> str:
    """The expert a trained parameter belongs to: the trainers name them `EXPERT.blocks...` (trainer.named_params)."""
    return name.split(".", 1)[0]


class _CopyToRanks(torch.autograd.Function):
    """A block's input x (B, T, d), the same on every rank. Forward: x. Backward: the sum of the ranks' gradients
    (all_reduce), each rank's holding the part through its own branches and gate columns."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _SumOverRanks(torch.autograd.Function):
    """A block's merge: each rank's share of the weighted sum (B, T, d) in, the sum out on every rank (all_reduce).
    Backward: each rank's own gradient, which is every rank's (they all compute the same from the sum)."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous().clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad


class _SumToFirst(torch.autograd.Function):
    """The last block's merge: the shares (B, T, d) summed on rank 0 (reduce; what the other ranks get back is not
    used). Backward: rank 0's gradient on every rank (broadcast); the other ranks start their backward here with a
    zero gradient, which the broadcast replaces."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous().clone()
        dist.reduce(x, dst=0)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.broadcast(grad, src=0)
        return grad


class SplitMoDE(nn.Module):
    """A MoDEModel's forward with its blocks' branches on different ranks. idx (B, T) -> logits (B, T, V) on rank 0;
    on the others a (B, T, d) tensor to start the backward from (its value unused)."""

    def __init__(self, model: MoDEModel, rank: int, owners: dict[str, int]):
        super().__init__()
        self.model, self.rank, self.owners = model, rank, owners

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.backbone.embed(idx)  # (B, T, d)
        for i, block in enumerate(model.blocks):
            x_in = _CopyToRanks.apply(x)
            a = block.gate_weights(x_in).to(x.dtype)  # (B, T, 1 + N)
            share = None  # this rank's branches' part of the weighted sum (every rank has at least one)
            if self.rank == 0:
                share = a[..., :1] * run_layers(block.backbone, x_in, model.backbone.rope, None, block.backbone_names)
            for j, (name, expert) in enumerate(block.experts.items(), start=1):
                if self.owners[name] == self.rank:
                    names = [f"{name}.{block.index}.{k}" for k in range(len(expert.layers))]
                    term = a[..., j : j + 1] * run_layers(expert.layers, x_in, model.backbone.rope, None, names)
                    share = term if share is None else share + term
            x = (_SumToFirst if i == len(model.blocks) - 1 else _SumOverRanks).apply(share)
        return model.backbone.head(x) if self.rank == 0 else x


class SplitPlan(DataParallelPlan):
    """The strategy of `--placement split` (see the module's docstring)."""

    def prepare(self, model: nn.Module, params: dict[str, nn.Parameter], loss_fn: Callable):
        """(SplitMoDE over `model`, `params`). Raises UserError for a model without experts, a loss other than the
        language model's, a world the placement cannot fill (`check_processes`), or parameters that are not the
        experts' layers and gates."""
        from mode_edge.training.trainer import is_gate, lm_loss

        if not isinstance(model, MoDEModel) or not model.experts:
            raise UserError("--placement split places MoDE experts beside the backbone; it applies to `train expert` "
                            "and `train compose`, not to the baselines")  # fmt: skip
        check_stay_out(loss_fn is not lm_loss)
        check_processes(self.size, len(model.experts))
        if any(expert_of(n) not in model.experts for n in params):
            raise UserError("--placement split trains experts' layers and gates only")
        super().prepare(model, params, loss_fn)
        self.owners = {name: 1 + k % (self.size - 1) for k, name in enumerate(model.experts)}
        self.params = params
        self.gates = {n: p for n, p in params.items() if is_gate(n)}
        self.own = {n: p for n, p in params.items() if not is_gate(n) and self.owners[expert_of(n)] == self.rank}
        self.shapes = {n: p.shape for n, p in params.items()}
        self._release(model, params)
        return SplitMoDE(model, self.rank, self.owners), params

    def _release(self, model: MoDEModel, params: dict[str, nn.Parameter]) -> None:
        """Empty the weights this rank never computes with (see the module's docstring); their shapes stay in
        self.shapes for the checkpoints, which rank 0 receives from the owners."""
        from mode_edge.training.trainer import is_gate

        unused = [p for n, p in params.items() if n not in self.gates and n not in self.own]
        if self.rank != 0:
            unused += [p for block in model.blocks for p in block.backbone.parameters()]
            if model.backbone.lm_head is not None:  # (a tied head is the embedding, which every rank uses)
                unused += list(model.backbone.lm_head.parameters())
            trained = {id(p) for p in params.values()}
            for name, expert in model.experts.items():  # frozen experts (--freeze-experts) of the other ranks
                if self.owners[name] != self.rank:
                    unused += [p for n, p in expert.named_parameters() if not is_gate(n) and id(p) not in trained]
        for p in unused:  # (as many dimensions as before: the trainer groups weights by them for weight decay)
            p.data = p.data.new_empty((0,) * p.ndim)

    def rows(self, batch):
        return batch  # every rank computes its branches for every row

    def tokens(self, rows) -> int:
        return batch_tokens(rows)

    def forward_backward(self, model, batch, loss_fn: Callable, scale: float) -> float:
        if self.rank == 0:
            return super().forward_backward(model, batch, loss_fn, scale)
        share = model(batch[:, :-1])
        share.backward(torch.zeros_like(share))  # the real gradient arrives by broadcast from rank 0
        return 0.0

    def sync(self, params: dict[str, nn.Parameter]) -> None:
        sum_gradients(self.gates)  # each rank holds the part through its own branches: the sum is the gradient

    def mean(self, value: float) -> float:
        return value  # rank 0 alone computes the loss, over the whole batch

    def clip(self, params: dict[str, nn.Parameter], max_norm: float) -> None:
        own = [p.grad for p in self.own.values() if p.grad is not None]
        square = torch.nn.utils.get_total_norm(own).float().pow(2) if own else torch.zeros((), device=self.device)
        dist.all_reduce(square)  # every expert's layers, each counted on its own rank
        gates = [p.grad for p in self.gates.values()]
        total = torch.sqrt(square + torch.nn.utils.get_total_norm(gates).float().pow(2))
        torch.nn.utils.clip_grads_with_norm_([*self.own.values(), *self.gates.values()], max_norm, total)

    def _to_first(self, name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors of parameter `name` (its value, or its moments) on rank 0: sent by the rank that trains it and
        received into `tensors` (of its shapes; on a GPU into copies there); a gate row's are on every rank already.
        Only the owner and rank 0 take part; each calls it for the parameters in the same order."""
        owner = None if name in self.gates else self.owners[expert_of(name)]
        if owner is None or self.rank not in (0, owner):
            return tensors
        moved = []
        for t in tensors:
            t = t.to(self.device)  # (NCCL sends GPU tensors only; AdamW keeps its step count on the CPU)
            if self.rank == owner:
                dist.send(t.contiguous(), dst=0)
            else:
                dist.recv(t, src=owner)
            moved.append(t)
        return moved

    def full(self, params: dict[str, nn.Parameter], keep: bool) -> dict[str, torch.Tensor]:
        wholes = {}
        with torch.no_grad():
            for n, p in params.items():
                held = p.data.new_empty(self.shapes[n]) if self.rank == 0 and not self.holds_state(n) else p.data
                (value,) = self._to_first(n, [held])
                if keep:
                    wholes[n] = value.detach().cpu()
        return wholes

    def optimizer_state(self, optimizer: torch.optim.Optimizer, params: dict, keep: bool) -> dict[int, dict]:
        names = {id(p): n for n, p in params.items()}
        state = optimizer.state_dict()["state"]
        moments = {}
        for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
            name = names[id(p)]
            if self.rank != 0 and not self.holds_state(name):
                continue  # neither the owner nor rank 0: nothing to send or keep
            held = state.get(i) or {  # a rank has moments only for what it steps: rank 0 receives the owner's
                "step": torch.zeros((), dtype=torch.float32), "exp_avg": p.new_zeros(self.shapes[name]),
                "exp_avg_sq": p.new_zeros(self.shapes[name])}  # fmt: skip
            whole = [torch.as_tensor(held[k], dtype=torch.float32 if k == "step" else None) for k in ADAMW_STATE]
            whole = dict(zip(ADAMW_STATE, self._to_first(name, whole)))
            if keep:
                moments[i] = {k: v.cpu() for k, v in whole.items()}
        return moments

    def holds_state(self, name: str) -> bool:
        return name in self.gates or name in self.own

    def finish(self) -> None:
        """Rank 0's model (the one that saves the run) gets every expert's trained weights back; the other ranks'
        stay partial."""
        for n, value in self.full(self.params, keep=self.rank == 0).items():
            self.params[n].data = value.to(self.device)
