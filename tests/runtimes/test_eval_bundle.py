"""`mode-edge eval --bundle`: held-out scores through the runtime, beside the PyTorch run it was exported from."""

import json

from tests.test_cli import assert_user_error, cli

SIZE = ["--seq-len", "32", "--max-tokens", "320"]


def scores(path):
    return json.loads(path.read_text())["domains"]


def test_fp32_bundle_scores_as_the_run_and_agrees_on_every_token(fp32_bundle, composed_run, code_data, prose_data,
                                                                  tmp_path):  # fmt: skip
    data = f"{code_data},{prose_data}"
    cli("eval", "--model", composed_run, "--data", data, *SIZE, "--json", tmp_path / "torch.json")
    proc = cli("eval", "--bundle", fp32_bundle, "--model", composed_run, "--data", data, *SIZE,
               "--json", tmp_path / "bundle.json")  # fmt: skip
    assert "top-1 agreement" in proc.stdout
    torch_side, bundle = scores(tmp_path / "torch.json"), scores(tmp_path / "bundle.json")
    for domain in ("code", "prose"):
        got = bundle[domain]
        # the reference is the same model `eval --model` scores: same windows, same accuracy
        assert got["reference"]["accuracy"] == torch_side[domain]["accuracy"]
        assert got["reference"]["tokens"] == got["tokens"] == torch_side[domain]["tokens"]
        assert got["top1_agreement"] >= 99.0  # fp32 graphs: argmax differs only at near-ties
        assert abs(got["accuracy"] - torch_side[domain]["accuracy"]) <= 1.0
        assert abs(got["perplexity"] - torch_side[domain]["perplexity"]) / torch_side[domain]["perplexity"] < 1e-3


def test_int8_bundle_reports_its_change_against_the_run(int8_bundle, composed_run, code_data, tmp_path):
    cli("eval", "--bundle", int8_bundle, "--model", composed_run, "--data", code_data, *SIZE,
        "--json", tmp_path / "int8.json")  # fmt: skip
    got = scores(tmp_path / "int8.json")["code"]
    assert 50.0 <= got["top1_agreement"] <= 100.0
    assert abs(got["change"]["delta"] - (got["accuracy"] - got["reference"]["accuracy"])) < 0.01
    low, high = got["change"]["ci"]
    assert low <= got["change"]["delta"] <= high


def test_base_only_bundle_matches_the_bare_backbone(fp32_bundle, composed_run, code_data, tmp_path):
    cli("eval", "--bundle", fp32_bundle, "--experts", "none", "--data", code_data, *SIZE,
        "--json", tmp_path / "base.json")  # fmt: skip
    cli("eval", "--base", "tiny", "--data", code_data, *SIZE, "--json", tmp_path / "backbone.json")
    got, ref = scores(tmp_path / "base.json")["code"], scores(tmp_path / "backbone.json")["code"]
    assert json.loads((tmp_path / "base.json").read_text())["experts"] == []
    assert abs(got["perplexity"] - ref["perplexity"]) / ref["perplexity"] < 1e-3


def test_eval_bundle_refuses_what_does_not_apply(fp32_bundle, composed_run, code_data, tmp_path):
    proc = cli("eval", "--bundle", fp32_bundle, "--base", "tiny", "--data", code_data, ok=False)
    assert_user_error(proc, "--base does not apply to --bundle")
    proc = cli("eval", "--bundle", fp32_bundle, "--experts", "poetry", "--data", code_data, ok=False)
    assert_user_error(proc, "poetry")
    proc = cli("eval", "--bundle", fp32_bundle, "--data", code_data, "--seq-len", "100000", ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
