"""What a supertraining leaves users to read: the grid x keep-rate accuracy table and its heatmap.

Pure functions of results (no Ray, no MLflow): the command prints the table, logs it as artifacts and puts it in
the MLflow run's description.
"""

from __future__ import annotations

from pathlib import Path

from supervit import ArchConfig, SubnetConfig

__all__ = ["cells", "accuracy_table", "accuracy_heatmap"]


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
