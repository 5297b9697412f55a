"""Checkpoints under `--fsdp`, written by every rank at once: each rank's shards of the trainable weights and AdamW
moments go to a safetensors file of its own through torch.distributed.checkpoint (DCP, with its Hugging Face storage
writer: safetensors files whose headers say where each shard sits in its tensor; no pickle anywhere, unlike DCP's
default format, whose index is pickled). No rank gathers a whole tensor: writing a checkpoint costs each rank the
memory of its shards alone, where gathering would hold the whole trainable model and its moments on rank 0.

Read back under --fsdp, each rank reads only the parts of the files its own shards need, straight into its sharded
weights and moments, whatever the world size that wrote them (DCP reshards on load: `load_into`). Any other strategy
(one process, plain data parallel, split placement) reads it whole under the same keys as a single-file checkpoint
(`trainer._state_tensors`), each process on its own (`load_whole`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from mode_edge.bundle import check_declared
from mode_edge.errors import UserError
from mode_edge.integrity import file_record, verify_records
from mode_edge.training.distributed import peers_watched

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

# torch.distributed.checkpoint is imported where it is used: it adds a second to every training command's start.

SUFFIX = ".shards"
"""A sharded checkpoint is a folder `state-N.shards` beside state.json (a single-file one: `state-N.safetensors`)."""


def checkpoint_tensors(params: dict[str, torch.Tensor], moments: dict[int, dict]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by key, in either format: `param.NAME` for each trainable tensor, `opt.INDEX.MOMENT` for
    the optimizer's state of the INDEX-th parameter in its groups' order (AdamW: step, exp_avg, exp_avg_sq); whole
    tensors for a single file, a rank's DTensor shards here."""
    tensors = {f"param.{n}": t for n, t in params.items()}
    for i, state in moments.items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    return tensors


@contextmanager
def _dcp_failures():
    """DCP gathers any rank's failure into a CheckpointException, which is a BaseException: an interrupt stays an
    interrupt (the trainer says which checkpoint is kept), any other failure becomes the first rank's own exception,
    and DCP's one-process warning (what resuming in one process asks of it) is not shown."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            yield
    except CheckpointException as e:
        failures = [exc for exc, _ in e.failures.values()]
        if any(isinstance(exc, KeyboardInterrupt) for exc in failures):
            raise KeyboardInterrupt from None
        first = next((exc for exc in failures if isinstance(exc, Exception)), None)
        raise first if first is not None else RuntimeError(str(e).splitlines()[-1]) from None


def save_shards(folder: Path, tensors: dict[str, torch.Tensor]) -> Metadata:
    """Every rank, collectively: write its shards of `tensors` (`checkpoint_tensors` of the DTensors it trains;
    what every rank holds alike, the gate rows and AdamW's step counts, DCP writes from one rank only) into
    `folder`, one file per rank, each flushed to disk. Returns on every rank once every rank's file is written,
    with the checkpoint's global metadata (every key's size and shards)."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True)
    with _dcp_failures():
        return dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())


def check_written(folder: Path, written: Metadata) -> None:
    """Raise UserError unless `folder` holds every shard `save_shards` reported written (read from the files' headers):
    ranks on several machines must write to one shared folder."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    found = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    for key, meta in written.state_dict_metadata.items():
        chunks = {(tuple(c.offsets), tuple(c.sizes)) for c in getattr(meta, "chunks", [])}
        here = {(tuple(c.offsets), tuple(c.sizes)) for c in found[key].chunks} if key in found else set()
        if chunks - here:
            raise UserError(f"{folder} lacks shards the other ranks wrote ({key} among them): every rank must write to "
                            f"the same folder; on several machines give --out on a file system they share")  # fmt: skip


def _metadata(folder: Path) -> dict:
    """Every tensor's metadata by key (its whole size, dtype and shards), from the files' headers. Raises ValueError
    where a tensor's shards overlap or leave part of it uncovered, or what the reader raises for a damaged file."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    for key, meta in metadata.items():
        covered = torch.zeros(meta.size, dtype=torch.int8)
        for chunk in meta.chunks:
            covered[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))] += 1
        if covered.numel() and not bool((covered == 1).all()):
            raise ValueError(f"the shards of {key} overlap or leave part of it out")
    return metadata


def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's whole shape by key, from the files' headers. Raises as `_metadata` does."""
    return {key: tuple(meta.size) for key, meta in _metadata(folder).items()}


def load_whole(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, whole, on the CPU, read by this process alone (no collective: each rank of a group
    reads it on its own). Raises as `_metadata` does."""
    import torch.distributed.checkpoint as dcp

    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in _metadata(folder).items()}
    with _dcp_failures():
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=True)
    return tensors


def load_into(folder: Path, targets: dict[str, torch.Tensor]) -> None:
    """Every rank, collectively: fill `targets` (keys of the checkpoint, each a rank's DTensor shard of a tensor or a
    plain tensor of its whole shape) in place from `folder`, each rank reading only the parts that cover its own
    shards, whatever the world size that wrote them (DCP's load planner matches the requested pieces with the
    stored ones). Raises what the reader raises for a damaged file."""
    import torch.distributed.checkpoint as dcp

    with peers_watched(), _dcp_failures():  # (a peer lost in the collective read: RunStopped, not a damaged file)
        dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=not dist.is_initialized())


def folder_record(folder: Path) -> dict:
    """{'files': {name: {'bytes', 'sha256'}}} of every file in a checkpoint folder, for state.json (rank 0 hashes
    them all: the checkpoint's size read once from disk)."""
    return {"files": {p.name: file_record(p) for p in sorted(Path(folder).iterdir())}}


def check_folder(folder: Path, record, fix: str) -> None:
    """Raise UserError (ending in `fix`) unless `folder` holds exactly the files of `record` (`folder_record`), each
    with its recorded size and sha256: the reader takes every safetensors file it finds, so a stray or missing one
    would change what loads."""
    files = record.get("files") if isinstance(record, dict) else None
    try:
        check_declared(files, f"the checkpoint record of {folder}")
    except UserError as e:
        raise UserError(f"{e}: {fix}") from None
    if any("/" in name for name in files):
        raise UserError(f"the checkpoint record of {folder} lists files outside it; it is corrupt: {fix}")
    stray = sorted(p.name for p in Path(folder).iterdir() if p.name not in files)
    if stray:
        raise UserError(f"{folder} holds files its checkpoint record does not list ({', '.join(stray)}); remove "
                        f"them to resume, or {fix}")  # fmt: skip
    verify_records(folder, files, lambda p, problem: UserError(f"{p} {problem}; {fix}"), cached=False)
