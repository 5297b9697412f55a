"""Training past one process: `mode-edge train ...` under a real `torchrun` (gloo, 2 processes, one thread each) on the
tiny backbone. Two ranks with half the global batch each end on the weights one process reaches with the whole
batch, with whole copies (data parallel) or sharded layers (--fsdp: experts, full fine-tuning, LoRA); a run
interrupted in one process resumes under two, sharded or not, and ends where an uninterrupted run ends; with the
backbone on one rank and the expert on the other (--placement split) the run ends where one process's does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from mode_edge.training import runs
from mode_edge.training.backbones import load_backbone
from tests.cli_runner import invoke, refused

BIN = Path(sys.executable).parent
ARGS = ["--base", "tiny", "--domain", "code", "--steps", "6", "--batch-size", "4", "--seq-len", "48",
        "--warmup-steps", "1", "--lr", "1e-3", "--checkpoint-every", "2", "--init", "random"]  # fmt: skip
"""Random expert layers: the tiny backbone's blocks hold 2 layers, so an expert of 2 layers copied from its block
(--init copy) computes what the backbone slice computes, the gate's gradient is zero but for rounding, and AdamW's
first steps scale that rounding up towards a full step (g / (|g| + eps)), differently in each summation order."""


def interrupted_at_step(step: int = 4, ranks: str = "01", slow_commit_s: float = 0) -> str:
    """`mode-edge` (a `python -c` program) with an interrupt during `step`, in the processes of `ranks` (every rank
    reads the same stream: each listed one stops at the same point); `slow_commit_s`: rank 0 takes that much longer
    to make a checkpoint the one a rerun resumes from (its record's last write)."""
    return f"""
import os
import sys
import time
import mode_edge.training.train_expert as te
import mode_edge.training.trainer as trainer

original, switch = te.TokenStream, trainer._switch_to

def failing(*args, **kwargs):
    for i, batch in enumerate(original(*args, **kwargs)):
        if i == {step - 1} and os.environ["RANK"] in {ranks!r}:
            raise KeyboardInterrupt
        yield batch

def slow_switch(*args, **kwargs):
    time.sleep({slow_commit_s})
    return switch(*args, **kwargs)

te.TokenStream, trainer._switch_to = failing, slow_switch
from mode_edge.cli import entry
sys.argv[0] = "mode-edge"
entry()
"""


def torchrun(*args: str, processes: int = 2, program: list[str] | None = None) -> subprocess.CompletedProcess:
    """`mode-edge ARGS` (or `program ARGS`) under torchrun, one thread per process."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={processes}", "--no-python",
           *(program or [str(BIN / "mode-edge")]), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def expert_weights(run: Path) -> dict:
    return runs.load_run_experts(run, load_backbone("tiny"))[0].expert.state_dict()


def history(run: Path, stage: str = "code") -> list[float]:
    return json.loads((run / "model.json").read_text())["history"][stage]


@pytest.fixture(scope="module")
def single(code_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    invoke("train", "expert", *ARGS, "--data", code_data, "--out", out)
    return out


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_ranks_reach_the_weights_of_one_process_with_the_global_batch(sharding, single, code_data, tmp_path):
    proc = torchrun("train", "expert", *ARGS, *sharding, "--data", str(code_data), "--out", str(tmp_path / "ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("expert code:") == 1  # the last line from rank 0 alone
    a, b = expert_weights(tmp_path / "ddp"), expert_weights(single)
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert history(tmp_path / "ddp") == pytest.approx(history(single), rel=1e-5)
    record = runs.read_model_record(tmp_path / "ddp")["training"]
    assert record["tokens"] == runs.read_model_record(single)["training"]["tokens"]  # every rank's tokens counted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # one run folder, no partial left
    peaks = record["parallel"].pop("peak_rss_mb")
    assert record["parallel"] == {"processes": 2, "fsdp": bool(sharding), "placement": "data"}
    assert len(peaks) == 2 and peaks[0] == record["peak_rss_mb"] and 50 < peaks[1] < 4000  # each rank's own


@pytest.mark.parametrize("kind", ["full-ft", "lora"])
def test_fsdp_baselines_reach_the_weights_of_one_process(kind, code_data, tmp_path):
    """Full fine-tuning shards every layer and then the rest (the tied embedding in the root unit); LoRA shards its A
    and B matrices beside the frozen projections they adapt. Two micro-batches per step (--grad-accum 2)."""
    args = [*(a for a in ARGS if a not in ("--domain", "code", "--init", "random")), "--grad-accum", "2"]
    invoke("train", kind, *args, "--data", code_data, "--out", tmp_path / "single")
    proc = torchrun("train", kind, *args, "--fsdp", "--data", str(code_data), "--out", str(tmp_path / "fsdp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = "weights.safetensors" if kind == "full-ft" else "adapter.safetensors"
    a, b = load_file(str(tmp_path / "fsdp" / name)), load_file(str(tmp_path / "single" / name))
    assert sorted(a) == sorted(b)
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert history(tmp_path / "fsdp", kind) == pytest.approx(history(tmp_path / "single", kind), rel=1e-5)


def test_split_placement_ends_where_one_process_ends(code_data, tmp_path):
    """The backbone on rank 0, the expert on rank 1, the whole batch on both, two micro-batches per step."""
    args = [*ARGS, "--grad-accum", "2", "--data", str(code_data)]
    invoke("train", "expert", *args, "--out", tmp_path / "single")
    proc = torchrun("train", "expert", *args, "--placement", "split", "--out", str(tmp_path / "split"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = expert_weights(tmp_path / "split"), expert_weights(tmp_path / "single")
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert history(tmp_path / "split") == pytest.approx(history(tmp_path / "single"), rel=1e-5)
    record, reference = (runs.read_model_record(tmp_path / r)["training"] for r in ("split", "single"))
    assert record["tokens"] == reference["tokens"]  # the batch counted once, not once per rank
    assert record["parallel"]["placement"] == "split"


def test_split_placement_refusals_are_one_line_and_leave_nothing(code_data, prose_data, tmp_path):
    for extra, message in ((["--placement", "split"], "launch exactly 2 processes"),
                           (["--placement", "split", "--general", prose_data], "drop --general"),
                           (["--placement", "split", "--fsdp"], "choose one of them")):  # fmt: skip
        refused("train", "expert", *ARGS, *extra, "--data", code_data, "--out", tmp_path / "run", message=message)
        assert not list(tmp_path.iterdir())


def test_stay_out_training_is_the_same_with_its_general_rows_on_one_rank(code_data, prose_data, tmp_path):
    """--general: one general row in each batch of 4, so one rank holds it and the other none; the stay-out loss
    weighs each rank's means by its share of the global rows, and the weights match one process's."""
    args = [*ARGS, "--general", str(prose_data)]
    invoke("train", "expert", *args, "--data", code_data, "--out", tmp_path / "single")
    proc = torchrun("train", "expert", *args, "--data", str(code_data), "--out", str(tmp_path / "ddp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = expert_weights(tmp_path / "ddp"), expert_weights(tmp_path / "single")
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert history(tmp_path / "ddp") == pytest.approx(history(tmp_path / "single"), rel=1e-5)


@pytest.mark.parametrize("sharding", [[], ["--fsdp"], ["--placement", "split"]], ids=["ddp", "fsdp", "split"])
def test_an_interrupted_run_resumes_under_another_world_size(sharding, single, code_data, tmp_path):
    """Resumed from one process's checkpoint: whole copies, sharded, or with the expert on its own rank."""
    import mode_edge.training.train_expert as te

    def failing(stream):
        for i, batch in enumerate(stream):
            if i == 3:  # during step 4 of 6, after the checkpoint of step 2
                raise KeyboardInterrupt
            yield batch

    original = te.TokenStream
    te.TokenStream = lambda *a, **k: failing(original(*a, **k))
    try:  # (the command catches the interrupt, says how to resume, and exits non-zero)
        result = invoke("train", "expert", *ARGS, "--data", code_data, "--out", tmp_path / "run", ok=False)
    finally:
        te.TokenStream = original
    assert result.exit_code == 130 and "the checkpoint of step 2 of 6 is kept in" in result.stderr
    assert json.loads((tmp_path / ".run.partial/train_state/state.json").read_text())["step"] == 2
    proc = torchrun("train", "expert", *ARGS, *sharding, "--data", str(code_data), "--out", str(tmp_path / "run"))
    assert proc.returncode == 0 and "from its checkpoint of step 2 of 6" in proc.stderr, proc.stderr[-3000:]
    launches = runs.read_model_record(tmp_path / "run")["training"]["launches"]  # the record keeps both launches
    assert [(launch["from_step"], launch["processes"]) for launch in launches] == [(0, 1), (2, 2)]
    assert launches[1]["fsdp"] == ("--fsdp" in sharding) and launches[1]["placement"] == (
        "split" if "split" in sharding else "data")
    a, b = expert_weights(tmp_path / "run"), expert_weights(single)
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert history(tmp_path / "run") == pytest.approx(history(single), rel=1e-5)


def test_a_sharded_checkpoint_resumes_in_one_process_under_split_placement_and_in_four_shards(single, code_data,
                                                                                                tmp_path):  # fmt: skip
    """An --fsdp run of two processes interrupted after its checkpoint of step 2 (each rank's shards): resumed in one
    process, with the expert on its own rank, and under --fsdp in four processes (each reading the parts of the two
    files its quarter needs), it ends where an uninterrupted run ends."""
    args = [*ARGS, "--data", str(code_data)]
    proc = torchrun("train", "expert", *args, "--fsdp", "--out", str(tmp_path / "run"),
                    program=[sys.executable, "-c", interrupted_at_step()])  # fmt: skip
    assert proc.returncode != 0 and "the checkpoint of step 2 of 6 is kept in" in proc.stderr, proc.stderr[-3000:]
    state = tmp_path / ".run.partial/train_state"
    assert json.loads((state / "state.json").read_text())["weights_file"] == "state-2.shards"
    assert sorted(p.name for p in state.iterdir()) == ["state-2.shards", "state.json"]  # no leftover of step 4
    for copy in ("split", "fsdp"):
        shutil.copytree(tmp_path / ".run.partial", tmp_path / f".{copy}.partial")
    invoke("train", "expert", *args, "--out", tmp_path / "run")
    proc = torchrun("train", "expert", *args, "--placement", "split", "--out", str(tmp_path / "split"))
    assert proc.returncode == 0 and "from its checkpoint of step 2 of 6" in proc.stderr, proc.stderr[-3000:]
    proc = torchrun("train", "expert", *args, "--fsdp", "--out", str(tmp_path / "fsdp"), processes=4)
    assert proc.returncode == 0 and "from its checkpoint of step 2 of 6" in proc.stderr, proc.stderr[-3000:]
    for run, sharded in (("run", False), ("split", False), ("fsdp", True)):
        launches = runs.read_model_record(tmp_path / run)["training"]["launches"]
        assert [(launch["from_step"], launch["fsdp"]) for launch in launches] == [(0, True), (2, sharded)]
        a, b = expert_weights(tmp_path / run), expert_weights(single)
        for k in a:
            assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        assert history(tmp_path / run) == pytest.approx(history(single), rel=1e-5)


def test_a_rank_left_waiting_by_an_interrupted_one_says_one_line(code_data, tmp_path):
    """Under --fsdp, rank 1 alone interrupted in step 3, right after the checkpoint of step 2, which rank 0 is slow to
    make the one to resume from: no rank goes on before it has, so the checkpoint is kept (without that, torchrun
    would stop rank 0 while it wrote it; the barrier is the same for data parallel's checkpoints). Rank 0, left
    waiting for rank 1 in a collective, gets gloo's "Connection closed by peer" error and says in one line where the
    checkpoint is (that another process stopped, or, where torchrun's SIGTERM comes first, that it was interrupted);
    no traceback from either rank."""
    args = [*ARGS, "--fsdp", "--data", str(code_data), "--out", str(tmp_path / "run")]
    program = [sys.executable, "-c", interrupted_at_step(3, ranks="1", slow_commit_s=2)]
    proc = torchrun("train", "expert", *args, program=program)
    workers_tracebacks = proc.stderr.count("Traceback (most recent call last)") - proc.stderr.count("ChildFailedError:")
    assert proc.returncode != 0 and workers_tracebacks == 0, proc.stderr[-3000:]  # (torchrun's own report has one)
    said = [line for line in proc.stderr.splitlines() if "the checkpoint of step 2 of 6 is kept in" in line]
    assert len(said) == 1 and said[0].startswith(("error: another process of this run stopped", "interrupted")), (
        proc.stderr[-3000:])  # fmt: skip
    record = json.loads((tmp_path / ".run.partial/train_state/state.json").read_text())
    assert (record["step"], record["weights_file"]) == (2, "state-2.shards")  # (its resuming: the test above)


def test_two_nodes_of_one_process_each_end_where_one_process_ends(single, code_data, tmp_path):
    """torchrun's launch across machines, as the README gives it, with two "machines" on loopback: a torchrun per node
    (--nnodes 2, one process each, a c10d rendezvous), --out on the file system they share. The process with global
    rank 0 alone shows progress and writes the run (the other's local rank is 0 too), and the run ends where one
    process with the whole batch ends."""
    from tests.training.test_placement import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node",
                               "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--no-python",
                               str(BIN / "mode-edge"), "train", "expert", *ARGS, "--data", str(code_data), "--out",
                               str(tmp_path / "run")], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for node in (0, 1)]  # fmt: skip
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    assert sorted("step 6/6" in e for e in errs) == [False, True], errs  # progress from one process only
    assert runs.read_model_record(tmp_path / "run")["training"]["parallel"]["processes"] == 2
    a, b = expert_weights(tmp_path / "run"), expert_weights(single)
    for k in a:
        assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert history(tmp_path / "run") == pytest.approx(history(single), rel=1e-5)


