"""Choosing the answer per budget: the Pareto front and the best feasible subnet."""

import dataclasses

import pytest

from pipeline.search.select import choose, pareto_front
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
