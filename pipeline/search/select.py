"""Choosing the answer: the Pareto front of evaluated subnets and the best one per budget (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .trial import TrialResult

__all__ = ["pareto_front", "Choice", "choose", "pool_within"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (accuracy up, latency down) points no other point dominates."""
    return [
        not any(a2 >= a and l2 <= lat and (a2 > a or l2 < lat) for j, (a2, l2) in enumerate(points) if j != i)
        for i, (a, lat) in enumerate(points)
    ]


@dataclass(frozen=True)
class Choice:
    """A budget's answer, and the best subnet with one keep rate at every stage (the paper's kind) beside it."""

    best: TrialResult
    uniform: TrialResult | None


def choose(results: Sequence[TrialResult], latency_budget: float | None = None) -> Choice:
    """The most accurate evaluated subnet within the latency budget; ties go to the faster, then the cheaper.

    Raises:
        ValueError: no result meets the latency budget (or there is no result).
    """
    feasible = [r for r in results if latency_budget is None or r.latency_ms <= latency_budget]
    if not feasible:
        raise ValueError("no evaluated subnet meets the latency budget" if results else "no trial finished")
    uniform = [r for r in feasible if r.uniform]
    return Choice(max(feasible, key=_rank), max(uniform, key=_rank) if uniform else None)


def pool_within(per_budget: Sequence[Sequence[TrialResult]], values: Sequence[float]) -> list[list[TrialResult]]:
    """Per budget (``values``: its GFLOPs), its own results followed by every other budget's results that fit it,
    one per subnet: a subnet evaluated for one budget is a candidate for every budget it fits, so a larger
    budget's answer is never less accurate than a smaller one's."""
    pooled = []
    for i, (own, value) in enumerate(zip(per_budget, values, strict=True)):
        seen = {r.subnet for r in own}
        extra = []
        for j, results in enumerate(per_budget):
            if j == i:
                continue
            for r in results:
                if r.gflops <= value * (1 + 1e-9) and r.subnet not in seen:
                    seen.add(r.subnet)
                    extra.append(r)
        pooled.append([*own, *extra])
    return pooled


def _rank(r: TrialResult) -> tuple[float, float, float]:
    """Higher is better: top-1, then lower latency, then fewer FLOPs."""
    return (r.top1, -r.latency_ms, -r.gflops)
