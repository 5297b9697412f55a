"""`--fsdp` (training/fsdp.py) in real processes (gloo, 2 ranks): each rank holds half of every trainable layer and
none of the frozen backbone's shards, and after a step the checkpoint it gathers (weights and AdamW moments) equals
the one a single process writes after the same step on the whole batch (rank 0 keeps it, rank 1 drops each gathered
tensor at once); `finish` puts the trained weights back into
the model's own modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from mode_edge.training.distributed import DataParallelPlan
from mode_edge.training.trainer import lm_loss
from tests.training.test_placement import free_port, model_and_batch, one_step

def _rank(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        from torch.distributed.tensor import DTensor

        from mode_edge.training.fsdp import FSDPPlan

        model, params, batch = model_and_batch(2)
        plan = FSDPPlan(rank, size, torch.device("cpu"))
        state, trained, module = one_step(plan, model, params, batch)
        local = {n: p.to_local().numel() for n, p in trained.items() if isinstance(p, DTensor)}
        sharded_frozen = [n for n, p in module.named_parameters() if isinstance(p, DTensor) and not p.requires_grad]
        plan.finish()
        finished = {n: p.detach().clone() for n, p in params.items()}
        torch.save({"state": state, "local": local, "sharded_frozen": sharded_frozen, "finished": finished,
                    "loss_after": lm_loss(model, batch).item()}, f"{out}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_rank, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    return [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]


def test_each_rank_holds_half_of_every_trainable_layer_and_no_frozen_weight(ranks):
    model, params, _ = model_and_batch(2)
    layers = {n: p.numel() for n, p in params.items() if ".layers." in n}
    for r in ranks:
        assert set(r["local"]) == set(layers)  # every expert layer sharded, the gate rows not (replicated)
        assert r["sharded_frozen"] == []  # the frozen backbone is not wrapped
    for n, numel in layers.items():
        assert ranks[0]["local"][n] + ranks[1]["local"][n] == numel and ranks[0]["local"][n] < numel


def test_the_gathered_checkpoint_equals_one_process_with_the_whole_batch(ranks):
    model, params, batch = model_and_batch(2)
    reference, _, _ = one_step(DataParallelPlan(0, 1, torch.device("cpu")), model, params, batch)
    assert sorted(ranks[0]["state"]) == sorted(reference) and ranks[1]["state"] == {}  # rank 0 writes; rank 1 drops
    for key, value in reference.items():
        assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    for r in ranks:
        for n, p in params.items():  # `finish`: the model's own parameters hold the trained weights again
            assert_close(r["finished"][n], p.detach(), rtol=1e-5, atol=1e-7, msg=n)
        assert r["loss_after"] == pytest.approx(lm_loss(model, batch).item(), rel=1e-5)  # the model runs as trained
