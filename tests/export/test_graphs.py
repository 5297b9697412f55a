"""The export-only rewrite (explicit KV tensors, one causal mask) against the training model it was cut from."""

import pytest
import torch
from torch.testing import assert_close

from mode_edge.config import MoDELayout
from mode_edge.export.graphs import graph_layers, rotary_tables, split
from mode_edge.runtimes.engine import mix
from mode_edge.training.model import Expert, KVCache, MoDEModel


def run_split(graphs, n_blocks, experts, ids, cache, capacity=None):
    """Drive the split graphs in PyTorch the way the runtime does, with the mix in numpy. capacity None: "concat"
    graphs; else "buffer" graphs over buffers of that many positions, which start as noise (a graph must read only
    the positions it was given). cache: component -> k/v tensors, and "pos"."""
    P, T = cache.get("pos", 0), ids.shape[1]
    positions = ()
    if capacity is not None:
        # (Gemma 3's: the sliding layers' pair too)
        tables = [t for f, s in graphs["base/block0"].pairs() for t in rotary_tables(f, capacity, s)]
        positions = (torch.tensor([P + T - 1], dtype=torch.int32), torch.tensor(P + T, dtype=torch.int32), *tables)
    h = graphs["base/embed"](ids)
    for i in range(n_blocks):
        comps = [f"base/block{i}"] + [f"experts/{n}/block{i}" for n in experts]
        ys, logits = [], [torch.zeros(h.shape[:2])]
        for comp in comps:
            fresh = [torch.randn(1, 2, capacity or 0, 16) for _ in range(2 * graph_layers(graphs[comp]))]
            past = cache.get(comp) or fresh
            out = graphs[comp](h, *positions, *past)
            n = 2 if comp.startswith("experts/") else 1
            ys.append(out[0])
            logits += list(out[1:n])
            cache[comp] = list(out[n:])
        h = torch.from_numpy(mix([y.numpy() for y in ys], [g.numpy() for g in logits]))
    cache["pos"] = P + T
    return graphs["base/head"](h)


CAPACITY = {"concat": None, "buffer": 16}


@pytest.mark.parametrize("kv_cache", ["buffer", "concat"])
@torch.no_grad()
def test_split_graphs_match_the_model_over_prefill_and_decode(tiny, kv_cache):
    layout = MoDELayout(n_blocks=3, expert_layers=2, init="random", gate_bias=0.5)
    experts = {n: Expert.init_from(tiny.decoder, layout, seed=s) for s, n in enumerate(["a", "b"])}
    for e in experts.values():
        for blk in e.blocks:
            blk.gate.weight.normal_()  # non-trivial, token-dependent gate weights
    model = MoDEModel(tiny.decoder, layout, experts).eval()
    graphs = split(model, kv_cache)
    assert sorted(graphs) == sorted(
        ["base/embed", "base/head"] + [f"base/block{i}" for i in range(3)]
        + [f"experts/{n}/block{i}" for n in "ab" for i in range(3)]
    )  # fmt: skip
    ids = torch.randint(0, 256, (1, 12))
    ref_cache, cache = KVCache(), {}
    for chunk in (ids[:, :7], ids[:, 7:8], ids[:, 8:11], ids[:, 11:]):  # prefill, decode, a chunk, decode
        ref = model(chunk, ref_cache)
        got = run_split(graphs, 3, ["a", "b"], chunk, cache, CAPACITY[kv_cache])
        assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_cache", ["buffer", "concat"])
@torch.no_grad()
def test_gemma3_split_graphs_match_the_model_past_the_sliding_window(tmp_path, kv_cache):
    """Gemma 3's layers in both cache interfaces' graphs (the PyTorch references of GroupQueryAttention with
    local_window_size and of the .pte graphs' masks): 40 positions, five windows of 8, with copied expert layers of
    both kinds."""
    from mode_edge.training.backbones import decoder_from_hf
    from tests.conftest import save_tiny_hf_checkpoint

    decoder = decoder_from_hf(save_tiny_hf_checkpoint(tmp_path / "gemma3", "gemma3")).eval()
    layout = MoDELayout(n_blocks=3, expert_layers=2, gate_bias=0.5)
    experts = {"a": Expert.init_from(decoder, layout)}
    for blk in experts["a"].blocks:
        blk.gate.weight.normal_()
    model = MoDEModel(decoder, layout, experts).eval()
    graphs = split(model, kv_cache)
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(0))
    ref_cache, cache = KVCache(), {}
    for chunk in (ids[:, :20], ids[:, 20:21], ids[:, 21:30], ids[:, 30:]):
        ref = model(chunk, ref_cache)
        got = run_split(graphs, 3, ["a"], chunk, cache, 48 if kv_cache == "buffer" else None)
        assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_cache", ["buffer", "concat"])
