"""Choosing the answer per budget: the Pareto front and the best feasible subnet."""

import dataclasses

import pytest

from pipeline.search.select import choose, pareto_front, pool_within
from pipeline.search.trial import TrialResult
from supervit import SubnetConfig


def test_pareto_front():
    pts = [(90.0, 5.0), (95.0, 6.0), (89.0, 7.0), (95.0, 6.0), (80.0, 1.0)]
    assert pareto_front(pts) == [True, True, False, True, True]


def _result(subnet: str, top1: float, latency: float, gflops: float) -> TrialResult:
    uniform = SubnetConfig.parse(subnet).is_uniform
    return TrialResult(
        subnet=subnet,
        gflops=gflops,
        top1=top1,
        latency_ms=latency,
        latency_p10_ms=latency,
        latency_p90_ms=latency,
        latency_cached=False,
        compile_s=0.0,
        uniform=uniform,
        trial_node="node",
        latency_node="node",
        latency_hardware="cpu",
    )


def test_choose_prefers_accuracy_then_speed_then_flops_within_the_latency_budget():
    rs = [
        _result("g8_k0.5", 95.0, 3.0, 0.008),
        _result("g8_k0.9-0.7-0.5", 96.0, 4.0, 0.009),
        _result("g6_k1", 96.0, 3.5, 0.008),
        _result("g4_k0.7", 93.0, 1.0, 0.003),
    ]
    c = choose(rs)
    assert c.best.subnet == "g6_k1"  # 96 %, the faster of the two
    assert c.uniform.subnet == "g6_k1"
    c = choose(rs, latency_budget=3.2)
    assert c.best.subnet == "g8_k0.5" and c.uniform.subnet == "g8_k0.5"
    tie = [dataclasses.replace(rs[2], subnet="g6_k0.7", gflops=0.006), rs[2]]
    assert choose(tie).best.subnet == "g6_k0.7"  # same accuracy and latency: the cheaper
    with pytest.raises(ValueError, match="no evaluated subnet meets the latency budget"):
        choose(rs, latency_budget=0.5)
    with pytest.raises(ValueError, match="no trial finished"):
        choose([])


def test_choice_without_a_uniform_subnet():
    c = choose([_result("g8_k0.9-0.7-0.5", 96.0, 4.0, 0.009)])
    assert c.best.subnet == "g8_k0.9-0.7-0.5" and c.uniform is None


def test_a_budget_chooses_among_every_budgets_trials_within_it():
    small = [_result("g4_k0.5-1-1", 96.7, 0.36, 0.0024), _result("g4_k0.5", 95.0, 0.35, 0.0021)]
    large = [_result("g6_k0.5", 96.1, 0.52, 0.0045), _result("g4_k0.5", 95.0, 0.35, 0.0021)]
    pooled = pool_within([small, large], [0.004, 0.016])
    # The larger budget's own trials come first, then the smaller's within it, each subnet once.
    assert [r.subnet for r in pooled[1]] == ["g6_k0.5", "g4_k0.5", "g4_k0.5-1-1"]
    # The smaller budget gains nothing over it (g6_k0.5 is over 0.004 GFLOPs).
    assert [r.subnet for r in pooled[0]] == ["g4_k0.5-1-1", "g4_k0.5"]
    assert choose(large).best.subnet == "g6_k0.5"  # its own trials alone would answer less accurately
    assert choose(pooled[1]).best.subnet == "g4_k0.5-1-1" == choose(pooled[0]).best.subnet


def _predicted(subnet: str, top1: float, parts_ms: float) -> TrialResult:
    r = _result(subnet, top1, parts_ms, 0.001)
    return dataclasses.replace(r, latency_source="predicted", latency_predicted_ms=parts_ms, latency_parts_ms=parts_ms)


def test_settle_measures_the_answer_and_front_and_moves_on_when_the_latency_budget_fails():
    from pipeline.search.verify import settle
    from supervit import Calibration

    # Predicted (parts sum): g4_k1 is the most accurate and fits 1.0 ms; measured whole it takes 1.4 ms.
    results = [
        _predicted("g4_k1", 95.0, 0.9),
        _predicted("g4_k0.7", 93.0, 0.8),
        _predicted("g4_k0.5-1-1", 93.0, 0.85),  # dominated: never measured
        _predicted("g4_k0.5", 80.0, 0.5),
    ]
    whole = {"g4_k1": 1.4, "g4_k0.7": 0.75, "g4_k0.5": 0.45, "g4_k0.5-1-1": 0.7}
    rounds = []

    def measure(names):
        rounds.append(sorted(names))
        rows = {n: {"median_ms": whole[n], "p10_ms": whole[n], "p90_ms": whole[n], "hardware": "cpu:x"} for n in names}
        return rows, Calibration(1.0, -0.05, 1)

    (settled,), cal = settle([results], 1.0, measure, Calibration())
    assert rounds[0] == ["g4_k0.5", "g4_k0.7", "g4_k1"]  # the front and the choice, in one round
    by = {r.subnet: r for r in settled}
    assert by["g4_k1"].latency_ms == 1.4 and by["g4_k1"].latency_source == "measured"
    assert by["g4_k1"].latency_predicted_ms == pytest.approx(0.85)  # the final calibration, kept beside it
    assert by["g4_k0.5-1-1"].latency_source == "predicted" and by["g4_k0.5-1-1"].latency_ms == pytest.approx(0.8)
    # g4_k1 breaks the budget once measured: the next candidate was measured and is the answer.
    assert choose(settled, 1.0).best.subnet == "g4_k0.7" and cal.offset_ms == -0.05
    assert all(by[n].latency_source == "measured" for n in ("g4_k0.7", "g4_k0.5"))
