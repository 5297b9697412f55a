"""`--fsdp` (training/fsdp.py) in real processes (gloo, 2 ranks): each rank holds half of every trainable layer and
none of the frozen backbone's shards, and after a step the checkpoint it gathers (weights and AdamW moments) equals
the one a single process writes after the same step on the whole batch (rank 0 keeps it, rank 1 drops each gathered
tensor at once); `finish` puts the trained weights back into the model's own modules. The sharded checkpoint each
rank writes instead (training/sharded_checkpoint.py) holds each layer's half in that rank's file, and reads back
whole, in the two processes and in one, as that same single process's; three --fsdp ranks resume from it each with
a third read straight into its shards; a damaged, missing or stray file is refused."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.testing import assert_close

from mode_edge.errors import UserError
from mode_edge.training.distributed import DataParallelPlan
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from mode_edge.training import sharded_checkpoint
from mode_edge.training.sharded_checkpoint import check_written, checkpoint_tensors, save_shards
from mode_edge.training.trainer import (
    NOTHING_DONE,
    _checked_record,
    _load_own_shards,
    _load_state,
    _save_sharded_state,
    _state_tensors,
    lm_loss,
    param_groups,
)
from tests.training.test_placement import CFG, SIGNATURE, free_port, model_and_batch, one_step


def load_whole(state: Path, params: dict) -> tuple[dict, dict]:
    """What a run resuming from `state` without --fsdp does: the record checked, the weights read whole into
    `params`; (what the run spent before, the moments by parameter index)."""
    return _load_state(state, *_checked_record(state, SIGNATURE), params)


@contextmanager
def gloo_group(rank: int, size: int, port: int) -> Iterator[None]:
    """This spawned process as `rank` of a gloo group of `size` on loopback, one thread, for the duration."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _rank(rank: int, size: int, port: int, out: str) -> None:
    with gloo_group(rank, size, port):
        from torch.distributed.tensor import DTensor

        from mode_edge.training.fsdp import FSDPPlan

        model, params, batch = model_and_batch(2)
        plan = FSDPPlan(rank, size, torch.device("cpu"))
        state, trained, module = one_step(plan, model, params, batch, shards_in=Path(out) / "train_state")
        _, fresh, _ = model_and_batch(2)  # (the plan has emptied `params`' sharded tensors)
        _, moments = load_whole(Path(out) / "train_state", fresh)  # (each rank on its own)
        resumed = {**{f"param.{n}": p.detach().clone() for n, p in fresh.items()},
                   **{f"opt.{i}.{k}": v for i, m in moments.items() for k, v in m.items()}}  # fmt: skip
        local = {n: p.to_local().numel() for n, p in trained.items() if isinstance(p, DTensor)}
        sharded_frozen = [n for n, p in module.named_parameters() if isinstance(p, DTensor) and not p.requires_grad]
        plan.finish()
        finished = {n: p.detach().clone() for n, p in params.items()}
        record = {"state": state, "resumed": resumed, "local": local, "sharded_frozen": sharded_frozen,
                  "finished": finished, "loss_after": lm_loss(model, batch).item()}  # fmt: skip
        torch.save(record, f"{out}/rank{rank}.pt")


