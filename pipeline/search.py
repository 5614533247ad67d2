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
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from supervit import LATENCY_MODES, Budget, default_latency_mode, gflops
from supervit.data import redact

from . import cli
from .answers import choose_answers, log_answers, register_answers, report_latency
from .batches import held_out, ledger_over, raise_if_over
from .cli import UsageError, option, parse_options, quiet_libraries, run_cli
from .latency_table import LatencyTable, arch_key
from .ledger import start_ledger
from .plan import SearchPlan, SearchRun, plan_search, task_resources
from .report import answer_table
from .runs import (
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
from .searcher import SAMPLERS
from .trial import FinishedRecord, LatencySettings, Progress, TrialContext, TrialResult

EXPERIMENT = "supervit-search"


@dataclass
class SearchOptions:
    """Everything a search depends on; the command line is generated from these fields."""

    budgets: list[str] = option(
        help="compute budget, repeatable: 2.3GFLOPs, 450MFLOPs, or 0.5x (a fraction of the full model)",
        flag="--budget",
        factory=list,
    )
    checkpoint: str | None = option(
        None,
        help="a checkpoint file, an MLflow run id or a runs:/ URI (default: the newest finished supertraining "
        "run in the MLflow store)",
    )
    data: str | None = option(
        None, help="dataset (default: the one the checkpoint was trained on); the search split is held out"
    )
    space: str | None = option(None, help="search space YAML (default: search_spaces/<preset>.yaml)")
    trials: int = option(24, help="evaluated trials per budget", min=1)
    sampler: str = option("tpe", help="Optuna sampler", choices=SAMPLERS)
    objective: str = option(
        "accuracy",
        help="accuracy: best top-1 under the budget; pareto: accuracy up and latency down",
        choices=("accuracy", "pareto"),
    )
    latency_budget: str | None = option(None, help="extra constraint on measured latency, e.g. 5ms")
    latency_batch: int = option(1, help="batch size latency is measured at", min=1)
    latency_runs: int = option(30, help="timed forwards per latency measurement", min=1)
    latency_mode: str | None = option(
        None,
        help="what is timed: the subnet's program compiled for the device, as deployed, or its eager forward "
        "(default compiled; compile time is recorded apart, never counted)",
        choices=LATENCY_MODES,
    )
    latency_report: bool = option(
        True, help="also time every uniform cell and every trial in both modes, and log latency against GFLOPs"
    )
    device: str = option("cpu", help="where trials run and latency is measured", choices=("cpu", "cuda"))
    dtype: str = option("float32", help="latency dtype", choices=("float32", "bfloat16", "float16"))
    trial_cpus: int | None = option(
        None, help="CPUs per trial (default: every CPU Ray has here: latency holds the device)", min=1
    )
    latency_resource: str | None = option(
        None,
        help="measure latency only on nodes with this Ray resource (e.g. accelerator_type:A10G), holding all of it",
        metavar="RESOURCE",
    )
    latency_threads: int | None = option(None, help="CPU threads for latency measurement (default: the trial's)", min=1)
    concurrent: int = option(
        1,
        help="trials at a time (1: reproducible, and latency holds the device; raise it with --latency-resource, "
        "which keeps one measurement per device)",
        min=1,
    )
    max_failures: int = option(1, help="retries of a trial whose process died", min=0)
    search_images: int = option(
        10_000, help="images of the held-out split each trial evaluates: a fixed, class-balanced subset", min=1
    )
    max_bad_images: int = cli.max_bad_images_option()
    decode_cpus: float = cli.decode_cpus_option()
    latency_table: str | None = option(
        None, help="latency table: a directory of Parquet parts, local or in a bucket (default ./latency_table.parquet)"
    )
    warm_start: bool = option(True, help="start from the uniform keep-rate subnets under the budget")
    address: str | None = option(None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    storage: str | None = option(None, help="Ray Tune storage path (default ./ray_results)")
    resume: str | None = option(
        None, help="continue an interrupted search (default: the newest)", nargs="?", const="", metavar="NAME"
    )
    mlflow_uri: str | None = option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    experiment: str = option(EXPERIMENT, help="MLflow experiment")
    name: str | None = option(None, help="search name in Ray storage and MLflow (default: search-<budgets>-<n>)")
    registered_model: str | None = option(
        None,
        help="MLflow registered model the chosen subnets become versions of (default supervit-<preset>-subnets: "
        "apart from the supernet's supervit-<preset>)",
    )
    seed: int = option(0, help="sampler seed")
    inject_failure: str | None = option(None, help="", cli=False)  # failure drill: see `TrialContext`

    def parsed_budgets(self) -> list[Budget]:
        """The budgets, parsed (a malformed one is a `UsageError`)."""
        if not self.budgets:
            raise UsageError("give at least one --budget (e.g. --budget 2.3GFLOPs or --budget 0.5x)")
        try:
            return [Budget.parse(b) for b in self.budgets]
        except ValueError as e:
            raise UsageError(str(e)) from None

    def parsed_latency_budget(self) -> float | None:
        """``5ms`` -> 5.0; None without one."""
        if self.latency_budget is None:
            return None
        m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*ms\s*$", self.latency_budget, re.IGNORECASE)
        if not m or float(m.group(1)) <= 0:
            raise UsageError(f"cannot parse latency budget {self.latency_budget!r}; expected e.g. 5ms or 0.8ms")
        return float(m.group(1))


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
    latency = LatencySettings(
        opts.device,
        opts.dtype,
        opts.latency_batch,
        opts.latency_runs,
        opts.latency_threads,
        opts.latency_resource,
        opts.latency_mode or default_latency_mode(opts.device),
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
    return SearchRun(plan, name, storage, tracking_uri, parent_id, state is not None, ctx, study, study_path)


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
        task = task_resources(opts)
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


if __name__ == "__main__":
    sys.exit(run_cli(main))
