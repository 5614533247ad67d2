"""What a search leaves behind: per budget the chosen subnet (and the best uniform one) with its test top-1, as
metrics, a Pareto table, a plot and JSON in the search's MLflow run."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tempfile
import time
from pathlib import Path

from supervit import LATENCY_MODES, SubnetConfig, fit_calibration, gflops

from ..common.batches import held_out
from ..common.cli import UsageError
from ..common.latency_table import LatencyTable
from ..common.registry import budget_alias, log_subnet_model
from ..common.runs import dump_json
from .latency import measured_latency, table_calibration
from .latency_report import latency_report, prediction_report
from .plan import SearchRun
from .report import pareto_plot
from .select import choose, pareto_front, pool_within
from .trial import TrialContext, TrialResult
from .verify import in_trial_task, verify_answers

__all__ = ["test_top1", "choose_answers", "log_answers", "register_answers", "report_latency"]


def test_top1(s: SearchRun, subnets: list) -> dict:
    """Test top-1 of ``subnets``: one streamed pass over the test split, in a task with a trial's resources."""
    import ray

    test = held_out(s.plan.splits.test, {"num_cpus": s.plan.opts.decode_cpus}, materialize=False)
    task = ray.remote(TrialContext.top1).options(**s.resources)
    return ray.get(task.remote(s.ctx, subnets, test))


def choose_answers(s: SearchRun, per_budget: list[list[TrialResult]]) -> tuple[list[dict], list[dict]]:
    """Per budget, the chosen subnet and best uniform one (with their test top-1), and every trial as a row.

    A budget's candidates are its own trials and every other budget's trials within it (`select.pool_within`).

    With predicted latency, what the choice rests on is first measured whole (`verify.verify_answers`): the
    choice is made on measured latencies.
    """
    plan = s.plan
    own = [len(results) for results in per_budget]
    candidates = pool_within(per_budget, [value for _, value in plan.budgets])
    if s.ctx.latency.predict:
        candidates, _ = verify_answers(s, candidates)
    choices = []
    for (budget, _), results in zip(plan.budgets, candidates, strict=True):
        try:
            choices.append(choose(results, plan.latency_budget))
        except ValueError as e:
            raise UsageError(f"budget {budget.text}: {e} ({plan.opts.latency_budget or 'no latency budget'})") from None
    answers = [r for c in choices for r in (c.best, c.uniform) if r is not None]
    test = test_top1(s, sorted({r.subnet_config.validate(plan.model.arch) for r in answers}, key=str))
    chosen, rows = [], []
    for (budget, value), results, n, choice in zip(plan.budgets, candidates, own, choices, strict=True):
        # A row is a trial of this budget (its own, the first n candidates), flagged when no candidate the budget
        # chose among beats it: the front that `verify_answers` measured whole.
        front = pareto_front([(r.top1, r.latency_ms) for r in results])
        rows += [
            {"budget": budget.text, "budget_gflops": value, **dataclasses.asdict(r), "pareto": p}
            for r, p in zip(results[:n], front[:n], strict=True)
        ]

        def entry(r: TrialResult) -> dict:
            return dataclasses.asdict(r) | {"test_top1": test[r.subnet_config.validate(plan.model.arch)]}

        answer = {"budget": budget.text, "budget_gflops": value, **entry(choice.best), "trials": n}
        if choice.uniform is not None:
            answer["uniform"] = entry(choice.uniform)
        chosen.append(answer)
    return chosen, rows


def log_answers(s: SearchRun, chosen: list[dict], rows: list[dict]) -> None:
    """Metrics per budget; Pareto table, chosen subnets, plot, latency table and Optuna study as artifacts."""
    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(s.tracking_uri)
    now = int(time.time() * 1000)
    metrics = []
    for c in chosen:
        for k in ("gflops", "top1", "test_top1", "latency_ms"):
            metrics.append(Metric(f"chosen.{c['budget']}.{k}", float(c[k]), now, 0))
            if "uniform" in c:
                metrics.append(Metric(f"uniform.{c['budget']}.{k}", float(c["uniform"][k]), now, 0))
    client.log_batch(s.parent_id, metrics=metrics)
    plan = s.plan
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pq.write_table(pa.Table.from_pylist(rows), tmp / "pareto.parquet")
        (tmp / "chosen.json").write_text(dump_json(chosen))
        budgets = [(b.text, v) for b, v in plan.budgets]
        title = f"SuperViT {plan.model.arch.name}: searched subnets"
        pareto_plot(rows, chosen, budgets, plan.latency_budget, title, tmp / "pareto.png")
        for f in ("pareto.parquet", "chosen.json", "pareto.png"):
            client.log_artifact(s.parent_id, str(tmp / f))
        table = LatencyTable(plan.table_path)
        if len(table):
            client.log_artifact(s.parent_id, str(table.write_snapshot(tmp / "latency_table.parquet")))
    if s.study_path.exists():
        client.log_artifact(s.parent_id, str(s.study_path))


