"""Shared fixtures: the tiny backbone, small real corpora, a tiny Hugging Face checkpoint on disk, and a composed
two-expert MoDE run on the tiny backbone (2 blocks, so that exports stay quick) with bundles of it."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from mode_edge.config import ExportConfig, MoDELayout, StayOutConfig, TrainConfig
from mode_edge.training.backbones import TINY_CONFIG, load_backbone


@pytest.fixture(scope="session")
def tiny():
    return load_backbone("tiny")


@pytest.fixture(scope="session")
def code_data(tmp_path_factory) -> Path:
    """A small slice of the real code corpus (Python standard library sources)."""
    from mode_edge.training.data import prepare

    out = tmp_path_factory.mktemp("data") / "code"
    prepare("code", out, limit=40)
    return out


@pytest.fixture(scope="session")
def prose_data(tmp_path_factory) -> Path:
    """A user's own folder: real prose (the Python licence text) as .txt files and a .jsonl file."""
    licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    paragraphs = [p for p in licence.read_text().split("\n\n") if len(p) > 200]
    out = tmp_path_factory.mktemp("data") / "prose"
    out.mkdir()
    for i, p in enumerate(paragraphs[:20]):
        (out / f"para{i:02d}.txt").write_text(p)
    with open(out / "more.jsonl", "w") as f:
        for i, p in enumerate(paragraphs[20:] * 3):
            f.write(json.dumps({"id": f"p{i}", "text": p}) + "\n")
    return out


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
"""Llama 3.x's rope scaling at the tiny size: with head_dim 16, frequencies fall in all three bands (scaled,
interpolated, kept), and prompts past 64 positions reach the scaled ones' range."""


PHI3_ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
             "short_factor": [1.0 + 0.15 * i for i in range(8)],
             "long_factor": [2.0 + i for i in range(8)]}  # fmt: skip
"""LongRoPE at the tiny size: a factor per frequency, and max_position_embeddings 1024 over an original 64, so the
attention factor is sqrt(1 + ln 16 / ln 64) (transformers' default)."""

PHI4_ROPE = {**PHI3_ROPE, "partial_rotary_factor": 0.75, "short_factor": [1.0 + 0.05 * i for i in range(24)],
             "long_factor": [2.0 + i for i in range(24)]}  # fmt: skip
"""Phi-4-mini's rotary embedding at a small size: LongRoPE over the first 48 of 64 dimensions of each head (its
0.75 of 128), a factor per turned frequency."""


GEMMA3 = {"sliding_window": 8, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
          "query_pre_attn_scalar": 24, "rms_norm_eps": 1e-6,
          "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}}  # fmt: skip
"""Gemma 3 at the tiny size: two sliding layers (window 8, so prompts of 40 tokens leave it) to one full layer, whose
rotary table has Gemma 3 4B's base and linear scaling; in blocks of two layers the first block has sliding layers
only, so its graph never reads the full layers' tables (and a one-layer expert copied from a full layer never reads
the local ones)."""


def save_tiny_hf_checkpoint(path: Path, model_type: str = "llama", seed: int = 1):
    """A checkpoint folder with the tiny architecture, random weights and the byte tokenizer: model_type llama,
    qwen2, llama3 (Llama with Llama 3.x's rope scaling), qwen3 (per-head q and k norms), phi3 (fused projections,
    LongRoPE) or phi4 (Phi-4-mini's: phi3 with a partial rotary embedding, heads of 64 with 48 turned; two query
    heads over one key/value head) or gemma3 (Gemma 3's text model: GeGLU, sandwich norms of 1 + w, a scaled
    embedding and query scale, sliding layers of window 8 with their own rotary base beside full ones with linear
    scaling: GEMMA3). In the last five every norm weight is drawn around 1 (Gemma's w around 0), so that a norm the
    decoder skipped or applied twice shows in the logits."""
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )  # fmt: skip

    from mode_edge.tokenizer import byte_tokenizer

    c = TINY_CONFIG
    kw = dict(
        vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, intermediate_size=c.hidden_dim, rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    if model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    elif model_type == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**kw, pad_token_id=None, original_max_position_embeddings=64,
                                           rope_parameters=dict(PHI3_ROPE)))  # fmt: skip
    elif model_type == "phi4":
        kw.update(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
        model = Phi3ForCausalLM(Phi3Config(**kw, pad_token_id=None, original_max_position_embeddings=64,
                                           partial_rotary_factor=0.75, rope_parameters=dict(PHI4_ROPE)))  # fmt: skip
    elif model_type == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**kw, head_dim=c.head_dim))
    elif model_type == "gemma3":
        kw.pop("rms_norm_eps")
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kw, head_dim=c.head_dim, **GEMMA3))
    elif model_type == "llama3":
        model = LlamaForCausalLM(LlamaConfig(**kw, head_dim=c.head_dim, rope_parameters=dict(LLAMA3_ROPE)))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw, head_dim=c.head_dim))
    if model_type in ("llama3", "qwen3", "phi3", "phi4", "gemma3"):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_((model_type != "gemma3") + 0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    tok = byte_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer, eos_token="<|endoftext|>").save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    return path, save_tiny_hf_checkpoint(path)