def _resume_rank(rank: int, size: int, port: int, out: str) -> None:
    """A rank of an --fsdp run resuming from the checkpoint two ranks wrote: its own shards only, read in place."""
    with gloo_group(rank, size, port):
        from torch.distributed.tensor import DTensor

        from mode_edge.training.fsdp import FSDPPlan

        model, params, _ = model_and_batch(2)
        plan = FSDPPlan(rank, size, torch.device("cpu"))
        _, trained = plan.prepare(model, params, lm_loss)
        optimizer = torch.optim.AdamW(param_groups(trained, CFG), betas=(0.9, 0.95), eps=1e-8)
        state = Path(out) / "train_state"
        read, load_into = {}, sharded_checkpoint.load_into

        def recorded(folder, targets):  # what the checkpoint is read into: each rank's part of a sharded tensor
            read.update({k: t.to_local().numel() if isinstance(t, DTensor) else None for k, t in targets.items()})
            return load_into(folder, targets)

        sharded_checkpoint.load_into = recorded
        before = _load_own_shards(state, *_checked_record(state, SIGNATURE), trained, optimizer)
        local = {n: p.to_local().numel() for n, p in trained.items() if isinstance(p, DTensor)}
        moments = {i: s["exp_avg"].to_local().numel() for i, s in optimizer.state_dict()["state"].items()
                   if isinstance(s["exp_avg"], DTensor)}  # fmt: skip
        gathered = _state_tensors(plan, trained, optimizer)
        torch.save({"before": before, "local": local, "moments": moments, "state": gathered, "read": read},
                   f"{out}/resumed{rank}.pt")  # fmt: skip


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


def test_each_rank_writes_its_half_of_every_layer_and_no_tensor_twice(out, reference):
    from safetensors import safe_open

    reference, _, params, _ = reference
    record = json.loads((out / "train_state/state.json").read_text())
    folder = out / "train_state" / record["weights_file"]
    assert record["weights_file"] == "state-1.shards" and record["step"] == 1
    assert sorted(p.name for p in (out / "train_state").iterdir()) == ["state-1.shards", "state.json"]
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == sorted(record["weights"]["files"]) and len(files) == 2  # one file per rank
    elements: dict[str, int] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                numel = torch.Size(f.get_slice(key).get_shape()).numel()
                elements[key] = elements.get(key, 0) + numel
                name = key.split(".", 1)[1]
                if key.startswith("param.") and ".layers." in name:  # a sharded layer: half of it in each file
                    assert 2 * numel == params[name].numel(), key
    # every weight and moment once in all (what every rank holds alike, the gate rows and step counts: from one rank)
    assert elements == {key: value.numel() for key, value in reference.items()}


