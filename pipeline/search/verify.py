"""Predicted latency, checked: the calibration trials use, and the whole programs measured before answers count.

With ``--latency-mode predicted`` trials read their subnet's latency from its compiled parts. Before the trials,
the calibration is fitted on the whole programs the table already holds for this hardware (a second search starts
calibrated); with a ``--latency-budget`` and fewer than two such programs, the smallest and largest subnets
within the budgets are compiled and measured whole first, so the constraint is checked on calibrated numbers.
After the trials, every budget's answer (and its best uniform subnet) and the Pareto front are compiled and
measured whole; the choice is made again on those numbers, and a candidate whose measured latency breaks the
latency budget gives way to the next, which is measured in turn.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from supervit import Calibration, SubnetConfig, gflops, subnet_parts

from .latency import measured_latency, on_latency_node, part_rows, table_calibration
from .plan import SearchRun
from .select import choose, pareto_front
from .trial import TrialResult

__all__ = ["in_trial_task", "measure_whole", "trial_calibration", "verify_answers", "settle"]


def in_trial_task(s: SearchRun, fn, *args):
    """``fn(ctx, *args)`` in a task with a trial's resources: where trials run (and so the hardware their
    latency was measured on, or the route to the latency resource), not necessarily the driver's node."""
    import ray

    return ray.get(ray.remote(fn).options(**s.resources).remote(s.ctx, *args))


def measure_whole(s: SearchRun, subnets: list[SubnetConfig]) -> dict[str, dict]:
    """Whole compiled programs of ``subnets`` (from the table, or measured), in one task: name -> table row."""
    return in_trial_task(s, _measure_all, sorted(subnets, key=str))


def _measure_all(ctx, subnets: list[SubnetConfig]) -> dict[str, dict]:
    return {sub.name: measured_latency(ctx, sub, "compiled")[0] for sub in subnets}


def trial_calibration(s: SearchRun) -> Calibration | None:
    """The calibration the trials' predictions use (None when trials measure whole programs)."""
    if not s.ctx.latency.predict:
        return None
    cal, points = in_trial_task(s, table_calibration)
    if s.plan.latency_budget is not None and len(points) < 2:
        arch, n = s.plan.model.arch, s.plan.model.num_classes
        top = max(v for _, v in s.plan.budgets)
        feasible = [u.validate(arch) for u in s.plan.space.subnets() if gflops(arch, u, n) <= top]
        ends = {min(feasible, key=lambda u: gflops(arch, u, n)), max(feasible, key=lambda u: gflops(arch, u, n))}
        print(f"calibrating predicted latency on {len(ends)} whole programs ({', '.join(map(str, ends))})", flush=True)
        measure_whole(s, sorted(ends, key=str))
        in_trial_task(s, on_latency_node, part_rows, sorted({p for u in ends for p in subnet_parts(arch, u)}))
        cal, points = in_trial_task(s, table_calibration)
    return cal


def _with_latency(r: TrialResult, row: dict | None, cal: Calibration, parts_ms: float) -> TrialResult:
    """``r`` with its whole program's measured latency (``row``), or its prediction under ``cal``."""
    predicted = cal(parts_ms) if not math.isnan(parts_ms) else r.latency_predicted_ms
    if row is None:
        return dataclasses.replace(r, latency_ms=predicted, latency_predicted_ms=predicted)
    return dataclasses.replace(
        r,
        latency_ms=row["median_ms"],
        latency_p10_ms=row["p10_ms"],
        latency_p90_ms=row["p90_ms"],
        latency_source="measured",
        latency_predicted_ms=predicted,
        latency_hardware=row["hardware"],
        latency_node=row.get("node_id", ""),
    )


def verify_answers(s: SearchRun, per_budget: list[list[TrialResult]]) -> tuple[list[list[TrialResult]], Calibration]:
    """Measure whole, as deployed, what the answers rest on (`settle`), in tasks where trials run; returns every
    budget's results (measured latencies where measured, predictions under the final calibration elsewhere) and
    that calibration."""
    arch = s.plan.model.arch

    def measure(names: set[str]) -> tuple[dict[str, dict], Calibration]:
        rows = measure_whole(s, [SubnetConfig.parse(n).validate(arch) for n in names])
        return rows, in_trial_task(s, table_calibration)[0]

    return settle(per_budget, s.plan.latency_budget, measure, s.ctx.calibration or Calibration())


def settle(
    per_budget: list[list[TrialResult]],
    latency_budget: float | None,
    measure: Callable[[set[str]], tuple[dict[str, dict], Calibration]],
    calibration: Calibration,
) -> tuple[list[list[TrialResult]], Calibration]:
    """Measure until every budget's answer stands on measured numbers.

    Each round: per budget, the Pareto front (top-1 against latency), the choice under ``latency_budget`` and the
    best uniform subnet, on the numbers known so far (measured where measured, else predicted); those not yet
    measured go to ``measure`` (subnet names -> (table rows, the calibration refitted with them)), and the round
    repeats until nothing new is needed. A candidate whose measured latency breaks the budget so gives way to the
    next, which is measured in turn.
    """
    measured: dict[str, dict] = {}
    cal = calibration
    parts = {r.subnet: r.latency_parts_ms for results in per_budget for r in results}

    def current() -> list[list[TrialResult]]:
        return [[_with_latency(r, measured.get(r.subnet), cal, parts[r.subnet]) for r in rs] for rs in per_budget]

    while True:
        need: set[str] = set()
        for rs in current():
            front = pareto_front([(r.top1, r.latency_ms) for r in rs])
            need |= {r.subnet for r, f in zip(rs, front, strict=True) if f}
            try:
                c = choose(rs, latency_budget)
            except ValueError:
                continue  # nothing meets the latency budget on these numbers: choose_answers says so
            need |= {c.best.subnet} | ({c.uniform.subnet} if c.uniform else set())
        need -= set(measured)
        if not need:
            return current(), cal
        rows, cal = measure(need)
        measured |= rows
