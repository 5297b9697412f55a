"""Backbones beyond plain Llama through the whole pipeline: tiny Llama 3.x (its rope scaling), Qwen3 (per-head q and
k norms), Phi-4-mini-style (fused projections, LongRoPE, a partial rotary embedding) and Gemma 3 (sliding-window
layers with their own rotary tables, sandwich norms, GeGLU, scaled embedding and logits) checkpoints, saved by
transformers, loaded with --base, an expert trained on each, exported, and run: the runtime's logits equal PyTorch's
(fp32) and its greedy tokens too (fp32 and int8, with the prompt's logits within 5%), and
the native runtime's logits equal the Python runtime's (its C++ rotary tables, scaled as mode_edge/rope.py scales
them, over the turned dimensions). Phi-4-mini is also exported at a context past its original one (LongRoPE's long
factors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mode_edge.config import ExportConfig, MoDELayout, TrainConfig
from mode_edge.export.pipeline import export_bundle, load_model
from mode_edge.runtimes.engine import Engine, generate
from mode_edge.training.backbones import load_backbone
from mode_edge.training.evaluate import greedy
from mode_edge.training.model import KVCache
from mode_edge.training.train_expert import train_expert
from tests.conftest import save_tiny_hf_checkpoint

LAYOUT = MoDELayout(n_blocks=2, expert_layers=2, gate_bias=0.0)
LAYOUTS = {"gemma3": MoDELayout(n_blocks=3, expert_layers=1, gate_bias=0.0)}
"""Gemma 3's (tests/conftest.GEMMA3): graphs with sliding layers only (the first backbone block; experts copied from
a sliding layer) and with a full layer only (the last block's expert), each taking both pairs of rotary tables."""
TRAIN = TrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1, lr=1e-2, checkpoint_every=4)
PROMPTS = {"llama3": list(range(3, 83)), "qwen3": list(range(3, 83)), "phi4": list(range(3, 43)),
           "gemma3": list(range(3, 43))}  # fmt: skip
"""80 positions: past the tiny Llama 3 checkpoint's original context of 64. Phi-4-mini's default context is its
original 64 (LongRoPE's short factors hold there; LONG past it). Gemma 3's: 40, five times its sliding window."""
LONG = 96
"""The context of Phi-4-mini's second fp32 bundle (`export --context`): past its original 64, so its long factors."""


@pytest.fixture(scope="module", params=["llama3", "qwen3", "phi4", "gemma3"])
def exported(request, code_data, tmp_path_factory):
    """(architecture, trained run, {quant: bundle}): fp32 and int8 for each (7 s more a architecture), and for
    Phi-4-mini "long": fp32 at a context of LONG, past the original."""
    root = tmp_path_factory.mktemp(request.param)
    save_tiny_hf_checkpoint(root / "checkpoint", request.param)
    backbone = load_backbone(str(root / "checkpoint"))
    train_expert(backbone, "code", code_data, root / "code", LAYOUTS.get(request.param, LAYOUT), TRAIN)
    quants = ("fp32", "int8")
    bundles = {}
    for quant in quants:
        bundles[quant] = root / quant
        export_bundle(root / "code", bundles[quant], ExportConfig(formats=("onnx",), quant=quant))
    if request.param == "phi4":
        bundles["long"] = root / "long"
        export_bundle(root / "code", bundles["long"], ExportConfig(formats=("onnx",), quant="fp32", context=LONG))
    return request.param, root / "code", bundles


def pytorch_logits(model, ids: list[int], steps: list[int]) -> np.ndarray:
    """The PyTorch model's last-position logits after the prompt, then after each of `steps`, (1 + len, V)."""
    cache, out = KVCache(), []
    with torch.no_grad():
        out.append(model(torch.tensor([ids]), cache)[0, -1])
        for token in steps:
            out.append(model(torch.tensor([[token]]), cache)[0, -1])
    return torch.stack(out).numpy()


def check_runs_as_pytorch(bundle, model, prompt: list[int]) -> list[int]:
    """The fp32 `bundle` with its code expert generates `model`'s 12 greedy tokens after `prompt`, with its logits
    at each step within 1e-4; returns the tokens."""
    engine = Engine(bundle)
    engine.load_expert("code")
    want = greedy(model, prompt, 12)
    assert list(generate(engine, prompt, 12)) == want
    cache = engine.new_cache(len(prompt) + 12)
    got = [engine.forward(np.array([prompt], dtype=np.int64), cache, last_only=True)[0, -1]]
    got += [engine.forward(np.array([[t]], dtype=np.int64), cache)[0, -1] for t in want[:-1]]
    np.testing.assert_allclose(np.stack(got), pytorch_logits(model, prompt, want[:-1]), atol=1e-4, rtol=0)
    return want


def test_exported_architecture_runs_as_pytorch(exported):
    arch, run, bundles = exported
    _, model, _ = load_model(run, None)
    manifest_decoder = Engine(bundles["fp32"]).manifest["base"]["decoder"]
    assert ("rope_scaling" in manifest_decoder) == (arch != "qwen3") and manifest_decoder.get("qk_norm") == (
        arch in ("qwen3", "gemma3") or None)  # fmt: skip
    assert manifest_decoder.get("sliding_window") == (8 if arch == "gemma3" else None)
    assert manifest_decoder.get("rotary_dim") == (48 if arch == "phi4" else None)
    prompt = PROMPTS[arch]
    want = check_runs_as_pytorch(bundles["fp32"], model, prompt)
    ref = model(torch.tensor([prompt]))[0].detach().numpy()  # (T, V): every position of the prompt
    for quant in set(bundles) - {"fp32", "long"}:
        engine = Engine(bundles[quant])
        engine.load_expert("code")
        assert list(generate(engine, prompt, 12)) == want, quant
        # greedy continuations of a few-step expert are near constant, so every prompt position's logits are held
        # against PyTorch's too: measured 0.8% (Llama 3), 0.7% (Qwen3, Phi-4) and 1.4% (Gemma 3) relative
        # error, the same argmax everywhere
        quantized = engine.forward(np.array([prompt], dtype=np.int64), engine.new_cache(len(prompt)))[0]
        spread = np.linalg.norm(ref - ref.mean(-1, keepdims=True))
        assert np.linalg.norm(quantized - ref) / spread < 0.05, quant
        assert (quantized.argmax(-1) == ref.argmax(-1)).mean() >= 0.95, quant
    if "long" in bundles:
        check_long_context(run, bundles)