def test_the_sharded_checkpoint_reads_back_whole_as_one_process_wrote_it(out, ranks, reference):
    reference, _, _, _ = reference
    _, params, _ = model_and_batch(2)
    _, moments = load_whole(out / "train_state", params)  # one process, no group
    alone = {**{f"param.{n}": p.detach() for n, p in params.items()},
             **{f"opt.{i}.{k}": v for i, m in moments.items() for k, v in m.items()}}  # fmt: skip
    for read in (alone, ranks[0]["resumed"], ranks[1]["resumed"]):
        assert sorted(read) == sorted(reference)
        for key, value in reference.items():
            assert_close(read[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_three_ranks_resume_from_two_ranks_shards_each_reading_its_own(out, reference):
    """--fsdp resumed at another world size: each of three ranks holds a third of every layer and of its moments,
    read straight from the two ranks' files, and together they hold what one process wrote after the same step."""
    reference, _, params, _ = reference
    mp.start_processes(_resume_rank, args=(3, free_port(), str(out)), nprocs=3, start_method="spawn")
    ranks = [torch.load(out / f"resumed{r}.pt") for r in range(3)]
    layers = {n: p.numel() for n, p in params.items() if ".layers." in n}
    for n, numel in layers.items():
        assert sum(r["local"][n] for r in ranks) == numel and max(r["local"][n] for r in ranks) < numel, n
        assert [r["read"][f"param.{n}"] for r in ranks] == [r["local"][n] for r in ranks], n  # read into its part
    for r in ranks:  # ... and both moments of each layer likewise
        sharded_moments = sorted(v for k, v in r["read"].items() if k.startswith("opt.") and v is not None)
        assert sharded_moments == sorted(2 * list(r["moments"].values()))
    assert sum(sum(r["moments"].values()) for r in ranks) == sum(layers.values())  # each layer's exp_avg, split
    assert [r["before"]["step"] for r in ranks] == [1, 1, 1]
    assert sorted(ranks[0]["state"]) == sorted(reference) and ranks[1]["state"] == ranks[2]["state"] == {}
    for key, value in reference.items():
        assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("damage, problem", [("flipped", "does not match its sha256"), ("missing", "is missing"),
                                             ("stray", "does not list")])  # fmt: skip
def test_a_damaged_sharded_checkpoint_is_refused(damage, problem, out, tmp_path):
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
    with pytest.raises(UserError, match=f"{problem}.* delete {state.parent} to start the run afresh"):
        load_whole(state, params)
    for n, p in params.items():  # nothing half-read into the model
        assert torch.equal(p.detach(), before[n]), n
    if damage == "stray":  # as the refusal says: without the stray file, the checkpoint resumes
        files[0].with_name("shard-00003-model-00001-of-00001.safetensors").unlink()
        assert load_whole(state, params)[0]["step"] == 1


def test_shards_that_leave_part_of_a_tensor_out_are_not_read(out, tmp_path):
    """Past the record's checks: the reader infers each tensor's size from the shards it finds."""
    shutil.copytree(out / "train_state/state-1.shards", tmp_path / "shards")
    (tmp_path / "shards/shard-00001-model-00001-of-00001.safetensors").unlink()  # rank 0's: the first halves
    with pytest.raises(ValueError, match="leave part of it out"):
        sharded_checkpoint.load_whole(tmp_path / "shards")


def test_a_new_sharded_checkpoint_replaces_what_was_there_and_an_interrupt_keeps_the_last(monkeypatch, tmp_path):
    """In one process: a killed write's hidden folder and a folder a killed run renamed but never named are removed
    with the previous checkpoint; an interrupt while the shards are written keeps the last checkpoint named and
    leaves nothing else; a folder without the shards the save reported is refused (ranks on several machines must
    share one folder)."""
    model, params, batch = model_and_batch(1)
    optimizer = torch.optim.AdamW(param_groups(params, CFG), betas=(0.9, 0.95), eps=1e-8)
    plan, state = DataParallelPlan(0, 1, torch.device("cpu")), tmp_path / "run/train_state"
    state.parent.mkdir()  # (the run's partial folder)

    def save(step: int) -> None:  # after as many optimizer steps (the record must agree with the moments' count)
        while int(optimizer.state_dict()["state"].get(0, {}).get("step", 0)) < step:
            lm_loss(model, batch).backward()
            optimizer.step()
        done = {**NOTHING_DONE, "step": step, "history": [0.0] * step}
        _save_sharded_state(state, plan, params, optimizer, done, SIGNATURE)

    save(2)
    for leftover in (".state-4.shards.tmp", "state-4.shards"):
        (state / leftover).mkdir()
        (state / leftover / "shard-00002-model-00001-of-00001.safetensors").write_bytes(b"left over")
    save(4)
    assert sorted(p.name for p in state.iterdir()) == ["state-4.shards", "state.json"]
    _, fresh, _ = model_and_batch(1)
    _, moments = load_whole(state, fresh)
    for n, p in params.items():
        assert torch.equal(fresh[n], p.detach()), n
    assert sorted(moments) == sorted(optimizer.state_dict()["state"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data", interrupted)
    with pytest.raises(KeyboardInterrupt):  # (not DCP's CheckpointException: the trainer says what is kept)
        save(6)
    assert sorted(p.name for p in state.iterdir()) == ["state-4.shards", "state.json"]
    assert json.loads((state / "state.json").read_text())["weights_file"] == "state-4.shards"
    monkeypatch.undo()
    written = save_shards(tmp_path / "alone", checkpoint_tensors(params, {}))
    check_written(tmp_path / "alone", written)
    (tmp_path / "alone/shard-00001-model-00001-of-00001.safetensors").unlink()
    with pytest.raises(UserError, match="every rank must write to the same folder"):
        check_written(tmp_path / "alone", written)