def test_the_global_batch_is_checked_before_the_backbone_loads(monkeypatch, tmp_path):
    """make_train_config (every training command, before it loads anything) refuses a batch the processes cannot
    share; split placement gives every rank the whole batch."""
    from mode_edge.cli import make_train_config
    from mode_edge.errors import UserError

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    for fsdp in (False, True):
        with pytest.raises(UserError, match="--batch-size 4 does not divide among 3 processes"):
            make_train_config(tmp_path / "run", "expert", batch_size=4, fsdp=fsdp)
    cfg, parallel = make_train_config(tmp_path / "run", "compose", experts=2, batch_size=4, fsdp=False,
                                      placement="split")  # fmt: skip
    assert cfg.batch_size == 4 and parallel.placement == "split"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert make_train_config(tmp_path / "run", "lora", batch_size=4, fsdp=False)[0].batch_size == 4


def test_compose_checks_its_experts_and_device_before_the_backbone_loads(composed_run, code_data, monkeypatch,
                                                                          tmp_path):  # fmt: skip
    """`train compose` counts the experts of its runs (model.json) for split placement's process count, refuses
    experts of the same name, and every trainer refuses --device cuda without CUDA, each before any backbone loads;
    a usage mistake is said by rank 0 alone, as a refusal is."""
    import mode_edge.cli
    from tests.cli_runner import invoke, refused

    def no_load(*a, **k):
        raise AssertionError("the backbone was loaded before the refusal")

    monkeypatch.setattr(mode_edge.cli, "load_base", no_load)
    args = ["train", "compose", "--data", code_data, "--out", tmp_path / "run", "--batch-size", "4"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    refused(*args, "--experts", composed_run, "--placement", "split",
            message="launch 2 to 3 processes (torchrun --nproc-per-node), not 4")  # (code and prose: 2 experts)
    monkeypatch.setenv("WORLD_SIZE", "1")
    refused(*args, "--experts", f"{composed_run},{composed_run}",
            message=("two experts are named code, prose", "another --domain"))
    if not torch.cuda.is_available():
        refused(*args, "--experts", composed_run, "--device", "cuda", message="use --device cpu")
        refused("train", "expert", "--domain", "code", "--data", code_data, "--out", tmp_path / "run", "--device",
                "cuda", message="use --device cpu")  # fmt: skip
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(mode_edge.cli, "RANK0_GRACE_S", 0.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused("train", "full-ft", "--placement", "split", message="No such option")  # rank 0 says it ...
    monkeypatch.setenv("RANK", "1")
    other = invoke("train", "full-ft", "--placement", "split", ok=False)  # ... the other ranks do not
    assert other.exit_code == 2 and other.stderr == ""
    monkeypatch.delenv("WORLD_SIZE")  # a stray RANK outside torchrun: the process speaks for itself
    refused("train", "full-ft", "--placement", "split", message="No such option")
    monkeypatch.delenv("RANK")
    baseline = tmp_path / "baseline"  # a run without experts (its record made so: a baseline's has none)
    shutil.copytree(composed_run, baseline)
    record = json.loads((baseline / "model.json").read_text())
    (baseline / "model.json").write_text(json.dumps({**record, "kind": "full-ft", "experts": []}))
    refused(*args, "--experts", baseline, message=(f"{baseline} holds no experts (a full-ft run)", "train expert"))


def test_a_global_batch_that_does_not_divide_is_one_line(code_data, tmp_path):
    """Three processes: the other ranks meet the mistake as rank 0 does, and wait for it to say so and to remove its
    partial run folder before they fail (torchrun stops every process as soon as one fails)."""
    proc = torchrun("train", "expert", *ARGS, "--data", str(code_data), "--out", str(tmp_path / "odd"), processes=3)
    assert proc.returncode != 0 and proc.stderr.count("--batch-size 4 does not divide among 3 processes") == 1
    assert "Traceback" not in proc.stderr.split("--batch-size 4")[0][-2000:]  # (torchrun then reports the ranks)
    assert not list(tmp_path.iterdir())
