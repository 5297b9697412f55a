"""Numeric options of every command, and the matching API arguments: refused in one line naming the option and its
range (exit 2, nothing written), or clamped where the field's convention is to clamp (top-k above the vocabulary)."""

import json
import math

import numpy as np
import pytest

from mode_edge.config import ExportConfig, MoDELayout, TrainConfig
from mode_edge.errors import UserError
from tests.cli_runner import invoke, refused

TRAIN = ["--base", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--warmup-steps", "1"]


def generate(bundle, tmp_path, *options):
    """The text of a sampled run (its profile JSON says how many tokens)."""
    out = tmp_path / "p.json"
    result = invoke("run", "--bundle", bundle, "--experts", "none", "--prompt", "def f(x):", "--max-new-tokens", "6",
                    "--json", out, *options)  # fmt: skip
    assert json.loads(out.read_text())["new_tokens"] >= 1
    return result.stdout


def test_top_k_above_the_vocabulary_means_all(int8_bundle, tmp_path):
    """The issue's example: the tiny model has 257 tokens; --top-k 258 (or far above) samples from all of them."""
    for seed in ("1", "2"):
        every = generate(int8_bundle, tmp_path, "--temperature", "1", "--top-k", "0", "--seed", seed)
        assert generate(int8_bundle, tmp_path, "--temperature", "1", "--top-k", "258", "--seed", seed) == every
        assert generate(int8_bundle, tmp_path, "--temperature", "1", "--top-k", "100000", "--seed", seed) == every


def test_degenerate_temperatures_are_greedy(int8_bundle, tmp_path):
    greedy = generate(int8_bundle, tmp_path)
    assert generate(int8_bundle, tmp_path, "--temperature", "1e-300", "--seed", "3") == greedy
    assert generate(int8_bundle, tmp_path, "--temperature", "1", "--top-k", "1", "--seed", "4") == greedy
    generate(int8_bundle, tmp_path, "--temperature", "1e300", "--top-p", "1e-12")  # no nan, no crash


@pytest.mark.parametrize("option,value,message", [
    ("--temperature", "nan", "finite"), ("--temperature", "-1", "x>=0"), ("--temperature", "inf", "finite"),
    ("--top-p", "0", "0<x<=1"), ("--top-p", "1.5", "0<x<=1"), ("--top-p", "nan", "finite"),
    ("--top-k", "-1", "x>=0"), ("--max-new-tokens", "0", "x>=1"), ("--max-new-tokens", "-5", "x>=1"),
    ("--seed", "-1", "0<=x<="), ("--route-top-k", "0", "x>=1"), ("--top-k", "2.5", "not a valid integer"),
])  # fmt: skip
def test_run_refuses_bad_sampling_options(int8_bundle, option, value, message):
    refused("run", "--bundle", int8_bundle, "--prompt", "x", option, value, message=(option, message))


def test_bench_and_export_refuse_bad_numbers(int8_bundle, composed_run, tmp_path):
    for value in ("0", "-1"):
        refused("bench", "--bundle", int8_bundle, "--new-tokens", value, message=("--new-tokens", "x>=1"))
    for value, message in (("24", "one of 16, 32"), ("8", "16<=x<=256"), ("1024", "16<=x<=256"),
                           ("nan", "not a valid integer")):
        refused("export", "--model", composed_run, "--out", tmp_path / "b", "--block-size", value,
                message=("--block-size", message))  # fmt: skip
    refused("data", "prepare", "--domain", "code", "--out", tmp_path / "d", "--limit", "5", message="--limit")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option,value,message", [
    ("--steps", "0", "x>=1"), ("--lr", "nan", "finite"), ("--lr", "-1e-3", "x>0"), ("--lr", "inf", "finite"),
    ("--gate-lr", "0", "x>0"), ("--batch-size", "0", "x>=1"), ("--seq-len", "-1", "x>=1"),
    ("--grad-accum", "0", "x>=1"), ("--warmup-steps", "-1", "x>=0"), ("--checkpoint-every", "0", "x>=1"),
    ("--seed", "-2", "0<=x<="), ("--blocks", "0", "x>=1"), ("--expert-layers", "-1", "x>=1"),
    ("--seq-len", "5000", "exceeds the backbone's context of 1024"),
])  # fmt: skip
def test_train_expert_refuses_bad_numbers(prose_data, tmp_path, option, value, message):
    out = tmp_path / "run"
    refused("train", "expert", "--domain", "x", "--data", prose_data, "--out", out, *TRAIN, option, value,
            message=(option, message))  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # nothing half-written: no run, no .run.partial


