"""`--placement split` (training/placement.py) in real processes (gloo): the backbone on rank 0 and the experts on
the others give the single-process MoDE model's loss and gradients, for one expert on one rank and for two experts
on one rank or on two; after a step, every rank's checkpoint (weights and AdamW moments, each expert's from the
rank that trains it) is the single process's. Each rank holds only the weights it computes with."""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from mode_edge.config import MoDELayout, TrainConfig
from mode_edge.training.backbones import TINY_CONFIG, tiny_decoder
from mode_edge.training.distributed import DataParallelPlan
from mode_edge.training.model import Expert, MoDEModel
from mode_edge.training.trainer import (
    NOTHING_DONE,
    _save_sharded_state,
    _state_tensors,
    is_gate,
    lm_loss,
    named_params,
    param_groups,
)

LAYOUT = MoDELayout(n_blocks=2, expert_layers=2, init="random", gate_bias=0.0)


def model_and_batch(n_experts: int, variant: str = "tied"):
    """The tiny backbone (`variant` "untied": with an output head of its own) with `n_experts` random experts (gates
    moved off zero, so every column matters), the parameters to train (the gates alone for "frozen", as
    --freeze-experts trains) and a batch of token windows (4, 21)."""
    backbone = tiny_decoder(cfg=replace(TINY_CONFIG, tie_embeddings=variant != "untied"))
    experts = {f"e{k}": Expert.init_from(backbone, LAYOUT, seed=k + 1) for k in range(n_experts)}
    torch.manual_seed(7)
    for expert in experts.values():
        for block in expert.blocks:
            torch.nn.init.normal_(block.gate.weight, std=0.5)
    model = MoDEModel(backbone, LAYOUT, experts)
    params = named_params(experts, keep=is_gate if variant == "frozen" else lambda name: True)
    for p in params.values():
        p.requires_grad_(True)
    batch = torch.randint(0, backbone.cfg.vocab_size, (4, 21), generator=torch.Generator().manual_seed(3))
    return model, params, batch


CFG = TrainConfig(lr=1e-3, warmup_steps=0)
SIGNATURE = {"train": CFG.to_dict()}


def one_step(plan: DataParallelPlan, model, params, batch, shards_in: Path | None = None):
    """Prepare, one AdamW step on this rank's rows, the checkpoint tensors; also the parameters and module trained.
    `shards_in`: a folder where the plan also writes its sharded checkpoint of the step (--fsdp)."""
    module, trained = plan.prepare(model, params, lm_loss)
    optimizer = torch.optim.AdamW(param_groups(trained, CFG), betas=(0.9, 0.95), eps=1e-8)
    plan.forward_backward(module, plan.rows(batch), lm_loss, 1.0)
    plan.sync(trained)
    plan.clip(trained, 1e-3)  # small enough to clip: the norm must be the whole model's
    optimizer.step()
    if shards_in is not None:
        done = {**NOTHING_DONE, "step": 1, "history": [0.0]}
        _save_sharded_state(shards_in, plan, trained, optimizer, done, SIGNATURE)
    return _state_tensors(plan, trained, optimizer), trained, module


