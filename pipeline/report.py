"""What users read: the grid x keep-rate accuracy table, the per-budget answer table, and their plots.

Pure functions of results (no Ray, no MLflow): the commands print the tables, log them as artifacts and put
them in the MLflow run's description.
"""

from __future__ import annotations

import math
from pathlib import Path

from supervit import ArchConfig, SubnetConfig

__all__ = ["cells", "accuracy_table", "accuracy_heatmap", "answer_table", "pareto_plot"]


def cells(arch: ArchConfig) -> list[SubnetConfig]:
    """The grid x uniform-keep-rate table (the paper's table), one subnet per cell."""
    return [SubnetConfig(g, (r,) * arch.num_stages) for g in arch.grids for r in arch.keep_rates]


def accuracy_table(arch: ArchConfig, table: dict[str, dict[str, float]]) -> tuple[str, str]:
    """(Markdown, CSV) of validation/test top-1 and FLOPs per cell; ``table`` maps cell name to
    ``{"gflops", "top1", "test_top1"}``."""
    rates = arch.keep_rates
    md = ["| grid \\ keep | " + " | ".join(f"{r:g}" for r in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    csv = ["grid,keep_rate,gflops,top1,test_top1"]
    for g in arch.grids:
        row = []
        for r in rates:
            c = table[SubnetConfig(g, (r,) * arch.num_stages).name]
            row.append(f"{c['top1']:.1f} / {c['test_top1']:.1f} ({c['gflops'] * 1e3:.1f} MFLOPs)")
            csv.append(f"{g},{r:g},{c['gflops']:.6f},{c['top1']:.2f},{c['test_top1']:.2f}")
        md.append(f"| {g} | " + " | ".join(row) + " |")
    header = "Top-1 (%) validation / test, and FLOPs, per token grid and keep rate\n\n"
    return header + "\n".join(md) + "\n", "\n".join(csv) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_heatmap(arch: ArchConfig, table: dict[str, dict[str, float]], path: Path) -> None:
    """The validation top-1 of every cell as a heatmap PNG, with each cell's FLOPs."""
    plt = _pyplot()
    rates = arch.keep_rates
    values = [[table[SubnetConfig(g, (r,) * arch.num_stages).name] for r in rates] for g in arch.grids]
    top = max(c["top1"] for row in values for c in row)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rates), 1.2 + 0.8 * len(arch.grids)))
    im = ax.imshow([[c["top1"] for c in row] for row in values], cmap="viridis", aspect="auto")
    for i, row in enumerate(values):
        for j, c in enumerate(row):
            text = f"{c['top1']:.1f}%\n{c['gflops'] * 1e3:.1f} MFLOPs"
            color = "w" if c["top1"] < top - 5 else "k"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_yticks(range(len(arch.grids)), [str(g) for g in arch.grids])
    ax.set_xlabel("keep rate (every stage)")
    ax.set_ylabel("token grid")
    ax.set_title(f"SuperViT {arch.name}: validation top-1")
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def answer_table(chosen: list[dict]) -> str:
    """Markdown: per budget, the chosen subnet and the best uniform-keep-rate subnet beside it."""
    lines = [
        "| budget | subnet | GFLOPs | search top-1 | test top-1 | latency ms | best uniform | its test top-1 "
        "| its latency ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nan = math.nan
    for c in chosen:
        u = c.get("uniform") or {}
        lines.append(
            f"| {c['budget']} | {c['subnet']} | {c['gflops']:.4f} | {c['top1']:.1f} | {c['test_top1']:.1f} | "
            f"{c['latency_ms']:.3f} | {u.get('subnet', '-')} | {u.get('test_top1', nan):.1f} | "
            f"{u.get('latency_ms', nan):.3f} |"
        )
    return "\n".join(lines) + "\n"


def pareto_plot(
    rows: list[dict],
    chosen: list[dict],
    budgets: list[tuple[str, float]],
    latency_budget: float | None,
    title: str,
    path: Path,
) -> None:
    """Top-1 against latency and against GFLOPs per budget: trials, Pareto front, chosen point, budget lines."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (text, gflops_budget) in enumerate(budgets):
        color = colors[i % len(colors)]
        rs = [r for r in rows if r["budget"] == text]
        ch = next(c for c in chosen if c["budget"] == text)
        for ax, x in zip(axes, ("latency_ms", "gflops"), strict=True):
            ax.scatter(
                [r[x] for r in rs], [r["top1"] for r in rs], s=18, alpha=0.5, color=color, label=f"trials {text}"
            )
            front = sorted((r for r in rs if r["pareto"]), key=lambda r: r[x])
            ax.plot([r[x] for r in front], [r["top1"] for r in front], color=color, lw=1)
            label = f"chosen {text}: {ch['subnet']}"
            ax.scatter([ch[x]], [ch["top1"]], marker="*", s=220, color=color, edgecolor="k", zorder=5, label=label)
        axes[1].axvline(gflops_budget, color=color, ls="--", lw=1)
    if latency_budget is not None:
        axes[0].axvline(latency_budget, color="k", ls=":", lw=1, label="latency budget")
    axes[0].set_xlabel("latency (ms, median)")
    axes[1].set_xlabel("GFLOPs (multiply-adds); dashed: budgets")
    for ax in axes:
        ax.set_ylabel("top-1 on the search split (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
