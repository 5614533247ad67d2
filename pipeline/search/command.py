"""Budgeted subnet search: Ray Tune runs the trials, Optuna proposes them, latency is measured, MLflow keeps it.

    python -m pipeline.search --budget 0.5x                     # newest finished supertraining in the MLflow store
    python -m pipeline.search --budget 2.3GFLOPs --budget 1.5GFLOPs --checkpoint runs:/<run id>/checkpoint
    python -m pipeline.search --budget 0.5x --objective pareto --latency-budget 5ms --device cuda

For each budget: proposals over the analytic FLOPs budget are told to Optuna as infeasible and never run; each
feasible trial reports GFLOPs, top-1 on the held-out search split and measured latency (cached per hardware in a
Parquet table). The answer per budget, the Pareto front and a plot land in one MLflow parent run with one nested
run per trial.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from supervit import default_latency_mode, gflops
from supervit.data import redact

from ..common.batches import held_out, ledger_over, raise_if_over
from ..common.cli import UsageError, parse_options, quiet_libraries
from ..common.latency_table import LatencyTable, arch_key
from ..common.ledger import start_ledger
from ..common.runs import (
    STAGE_TAG,
    RunState,
    default_storage,
    finish_mlflow_run,
    init_ray,
    open_mlflow_run,
    read_run_file,
    resolve_tracking_uri,
    resume_or_name,
    save_state,
    ui_command,
)
from .answers import choose_answers, log_answers, register_answers, report_latency
from .latency import LatencySettings
from .options import SearchOptions
from .plan import SearchPlan, SearchRun, plan_search, task_resources
from .report import answer_table
from .trial import FinishedRecord, Progress, TrialContext, TrialResult
from .verify import trial_calibration

__all__ = ["SearchResult", "search", "main"]


@dataclass
class SearchResult:
    """The chosen subnet per budget and where everything was logged."""

    parent_run_id: str
    tracking_uri: str
    chosen: list[dict]
    trials: list[dict]


def search(opts: SearchOptions, verbose: bool = False) -> SearchResult:
    """Run (or resume) a search over every budget; bad input raises `UsageError` before anything is written."""
    storage = opts.storage or default_storage()
    if opts.resume is None:
        opts.parsed_budgets()  # the name is made of them
    keep = ("address", "storage", "mlflow_uri", "inject_failure")
    opts, name, state = resume_or_name(opts, storage, "search", ("search", *opts.budgets), keep)
    tracking_uri = resolve_tracking_uri(opts.mlflow_uri or (state.tracking_uri if state else None))
    plan = plan_search(opts, tracking_uri)
    for b, value in plan.budgets:
        full = gflops(plan.model.arch, None, plan.model.num_classes)
        if value >= full:
            print(
                f"budget {b.text} ({value:.4g} GFLOPs) is at or above the full model ({full:.4g} GFLOPs): "
                "every subnet fits; searching anyway"
            )
    init_ray(opts.address, verbose=verbose)
    import ray

    if opts.latency_resource and ray.cluster_resources().get(opts.latency_resource, 0) < 1:
        raise UsageError(f"no node of the Ray cluster has the latency resource {opts.latency_resource!r}")
    s = _start(plan, name, storage, tracking_uri, state)
    print(
        f"search {name}: budgets {', '.join(opts.budgets)}, {opts.trials} trials each; MLflow run {s.parent_id}",
        flush=True,
    )
    s.ctx = dataclasses.replace(s.ctx, calibration=trial_calibration(s))
    per_budget = [_search_budget(s, i) for i in range(len(plan.budgets))]
    chosen, rows = choose_answers(s, per_budget)
    log_answers(s, chosen, rows)
    register_answers(s, chosen)
    if opts.latency_report:
        report_latency(s, rows)
    finish_mlflow_run(tracking_uri, s.parent_id, answer_table(chosen))
    save_state(storage, name, RunState(s.parent_id, tracking_uri, "finished", _saved_options(opts)))
    return SearchResult(s.parent_id, tracking_uri, chosen, rows)


def _saved_options(opts: SearchOptions) -> dict:
    return {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("inject_failure", "resume")}


def _params(plan: SearchPlan) -> dict:
    import ray

    return _saved_options(plan.opts) | {
        "data": redact(plan.data_spec),  # a bucket URI may carry credentials; MLflow shows params to everyone
        "space_grids": list(plan.space.grids),
        "space_keep_rates": [list(s) for s in plan.space.keep_rates],
        "search_size": len(plan.splits.search),
        "test_size": len(plan.splits.test),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
    }


def _start(plan: SearchPlan, name: str, storage: str, tracking_uri: str, state: RunState | None) -> SearchRun:
    """Open (or reopen) the MLflow parent run, record the run state, and build the shared trial context."""
    import optuna
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts, arch, num_classes = plan.opts, plan.model.arch, plan.model.num_classes
    tags = {
        STAGE_TAG: "search",
        "preset": arch.name,
        "dataset": redact(plan.data_spec),
        "supertrain_run_id": plan.supertrain_run or "",
        "budgets": ", ".join(opts.budgets),
    }
    parent_id = open_mlflow_run(tracking_uri, opts.experiment, name, state, tags, _params(plan))
    save_state(storage, name, RunState(parent_id, tracking_uri, "running", _saved_options(opts)))
    # The table lives on the driver's node; trials on any node ask it, so each subnet is measured once.
    here = ray.get_runtime_context().get_node_id()
    table = (
        ray.remote(LatencyTable)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
        .remote(plan.table_path)
    )
    resources = task_resources(opts)
    # One thread count for every measurement of the search (parts, trials, whole programs), whichever process
    # takes it: the count is part of the hardware fingerprint, and Ray gives its processes different defaults.
    threads = opts.latency_threads or (resources["num_cpus"] if opts.device == "cpu" else None)
    latency = LatencySettings(
        opts.device,
        opts.dtype,
        opts.latency_batch,
        opts.latency_runs,
        threads,
        opts.latency_resource,
        "eager" if opts.latency_mode == "eager" else default_latency_mode(opts.device),
        predict=opts.latency_mode == "predicted",
    )
    state_dict = {k: v.cpu() for k, v in plan.model.state_dict().items()}
    # File-backed: decoded once into the object store when it fits, else streamed by every trial.
    search_split = held_out(plan.splits.search, {"num_cpus": opts.decode_cpus})
    ctx = TrialContext(
        arch=arch,
        num_classes=num_classes,
        arch_key=arch_key(arch, num_classes),
        space=plan.space,
        state=state_dict,
        search=search_split,
        table=table,
        latency=latency,
        calibration=None,
        # Only file-backed images can fail to decode: in-memory data needs no ledger (an actor fewer).
        ledger=start_ledger(opts.max_bad_images) if search_split.dataset is not None else None,
        max_bad_images=opts.max_bad_images,
        inject_failure=opts.inject_failure,
    )
    # The Optuna studies persist next to the driver (a journal file; logged with the run) for optuna-dashboard.
    study_path = Path(storage if "://" not in storage else tempfile.mkdtemp()) / name / "optuna.journal"
    study_path.parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(study_path))
    study = optuna.storages.JournalStorage(backend)
    return SearchRun(plan, name, storage, tracking_uri, parent_id, state is not None, ctx, study, study_path, resources)


def _finished_record(i: int) -> str:
    return f"finished-budget{i}.json"


def _search_budget(s: SearchRun, i: int) -> list[TrialResult]:
    """Search one budget with Ray Tune; finished trials are recorded as they finish (what --resume reads)."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .searcher import BudgetedOptunaSearch, make_sampler

    plan, opts = s.plan, s.plan.opts
    budget, value = plan.budgets[i]
    arch, num_classes = plan.model.arch, plan.model.num_classes
    saved = read_run_file(s.storage, s.name, _finished_record(i)) if s.resumed else None
    finished = [TrialResult.from_metrics(r) for r in json.loads(saved)] if saved else []
    known = {r.subnet_config.validate(arch): dataclasses.asdict(r) for r in finished}
    warm = [u for u in plan.space.uniform_subnets() if gflops(arch, u, num_classes) <= value]
    objective = ("top1", "max") if opts.objective == "accuracy" else (["top1", "latency_ms"], ["max", "min"])
    searcher = BudgetedOptunaSearch(
        plan.space,
        arch,
        num_classes,
        value,
        metric=objective[0],
        mode=objective[1],
        sampler=make_sampler(opts.sampler, plan.space, opts.seed + i, opts.trials),
        latency_budget=plan.latency_budget,
        known=known,
        warm_start=warm[: opts.trials] if opts.warm_start and opts.sampler != "grid" else (),
        storage=s.study_storage,
        study_name=f"{s.name}-{budget.text}",
        stop=lambda: ledger_over(s.ctx.ledger),  # too many bad images: no trial can succeed
    )
    record = FinishedRecord(s.storage, s.name, _finished_record(i), finished)
    remaining = opts.trials - len(finished)
    if remaining > 0 and not searcher.feasible <= set(searcher.known):
        task = s.resources
        resources = {"cpu": task["num_cpus"], "gpu": task.get("num_gpus", 0)}
        tuner = tune.Tuner(
            tune.with_parameters(tune.with_resources(_trainable(), resources), ctx=s.ctx),
            run_config=tune.RunConfig(
                name=f"{s.name}-budget{i}" + (f"-resumed{len(finished)}" if finished else ""),
                storage_path=s.storage,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                callbacks=[_mlflow_callback(s, budget.text), record, Progress(budget.text, opts.trials, len(finished))],
            ),
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=opts.concurrent),
                num_samples=remaining,
                reuse_actors=True,
                trial_name_creator=lambda t: plan.space.subnet(t.config).validate(arch).name,
            ),
        )
        tuner.fit()
    raise_if_over(s.ctx.ledger, opts.max_bad_images)
    return record.results


def _trainable():
    from .trial import run_trial

    return run_trial


def _mlflow_callback(s: SearchRun, budget: str):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(
        tracking_uri=s.tracking_uri,
        experiment_name=s.plan.opts.experiment,
        save_artifact=False,
        tags={"mlflow.parentRunId": s.parent_id, "budget": budget, STAGE_TAG: "search-trial"},
    )


def main(argv: list[str] | None = None) -> SearchResult:
    """CLI entry: parse, search, print the answer per budget."""
    opts, verbose = parse_options(SearchOptions, argv, "python -m pipeline.search", __doc__.split("\n\n")[0])
    quiet_libraries(verbose)
    res = search(opts, verbose)
    print()
    print(answer_table(res.chosen))
    print(f"MLflow parent run {res.parent_run_id} ({res.tracking_uri})")
    print(f"open it with: {ui_command(res.tracking_uri)}")
    return res
