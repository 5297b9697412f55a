"""Expert training and composition on the tiny backbone, with real files on disk."""

import json
import shutil

import pytest
import torch
from torch.testing import assert_close

from mode_edge.config import DEFAULT_LR, MoDELayout, TrainConfig
from mode_edge.errors import UserError
from mode_edge.training import runs
from mode_edge.training.backbones import Backbone, tiny_decoder, weights_sha256
from mode_edge.training.compose import compose
from mode_edge.training.data import TokenStream, load_corpus
from mode_edge.training.evaluate import build_model, evaluate
from mode_edge.training.model import Expert, MoDEModel
from mode_edge.training.train_expert import train_expert

LAYOUT = MoDELayout(n_blocks=3, expert_layers=2)
CFG = TrainConfig(steps=6, batch_size=2, seq_len=64, warmup_steps=1, lr=1e-3, checkpoint_every=2)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_identical(before, module):
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"


@pytest.fixture(scope="module")
def expert_runs(tiny, code_data, prose_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    before = snapshot(tiny.decoder)
    train_expert(tiny, "code", code_data, root / "code", LAYOUT, CFG)
    train_expert(tiny, "prose", prose_data, root / "prose", LAYOUT, CFG)
    assert_identical(before, tiny.decoder)  # the backbone is frozen and never written
    return root


def test_expert_run_holds_only_the_expert(expert_runs, tiny):
    run = expert_runs / "code"
    record = json.loads((run / "model.json").read_text())
    assert record["kind"] == "expert" and record["experts"] == ["code"]
    assert record["base"]["fingerprint"] == tiny.fingerprint(LAYOUT)
    assert len(record["history"]["code"]) == CFG.steps
    meta = json.loads((run / "experts/code/expert.json").read_text())
    per_layer = sum(p.numel() for p in tiny.decoder.layers[0].parameters())
    assert meta["parameters"] == 3 * (2 * per_layer + tiny.decoder.cfg.dim + 1)  # layers + gate rows, no backbone
    assert not (run / "train_state").exists()
    assert sorted(p.name for p in run.iterdir()) == ["experts", "model.json"]


def test_training_moves_the_expert_and_lowers_the_loss(expert_runs, tiny, code_data):
    trained = runs.load_run_experts(expert_runs / "code", tiny)[0].expert
    fresh = Expert.init_from(tiny.decoder, LAYOUT)
    assert not torch.equal(trained.blocks[0].layers[0].mlp.up_proj.weight, fresh.blocks[0].layers[0].mlp.up_proj.weight)
    assert not torch.equal(trained.blocks[0].gate.weight, fresh.blocks[0].gate.weight)
    loss = json.loads((expert_runs / "code/model.json").read_text())["history"]["code"]
    assert sum(loss[-2:]) < sum(loss[:2])


def test_reloaded_expert_reproduces_the_trained_model(expert_runs, tiny, code_data):
    """A composition of one expert (loaded back from disk) equals that expert's single-expert model."""
    loaded = runs.load_run_experts(expert_runs / "code", tiny)[0]
    model, names, _ = build_model(tiny, expert_runs / "code", None)
    single = MoDEModel(tiny.decoder, LAYOUT, {"code": loaded.expert})
    idx = next(TokenStream(load_corpus(code_data).docs["test"], tiny.tokenizer, 2, 32, seed=0))
    with torch.no_grad():
        assert_close(model(idx), single(idx), rtol=0, atol=0)
    assert names == ["code"]


def rerun_ends_like_a_straight_run(tiny, code_data, tmp_path, name: str) -> None:
    """Train into tmp_path/NAME again (resuming what an interrupted run left there) and once uninterrupted into
    tmp_path/straight; the two must end on the same expert weights."""
    train_expert(tiny, "code", code_data, tmp_path / name, LAYOUT, CFG)
    train_expert(tiny, "code", code_data, tmp_path / "straight", LAYOUT, CFG)
    a = runs.load_run_experts(tmp_path / name, tiny)[0].expert.state_dict()
    b = runs.load_run_experts(tmp_path / "straight", tiny)[0].expert.state_dict()
    for k in a:
        assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_interrupted_training_resumes_to_the_same_weights(tiny, code_data, tmp_path):
    class Interrupt(Exception):
        pass

    def failing(stream, after):
        for i, batch in enumerate(stream):
            if i == after:
                raise Interrupt
            yield batch

    import mode_edge.training.train_expert as te

    original = te.TokenStream
    te.TokenStream = lambda *a, **k: failing(original(*a, **k), after=3)  # dies during step 4 of 6
    try:
        with pytest.raises(Interrupt):
            train_expert(tiny, "code", code_data, tmp_path / "resumed", LAYOUT, CFG)
    finally:
        te.TokenStream = original
    partial = tmp_path / ".resumed.partial"
    assert json.loads((partial / "train_state/state.json").read_text())["step"] == 2
    assert not (tmp_path / "resumed").exists()
    rerun_ends_like_a_straight_run(tiny, code_data, tmp_path, "resumed")
    assert not partial.exists()
    h1 = json.loads((tmp_path / "resumed/model.json").read_text())["history"]["code"]
    h2 = json.loads((tmp_path / "straight/model.json").read_text())["history"]["code"]
    assert len(h1) == 6 and h1 == pytest.approx(h2, rel=1e-4)
    spent = [runs.read_model_record(tmp_path / r)["training"] for r in ("resumed", "straight")]
    assert spent[0]["tokens"] == spent[1]["tokens"] > 0  # the record covers the steps before the checkpoint too
    assert spent[0]["wall_s"] > 0 and spent[0]["peak_rss_mb"] > 0


@pytest.mark.parametrize("during", ["weights", "record"])
def test_an_interrupt_while_a_checkpoint_is_written_keeps_the_previous_one(during, tiny, code_data, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """Ctrl-C while the checkpoint of step 4 is written (its weights half on disk, or whole but not yet in the
    record): the checkpoint of step 2 stays whole, no half-written file is left, and the rerun resumes from step 2
    and ends on the uninterrupted run's weights."""
    import mode_edge.training.trainer as trainer

    writes = {"weights": trainer.save_file, "record": trainer.write_json}
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the checkpoint of step 4
            if during == "weights":
                open(args[1], "wb").write(b"half")
            raise KeyboardInterrupt
        return writes[during](*args, **kwargs)

    monkeypatch.setattr(trainer, {"weights": "save_file", "record": "write_json"}[during], interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_expert(tiny, "code", code_data, tmp_path / "run", LAYOUT, CFG)
    monkeypatch.undo()
    state = tmp_path / ".run.partial" / trainer.STATE_DIR
    record = json.loads((state / "state.json").read_text())
    kept = {"state.json", "state-2.safetensors"} | ({"state-4.safetensors"} if during == "record" else set())
    assert record["step"] == 2 and record["weights_file"] == "state-2.safetensors"
    assert {p.name for p in state.iterdir()} == kept  # (nothing half-written; step 4's whole file is not named)
    rerun_ends_like_a_straight_run(tiny, code_data, tmp_path, "run")
    assert not (tmp_path / ".run.partial").exists()


def test_a_checkpoint_of_the_previous_format_resumes(tiny, code_data, tmp_path, monkeypatch):
    """A checkpoint written before records named their weights file (train_state/state.safetensors, no
    `weights_file` in state.json) resumes and ends on the uninterrupted run's weights."""
    import mode_edge.training.trainer as trainer

    def interrupted(stream, after=3):  # during step 4 of 6, after the checkpoint of step 2
        for i, batch in enumerate(stream):
            if i == after:
                raise KeyboardInterrupt
            yield batch

    import mode_edge.training.train_expert as te

    original = te.TokenStream
    monkeypatch.setattr(te, "TokenStream", lambda *a, **k: interrupted(original(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        train_expert(tiny, "code", code_data, tmp_path / "run", LAYOUT, CFG)
    monkeypatch.undo()
    state = tmp_path / ".run.partial" / trainer.STATE_DIR
    record = json.loads((state / "state.json").read_text())
    (state / record.pop("weights_file")).rename(state / "state.safetensors")
    (state / "state.json").write_text(json.dumps(record))
    rerun_ends_like_a_straight_run(tiny, code_data, tmp_path, "run")


def test_an_interrupt_says_what_a_rerun_will_find(code_data, tmp_path, monkeypatch):
    """Ctrl-C through the command line: before the first checkpoint a rerun starts afresh, after one it resumes from
    that step; each says so in one line (exit code 130), and the rerun's first line names the step it resumes. A rerun
    with other training options or of another command is refused before the backbone loads, with the values then and
    now; one with another --domain, after it."""
    import mode_edge.training.train_expert as te
    from tests.cli_runner import invoke, refused

    args = ["train", "expert", "--base", "tiny", "--domain", "legal", "--data", code_data, "--out", tmp_path / "run",
            "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1", "--checkpoint-every", "2"]
    original = te.TokenStream

    def interrupted_after(batches: int):
        def stream(*a, **k):
            for i, batch in enumerate(original(*a, **k)):
                if i == batches:
                    raise KeyboardInterrupt
                yield batch

        return stream

    try:
        te.TokenStream = interrupted_after(1)  # during step 2: no checkpoint yet
        first = invoke(*args, ok=False)
        te.TokenStream = interrupted_after(3)  # during step 4, after the checkpoint of step 2
        second = invoke(*args, ok=False)
    finally:
        te.TokenStream = original
    assert first.exit_code == second.exit_code == 130
    last = [r.stderr.strip().splitlines()[-1] for r in (first, second)]
    assert last[0] == ("interrupted before the first checkpoint (one every 2 steps): a rerun of the same command "
                       "starts from step 0")
    assert "saved no checkpoint: training starts from step 0" in " ".join(second.stderr.split())
    partial = tmp_path / ".run.partial"
    assert last[1] == (f"interrupted; the checkpoint of step 2 of 6 is kept in {partial}: rerun the same command to "
                       "resume from it")
    import mode_edge.training.backbones as backbones

    with monkeypatch.context() as m:  # refused before anything loads: a load would fail the message below
        m.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("the backbone loaded before the refusal"))
        changed = f"other settings (--lr: {DEFAULT_LR['mode']} then, 0.002 now; --seq-len: 32 then, 48 now)"
        lr = refused(*args, "--lr", "2e-3", "--seq-len", "48", message=(changed, "delete that folder"))
        assert "--checkpoint-every" not in lr
        lora = ["train", "lora", *args[2:4], *args[6:]]  # (no --domain: a lora run has none)
        refused(*lora, message=("other settings (the command: it was train expert, now train lora)", "delete that"))
    rerun = [*args[:5], "code", *args[6:]]  # the rest of a run's settings is checked once the backbone has loaded
    refused(*rerun, "--checkpoint-every", "3", message="other settings (--domain: legal then, code now)")
    done = invoke(*args, "--checkpoint-every", "3", "--fsdp")  # settings that change nothing computed: it resumes
    assert f"resuming the interrupted run in {partial} from its checkpoint of step 2 of 6" in (
        " ".join(done.stderr.split()))
    assert "tok/s) ->" in done.stdout
    training = runs.read_model_record(tmp_path / "run")["training"]
    launches = [(launch["from_step"], launch["processes"], launch["fsdp"]) for launch in training["launches"]]
    assert launches == [(0, 1, False), (2, 1, False)]  # (--fsdp in one process trains without it: recorded so)
    assert training["domain"] == "legal"  # the expert's --domain, not its data folder's name


def test_records_that_do_not_match_their_checkpoint_are_refused(code_data, tmp_path, monkeypatch):
    """A checkpoint record edited by hand (its step, its loss history) or unreadable is refused in one line, with no
    line before it saying that training starts afresh, and the checkpoint is kept."""
    import mode_edge.training.train_expert as te
    from tests.cli_runner import invoke

    args = ["train", "expert", "--base", "tiny", "--domain", "code", "--data", code_data, "--steps", "6",
            "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1", "--checkpoint-every", "2"]  # fmt: skip
    original = te.TokenStream

    def stream(*a, **k):  # interrupted during step 4, after the checkpoint of step 2
        for i, batch in enumerate(original(*a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(te, "TokenStream", stream)
    assert invoke(*args, "--out", tmp_path / "run", ok=False).exit_code == 130
    monkeypatch.undo()
    record = json.loads((tmp_path / ".run.partial/train_state/state.json").read_text())
    edits = {"step": {**record, "step": 3}, "past the end": {**record, "step": 9},
             "history": {**record, "history": record["history"][:1]}, "unreadable": [1, 2]}  # fmt: skip
    for what, edited in edits.items():
        shutil.copytree(tmp_path / ".run.partial", tmp_path / ".edited.partial")
        (tmp_path / ".edited.partial/train_state/state.json").write_text(json.dumps(edited))
        problem = "state.json is damaged" if what == "unreadable" else "does not match its weights"
        result = invoke(*args, "--out", tmp_path / "edited", ok=False)
        last = result.stderr.strip().splitlines()[-1]
        assert result.exit_code == 2 and problem in last and f"delete {tmp_path / '.edited.partial'}" in last, what
        assert "starts from step 0" not in result.stderr and "Traceback" not in result.stderr, what
        assert (tmp_path / ".edited.partial/train_state").is_dir()  # kept: deleting it is the user's decision
        shutil.rmtree(tmp_path / ".edited.partial")


def test_a_folder_the_run_cannot_write_is_one_line_and_keeps_the_checkpoint(code_data, tmp_path, monkeypatch):
    """An --out whose folder cannot be written is refused before the backbone loads; a write that fails at the end
    (the last rename, here) is one line, keeps the partial folder with the run's last checkpoint, and the rerun
    resumes from it."""
    import errno
    import os

    import mode_edge.training.backbones as backbones
    from tests.cli_runner import invoke, refused

    args = ["train", "expert", "--base", "tiny", "--domain", "code", "--data", code_data, "--steps", "6",
            "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1", "--checkpoint-every", "2"]  # fmt: skip
    with monkeypatch.context() as m:  # (sysfs takes no new files, not even from root)
        m.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("the backbone loaded before the refusal"))
        refused(*args, "--out", "/sys/mode-edge-run", message=("/sys is not writable", "choose another --out"))
    replace = os.replace

    def failing(src, dst):
        if str(src).endswith(".partial"):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src))
        return replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", failing)
        result = invoke(*args, "--out", tmp_path / "run", ok=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert last == (f"error: could not access {tmp_path / '.run.partial'} (Operation not permitted); change its "
                    "permissions, or choose another --out, and run the command again")
    assert json.loads((tmp_path / ".run.partial/train_state/state.json").read_text())["step"] == 4
    done = invoke(*args, "--out", tmp_path / "run")
    assert "from its checkpoint of step 4 of 6" in " ".join(done.stderr.split())
    assert sorted(p.name for p in tmp_path.iterdir() if "run" in p.name) == ["run"]
    assert not (tmp_path / "run/train_state").exists()


@pytest.mark.parametrize("freeze", [False, True])
def test_compose_trains_gates_and_optionally_experts(expert_runs, tiny, code_data, prose_data, tmp_path, freeze):
    before_backbone = snapshot(tiny.decoder)
    out = tmp_path / "composed"
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=64, warmup_steps=1, lr=1e-3)
    compose(tiny, [expert_runs / "code", expert_runs / "prose"], [code_data, prose_data], out, cfg, freeze)
    assert_identical(before_backbone, tiny.decoder)
    record = json.loads((out / "model.json").read_text())
    assert record["kind"] == "composed" and record["experts"] == ["code", "prose"]
    old = runs.load_run_experts(expert_runs / "code", tiny)[0].expert
    new = runs.load_run_experts(out, tiny, ["code"])[0].expert
    assert not torch.equal(old.blocks[1].gate.weight, new.blocks[1].gate.weight)
    layers_equal = torch.equal(old.blocks[1].layers[0].mlp.up_proj.weight, new.blocks[1].layers[0].mlp.up_proj.weight)
    assert layers_equal == freeze


def test_eval_reports_accuracy_and_perplexity_per_domain(expert_runs, tiny, code_data, prose_data):
    model, _, _ = build_model(tiny, expert_runs / "code", None)
    results = evaluate(tiny, model, [code_data, prose_data], seq_len=32, max_tokens=256)
    assert set(results) == {"code", "prose"}
    for r in results.values():
        assert 0 <= r["accuracy"] <= 100 and r["perplexity"] > 1 and r["tokens"] == 256
        gates = r["gates"]  # mean weight per block of the backbone and the expert: each block's weights sum to 1
        assert set(gates) == {"backbone", "code"} and len(gates["code"]) == len(model.blocks)
        assert all(0 < w < 1 for w in gates["code"])
        assert [a + b for a, b in zip(gates["backbone"], gates["code"])] == pytest.approx([1.0] * len(model.blocks))
    bare, names, label = build_model(tiny, expert_runs / "code", [])
    assert names == [] and label == "backbone" and len(list(bare.experts.parameters())) == 0
    assert "gates" not in evaluate(tiny, bare, [code_data], seq_len=32, max_tokens=64)["code"]


def test_an_expert_from_another_base_is_refused(expert_runs, tiny):
    other = Backbone("tiny-seed1", tiny_decoder(seed=1), tiny.tokenizer, weights_sha256(tiny_decoder(seed=1)))
    with pytest.raises(
        UserError,
        match=r"trained on base 'tiny' \(fingerprint [0-9a-f]{16}\), "
        r"but the loaded base 'tiny-seed1' has fingerprint [0-9a-f]{16}",
    ):
        runs.load_run_experts(expert_runs / "code", other)


def test_a_corrupt_expert_file_is_refused(expert_runs, tiny, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(expert_runs / "code", run)
    weights = run / "experts/code/expert.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="expert.safetensors has .* bytes where .* were recorded.*retrain the expert"):
        runs.load_run_experts(run, tiny)


def test_unknown_expert_subset_and_existing_output_are_refused(expert_runs, tiny, code_data):
    with pytest.raises(UserError, match="has no expert named math; it has: code"):
        runs.load_run_experts(expert_runs / "code", tiny, ["math"])
    with pytest.raises(UserError, match="already exists"):
        train_expert(tiny, "code", code_data, expert_runs / "code", LAYOUT, CFG)
    with pytest.raises(UserError, match="expert name 'a/b'"):
        train_expert(tiny, "a/b", code_data, expert_runs / "x", LAYOUT, CFG)


def test_a_run_says_what_it_trains_on_and_warns_of_a_warmup_past_its_end(code_data, tmp_path):
    from tests.cli_runner import invoke

    args = ["--base", "tiny", "--domain", "code", "--data", code_data, "--steps", "2", "--batch-size", "2",
            "--seq-len", "32"]  # fmt: skip
    result = invoke("train", "expert", *args, "--out", tmp_path / "run", "--warmup-steps", "5")
    lines = result.stderr.splitlines()
    assert lines[0] == ("backbone tiny: 0.2M parameters, 6 layers x 64, 4 query / 2 KV heads of 16, SwiGLU 128, "
                        "RoPE base 10000, context 1024")  # fmt: skip
    assert lines[1] == ("note: --warmup-steps 5 is longer than the run's --steps 2: the learning rate stays below "
                        "--lr (at most 40% of it)")  # fmt: skip
    quiet = invoke("train", "expert", *args, "--out", tmp_path / "run2", "--warmup-steps", "2")
    assert "note:" not in quiet.stderr


def test_optimizer_state_of_other_shapes_is_refused():
    """A checkpoint's moments must fit the run's parameters (a sharded checkpoint's reader infers each tensor's size
    from the shards it finds): another shape, a missing moment or an index past the parameters is one line."""
    from mode_edge.training.distributed import DataParallelPlan
    from mode_edge.training.trainer import _load_optimizer, param_groups

    params = {"w": torch.nn.Parameter(torch.ones(3, 2)), "b": torch.nn.Parameter(torch.ones(3))}
    optimizer = torch.optim.AdamW(param_groups(params, TrainConfig()))
    first = optimizer.param_groups[0]["params"][0]
    good = {"step": torch.tensor(2.0), "exp_avg": torch.full_like(first, 0.5), "exp_avg_sq": torch.ones_like(first)}
    plan = DataParallelPlan(0, 1, torch.device("cpu"))
    _load_optimizer(optimizer, {0: good}, params, plan, "fix it")
    assert torch.equal(optimizer.state[first]["exp_avg"], good["exp_avg"])
    for bad in ({0: {**good, "exp_avg": torch.zeros(4)}}, {0: {k: good[k] for k in ("step", "exp_avg")}}, {2: good}):
        with pytest.raises(UserError, match="optimizer state does not match this run's weights; fix it"):
            _load_optimizer(optimizer, bad, params, plan, "fix it")


def test_a_run_s_files_are_as_readable_as_a_plain_write(expert_runs, tmp_path):
    """safetensors creates its files private (0600); a run's weights keep the permissions every other file of the
    run gets from the umask, so a run on a shared disk is readable by whom its records are."""
    import stat

    from mode_edge.files import current_umask

    files = [p for p in (expert_runs / "code").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~current_umask(), p
