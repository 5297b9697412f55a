"""Experts that stay out of general text: the stay-out penalties, data gate initialisation and the row mix."""

import pytest
import torch
import torch.nn.functional as F

from mode_edge.config import MoDELayout, StayOutConfig, TrainConfig
from mode_edge.training.data import TokenStream, held_out, load_corpus
from mode_edge.training.model import Expert, MoDEModel, run_layers
from mode_edge.training.runs import load_run_experts
from mode_edge.training.stay_out import data_gate_init, mixed_rows
from mode_edge.training.train_expert import train_expert

LAYOUT = MoDELayout(n_blocks=2, expert_layers=1)
CFG = TrainConfig(steps=20, batch_size=4, seq_len=64, warmup_steps=1, lr=3e-3, checkpoint_every=100)
TOLERANCE = 0.05
"""Mean KL divergence (nats per token) from the backbone on held-out general text that a stay-out expert may keep;
a plain expert trained the same way measures 0.2 here."""


@torch.no_grad()
def kl_from_backbone(tiny, run, corpus) -> float:
    """Mean per-token KL(model || backbone) over held-out windows of a corpus."""
    e = load_run_experts(run, tiny)[0]
    model = MoDEModel(tiny.decoder, e.layout, {e.name: e.expert}).eval()
    w = held_out(load_corpus(corpus).docs["test"], tiny.tokenizer, 64, 1024).windows[:, :-1]
    log_p, log_q = F.log_softmax(model(w), -1).flatten(0, 1), F.log_softmax(tiny.decoder(w), -1).flatten(0, 1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").item()


@pytest.fixture(scope="module")
def plain_run(tiny, toy_domains, tmp_path_factory):
    out = tmp_path_factory.mktemp("stay-out") / "plain"
    train_expert(tiny, "hex", toy_domains["hex"], out, LAYOUT, CFG)
    return out


@pytest.mark.parametrize("penalty", ["kl", "delta"])
def test_stay_out_expert_leaves_general_text_to_the_backbone(tiny, toy_domains, plain_run, tmp_path, penalty):
    out = tmp_path / penalty
    layout = MoDELayout(n_blocks=2, expert_layers=1, gate_init="data")
    train_expert(tiny, "hex", toy_domains["hex"], out, layout, CFG, toy_domains["general"],
                 StayOutConfig(weight=10.0, penalty=penalty))  # fmt: skip
    plain = kl_from_backbone(tiny, plain_run, toy_domains["general"])
    stay_out = kl_from_backbone(tiny, out, toy_domains["general"])
    assert plain > 2 * TOLERANCE  # without general rows the expert changes general text: the check can fail
    assert stay_out < TOLERANCE
    assert kl_from_backbone(tiny, out, toy_domains["hex"]) > 2 * stay_out  # it still acts on its own domain


def test_data_gate_init_opens_on_the_domain_and_shuts_on_general_text(tiny, toy_domains):
    expert = Expert.init_from(tiny.decoder, LAYOUT)
    domain, general = (load_corpus(toy_domains[d]) for d in ("hex", "general"))

    def stream(corpus, split, seed):
        return TokenStream(corpus.docs[split], tiny.tokenizer, 4, 64, seed=seed)

    data_gate_init(tiny.decoder, LAYOUT, expert, stream(domain, "train", 1), stream(general, "train", 2))
    model = MoDEModel(tiny.decoder, LAYOUT, {"hex": expert})
    opened = {}
    for name, corpus in (("hex", domain), ("general", general)):  # measured on held-out text, before any step
        x = tiny.decoder.embed_tokens(held_out(corpus.docs["validation"], tiny.tokenizer, 64, 512).windows)
        weights = []
        for block in model.blocks:  # each gate reads the backbone's block input, as at initialisation
            weights.append(block.gate_weights(x)[..., 1].mean().item())
            x = run_layers(block.backbone, x, tiny.decoder.rope, None, block.backbone_names)
        opened[name] = weights
    for on_domain, on_general in zip(opened["hex"], opened["general"]):
        assert on_domain > on_general and on_general < 0.08  # nearly shut on held-out general text (0.05 on fit)
    assert opened["hex"][-1] > 2 * opened["general"][-1]  # the deeper block tells the domains apart clearly
    zero = Expert.init_from(tiny.decoder, LAYOUT)  # the zero init: the same weight on every token
    assert torch.all(zero.blocks[0].gate.weight == 0)


def test_general_rows_make_up_the_share_evenly(tiny, toy_domains):
    domain, general = (load_corpus(toy_domains[d]).docs["train"] for d in ("hex", "general"))
    streams = TokenStream(domain, tiny.tokenizer, 4, 16, 0), TokenStream(general, tiny.tokenizer, 4, 16, 1)
    rows = mixed_rows(*streams, 0.25)
    flags = [next(rows)[1] for _ in range(10)]
    assert sum(int(f.sum()) for f in flags) == 10  # 40 rows x 0.25
    assert all(int(f.sum()) == 1 for f in flags)  # one per batch of four: spread, not bunched
    tokens, is_general = next(rows)
    assert tokens.shape == (4, 17) and is_general.dtype == torch.bool


def test_stay_out_options_are_checked():
    from mode_edge.errors import UserError

    for bad in (dict(share=0.0), dict(share=1.0), dict(share=float("nan")), dict(weight=-1.0),
                dict(weight=float("inf")), dict(penalty="l2")):  # fmt: skip
        with pytest.raises(UserError):
            StayOutConfig(**bad)
    with pytest.raises(UserError, match="--gate-init"):
        MoDELayout(gate_init="random")


def test_stay_out_options_through_the_cli_need_general_text(toy_domains, tmp_path):
    from tests.cli_runner import refused

    common = ["train", "expert", "--base", "tiny", "--domain", "hex", "--data", toy_domains["hex"], "--steps", 1]
    for option in (["--stay-out", "delta"], ["--general-share", 0.5], ["--stay-out-weight", 3]):
        refused(*common, "--out", tmp_path / "a", *option, message=(option[0], "--general"))
    refused(*common, "--out", tmp_path / "b", "--gate-init", "data", message="--general")
    refused(*common, "--out", tmp_path / "c", "--general", toy_domains["hex"], message="own --data")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_a_batch_of_general_rows_at_weight_zero_still_steps(tiny):
    """No row carries a loss: the step must not fail (the loss keeps its graph) and nothing moves."""
    from mode_edge.training.stay_out import StayOutLoss

    expert = Expert.init_from(tiny.decoder, LAYOUT)
    model = MoDEModel(tiny.decoder, LAYOUT, {"hex": expert})
    for penalty in ("kl", "delta"):
        loss_fn = StayOutLoss(model, StayOutConfig(weight=0.0, penalty=penalty))
        loss = loss_fn(model, (torch.randint(0, 256, (2, 9)), torch.tensor([True, True])))
        loss.backward()
        loss_fn.close()
        assert loss.item() == 0.0 and not loss_fn.hooks
