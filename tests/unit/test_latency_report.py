"""Latency against FLOPs: tables per device and mode, rank correlation, inverted pairs, the plot."""

import math

import pytest
from scipy.stats import spearmanr

from pipeline.search.latency_report import inverted_pairs, latency_report, spearman

CPU, GPU = "cpu:Xeon x2 torch2.14.1", "cuda:H100 sm9.0 cuda13.0 torch2.14.1"


def _rows():
    # The CPU case: eager at batch 1 ranks g8_k0.5 slower than g8_k1; compiled keeps FLOPs order.
    cells = {"g4_k0.5": 2.07, "g4_k1": 3.57, "g8_k0.5": 8.25, "g8_k1": 16.04}
    eager = {"g4_k0.5": 1.3, "g4_k1": 1.2, "g8_k0.5": 1.5, "g8_k1": 1.3}
    compiled = {"g4_k0.5": 0.7, "g4_k1": 0.8, "g8_k0.5": 1.0, "g8_k1": 1.2}
    rows = []
    for mode, lat in (("eager", eager), ("compiled", compiled)):
        rows += [
            {"subnet": s, "gflops": g / 1e3, "latency_ms": lat[s], "mode": mode, "hardware": CPU}
            for s, g in cells.items()
        ]
    rows += [
        {"subnet": s, "gflops": g / 1e3, "latency_ms": 0.1 + g / 100, "mode": "compiled", "hardware": GPU}
        for s, g in cells.items()
    ]
    return rows


def test_spearman_matches_scipy_with_ties():
    xs, ys = [1, 2, 2, 3, 5, 4], [1.0, 3.0, 2.0, 4.0, 4.0, 9.0]
    assert spearman(xs, ys) == pytest.approx(spearmanr(xs, ys).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1], [2])) and math.isnan(spearman([1, 2], [5, 5]))


def test_report_separates_devices_and_modes(tmp_path):
    report = latency_report(_rows(), tmp_path / "latency_vs_flops.png")
    assert set(report.spearman) == {(CPU, "eager"), (CPU, "compiled"), (GPU, "compiled")}
    assert report.spearman[(CPU, "compiled")] == pytest.approx(1.0)
    assert report.spearman[(CPU, "eager")] < 0.5
    assert ("g8_k0.5", "g8_k1") in report.inversions[(CPU, "eager")]
    assert report.inversions[(CPU, "compiled")] == []
    md = report.markdown
    assert f"## {CPU} — eager" in md and f"## {CPU} — compiled" in md and f"## {GPU} — compiled" in md
    eager_section = md.split(f"## {CPU} — eager")[1].split("## ")[0]
    assert "| g8_k0.5 | 0.00825 | 1.5 |" in eager_section and "| 0.7 |" not in eager_section  # no compiled row
    assert eager_section.index("g4_k0.5") < eager_section.index("g4_k1") < eager_section.index("g8_k1")
    assert "pairs in the wrong order: 2 of 6" in eager_section
    png = (tmp_path / "latency_vs_flops.png").read_bytes()
    assert report.plot == tmp_path / "latency_vs_flops.png" and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bad_rows():
    with pytest.raises(ValueError, match="no rows"):
        latency_report([])
    with pytest.raises(ValueError, match="lacks \\['mode'\\]"):
        latency_report([{"subnet": "g4_k1", "gflops": 1.0, "latency_ms": 1.0, "hardware": CPU}])
    assert inverted_pairs(
        [{"subnet": "a", "gflops": 1, "latency_ms": 2}, {"subnet": "b", "gflops": 2, "latency_ms": 1}]
    ) == [("a", "b")]