def test_baselines_compose_and_eval_refuse_bad_numbers(prose_data, composed_run, tmp_path):
    base = ["--data", prose_data, "--out", tmp_path / "o", *TRAIN]
    refused("train", "lora", *base, "--rank", "0", message=("--rank", "x>=1"))
    refused("train", "lora", *base, "--alpha", "nan", message=("--alpha", "finite"))
    refused("train", "full-ft", *base, "--seq-len", "2048", message="--seq-len 2048 exceeds the backbone's context")
    refused("train", "compose", "--experts", composed_run, *base, "--seq-len", "4096", message="--seq-len 4096")
    refused("train", "compose", "--experts", tmp_path / "e", *base, message=(f"run folder {tmp_path / 'e'} does not "
                                                                             "exist"))  # (before the backbone loads)
    evaluate = ["eval", "--base", "tiny", "--data", prose_data]
    refused(*evaluate, "--seq-len", "1025", message="--seq-len 1025 exceeds the backbone's context of 1024")
    refused(*evaluate, "--max-tokens", "0", message=("--max-tokens", "x>=1"))
    refused(*evaluate, "--seq-len", "0", message=("--seq-len", "x>=1"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", [
    lambda: TrainConfig(lr=math.nan), lambda: TrainConfig(steps=0), lambda: TrainConfig(gate_lr=math.inf),
    lambda: TrainConfig(weight_decay=-1.0), lambda: TrainConfig(min_lr_ratio=2.0), lambda: TrainConfig(seed=-1),
    lambda: TrainConfig(batch_size=2.5), lambda: MoDELayout(n_blocks=0), lambda: MoDELayout(gate_bias=math.nan),
    lambda: ExportConfig(block_size=48), lambda: ExportConfig(experts=["../x"]),
])  # fmt: skip
def test_configs_refuse_bad_numbers(make):
    with pytest.raises(UserError, match="must be|is not a plain name"):
        make()


def test_runtime_api_validates_its_arguments(int8_bundle):
    from mode_edge.runtimes.engine import Sampling, SplitMix64, sample
    from mode_edge.runtimes.session import Session

    for kw in (dict(temperature=math.nan), dict(top_p=0.0), dict(top_p=1.01), dict(top_k=-1), dict(seed=2**40)):
        with pytest.raises(UserError, match="must be"):
            Sampling(**kw)
    logits, rng = np.random.default_rng(0).normal(size=257).astype(np.float32), SplitMix64(0)
    assert 0 <= sample(logits, Sampling(temperature=1.0, top_k=10_000), rng) < 257
    with pytest.raises(UserError, match="memory budget"):
        Session(int8_bundle, budget_mb=math.nan)
    with pytest.raises(UserError, match="threads"):
        Session(int8_bundle, threads=0)
    session = Session(int8_bundle)
    with pytest.raises(UserError, match="--route-top-k"):
        session.route([1, 2, 3], top_k=0)
    assert sorted(session.route([1, 2, 3], top_k=99)) == ["code", "prose"]  # above the installed count: all
    with pytest.raises(UserError, match="--max-new-tokens"):
        list(session.generate([1, 2], "none", max_new_tokens=0))


def test_click_usage_errors_are_one_line_too(tmp_path):
    refused("run", "--bundle", tmp_path, message=("Missing option '--prompt'", " run --help`"))
    refused("--bogus", message="No such option '--bogus'")
    refused("train", "--bogus", message=("No such option '--bogus'", " train --help`"))
    refused("nosuch", message="No such command 'nosuch'")
    refused("train", "expert", "--steps", "abc", message="'abc' is not a valid integer")
    assert "Commands:" in invoke("train", ok=False).output  # a group without a command still shows its help


def test_run_refuses_a_plot_it_cannot_write_before_generating(int8_bundle, tmp_path):
    """A --plot name matplotlib cannot write (.txt; no suffix, where it would add .png unasked) is one line before the
    run, and leaves no folder behind."""
    for name in ("out/p.txt", "out/timeline"):
        refused("run", "--bundle", int8_bundle, "--prompt", "x", "--plot", tmp_path / name,
                message=("--plot", "name a .png, .svg, .pdf file"))  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_empty_values_are_refused_not_read_as_defaults(int8_bundle, tmp_path):
    """An unset shell variable passed as "" must not mean the current folder, the bare base or no key."""
    from tests.cli_runner import refused

    refused("keys", "generate", "--out", "", message="--out is empty")
    refused("run", "--bundle", int8_bundle, "--prompt", "hi", "--experts", "", message="--experts is empty")
    refused("run", "--bundle", int8_bundle, "--prompt", "hi", "--trust", " ", message="--trust is empty")
    refused("train", "expert", "--base", "tiny", "--domain", "code", "--data", "", "--out", tmp_path / "r",
            message=("--data", "is empty"))  # fmt: skip
    assert not (tmp_path / "r").exists()
