"""What a search leaves behind: per budget the chosen subnet (and the best uniform one) with its test top-1, as
metrics, a Pareto table, a plot and JSON in the search's MLflow run."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from .batches import held_out
from .cli import UsageError
from .plan import SearchRun, task_resources
from .report import pareto_plot
from .runs import dump_json
from .select import choose, pareto_front
from .trial import TrialContext, TrialResult

__all__ = ["test_top1", "choose_answers", "log_answers"]


def test_top1(s: SearchRun, subnets: list) -> dict:
    """Test top-1 of ``subnets``: one streamed pass over the test split, in a task with a trial's resources."""
    import ray

    test = held_out(s.plan.splits.test, {"num_cpus": s.plan.opts.decode_cpus}, materialize=False)
    task = ray.remote(TrialContext.top1).options(**task_resources(s.plan.opts))
    return ray.get(task.remote(s.ctx, subnets, test))


def choose_answers(s: SearchRun, per_budget: list[list[TrialResult]]) -> tuple[list[dict], list[dict]]:
    """Per budget, the chosen subnet and best uniform one (with their test top-1), and every trial as a row."""
    plan = s.plan
    choices = []
    for (budget, _), results in zip(plan.budgets, per_budget, strict=True):
        try:
            choices.append(choose(results, plan.latency_budget))
        except ValueError as e:
            raise UsageError(f"budget {budget.text}: {e} ({plan.opts.latency_budget or 'no latency budget'})") from None
    answers = [r for c in choices for r in (c.best, c.uniform) if r is not None]
    test = test_top1(s, sorted({r.subnet_config.validate(plan.model.arch) for r in answers}, key=str))
    chosen, rows = [], []
    for (budget, value), results, choice in zip(plan.budgets, per_budget, choices, strict=True):
        front = pareto_front([(r.top1, r.latency_ms) for r in results])
        rows += [
            {"budget": budget.text, "budget_gflops": value, **dataclasses.asdict(r), "pareto": p}
            for r, p in zip(results, front, strict=True)
        ]

        def entry(r: TrialResult) -> dict:
            return dataclasses.asdict(r) | {"test_top1": test[r.subnet_config.validate(plan.model.arch)]}

        answer = {"budget": budget.text, "budget_gflops": value, **entry(choice.best), "trials": len(results)}
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
    for f in (plan.table_path, s.study_path):
        if f.exists():
            client.log_artifact(s.parent_id, str(f))
