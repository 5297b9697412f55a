"""Full fine-tuning and LoRA baselines on the tiny backbone: same loop, same data, real peft adapters."""

import json

import pytest
import torch
from torch.testing import assert_close

from mode_edge.config import TrainConfig
from mode_edge.errors import UserError
from mode_edge.training.backbones import Backbone, tiny_decoder, weights_sha256
from mode_edge.training.baselines import LoraSettings, lora_model, train_full_ft, train_lora
from mode_edge.training.evaluate import build_model, evaluate

CFG = TrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1, lr=1e-3)


def test_full_ft_learns_on_a_copy_and_reloads(tiny, code_data, prose_data, tmp_path):
    before = weights_sha256(tiny.decoder)
    record = train_full_ft(tiny, [code_data, prose_data], tmp_path / "ft", CFG)
    assert weights_sha256(tiny.decoder) == before  # the loaded backbone is never written
    assert record["trainable_parameters"] == sum(p.numel() for p in tiny.decoder.parameters())
    meta = json.loads((tmp_path / "ft/model.json").read_text())
    assert meta["kind"] == "full-ft" and len(meta["history"]["full-ft"]) == 4
    model, names, label = build_model(tiny, tmp_path / "ft", None)
    assert label == "full-ft" and names == []
    assert weights_sha256(model) != before
    idx = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(model(idx), tiny.decoder(idx))


def test_lora_trains_only_adapters(tiny, code_data, prose_data, tmp_path):
    settings = LoraSettings(rank=4, alpha=8)
    fresh = lora_model(tiny, settings)
    idx = torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(fresh(idx), tiny.decoder(idx))  # B starts at zero: the adapter starts as a no-op
    assert (
        fresh.layers[0].self_attn.q_proj.base_layer.weight.data_ptr()
        == tiny.decoder.layers[0].self_attn.q_proj.weight.data_ptr()
    )
    before = weights_sha256(tiny.decoder)
    record = train_lora(tiny, [code_data, prose_data], tmp_path / "lora", CFG, settings)
    assert weights_sha256(tiny.decoder) == before  # shared, frozen, never written
    assert type(tiny.decoder.layers[0].self_attn.q_proj) is torch.nn.Linear  # the backbone's own modules untouched
    per_layer = sum(4 * (m.in_features + m.out_features) for m in tiny.decoder.layers[0].self_attn.children())
    assert record["trainable_parameters"] == per_layer * tiny.decoder.cfg.n_layers
    model, _, label = build_model(tiny, tmp_path / "lora", None)
    assert label == "lora"
    with torch.no_grad():
        assert not torch.allclose(model(idx), tiny.decoder(idx))
    results = evaluate(tiny, model, [code_data], seq_len=32, max_tokens=128)
    assert results["code"]["tokens"] == 128


def test_baseline_errors(tiny, code_data, tmp_path):
    with pytest.raises(UserError, match="--targets qkv unknown"):
        LoraSettings(targets=("qkv",))
    with pytest.raises(UserError, match="--rank must be an integer >= 1"):
        LoraSettings(rank=0)
    train_full_ft(tiny, [code_data], tmp_path / "ft", TrainConfig(steps=1, batch_size=1, seq_len=16, warmup_steps=0))
    with pytest.raises(UserError, match="--experts applies to MoDE runs"):
        build_model(tiny, tmp_path / "ft", ["code"])
    other = Backbone("tiny-seed1", tiny_decoder(seed=1), tiny.tokenizer, weights_sha256(tiny_decoder(seed=1)))
    with pytest.raises(UserError, match="was trained on base 'tiny'"):
        build_model(other, tmp_path / "ft", None)
