"""The comparison's outputs: table.md, table.csv and plots/*.png (accuracy per domain and method, loss curves,
and with --sweep accuracy against trainable parameters)."""

from __future__ import annotations

import csv
from pathlib import Path

DOMAINS = ("code", "math", "math-prose", "english", "general")
AVERAGED = ("code", "math", "english", "general")
"""The avg column: math-prose is a part of math's own test split, so it does not count twice."""
COLUMNS = ["method", "total params", "trainable params", *DOMAINS, "avg", "train s", "peak RSS MB"]


def table_rows(results: list[dict]) -> list[list]:
    """One CSV row per method: parameters, accuracy per domain (and its 95% interval), their mean, cost."""
    rows = []
    for r in results:
        acc = [r["scores"][d]["accuracy"] for d in DOMAINS]
        avg = sum(r["scores"][d]["accuracy"] for d in AVERAGED) / len(AVERAGED)
        peak = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "-"
        rows.append([r["row"], r["total_params"], r["trainable_params"], *acc, avg, r["train_s"], peak])
    return rows


def _cell(score: dict) -> str:
    ci = score.get("accuracy_ci")
    return f"{score['accuracy']:.2f}" + (f" ({ci[0]:.1f}-{ci[1]:.1f})" if ci else "")


def off_domain_lines(results: list[dict]) -> list[str]:
    """Each single expert's change against the backbone on every domain, in points, with a paired 95% interval (the
    same documents resampled for both): what an expert costs where it was not trained."""
    from mode_edge.training.evaluate import paired_ci

    base = next((r for r in results if r["method"] == "backbone"), None)
    rows = [r for r in results if r["method"] in ("mode-expert", "mode-routed", "mode-composed")]
    if base is None or not rows or "per_doc" not in base["scores"][DOMAINS[0]]:
        return []
    lines = ["", "Change against the backbone, points (paired 95% interval over documents):", "",
             "| method | " + " | ".join(DOMAINS) + " |", "|" + "---|" * (len(DOMAINS) + 1)]  # fmt: skip
    for r in rows:
        cells = []
        for d in DOMAINS:
            p = paired_ci(r["scores"][d], base["scores"][d])
            cells.append(f"{p['delta']:+.2f} ({p['ci'][0]:+.1f}, {p['ci'][1]:+.1f})")
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return lines


def write_report(out: Path, results: list[dict], preset_name: str, preset) -> None:
    rows = table_rows(results)
    tokens = preset.budget_steps * preset.batch_size * preset.seq_len
    header = (
        f"Preset `{preset_name}`: every trained method gets {tokens:,} training tokens "
        f"({preset.budget_steps} steps x {preset.batch_size} x {preset.seq_len}; MoDE: {preset.expert_steps} steps "
        f"per expert + {preset.compose_steps} composition steps; -so experts spend a quarter of their rows on general "
        f"text). Peak learning rates {preset.lr}. Next-token accuracy % on up to {preset.eval_tokens:,} held-out "
        f"tokens per domain (at most 512 per document), 95% interval over documents in parentheses; targets code + "
        f"math (math-prose: its human-written part), retention English (KJV, never trained on) and general (State of "
        f"the Union test split); avg over code, math, English, general."
    )
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row, r in zip(rows, results):
        name, total, trainable, *_, avg, train_s, peak = row
        cells = [name, f"{total / 1e6:.1f}M", f"{trainable / 1e6:.2f}M", *(_cell(r["scores"][d]) for d in DOMAINS)]
        lines.append("| " + " | ".join([*cells, f"{avg:.2f}", f"{train_s:.0f}", peak]) + " |")
    lines += off_domain_lines(results)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    plot(out / "plots", results)


def plot(folder: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    domains = DOMAINS
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(results)), 4))
    width = 0.8 / len(domains)
    for i, d in enumerate(domains):
        xs = [j + (i - (len(domains) - 1) / 2) * width for j in range(len(results))]
        ax.bar(xs, [r["scores"][d]["accuracy"] for r in results], width, label=d)
    ax.set_xticks(range(len(results)), [r["row"] for r in results], rotation=30, ha="right")
    ax.set_ylabel("next-token accuracy %")
    low = min(r["scores"][d]["accuracy"] for r in results for d in domains)
    high = max(r["scores"][d]["accuracy"] for r in results for d in domains)
    ax.set_ylim(max(0, low - 5), high + 0.25 * (high - low + 5))
    ax.legend(ncol=len(domains), loc="upper center")
    ax.set_title("held-out accuracy per domain and method")
    fig.tight_layout()
    fig.savefig(folder / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    seen = set()
    for r in results:
        for name, losses in r["history"].items():
            if name not in seen and losses:
                seen.add(name)
                w = max(1, len(losses) // 10)  # a moving average: single batches are noisy
                smooth = [
                    sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1])
                    for i in range(len(losses))
                ]
                ax.plot(range(1, len(losses) + 1), smooth, label=name, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_title("training loss per run")
    if seen:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=120)
    plt.close(fig)

    families = {"MoDE (2 experts)": "mode-composed", "LoRA": "lora"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, method in families.items():
        pts = sorted(
            (r["trainable_params"], (r["scores"]["code"]["accuracy"] + r["scores"]["math"]["accuracy"]) / 2)
            for r in results
            if r["method"] == method and not r["row"].endswith(("frozen", "-so"))
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("target accuracy % (code, math mean)")
    ax.set_title("scaling with trainable parameters")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "scaling.png", dpi=120)
    plt.close(fig)
