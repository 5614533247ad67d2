"""The serving policy: which rung of the ladder answers a batch (pure functions, no Ray).

A ladder is a list of `Rung` (a subnet with its GFLOPs, held-out top-1 and measured latency per batch size). A
request either names a budget (GFLOPs, a fraction of the full model, or a latency) and gets the most accurate rung
within it, or follows the deployment's SLO: per batch, the most accurate rung whose latency at that batch size
fits the slack left to the batch's oldest request (SuperServe's SlackFit). Under a burst, requests wait, slack
shrinks and the batch steps down the ladder; when the queue drains, slack grows back and so does the rung.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from supervit.flops import Budget

__all__ = ["Rung", "BadRequest", "RequestBudget", "best", "slack_fit", "within_budget", "parse_request_budget"]


@dataclass(frozen=True)
class Rung:
    """One subnet of the ladder: what it costs (``latency_ms``: batch size -> measured milliseconds of its program
    at that batch) and how accurate it is (``top1``: on the held-out search split)."""

    subnet: str
    gflops: float
    top1: float
    latency_ms: Mapping[int, float] = field(default_factory=dict)

    def batch_for(self, n: int) -> int:
        """The program batch that runs ``n`` requests: the smallest measured batch size that holds them (a batch
        is padded up to it), or the largest (the batch then runs in several calls)."""
        sizes = sorted(self.latency_ms)
        return next((b for b in sizes if b >= n), sizes[-1])

    def latency(self, n: int) -> float:
        """Milliseconds to run ``n`` requests at once with this rung's programs."""
        b = self.batch_for(n)
        return math.ceil(n / b) * self.latency_ms[b]


class BadRequest(ValueError):
    """A request the server refuses with a 4xx status: one line, the server keeps serving."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestBudget:
    """A request's own budget: at most ``gflops`` GFLOPs, or at most ``latency_ms`` at batch size 1."""

    gflops: float | None = None
    latency_ms: float | None = None


def best(rungs: Sequence[Rung], n: int = 1) -> Rung:
    """The most accurate rung; ties go to the faster at ``n``, then the cheaper."""
    return max(rungs, key=lambda r: (r.top1, -r.latency(n), -r.gflops))


def slack_fit(ladder: Sequence[Rung], n: int, slack_ms: float) -> Rung:
    """The most accurate rung whose latency for a batch of ``n`` fits ``slack_ms``; when none fits (the oldest
    request is already late), the fastest, which makes it the least late and drains the queue soonest."""
    if not ladder:
        raise ValueError("the ladder is empty")
    fits = [r for r in ladder if r.latency(n) <= slack_ms]
    if fits:
        return best(fits, n)
    return min(ladder, key=lambda r: (r.latency(n), r.gflops))


def within_budget(ladder: Sequence[Rung], budget: RequestBudget) -> Rung:
    """The most accurate rung within a request's budget.

    Raises:
        BadRequest: the budget is below the ladder's smallest rung (the message names it).
    """
    if budget.gflops is not None:
        fits = [r for r in ladder if r.gflops <= budget.gflops * (1 + 1e-9)]
        if not fits:
            low = min(ladder, key=lambda r: r.gflops)
            raise BadRequest(
                f"budget {budget.gflops:.4g} GFLOPs is below the smallest subnet served, {low.subnet} "
                f"({low.gflops:.4g} GFLOPs)"
            )
        return best(fits, 1)
    assert budget.latency_ms is not None
    fits = [r for r in ladder if r.latency(1) <= budget.latency_ms]
    if not fits:
        low = min(ladder, key=lambda r: r.latency(1))
        raise BadRequest(
            f"max_latency_ms {budget.latency_ms:g} is below the fastest subnet served, {low.subnet} "
            f"({low.latency(1):.3g} ms)"
        )
    return best(fits, 1)


def parse_request_budget(query: Mapping[str, str], full_gflops: float) -> RequestBudget | None:
    """A request's budget from its query (``budget=0.5x|450MFLOPs|2.3GFLOPs`` or ``max_latency_ms=…``); None when
    it gives neither (the request then follows the SLO).

    Raises:
        BadRequest: a malformed or non-positive value, an unknown parameter, or both kinds at once.
    """
    unknown = sorted(set(query) - {"budget", "max_latency_ms"})
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}; accepted: budget, max_latency_ms")
    if "budget" in query and "max_latency_ms" in query:
        raise BadRequest("give budget or max_latency_ms, not both")
    if "budget" in query:
        try:
            b = Budget.parse(query["budget"])
        except ValueError:
            raise BadRequest(
                f"cannot parse budget {query['budget']!r}; expected e.g. budget=0.5x, 450MFLOPs or 2.3GFLOPs"
            ) from None
        return RequestBudget(gflops=b.value * full_gflops if b.relative else b.value)
    if "max_latency_ms" in query:
        try:
            ms = float(query["max_latency_ms"])
        except ValueError:
            ms = math.nan
        if not ms > 0 or math.isinf(ms):
            raise BadRequest(
                f"max_latency_ms must be a positive number of milliseconds, got {query['max_latency_ms']!r}"
            )
        return RequestBudget(latency_ms=ms)
    return None
