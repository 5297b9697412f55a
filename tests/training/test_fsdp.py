"""`--fsdp` (training/fsdp.py) in real processes (gloo, 2 ranks): each rank holds half of every trainable layer and
none of the frozen backbone's shards, and after a step the checkpoint it gathers (weights and AdamW moments) equals
the one a single process writes after the same step on the whole batch (rank 0 keeps it, rank 1 drops each gathered
tensor at once); `finish` puts the trained weights back into the model's own modules. The sharded checkpoint each
rank writes instead (training/sharded_checkpoint.py) holds each layer's half in that rank's file, and reads back
whole, in the two processes and in one, as that same single process's; a damaged, missing or stray file is
refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from mode_edge.errors import UserError
from mode_edge.training.distributed import DataParallelPlan
from mode_edge.training.trainer import _load_state, lm_loss
from tests.training.test_placement import SIGNATURE, free_port, model_and_batch, one_step


def _rank(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        from torch.distributed.tensor import DTensor

        from mode_edge.training.fsdp import FSDPPlan

        model, params, batch = model_and_batch(2)
        plan = FSDPPlan(rank, size, torch.device("cpu"))
        state, trained, module = one_step(plan, model, params, batch, shards_in=Path(out) / "train_state")
        _, fresh, _ = model_and_batch(2)  # (the plan has emptied `params`' sharded tensors)
        _, moments = _load_state(Path(out) / "train_state", fresh, SIGNATURE)  # (collective: both ranks read it)
        resumed = {**{f"param.{n}": p.detach().clone() for n, p in fresh.items()},
                   **{f"opt.{i}.{k}": v for i, m in moments.items() for k, v in m.items()}}  # fmt: skip
        local = {n: p.to_local().numel() for n, p in trained.items() if isinstance(p, DTensor)}
        sharded_frozen = [n for n, p in module.named_parameters() if isinstance(p, DTensor) and not p.requires_grad]
        plan.finish()
        finished = {n: p.detach().clone() for n, p in params.items()}
        record = {"state": state, "resumed": resumed, "local": local, "sharded_frozen": sharded_frozen,
                  "finished": finished, "loss_after": lm_loss(model, batch).item()}  # fmt: skip
        torch.save(record, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_rank, args=(2, free_port(), str(folder)), nprocs=2, start_method="spawn")
    return folder


@pytest.fixture(scope="module")
def ranks(out) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def reference() -> tuple[dict, torch.nn.Module, dict, torch.Tensor]:
    """One process after the same step on the whole batch: its checkpoint tensors, model, parameters and batch."""
    model, params, batch = model_and_batch(2)
    return one_step(DataParallelPlan(0, 1, torch.device("cpu")), model, params, batch)[0], model, params, batch


def test_each_rank_holds_half_of_every_trainable_layer_and_no_frozen_weight(ranks):
    model, params, _ = model_and_batch(2)
    layers = {n: p.numel() for n, p in params.items() if ".layers." in n}
    for r in ranks:
        assert set(r["local"]) == set(layers)  # every expert layer sharded, the gate rows not (replicated)
        assert r["sharded_frozen"] == []  # the frozen backbone is not wrapped
    for n, numel in layers.items():
        assert ranks[0]["local"][n] + ranks[1]["local"][n] == numel and ranks[0]["local"][n] < numel


def test_the_gathered_checkpoint_equals_one_process_with_the_whole_batch(ranks, reference):
    reference, model, params, batch = reference
    assert sorted(ranks[0]["state"]) == sorted(reference) and ranks[1]["state"] == {}  # rank 0 writes; rank 1 drops
    for key, value in reference.items():
        assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    for r in ranks:
        for n, p in params.items():  # `finish`: the model's own parameters hold the trained weights again
            assert_close(r["finished"][n], p.detach(), rtol=1e-5, atol=1e-7, msg=n)
        assert r["loss_after"] == pytest.approx(lm_loss(model, batch).item(), rel=1e-5)  # the model runs as trained


def test_each_rank_writes_its_half_of_every_layer_and_no_tensor_twice(out):
    from safetensors import safe_open

    record = json.loads((out / "train_state/state.json").read_text())
    folder = out / "train_state" / record["weights_file"]
    assert record["weights_file"] == "state-1.shards" and record["step"] == 1
    assert sorted(p.name for p in (out / "train_state").iterdir()) == ["state-1.shards", "state.json"]
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == sorted(record["weights"]["files"]) and len(files) == 2  # one file per rank
    _, params, _ = model_and_batch(2)
    elements: dict[str, int] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                numel = f.get_slice(key).get_shape()
                elements[key] = elements.get(key, 0) + int(torch.Size(numel).numel())
                name = key.split(".", 1)[1]
                if key.startswith("param.") and ".layers." in name:  # a sharded layer: half of it in each file
                    assert 2 * torch.Size(numel).numel() == params[name].numel(), key
    for name, p in params.items():  # every weight once in all (the replicated gate rows: from one rank)
        assert elements[f"param.{name}"] == p.numel(), name


def test_the_sharded_checkpoint_reads_back_whole_as_one_process_wrote_it(out, ranks, reference):
    reference, _, _, _ = reference
    _, params, _ = model_and_batch(2)
    _, moments = _load_state(out / "train_state", params, SIGNATURE)  # one process, no group
    alone = {**{f"param.{n}": p.detach() for n, p in params.items()},
             **{f"opt.{i}.{k}": v for i, m in moments.items() for k, v in m.items()}}  # fmt: skip
    for read in (alone, ranks[0]["resumed"], ranks[1]["resumed"]):
        assert sorted(read) == sorted(reference)
        for key, value in reference.items():
            assert_close(read[key], value, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("damage", ["flipped", "missing", "stray"])
def test_a_damaged_sharded_checkpoint_is_refused(damage, out, tmp_path):
    state = tmp_path / "run/train_state"
    shutil.copytree(out / "train_state", state)
    files = sorted((state / "state-1.shards").iterdir())
    if damage == "flipped":
        data = bytearray(files[1].read_bytes())
        data[-3] ^= 0xFF
        files[1].write_bytes(bytes(data))
    elif damage == "missing":
        files[0].unlink()
    else:
        shutil.copy(files[0], files[0].with_name("shard-00003-model-00001-of-00001.safetensors"))
    _, params, _ = model_and_batch(2)
    before = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(UserError, match=f"delete {state.parent} to start the run afresh"):
        _load_state(state, params, SIGNATURE)
    for n, p in params.items():  # nothing half-read into the model
        assert torch.equal(p.detach(), before[n]), n