def _rank(rank: int, size: int, port: int, n_experts: int, variant: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        from mode_edge.training.placement import SplitPlan

        model, params, batch = model_and_batch(n_experts, variant)
        plan = SplitPlan(rank, size, torch.device("cpu"))
        module, _ = plan.prepare(model, params, lm_loss)
        emptied = sorted(n for n, p in model.named_parameters() if p.numel() == 0)
        loss = plan.forward_backward(module, batch, lm_loss, 1.0)
        plan.sync(params)
        grads = {n: p.grad.clone() for n, p in plan.own.items()} | {n: p.grad.clone() for n, p in plan.gates.items()}
        model, params, batch = model_and_batch(n_experts, variant)  # a fresh start for one whole step
        state, _, _ = one_step(SplitPlan(rank, size, torch.device("cpu")), model, params, batch)
        torch.save({"loss": loss, "grads": grads, "state": state, "emptied": emptied}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unused_weights(model: MoDEModel, rank: int, size: int, frozen: bool) -> list[str]:
    """The parameters (by the model's names) rank `rank` of `size` never computes with under split placement: the
    experts' layers of other ranks (expert k is on rank 1 + k mod (size - 1); rank 0 keeps frozen ones, which it
    saves), and on the expert ranks the backbone's layers and an untied head; the embedding, norms and gates are kept
    everywhere."""
    unused = set()
    for k, expert in enumerate(model.experts.values()):
        if rank != 1 + k % (size - 1) and not (rank == 0 and frozen):
            unused |= {id(p) for n, p in expert.named_parameters() if ".gate." not in f".{n}"}
    if rank != 0:
        unused |= {id(p) for block in model.blocks for p in block.backbone.parameters()}
        unused |= {id(p) for p in (model.backbone.lm_head.parameters() if model.backbone.lm_head else ())}
    return sorted(n for n, p in model.named_parameters() if id(p) in unused)


@pytest.mark.parametrize("n_experts, size, variant", [(1, 2, "tied"), (2, 2, "tied"), (2, 3, "tied"),
                                                      (1, 2, "untied"), (2, 3, "frozen")])  # fmt: skip
def test_split_placement_gives_the_single_process_loss_and_gradients(n_experts, size, variant, tmp_path: Path):
    model, params, batch = model_and_batch(n_experts, variant)
    loss = lm_loss(model, batch)
    loss.backward()
    mp.start_processes(_rank, args=(size, free_port(), n_experts, variant, str(tmp_path)), nprocs=size,
                       start_method="spawn")  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(size)]
    assert ranks[0]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    got = {}
    for r in ranks:
        for n, g in r["grads"].items():
            if ".gate." in n:  # replicated: the same summed gradient on every rank
                assert torch.equal(g, ranks[0]["grads"][n]), n
            assert n not in got or ".gate." in n, f"{n} learned on two ranks"
            got[n] = g
    assert sorted(got) == sorted(params)  # every expert weight has one owner, every gate is on every rank
    for n, p in params.items():
        assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    owners = {n.split(".")[0] for r in ranks[1:] for n in r["grads"] if ".gate." not in n}
    assert owners == (set() if variant == "frozen" else set(model.experts))
    assert not [n for n in ranks[0]["grads"] if ".gate." not in n]
    for r, held in enumerate(ranks):  # each rank holds only the weights it computes with
        expected = unused_weights(model, r, size, variant == "frozen")
        assert held["emptied"] == expected and (expected or r == 0), f"rank {r}"
    model, params, batch = model_and_batch(n_experts, variant)
    reference, _, _ = one_step(DataParallelPlan(0, 1, torch.device("cpu")), model, params, batch)
    assert sorted(ranks[0]["state"]) == sorted(reference) and all(r["state"] == {} for r in ranks[1:])
    for key, value in reference.items():  # rank 0, which writes checkpoints, holds every expert's from its owner
        scale = float(value.abs().max())  # (moments and weights differ in size by orders of magnitude)
        assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, k=key: f"{k}: {m}")


def test_split_placement_refuses_what_it_cannot_place(tmp_path: Path):
    from mode_edge.errors import UserError
    from mode_edge.training.placement import SplitPlan

    model, params, _ = model_and_batch(1)
    with pytest.raises(UserError, match="launch exactly 2 processes"):
        SplitPlan(0, 3, torch.device("cpu")).prepare(model, params, lm_loss)
    with pytest.raises(UserError, match="drop --general"):
        SplitPlan(0, 2, torch.device("cpu")).prepare(model, params, lambda m, b: lm_loss(m, b))
    with pytest.raises(UserError, match="not to the baselines"):
        SplitPlan(0, 2, torch.device("cpu")).prepare(model.backbone, params, lm_loss)
