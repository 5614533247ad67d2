"""Where FLOPs mislead: measured latency against GFLOPs, per device and latency mode.

Rows are dicts with ``subnet``, ``gflops``, ``latency_ms``, ``mode`` (``eager``/``compiled``) and ``hardware``
(e.g. latency-table rows joined with their GFLOPs, for every uniform cell and every trial). Per (hardware,
mode): a markdown table in FLOPs order with the subnets that are slower than a subnet of more FLOPs marked,
Spearman's rank correlation of latency with GFLOPs (1: latency follows FLOPs exactly), and the number of
pairs whose order the two disagree on. One plot shows every mode of every device. Pure functions: the search
logs their output.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LatencyReport",
    "latency_report",
    "spearman",
    "inverted_pairs",
    "plot_latency",
    "PredictionReport",
    "prediction_report",
]

_FIELDS = ("subnet", "gflops", "latency_ms", "mode", "hardware")


def _ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (ties at their mean rank); nan for fewer than 2 points or a constant."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs equally long sequences, got {len(xs)} and {len(ys)}")
    if len(xs) < 2:
        return math.nan
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx > 0 and sy > 0 else math.nan


def inverted_pairs(rows: Sequence[Mapping]) -> list[tuple[str, str]]:
    """Pairs ``(a, b)`` where ``a`` has fewer GFLOPs than ``b`` but a higher latency."""
    out = []
    for a in rows:
        for b in rows:
            if a["gflops"] < b["gflops"] and a["latency_ms"] > b["latency_ms"]:
                out.append((a["subnet"], b["subnet"]))
    return out


@dataclass
class LatencyReport:
    """The report: ``markdown`` text, Spearman's rho and inverted pairs per (hardware, mode), the plot."""

    markdown: str
    spearman: dict[tuple[str, str], float] = field(default_factory=dict)
    inversions: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)
    plot: Path | None = None


def _groups(rows: Sequence[Mapping]) -> dict[tuple[str, str], list[Mapping]]:
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        missing = [f for f in _FIELDS if f not in r]
        if missing:
            raise ValueError(f"latency report row {dict(r)} lacks {missing}")
        groups.setdefault((str(r["hardware"]), str(r["mode"])), []).append(r)
    # One row per subnet and group: the same subnet measured twice (a cell that a trial also drew) counts once.
    return {
        k: sorted({r["subnet"]: r for r in v}.values(), key=lambda r: (r["gflops"], r["subnet"]))
        for k, v in sorted(groups.items())
    }


def latency_report(rows: Sequence[Mapping], plot_path: str | Path | None = None) -> LatencyReport:
    """Markdown tables, rank correlations and (optionally) a plot of latency against GFLOPs.

    Raises:
        ValueError: no rows, or a row without the fields named in the module docstring.
    """
    if not rows:
        raise ValueError("latency report: no rows")
    groups = _groups(rows)
    report = LatencyReport(markdown="")
    lines = ["# Measured latency against FLOPs", ""]
    for (hardware, mode), rs in groups.items():
        rho = spearman([r["gflops"] for r in rs], [r["latency_ms"] for r in rs])
        inv = inverted_pairs(rs)
        report.spearman[(hardware, mode)] = rho
        report.inversions[(hardware, mode)] = inv
        slower = {a for a, _ in inv}
        full = max(rs, key=lambda r: r["gflops"])
        pairs = len(rs) * (len(rs) - 1) // 2
        lines += [
            f"## {hardware} — {mode}",
            "",
            f"Spearman rank correlation of latency with GFLOPs: {rho:.3f}; "
            f"pairs in the wrong order: {len(inv)} of {pairs}",
            "",
            "| subnet | GFLOPs | latency (ms) | FLOPs ratio | latency ratio | slower than a larger subnet |",
            "|---|---|---|---|---|---|",
        ]
        for r in rs:
            lines.append(
                f"| {r['subnet']} | {r['gflops']:.4g} | {r['latency_ms']:.4g} | {r['gflops'] / full['gflops']:.3f} | "
                f"{r['latency_ms'] / full['latency_ms']:.3f} | {'yes' if r['subnet'] in slower else ''} |"
            )
        lines.append("")
    report.markdown = "\n".join(lines)
    if plot_path is not None:
        report.plot = plot_latency(groups, report.spearman, Path(plot_path))
    return report


