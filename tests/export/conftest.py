"""A composed two-expert MoDE run on the tiny backbone (2 blocks, so that exports stay quick) and bundles of it."""

from __future__ import annotations

import pytest

from mode_edge.config import ExportConfig, MoDELayout, TrainConfig

LAYOUT = MoDELayout(n_blocks=2, expert_layers=2, gate_bias=0.0)
CFG = TrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1, lr=1e-2, checkpoint_every=4)


@pytest.fixture(scope="session")
def composed_run(tiny, code_data, prose_data, tmp_path_factory):
    """Experts trained at a high rate, so that they differ from the backbone and the gate mixes them for real."""
    from mode_edge.training.compose import compose
    from mode_edge.training.train_expert import train_expert

    root = tmp_path_factory.mktemp("export-runs")
    train_expert(tiny, "code", code_data, root / "code", LAYOUT, CFG)
    train_expert(tiny, "prose", prose_data, root / "prose", LAYOUT, CFG)
    compose(tiny, [root / "code", root / "prose"], [code_data, prose_data], root / "both", CFG, freeze_experts=False)
    return root / "both"


@pytest.fixture(scope="session")
def fp32_bundle(composed_run, tmp_path_factory):
    """Both formats at fp32: what the parity tests drive."""
    from mode_edge.export.pipeline import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    export_bundle(composed_run, out, ExportConfig(formats=("onnx", "executorch"), quant="fp32"))
    return out


@pytest.fixture(scope="session")
def int8_bundle(composed_run, tmp_path_factory):
    """ONNX int8: the bundle the pack tests install into and remove from (copied per test)."""
    from mode_edge.export.pipeline import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "int8"
    export_bundle(composed_run, out, ExportConfig(formats=("onnx",), quant="int8"))
    return out
