"""What a search leaves users to read: the per-budget answer table and the Pareto plot.

Pure functions of results (no Ray, no MLflow): the command prints the table, logs the plot as an artifact and puts
the table in the MLflow run's description.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["answer_table", "pareto_plot"]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