@torch.no_grad()
def test_backbone_only_split_is_the_backbone(tiny, kv_cache):
    model = MoDEModel(tiny.decoder, MoDELayout()).eval()
    graphs = split(model, kv_cache)
    ids = torch.randint(0, 256, (1, 9))
    got = run_split(graphs, 3, [], ids, {}, CAPACITY[kv_cache])
    assert_close(got, tiny.decoder(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_cache", ["buffer", "concat"])
@torch.no_grad()
def test_fused_graph_is_the_composed_model_with_an_explicit_cache(tiny, kv_cache):
    from mode_edge.export.graphs import FusedGraph

    layout = MoDELayout(n_blocks=3, expert_layers=2, init="random", gate_bias=0.5)
    experts = {n: Expert.init_from(tiny.decoder, layout, seed=s) for s, n in enumerate(["a", "b"])}
    model = MoDEModel(tiny.decoder, layout, experts).eval()
    fused = FusedGraph(model, kv_cache)
    assert graph_layers(fused) == 6 + 2 * 3 * 2
    ids = torch.randint(0, 256, (1, 10))
    capacity = CAPACITY[kv_cache] or 0
    past = [torch.zeros(1, 2, capacity, 16)] * (2 * graph_layers(fused))
    inv_freq, scale = fused.pairs()[0]
    cos, sin = rotary_tables(inv_freq, capacity, scale)
    ref_cache, pos = KVCache(), 0
    for chunk in (ids[:, :7], ids[:, 7:8], ids[:, 8:]):
        total = pos + chunk.shape[1]
        positions = () if kv_cache == "concat" else (
            torch.tensor([total - 1], dtype=torch.int32), torch.tensor(total, dtype=torch.int32), cos, sin)
        out = fused(chunk, *positions, *past)
        past, pos = list(out[1:]), total
        assert_close(out[0], model(chunk, ref_cache), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_8bit_embed_graph_keeps_the_embedding_scale(tmp_path):
    """The .pte's 8-bit embed graph (export/executorch_graphs.Int8EmbedGraph) replaces the whole embed graph, so it
    must scale the rows as Gemma's does: its output equals the fp32 graph's within the 8-bit table's rounding."""
    import executorch.exir  # noqa: F401  (defines quantized_decomposed.embedding_byte, as the .pte export has)

    from mode_edge.export.executorch_graphs import Int8EmbedGraph
    from mode_edge.export.graphs import EmbedGraph
    from mode_edge.training.backbones import decoder_from_hf
    from tests.conftest import save_tiny_hf_checkpoint

    decoder = decoder_from_hf(save_tiny_hf_checkpoint(tmp_path / "gemma3", "gemma3")).eval()
    fp32 = EmbedGraph(decoder)
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(0))
    want = fp32(ids)
    assert fp32.scale == 8.0 and torch.allclose(want, decoder.embed_tokens(ids) * 8.0)  # sqrt(64)
    got = Int8EmbedGraph(fp32)(ids)
    assert_close(got, want, atol=8.0 * decoder.embed_tokens.weight.abs().max().item() / 127, rtol=0)


def test_pte_block_graphs_keep_norms_and_attention_inside_xnnpack(tiny):
    """The .pte ("concat") block graph lowered: the RMS norms' means (`pooled_rms_norm`) and the attention's mask
    (`additive_mask`, made once a graph; no SDPA row guards) run inside XNNPACK; what stays outside is the cache's
    concatenation and reshapes. An ExecuTorch upgrade that undid this would show here before in a benchmark."""
    from mode_edge.export.executorch_graphs import lower
    from mode_edge.export.graphs import example_inputs

    graph = split(MoDEModel(tiny.decoder, MoDELayout(n_blocks=2, expert_layers=2)), "concat")["base/block0"]
    program = lower(graph.eval(), example_inputs(graph, tiny.decoder.cfg, tokens=3, past=4))
    outside = [str(n.target) for n in program.exported_program().graph.nodes
               if n.op == "call_function" and "executorch_call_delegate" not in str(n.target)]  # fmt: skip
    assert not [op for op in outside if any(k in op for k in ("mean", "logical_not", "any", "softmax"))], outside
    assert sum("where" in op for op in outside) == 1, outside  # the mask, once for the graph's layers