def check_long_context(run, bundles: dict) -> None:
    """Phi-4-mini exported with --context 96 (past its original 64): the manifest holds the long factors and that
    context, and the runtime computes the logits and greedy tokens of the PyTorch model built for the same context
    over 80 prompt positions, past the original."""
    from mode_edge.packs import describe

    assert (describe(bundles["long"])["context"], describe(bundles["fp32"])["context"]) == (
        "96 tokens (LongRoPE's long factors)", "64 tokens (LongRoPE's short factors)")  # (what `inspect` says)
    decoder = Engine(bundles["long"]).manifest["base"]["decoder"]
    assert (decoder["max_seq_len"], sorted(decoder["rope_scaling"])) == (LONG, ["attention_factor", "long_factor",
                                                                               "rope_type"])  # fmt: skip
    _, model, _ = load_model(run, None, LONG)
    prompt = list(range(3, 83))
    check_runs_as_pytorch(bundles["long"], model, prompt)
    _, short, _ = load_model(run, None)  # the short factors' model: other logits, so the factor set is tested
    assert np.abs(pytorch_logits(short, prompt[:60], []) - pytorch_logits(model, prompt[:60], [])).max() > 1e-3


def test_native_runtime_takes_the_architecture(native, exported, tmp_path):
    """Native logits equal the Python runtime's: for Llama 3, its own rotary tables are scaled as mode_edge/rope.py,
    from the Llama 3 parameters and from the divisors a GGUF gives (`check_frequency_factors`)."""
    from mode_edge.runtimes.session import Session
    from tests.runtimes.test_native import python_logits, run_native

    arch, _, bundles = exported
    for bundle, prompt in [(bundles["fp32"], PROMPTS[arch])] + ([(bundles["long"], list(range(3, 83)))] if "long" in
                                                                bundles else []):  # fmt: skip
        session = Session(bundle)
        code, tokens, err, _ = run_native(native, bundle, prompt, "--experts", "code", "--max-new-tokens", "8",
                                          "--logits", str(tmp_path / "logits.bin"))  # fmt: skip
        assert code == 0 and tokens == list(session.generate(prompt, ["code"], 8)), err
        got = np.fromfile(tmp_path / "logits.bin", dtype=np.float32).reshape(len(tokens), -1)
        np.testing.assert_allclose(got, python_logits(session, prompt, ["code"], tokens), atol=1e-5, rtol=0)
    if arch == "llama3":
        check_frequency_factors(native, bundles, tmp_path)


def check_frequency_factors(native, bundles: dict, tmp_path) -> None:
    """A GGUF's rotary divisors (rope_scaling "frequency_factors", training/backbones.gguf_rope) in place of the
    Llama 3 parameters they stand for: the Python and native runtimes compute the logits they computed before."""
    import json
    import shutil

    from mode_edge.rope import inv_freq
    from mode_edge.runtimes.session import Session
    from tests.runtimes.test_native import python_logits, run_native

    arch = "llama3"
    bundle = shutil.copytree(bundles["fp32"], tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    decoder = manifest["base"]["decoder"]
    divisors = inv_freq(decoder["rope_theta"], decoder["head_dim"]) / inv_freq(
        decoder["rope_theta"], decoder["head_dim"], decoder["rope_scaling"])  # fmt: skip
    assert 1.0 < divisors.max() and not np.allclose(divisors, divisors[0])  # scaled, and not all alike
    decoder["rope_scaling"] = {"rope_type": "frequency_factors", "factors": divisors.tolist()}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    prompt = PROMPTS[arch]
    want_session = Session(bundles["fp32"])
    want_tokens = list(want_session.generate(prompt, ["code"], 8))
    want = python_logits(want_session, prompt, ["code"], want_tokens)
    np.testing.assert_allclose(python_logits(Session(bundle), prompt, ["code"], want_tokens), want, atol=1e-5, rtol=0)
    code, tokens, err, _ = run_native(native, bundle, prompt, "--experts", "code", "--max-new-tokens", "8",
                                      "--logits", str(tmp_path / "logits.bin"))  # fmt: skip
    assert code == 0 and tokens == want_tokens, err
    got = np.fromfile(tmp_path / "logits.bin", dtype=np.float32).reshape(len(tokens), -1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)



def test_a_sliding_window_bundle_needs_an_onnxruntime_that_counts_the_window_as_exported(exported, monkeypatch):
    """onnxruntime before 1.24 attends to one key more in a sliding layer (PR #25927): such a runtime is refused in
    one line for a bundle with sliding layers, and only for one."""
    import onnxruntime

    from mode_edge.errors import UserError

    arch, _, bundles = exported
    monkeypatch.setattr(onnxruntime, "__version__", "1.23.2")
    if arch != "gemma3":
        Engine(bundles["fp32"])  # no sliding layers: any supported onnxruntime
        return
    with pytest.raises(UserError, match=r"sliding-window layers, whose window onnxruntime 1.23.2 counts one key"):
        Engine(bundles["fp32"])