def register_answers(s: SearchRun, chosen: list[dict]) -> None:
    """Each budget's subnet as a version of the registered model, with an alias naming the budget
    (``budget-2_3GFLOPs``), tagged with what it is, costs and scored, and linked to this search's run."""
    plan, arch = s.plan, s.plan.model.arch
    name = plan.opts.registered_model or f"supervit-{arch.name}-subnets"
    for c in chosen:
        hardware = c["latency_hardware"]
        tags = {
            "budget": c["budget"],
            "budget_gflops": f"{c['budget_gflops']:.6g}",
            "search_top1": f"{c['top1']:.4g}",
            "test_top1": f"{c['test_top1']:.4g}",
            "latency_ms": f"{c['latency_ms']:.4g}",
            "latency_measured_ms": f"{c['latency_ms']:.4g}" if c["latency_source"] == "measured" else "",
            "latency_predicted_ms": "" if math.isnan(c["latency_predicted_ms"]) else f"{c['latency_predicted_ms']:.4g}",
            "latency_source": c["latency_source"],
            "latency_mode": s.ctx.latency.mode,
            "latency_batch": str(s.ctx.latency.batch),
            "latency_dtype": s.ctx.latency.dtype,
            "hardware": hardware,
            "hardware_fingerprint": hashlib.sha1(hardware.encode()).hexdigest()[:12],
            "search_run_id": s.parent_id,
            "supertrain_run_id": plan.supertrain_run or "",
        }
        alias = budget_alias(c["budget"])
        log_subnet_model(
            plan.model,
            SubnetConfig.parse(c["subnet"]),
            name=alias,
            registered_model=name,
            alias=alias,
            tags=tags,
            run_id=s.parent_id,
            tracking_uri=s.tracking_uri,
        )


def _report_rows(ctx: TrialContext, subnets: list, measure_all: bool) -> tuple[list[dict], list[tuple]]:
    """Whole-program rows of ``subnets`` in the search's mode as the table holds them (``measure_all``: both
    modes, measured where missing), and the calibration points of the table (predicted latency only)."""
    modes = LATENCY_MODES if measure_all else (ctx.latency.mode,)
    rows = [measured_latency(ctx, sub, mode, measure=measure_all)[0] for mode in modes for sub in subnets]
    points = table_calibration(ctx)[1] if ctx.latency.predict else []
    return [r for r in rows if r is not None], points


def report_latency(s: SearchRun, rows: list[dict]) -> None:
    """What the search measured whole, on its hardware: latency against GFLOPs (``latency_vs_flops.*``) and, with
    predicted latency, predicted against measured (``latency_predicted.*``; each program predicted with the
    calibration fitted on the table's other programs, so no program scores its own fit). With
    ``--latency-report-all``, every uniform cell and every trial is measured whole first, in both modes."""
    import mlflow

    plan, arch, n = s.plan, s.plan.model.arch, s.plan.model.num_classes
    subnets = {SubnetConfig.parse(r["subnet"]).validate(arch) for r in rows}
    if plan.opts.latency_report_all:
        subnets |= {u.validate(arch) for u in plan.space.uniform_subnets()}
    measured, points = in_trial_task(s, _report_rows, sorted(subnets, key=str), plan.opts.latency_report_all)
    if not measured:
        return
    flops = [
        {
            "subnet": m["subnet"],
            "gflops": gflops(arch, SubnetConfig.parse(m["subnet"]), n),
            "latency_ms": m["median_ms"],
            "mode": m["mode"],
            "hardware": m["hardware"],
        }
        for m in measured
    ]
    hardware = {m["subnet"]: m["hardware"] for m in measured if m["mode"] == "compiled"}
    predicted = [
        {
            "subnet": name,
            "predicted_ms": fit_calibration([(x, y) for other, x, y in points if other != name])(total),
            "measured_ms": ms,
            "mode": "compiled",
            "hardware": hardware[name],
        }
        for name, total, ms in points
        if name in hardware and len(points) >= 2
    ]
    client = mlflow.MlflowClient(s.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report = latency_report(flops, tmp / "latency_vs_flops.png")
        (tmp / "latency_vs_flops.md").write_text(report.markdown)
        files = ["latency_vs_flops.md", "latency_vs_flops.png"]
        if predicted:
            note = (
                f"Each program is predicted from its parts with the calibration fitted on the table's other "
                f"{len(points) - 1} whole programs of this hardware (leave one out)."
            )
            pred = prediction_report(predicted, tmp / "latency_predicted.png", note)
            (tmp / "latency_predicted.md").write_text(pred.markdown)
            files += ["latency_predicted.md", "latency_predicted.png"]
        for f in files:
            client.log_artifact(s.parent_id, str(tmp / f))
    for (_, mode), rho in report.spearman.items():
        client.log_metric(s.parent_id, f"latency_flops_spearman.{mode}", rho)
    if predicted and len(pred.spearman) == 1:  # trials on one kind of hardware (always, with a latency resource)
        (key,) = pred.spearman
        client.log_metric(s.parent_id, "latency_prediction.spearman", pred.spearman[key])
        client.log_metric(s.parent_id, "latency_prediction.median_error", pred.median_error[key])
        client.log_metric(s.parent_id, "latency_prediction.worst_error", pred.worst_error[key])
        client.log_metric(s.parent_id, "latency_prediction.within_10pct", pred.within_10pct[key])
