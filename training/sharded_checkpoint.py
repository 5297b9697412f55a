"""Checkpoints under `--fsdp`, written by every rank at once: each rank's shards of the trainable weights and AdamW
moments go to a safetensors file of its own through torch.distributed.checkpoint (DCP, with its Hugging Face storage
writer: safetensors files whose headers say where each shard sits in its tensor; no pickle anywhere, unlike DCP's
default format, whose index is pickled). No rank gathers a whole tensor: a checkpoint costs each rank the memory of
its shards alone, where gathering would hold the whole trainable model and its moments on rank 0.

Read back, a checkpoint gives whole tensors under the same keys as a single-file one (`trainer._state_tensors`), in
one process or collectively in any process group: DCP reshards on load (a plain tensor of the whole shape takes every
shard that covers it), so it resumes at any world size and under any strategy, as a single-file checkpoint does.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mode_edge.errors import UserError
from mode_edge.integrity import file_record, is_int, verify_records

SUFFIX = ".shards"
"""A sharded checkpoint is a folder `state-N.shards` beside state.json (a single-file one: `state-N.safetensors`)."""


def local_state(trained: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's part of a checkpoint, keyed as a whole one is (`param.NAME`, `opt.INDEX.MOMENT`): DTensors for the
    sharded layers and their moments, plain tensors for what every rank holds alike (the gate rows, AdamW's step
    counts), which DCP writes from one rank only."""
    tensors = {f"param.{n}": p.detach() for n, p in trained.items()}
    for i, state in optimizer.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    return tensors


def save_shards(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every rank, collectively: write its shards of `tensors` into `folder` (one file per rank, each flushed to
    disk). Returns on every rank once every rank's file is written."""
    writer = HuggingFaceStorageWriter(str(folder), save_distributed=True)
    dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())


def load_whole(folder: Path) -> dict[str, torch.Tensor]:
    """Every rank (collectively where a process group is up): the checkpoint's tensors, whole, on the CPU. Raises
    ValueError where its shards do not cover a tensor (a file missing), or what the reader raises for a damaged
    file."""
    metadata = HuggingFaceStorageReader(str(folder)).read_metadata()
    tensors = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            raise ValueError(f"{key} is not a tensor")
        if sum(math.prod(chunk.sizes) for chunk in meta.chunks) != math.prod(meta.size):
            raise ValueError(f"the shards of {key} do not cover it")
        tensors[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # (DCP warns that it reads in one process: what resuming in one process asks of it)
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not dist.is_initialized())
    return tensors


def folder_record(folder: Path) -> dict:
    """{'files': {name: {'bytes', 'sha256'}}} of every file in a checkpoint folder, for state.json."""
    return {"files": {p.name: file_record(p) for p in sorted(Path(folder).iterdir())}}


def check_folder(folder: Path, record, fix: str) -> None:
    """Raise UserError (ending in `fix`) unless `folder` holds exactly the files of `record` (`folder_record`), each
    with its recorded size and sha256: the reader takes every safetensors file it finds, so a stray or missing one
    would change what loads."""
    files = record.get("files") if isinstance(record, dict) else None
    valid = isinstance(files, dict) and all(
        isinstance(r, dict) and is_int(r.get("bytes")) and isinstance(r.get("sha256"), str) for r in files.values()
    )
    if not valid or any(Path(name).name != name for name in files):
        raise UserError(f"the checkpoint record beside {folder} is damaged; {fix}")
    stray = sorted(set(os.listdir(folder)) - set(files))
    if stray:
        raise UserError(f"{folder} holds files its checkpoint record does not list ({', '.join(stray)}); {fix}")
    verify_records(folder, files, lambda p, problem: UserError(f"{p} {problem}; {fix}"), cached=False)