def plot_latency(
    groups: Mapping[tuple[str, str], Sequence[Mapping]], rhos: Mapping[tuple[str, str], float], path: Path
) -> Path:
    """One panel per device: latency against GFLOPs, one series per mode (eager, compiled), rho in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({hw for hw, _ in groups})
    fig, axes = plt.subplots(1, len(devices), figsize=(5.5 * len(devices), 4.2), squeeze=False)
    style = {"eager": ("o", "tab:orange"), "compiled": ("s", "tab:blue")}
    for ax, hw in zip(axes[0], devices, strict=True):
        for (g_hw, mode), rs in groups.items():
            if g_hw != hw:
                continue
            marker, color = style.get(mode, ("^", "tab:gray"))
            xs, ys = [r["gflops"] for r in rs], [r["latency_ms"] for r in rs]
            ax.plot(xs, ys, marker=marker, color=color, lw=1, ms=5, label=f"{mode} (Spearman {rhos[(hw, mode)]:.2f})")
        ax.set_title(hw if len(hw) < 60 else hw[:57] + "...", fontsize=8)
        ax.set_xlabel("GFLOPs (multiply-adds)")
        ax.set_ylabel("latency (ms, median)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Measured latency against FLOPs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ predicted against measured

_PRED_FIELDS = ("subnet", "predicted_ms", "measured_ms", "mode", "hardware")


@dataclass
class PredictionReport:
    """Predicted against measured latency per (hardware, mode): ``markdown``, and per group Spearman's rho, the
    median and worst relative error, and the share of programs within +-10 %."""

    markdown: str
    spearman: dict[tuple[str, str], float] = field(default_factory=dict)
    median_error: dict[tuple[str, str], float] = field(default_factory=dict)
    worst_error: dict[tuple[str, str], float] = field(default_factory=dict)
    within_10pct: dict[tuple[str, str], float] = field(default_factory=dict)
    plot: Path | None = None


def prediction_report(rows: Sequence[Mapping], plot_path: str | Path | None = None, note: str = "") -> PredictionReport:
    """Markdown tables, error statistics and (optionally) a scatter plot of predicted against measured latency.

    Rows are dicts with the fields ``subnet``, ``predicted_ms``, ``measured_ms``, ``mode`` and ``hardware``.

    Raises:
        ValueError: no rows, or a row without those fields.
    """
    if not rows:
        raise ValueError("prediction report: no rows")
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        missing = [f for f in _PRED_FIELDS if f not in r]
        if missing:
            raise ValueError(f"prediction report row {dict(r)} lacks {missing}")
        groups.setdefault((str(r["hardware"]), str(r["mode"])), []).append(r)
    rep = PredictionReport(markdown="")
    lines = ["# Predicted against measured latency", ""] + ([note, ""] if note else [])
    for key, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["measured_ms"])
        errs = [abs(r["predicted_ms"] / r["measured_ms"] - 1) for r in rs]
        rep.spearman[key] = spearman([r["predicted_ms"] for r in rs], [r["measured_ms"] for r in rs])
        rep.median_error[key] = statistics.median(errs)
        rep.worst_error[key] = max(errs)
        rep.within_10pct[key] = sum(e <= 0.10 for e in errs) / len(errs)
        lines += [
            f"## {key[0]} — {key[1]}",
            "",
            f"{len(rs)} programs: Spearman {rep.spearman[key]:.3f}, median error {100 * rep.median_error[key]:.1f} %, "
            f"worst {100 * rep.worst_error[key]:.1f} %, within ±10 %: {100 * rep.within_10pct[key]:.0f} %",
            "",
            "| subnet | measured (ms) | predicted (ms) | error |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['subnet']} | {r['measured_ms']:.4g} | {r['predicted_ms']:.4g} | "
            f"{100 * (r['predicted_ms'] / r['measured_ms'] - 1):+.1f} % |"
            for r in rs
        ]
        lines.append("")
    rep.markdown = "\n".join(lines)
    if plot_path is not None:
        rep.plot = _plot_prediction(groups, rep.spearman, Path(plot_path))
    return rep


def _plot_prediction(groups: Mapping[tuple[str, str], Sequence[Mapping]], rhos, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = 0.0
    for (hw, mode), rs in sorted(groups.items()):
        xs, ys = [r["measured_ms"] for r in rs], [r["predicted_ms"] for r in rs]
        top = max(top, *xs, *ys)
        ax.scatter(xs, ys, s=22, label=f"{hw[:40]} {mode} (Spearman {rhos[(hw, mode)]:.2f})")
    ax.plot([0, top * 1.05], [0, top * 1.05], color="k", lw=1)
    for f in (0.9, 1.1):
        ax.plot([0, top * 1.05], [0, f * top * 1.05], color="k", lw=0.6, ls=":")
    ax.set_xlabel("measured whole program (ms, median)")
    ax.set_ylabel("predicted from parts (ms)")
    ax.set_title("Predicted against measured latency (dotted: ±10 %)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