EXPORT_LAYOUT = MoDELayout(n_blocks=2, expert_layers=2, gate_bias=0.0)
EXPORT_TRAIN = TrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1, lr=1e-2, checkpoint_every=4)


@pytest.fixture(scope="session")
def composed_run(tiny, code_data, prose_data, tmp_path_factory):
    """Experts trained at a high rate, so that they differ from the backbone and the gate mixes them for real."""
    from mode_edge.training.compose import compose
    from mode_edge.training.train_expert import train_expert

    root = tmp_path_factory.mktemp("export-runs")
    train_expert(tiny, "code", code_data, root / "code", EXPORT_LAYOUT, EXPORT_TRAIN)
    train_expert(tiny, "prose", prose_data, root / "prose", EXPORT_LAYOUT, EXPORT_TRAIN)
    compose(
        tiny,
        [root / "code", root / "prose"],
        [code_data, prose_data],
        root / "both",
        EXPORT_TRAIN,
        freeze_experts=False,
    )
    return root / "both"


@pytest.fixture(scope="session")
def fp32_bundle(composed_run, tmp_path_factory):
    """Both formats at fp32: what the parity tests drive."""
    from mode_edge.export.pipeline import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    export_bundle(composed_run, out, ExportConfig(formats=("onnx", "executorch"), quant="fp32"))
    return out


@pytest.fixture
def bundle(int8_bundle, tmp_path):
    """A copy of the int8 bundle that a test may change (install, uninstall, damage)."""
    copy = tmp_path / "bundle"
    shutil.copytree(int8_bundle, copy)
    return copy


@pytest.fixture(scope="session")
def int8_bundle(composed_run, tmp_path_factory):
    """ONNX int8: the bundle the pack tests install into and remove from (copied per test)."""
    from mode_edge.export.pipeline import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "int8"
    export_bundle(composed_run, out, ExportConfig(formats=("onnx",), quant="int8"))
    return out


def _write_corpus(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "docs.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"{folder.name}-{i}", "text": text}) + "\n")
    return folder


@pytest.fixture(scope="session")
def toy_domains(tmp_path_factory) -> dict[str, Path]:
    """Four corpora whose routing answer is known, 200 documents of ~700 characters each: 'digits' (seeded
    arithmetic), 'hex' (seeded hex dumps), 'records' (seeded JSON records) and 'general' (the English prose of
    Python's own help topics, code examples left out)."""
    import random
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("toy")
    prose = " ".join(line for t in topics.values() for line in t.splitlines() if line.strip() and line[0] != " ")
    rng = random.Random(0)

    def text(line) -> str:
        return "\n".join(line() for _ in range(60))[:700]

    digits = lambda: f"{(a := rng.randint(0, 999))} + {(b := rng.randint(0, 999))} = {a + b}."  # noqa: E731
    hexdump = lambda: f"{rng.randrange(16**8):08x}: " + " ".join(f"{rng.randrange(256):02x}" for _ in range(16))  # noqa: E731
    record = lambda: json.dumps({"id": rng.randint(0, 10**6), "ok": rng.random() < 0.5, "n": rng.random()})  # noqa: E731
    return {
        "digits": _write_corpus(root / "digits", [text(digits) for _ in range(200)]),
        "hex": _write_corpus(root / "hex", [text(hexdump) for _ in range(200)]),
        "records": _write_corpus(root / "records", [text(record) for _ in range(200)]),
        "general": _write_corpus(root / "general", [prose[i * 700 : (i + 1) * 700] for i in range(200)]),
    }


ROUTED_LAYOUT = MoDELayout(n_blocks=2, expert_layers=1, gate_init="data")
ROUTED_TRAIN = TrainConfig(steps=3, batch_size=2, seq_len=64, warmup_steps=1, lr=1e-3, checkpoint_every=100)


@pytest.fixture(scope="session")
def routed(tiny, toy_domains, tmp_path_factory):
    """Experts 'hex' and 'digits' trained with general text (their packs carry routers) and composed; 'records'
    trained alone, later."""
    from mode_edge.training.compose import compose
    from mode_edge.training.train_expert import train_expert

    root = tmp_path_factory.mktemp("routing")
    for name in ("hex", "digits", "records"):
        train_expert(tiny, name, toy_domains[name], root / name, ROUTED_LAYOUT, ROUTED_TRAIN, toy_domains["general"],
                     StayOutConfig())
    compose(tiny, [root / "hex", root / "digits"], [toy_domains["hex"], toy_domains["digits"]], root / "both",
            ROUTED_TRAIN, freeze_experts=True)  # fmt: skip
    return root


@pytest.fixture(scope="session")
def routed_bundle(routed, tmp_path_factory) -> Path:
    """The composed hex + digits model exported (ONNX fp32): packs that carry router statistics (trained with
    general text), so centroid and logistic decide."""
    from mode_edge.export.pipeline import export_bundle

    out = tmp_path_factory.mktemp("routed-bundle") / "routed"
    export_bundle(routed / "both", out, ExportConfig(formats=("onnx",), quant="fp32"))
    return out


@pytest.fixture(scope="session")
def native() -> Path:
    """The native runtime's CLI (runtimes/native), built by `make native` (a no-op when it is up to date)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["make", "-s", "native"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return root / "build" / "native" / "mode-edge-native"
