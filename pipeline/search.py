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

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from ray.tune import Callback
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from supervit import (
    PRESETS,
    ArchConfig,
    SubnetConfig,
    SuperViT,
    gflops,
    hardware_fingerprint,
    measure_latency,
    parse_budget,
)

from .common import (
    Parser,
    UsageError,
    check_mlflow,
    dump_json,
    find_resume,
    init_ray,
    parse_options,
    read_run_file,
    resolve_tracking_uri,
    run_cli,
    ui_command,
    write_run_file,
)
from .latency_table import KEY, LatencyTable, arch_key
from .space import SearchSpace, default_space_path, load_space

EXPERIMENT = "supervit-search"
SUPERTRAIN_STAGE_TAG = "supervit.stage"
SAMPLERS = ("tpe", "nsga2", "random", "grid")
STATE_FILE = "supervit_search.json"


@dataclass
class SearchOptions:
    """Everything a search depends on (the CLI maps one-to-one onto these fields)."""

    budgets: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    data: str | None = None
    space: str | None = None
    trials: int = 24
    sampler: str = "tpe"
    objective: str = "accuracy"
    latency_budget: str | None = None
    latency_batch: int = 1
    latency_runs: int = 30
    device: str = "cpu"
    dtype: str = "float32"
    trial_cpus: int | None = None
    latency_resource: str | None = None
    latency_threads: int | None = None
    concurrent: int = 1
    max_failures: int = 1
    inject_failure: str | None = None  # test hook: a marker file path; see `_maybe_fail`
    latency_table: str | None = None
    warm_start: bool = True
    address: str | None = None
    storage: str | None = None
    resume: str | None = None
    mlflow_uri: str | None = None
    experiment: str = EXPERIMENT
    name: str | None = None
    seed: int = 0


@dataclass
class SearchResult:
    """The chosen subnet per budget and where everything was logged."""

    parent_run_id: str
    tracking_uri: str
    chosen: list[dict]
    trials: list[dict]


# ---------------------------------------------------------------------------------------------- the searcher


def make_sampler(name: str, space: SearchSpace, seed: int, trials: int):
    """A seeded Optuna sampler; TPE and NSGA-II know about infeasible proposals."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, trials // 3))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, trials // 4)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.choices(), seed=seed)
    raise UsageError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


class BudgetedOptunaSearch(OptunaSearch):
    """OptunaSearch that hands Tune only new proposals within the FLOPs budget.

    In `suggest`, each proposal's analytic FLOPs are checked: one over budget is told to Optuna at once as
    infeasible (constraint ``flops`` > 0) and never run; one already evaluated in this search is told its known
    result instead of being run again. A latency budget, known only after a trial, is a second constraint.
    When every subnet within the budget has been evaluated, the search is finished.
    """

    def __init__(
        self,
        *,
        search_space: SearchSpace,
        arch: ArchConfig,
        num_classes: int,
        budget: float,
        latency_budget: float | None,
        max_tries: int = 10_000,
        **kwargs,
    ) -> None:
        super().__init__(space=search_space.define_by_run, **kwargs)
        self.search_space, self.arch, self.num_classes = search_space, arch, num_classes
        self.budget, self.latency_budget, self.max_tries = budget, latency_budget, max_tries
        self.feasible = {s.name for s in search_space.subnets() if self._excess(s) <= 0}
        self.known: dict[str, dict] = {}  # subnet name -> its trial's result
        self.running: dict[str, SubnetConfig] = {}  # trial id -> subnet
        self.ruled_out = 0

    def _excess(self, subnet: SubnetConfig) -> float:
        return gflops(self.arch, subnet, self.num_classes) - self.budget - 1e-12

    def _values(self, result: dict | None):
        if isinstance(self.metric, list):
            return [result[m] for m in self.metric] if result else [0.0, 1e9]
        return result[self.metric] if result else 0.0

    def _constrain(self, ot_trial, subnet: SubnetConfig | None, result: dict | None) -> None:
        """Optuna constraints (<= 0 is feasible): FLOPs when proposed, latency once measured."""
        if subnet is not None:
            ot_trial.set_constraint("flops", self._excess(subnet))
        if self.latency_budget is not None and result is not None:
            ot_trial.set_constraint("latency", result["latency_ms"] - self.latency_budget)

    def suggest(self, trial_id: str):
        for _ in range(self.max_tries):
            if self.feasible <= set(self.known):
                return Searcher.FINISHED  # every subnet within the budget has been evaluated
            config = super().suggest(trial_id)
            if not config or config == Searcher.FINISHED:
                return config
            subnet = self.search_space.subnet(config).validate(self.arch)
            ot_trial = self._ot_trials[trial_id]
            if subnet.name in self.feasible and subnet.name not in self.known:
                self._constrain(ot_trial, subnet, None)
                self.running[trial_id] = subnet
                return config
            result = self.known.get(subnet.name)
            self._constrain(ot_trial, subnet, result)
            self._ot_study.tell(ot_trial, self._values(result))
            del self._ot_trials[trial_id]
            self.ruled_out += result is None
        raise RuntimeError(f"no new proposal within {self.budget:.4g} GFLOPs after {self.max_tries} tries")

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        subnet = self.running.pop(trial_id, None)
        if result and "top1" in result and subnet is not None:
            self.known[subnet.name] = {k: result[k] for k in ("top1", "latency_ms")}
            self._constrain(self._ot_trials[trial_id], None, result)
        super().on_trial_complete(trial_id, result, error)


# ------------------------------------------------------------------------------------------------ one trial


@torch.inference_mode()
def top1(model: SuperViT, subnet: SubnetConfig, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 (%) of ``subnet`` on a held-in-memory split."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size], subnet).argmax(1) == y[i : i + batch_size]).sum())
    return 100.0 * correct / max(1, len(x))


def latency_row(bundle: dict, subnet: SubnetConfig, threads: int) -> tuple[dict, bool]:
    """The latency of ``subnet`` on this node's hardware: from the shared table, or measured once and added."""
    import ray

    device, dtype = bundle["device"], bundle["dtype"]
    fingerprint, hardware = hardware_fingerprint(device, threads if device == "cpu" else None)
    key = (fingerprint, bundle["arch_key"], subnet.name, bundle["batch"], dtype)
    row = ray.get(bundle["table"].get.remote(key))
    if row is not None:
        return row, True
    model = SuperViT(bundle["arch"], num_classes=bundle["num_classes"])
    model.load_state_dict(bundle["state"])
    r = measure_latency(
        model,
        subnet,
        bundle["batch"],
        device,
        getattr(torch, dtype),
        runs=bundle["runs"],
        warmup=max(3, bundle["runs"] // 5),
        threads=threads if device == "cpu" else None,
    )
    row = dict(zip(KEY, key, strict=True)) | {
        "hardware": hardware,
        "median_ms": r.median_ms,
        "p10_ms": r.p10_ms,
        "p90_ms": r.p90_ms,
        "iqr_ms": r.iqr_ms,
        "runs": r.runs,
        "threads": r.threads,
        "device": r.device,
        "node_id": ray.get_runtime_context().get_node_id(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    ray.get(bundle["table"].put.remote(row))
    return row, False


def _maybe_fail(marker: str) -> None:
    """Test hook: the first trial to get here kills its own process, once (the marker file remembers)."""
    if not os.path.exists(marker):
        Path(marker).write_text("killed\n")
        os.kill(os.getpid(), 9)


def run_trial(config: dict, bundle: dict) -> None:
    """One Tune trial: accuracy on the search split, then latency (from the table, or measured once).

    With a latency resource, the measurement runs as a task on a node that has the resource, holding all of
    it (one measurement per device at a time); the accuracy is computed wherever the trial runs.
    """
    import ray
    from ray import tune

    arch: ArchConfig = bundle["arch"]
    subnet = bundle["space"].subnet(config).validate(arch)
    model = SuperViT(arch, num_classes=bundle["num_classes"])
    model.load_state_dict(bundle["state"])
    if bundle["inject_failure"]:
        _maybe_fail(bundle["inject_failure"])
    acc = top1(model, subnet, bundle["x"], bundle["y"])
    threads = bundle["latency_threads"] or torch.get_num_threads()
    resource = bundle["latency_resource"]
    if resource:
        # Outside the trial's placement group: the measurement goes wherever the resource is.
        task = ray.remote(latency_row).options(
            num_cpus=0, num_gpus=0, resources={resource: 1}, scheduling_strategy="DEFAULT"
        )
        row, cached = ray.get(task.remote(bundle, subnet, threads))
    else:
        row, cached = latency_row(bundle, subnet, threads)
    tune.report(
        {
            "gflops": gflops(arch, subnet, bundle["num_classes"]),
            "top1": acc,
            "latency_ms": row["median_ms"],
            "latency_p10_ms": row["p10_ms"],
            "latency_p90_ms": row["p90_ms"],
            "latency_cached": float(cached),
            "uniform": float(subnet.is_uniform),
            "trial_node": ray.get_runtime_context().get_node_id(),
            "latency_node": row.get("node_id", ""),
            "latency_hardware": row["hardware"],
        }
    )


# ------------------------------------------------------------------------------------------------ the driver


_MS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*ms\s*$", re.IGNORECASE)


def parse_latency(text: str) -> float:
    """``5ms`` -> 5.0."""
    m = _MS_RE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"cannot parse latency budget {text!r}; expected e.g. 5ms or 0.8ms")
    return float(m.group(1))


def resolve_checkpoint(spec: str | None, tracking_uri: str, workdir: Path) -> tuple[Path, str | None]:
    """A local checkpoint file for ``spec`` (file, run id, ``runs:/`` URI, or None: the newest finished
    supertraining in the store) and the supertraining run id it came from, if any."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if spec and Path(spec).is_file():
        return Path(spec), None
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).exists():
        # No store yet: say so rather than create an empty one.
        raise UsageError(
            f"the MLflow store {tracking_uri} does not exist: run `python -m pipeline.supertrain` "
            "first, or pass --checkpoint FILE or --mlflow-uri"
        )
    client = mlflow.MlflowClient(tracking_uri)
    if spec is None:
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = (
            client.search_runs(
                exps,
                f"tags.`{SUPERTRAIN_STAGE_TAG}` = 'supertrain' and attributes.status = 'FINISHED'",
                order_by=["attributes.end_time DESC"],
                max_results=1,
            )
            if exps
            else []
        )
        if not runs:
            raise UsageError(
                f"no finished supertraining run in the MLflow store {tracking_uri}; run "
                "`python -m pipeline.supertrain` first or pass --checkpoint"
            )
        run_id, path = runs[0].info.run_id, "checkpoint/model.safetensors"
    elif spec.startswith("runs:/"):
        run_id, _, path = spec[len("runs:/") :].partition("/")
        path = path or "checkpoint/model.safetensors"
    elif re.fullmatch(r"[0-9a-f]{32}", spec):
        run_id, path = spec, "checkpoint/model.safetensors"
    else:
        raise UsageError(f"checkpoint {spec!r} is neither a file, an MLflow run id nor a runs:/ URI")
    if not path.endswith(".safetensors"):
        path = path.rstrip("/") + "/model.safetensors"
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, tracking_uri=tracking_uri, dst_path=str(workdir)
        )
    except (MlflowException, OSError) as e:
        raise UsageError(f"cannot fetch checkpoint {path} of MLflow run {run_id}: {str(e).splitlines()[0]}") from None
    return Path(local), run_id


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which (accuracy up, latency down) points no other point dominates."""
    out = []
    for i, (a, lat) in enumerate(points):
        out.append(
            not any((a2 >= a and l2 <= lat) and (a2 > a or l2 < lat) for j, (a2, l2) in enumerate(points) if j != i)
        )
    return out


def _default_storage() -> str:
    return str(Path("ray_results").resolve())


def search(opts: SearchOptions) -> SearchResult:
    """Run (or resume) a search over every budget; bad input raises `UsageError` before anything is written."""
    from supervit import load_checkpoint
    from supervit.data import load_data

    storage = opts.storage or _default_storage()
    state = None
    if opts.resume is not None:
        name, state = find_resume(storage, opts.resume or None, STATE_FILE, "search")
        keep = {k: getattr(opts, k) for k in ("address", "storage", "mlflow_uri", "inject_failure")}
        opts = SearchOptions(**{**state["options"], **{k: v for k, v in keep.items() if v is not None}})
    else:
        name = opts.name or f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = resolve_tracking_uri(opts.mlflow_uri or (state or {}).get("tracking_uri"))
    if not opts.budgets:
        raise UsageError("give at least one --budget (e.g. --budget 2.3GFLOPs or --budget 0.5x)")
    if opts.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {opts.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if opts.objective not in ("accuracy", "pareto"):
        raise UsageError(f"unknown objective {opts.objective!r}; choose accuracy or pareto")
    if opts.trials < 1 or opts.latency_batch < 1 or opts.concurrent < 1:
        raise UsageError("--trials, --latency-batch and --concurrent must be at least 1")
    if opts.device not in ("cpu", "cuda") or (opts.device == "cuda" and not torch.cuda.is_available()):
        raise UsageError(f"--device {opts.device}: use cpu, or cuda where CUDA is available")
    latency_budget = parse_latency(opts.latency_budget) if opts.latency_budget else None
    for text in opts.budgets:  # the form now; the value needs the checkpoint's architecture
        try:
            parse_budget(text, PRESETS["tiny"])
        except ValueError as e:
            raise UsageError(str(e)) from None
    check_mlflow(tracking_uri)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path, supertrain_run = resolve_checkpoint(opts.checkpoint, tracking_uri, Path(tmp))
        from supervit.checkpoint import read_checkpoint_metadata

        meta = read_checkpoint_metadata(ckpt_path)
        model = load_checkpoint(ckpt_path).eval()
    arch, num_classes = model.arch, model.num_classes
    space_path = Path(opts.space) if opts.space else default_space_path(arch.name)
    space = load_space(space_path)
    space.check(arch, where=f"search space {space_path}")
    budgets = []
    for text in opts.budgets:
        try:
            budgets.append((text, parse_budget(text, arch, num_classes)))
        except ValueError as e:
            raise UsageError(str(e)) from None
    smallest = min(gflops(arch, s, num_classes) for s in space.subnets())
    full = gflops(arch, None, num_classes)
    for text, b in budgets:
        if b < smallest:
            raise UsageError(
                f"budget {text} ({b:.4g} GFLOPs) is below the smallest subnet of the space "
                f"({smallest:.4g} GFLOPs = {smallest * 1e3:.4g} MFLOPs)"
            )
    data_spec = opts.data or meta["extra"].get("data")
    if not data_spec:
        raise UsageError(f"checkpoint {ckpt_path.name} does not say which data it was trained on: pass --data")
    splits = load_data(data_spec, arch)
    if splits.num_classes != num_classes:
        raise UsageError(f"data {data_spec} has {splits.num_classes} classes, the checkpoint {num_classes}")
    xs, ys = _stack(splits.search)
    xt, yt = _stack(splits.test)
    table_path = Path(opts.latency_table or "latency_table.parquet").resolve()
    LatencyTable(table_path)  # a damaged table is bad input: say so before anything starts

    for text, b in budgets:
        if b >= full:
            print(
                f"budget {text} ({b:.4g} GFLOPs) is at or above the full model ({full:.4g} GFLOPs): "
                "every subnet fits; searching anyway"
            )
    init_ray(opts.address)
    if opts.latency_resource:
        import ray

        if ray.cluster_resources().get(opts.latency_resource, 0) < 1:
            raise UsageError(f"no node of the Ray cluster has the latency resource {opts.latency_resource!r}")
    return _run(
        opts,
        name,
        state,
        storage,
        tracking_uri,
        supertrain_run,
        model,
        space,
        budgets,
        latency_budget,
        (xs, ys, xt, yt),
        table_path,
        data_spec,
    )


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "tensors"):
        return dataset.tensors[0], torch.as_tensor(dataset.tensors[1])
    loader = torch.utils.data.DataLoader(dataset, batch_size=256)
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _run(
    opts,
    name,
    state,
    storage,
    tracking_uri,
    supertrain_run,
    model,
    space,
    budgets,
    latency_budget,
    data,
    table_path,
    data_spec,
) -> SearchResult:
    import mlflow
    import ray
    from mlflow.entities import Param
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.search import ConcurrencyLimiter
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    arch, num_classes = model.arch, model.num_classes
    xs, ys, xt, yt = data
    client = mlflow.MlflowClient(tracking_uri)
    if state:
        parent_id = state["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        mlflow.set_tracking_uri(tracking_uri)
        exp = mlflow.set_experiment(opts.experiment)
        parent = client.create_run(
            exp.experiment_id,
            run_name=name,
            tags={
                "supervit.stage": "search",
                "preset": arch.name,
                "dataset": data_spec,
                "supertrain_run_id": supertrain_run or "",
                "budgets": ", ".join(t for t, _ in budgets),
            },
        )
        parent_id = parent.info.run_id
        params = {k: v for k, v in dataclasses.asdict(opts).items()} | {
            "space_grids": list(space.grids),
            "space_keep_rates": [list(s) for s in space.keep_rates],
            "search_size": len(ys),
            "test_size": len(yt),
            "ray_version": ray.__version__,
            "torch_version": torch.__version__,
        }
        client.log_batch(parent_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    save_state = {
        "parent_run_id": parent_id,
        "tracking_uri": tracking_uri,
        "status": "running",
        "options": dataclasses.asdict(opts),
    }
    write_run_file(storage, name, STATE_FILE, dump_json(save_state))

    # The table lives on the driver's node; trials on any node ask it, so each subnet is measured once.
    here = ray.get_runtime_context().get_node_id()
    table = (
        ray.remote(LatencyTable)
        .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
        .remote(table_path)
    )
    cpus = opts.trial_cpus or max(1, int(ray.available_resources().get("CPU", 1)))
    resources = {"cpu": cpus} | ({"gpu": 1} if opts.device == "cuda" else {})
    bundle = {
        "arch": arch,
        "space": space,
        "num_classes": num_classes,
        "arch_key": arch_key(arch, num_classes),
        "state": {k: v.cpu() for k, v in model.state_dict().items()},
        "x": xs,
        "y": ys,
        "table": table,
        "device": opts.device,
        "dtype": opts.dtype,
        "batch": opts.latency_batch,
        "runs": opts.latency_runs,
        "latency_resource": opts.latency_resource,
        "latency_threads": opts.latency_threads,
        "inject_failure": opts.inject_failure,
    }
    # One object-store copy of the weights and the split, shared by every trial of every budget.
    trainable = tune.with_parameters(tune.with_resources(run_trial, resources), bundle=bundle)
    metric = "top1" if opts.objective == "accuracy" else ["top1", "latency_ms"]
    mode = "max" if opts.objective == "accuracy" else ["max", "min"]

    all_rows, chosen = [], []
    for i, (text, budget) in enumerate(budgets):
        # Finished trials are recorded by us, atomically, as they finish: --resume starts from that record
        # (Tune's own experiment state is written in place and a killed driver can leave it empty).
        record = f"finished-budget{i}.json"
        saved = read_run_file(storage, name, record) if state else None
        finished = json.loads(saved) if saved else []
        known = {space.subnet(r["config"]).validate(arch).name for r in finished}
        warm = [
            space.params(s)
            for s in space.uniform_subnets()
            if gflops(arch, s, num_classes) <= budget and s.validate(arch).name not in known
        ]
        searcher = BudgetedOptunaSearch(
            search_space=space,
            arch=arch,
            num_classes=num_classes,
            budget=budget,
            latency_budget=latency_budget,
            metric=metric,
            mode=mode,
            sampler=make_sampler(opts.sampler, space, opts.seed + i, opts.trials),
            points_to_evaluate=warm[: opts.trials] if opts.warm_start and opts.sampler != "grid" else None,
        )
        for r in finished:  # never run again; proposed again, they are answered from memory
            searcher.known[space.subnet(r["config"]).validate(arch).name] = {k: r[k] for k in ("top1", "latency_ms")}
        results = list(finished)
        remaining = opts.trials - len(finished)
        if remaining > 0 and not searcher.feasible <= set(searcher.known):
            run_config = tune.RunConfig(
                name=f"{name}-budget{i}" + (f"-resumed{len(finished)}" if finished else ""),
                storage_path=storage,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=opts.max_failures),
                callbacks=[
                    MLflowLoggerCallback(
                        tracking_uri=tracking_uri,
                        experiment_name=opts.experiment,
                        save_artifact=False,
                        tags={"mlflow.parentRunId": parent_id, "budget": text, "supervit.stage": "search-trial"},
                    ),
                    FinishedRecord(storage, name, record, results),
                    Progress(text, opts.trials, done=len(finished)),
                ],
            )
            tuner = tune.Tuner(
                trainable,
                run_config=run_config,
                tune_config=tune.TuneConfig(
                    search_alg=ConcurrencyLimiter(searcher, max_concurrent=opts.concurrent),
                    num_samples=remaining,
                    reuse_actors=True,
                ),
            )
            tuner.fit()
        rows = []
        for m in results:
            sub = space.subnet(m["config"])

            rows.append(
                {
                    "budget": text,
                    "budget_gflops": budget,
                    "subnet": sub.name,
                    "grid": sub.grid,
                    "keep_rates": list(sub.keep_rates),
                    "gflops": m["gflops"],
                    "top1": m["top1"],
                    "latency_ms": m["latency_ms"],
                    "latency_p10_ms": m["latency_p10_ms"],
                    "latency_p90_ms": m["latency_p90_ms"],
                    "latency_cached": bool(m["latency_cached"]),
                    "uniform": bool(m["uniform"]),
                    "trial_id": m["trial_id"],
                    "trial_node": m["trial_node"],
                    "latency_node": m["latency_node"],
                    "latency_hardware": m["latency_hardware"],
                }
            )
        if not rows:
            raise RuntimeError(f"budget {text}: no trial finished")
        for row, front in zip(rows, pareto_front([(r["top1"], r["latency_ms"]) for r in rows]), strict=True):
            row["pareto"] = front
        feasible = [r for r in rows if latency_budget is None or r["latency_ms"] <= latency_budget]
        if not feasible:
            raise UsageError(f"budget {text}: no evaluated subnet meets the latency budget {opts.latency_budget}")
        best = max(feasible, key=lambda r: (r["top1"], -r["latency_ms"], -r["gflops"]))
        uniform = [r for r in feasible if r["uniform"]]
        best_uniform = max(uniform, key=lambda r: (r["top1"], -r["latency_ms"])) if uniform else None
        entry = {"budget": text, "budget_gflops": budget, **_entry(best, model, space, xt, yt)}
        if best_uniform:
            entry["uniform"] = _entry(best_uniform, model, space, xt, yt)
        entry["trials"] = len(rows)
        chosen.append(entry)
        all_rows += rows
    _log_outputs(client, parent_id, chosen, all_rows, table_path, budgets, latency_budget, arch)
    client.set_terminated(parent_id, "FINISHED")
    write_run_file(storage, name, STATE_FILE, dump_json({**save_state, "status": "finished"}))
    return SearchResult(parent_id, tracking_uri, chosen, all_rows)


def _entry(row: dict, model: SuperViT, space: SearchSpace, xt, yt) -> dict:
    sub = SubnetConfig(row["grid"], tuple(row["keep_rates"]))
    return {
        "subnet": sub.name,
        "grid": sub.grid,
        "keep_rates": list(sub.keep_rates),
        "gflops": row["gflops"],
        "top1": row["top1"],
        "test_top1": top1(model, sub, xt, yt),
        "latency_ms": row["latency_ms"],
        "latency_p10_ms": row["latency_p10_ms"],
        "latency_p90_ms": row["latency_p90_ms"],
    }


class FinishedRecord(Callback):
    """Tune callback keeping, in ``results`` and whole in ``<storage>/<name>/<filename>``, every trial that
    finished with a result (failed trials are never chosen and are not recorded)."""

    def __init__(self, storage: str, name: str, filename: str, results: list[dict]) -> None:
        self.where, self.results = (storage, name, filename), results

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        m = trial.last_result or {}
        if "top1" in m:
            self.results.append(
                {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool))}
                | {"config": dict(trial.config), "trial_id": trial.trial_id}
            )
            write_run_file(*self.where, dump_json(self.results))


class Progress(Callback):
    """Tune callback printing one line per finished trial."""

    def __init__(self, budget: str, trials: int, done: int = 0) -> None:
        self.budget, self.trials, self.done = budget, trials, done

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        m = trial.last_result or {}
        if "top1" in m:
            name = SubnetConfig(
                trial.config["grid"], tuple(v for k, v in sorted(trial.config.items()) if k != "grid")
            ).name
            print(
                f"[{self.budget}] trial {self.done}/{self.trials}: {name:<18} {m['gflops'] * 1e3:9.3f} MFLOPs  "
                f"top1 {m['top1']:5.1f}  latency {m['latency_ms']:.3f} ms"
                + (" (cached)" if m["latency_cached"] else ""),
                flush=True,
            )


def _log_outputs(client, parent_id, chosen, rows, table_path, budgets, latency_budget, arch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for c in chosen:
        for k in ("gflops", "top1", "test_top1", "latency_ms"):
            metrics.append(Metric(f"chosen.{c['budget']}.{k}", float(c[k]), now, 0))
            if "uniform" in c:
                metrics.append(Metric(f"uniform.{c['budget']}.{k}", float(c["uniform"][k]), now, 0))
    client.log_batch(parent_id, metrics=metrics)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pq.write_table(pa.Table.from_pylist(rows), tmp / "pareto.parquet")
        (tmp / "chosen.json").write_text(dump_json(chosen))
        _plot(rows, chosen, budgets, latency_budget, arch, tmp / "pareto.png")
        for f in ("pareto.parquet", "chosen.json", "pareto.png"):
            client.log_artifact(parent_id, str(tmp / f))
    if table_path.exists():
        client.log_artifact(parent_id, str(table_path))


def _plot(rows, chosen, budgets, latency_budget, arch, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (text, b) in enumerate(budgets):
        c = colors[i % len(colors)]
        rs = [r for r in rows if r["budget"] == text]
        for ax, x in zip(axes, ("latency_ms", "gflops"), strict=True):
            ax.scatter([r[x] for r in rs], [r["top1"] for r in rs], s=18, alpha=0.5, color=c, label=f"trials {text}")
            front = sorted((r for r in rs if r["pareto"]), key=lambda r: r[x])
            ax.plot([r[x] for r in front], [r["top1"] for r in front], color=c, lw=1)
            ch = next(ch for ch in chosen if ch["budget"] == text)
            ax.scatter(
                [ch[x]],
                [ch["top1"]],
                marker="*",
                s=220,
                color=c,
                edgecolor="k",
                zorder=5,
                label=f"chosen {text}: {ch['subnet']}",
            )
        axes[1].axvline(b, color=c, ls="--", lw=1)
    if latency_budget is not None:
        axes[0].axvline(latency_budget, color="k", ls=":", lw=1, label="latency budget")
    axes[0].set_xlabel("latency (ms, median)")
    axes[1].set_xlabel("GFLOPs (multiply-adds); dashed: budgets")
    for ax in axes:
        ax.set_ylabel("top-1 on the search split (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"SuperViT {arch.name}: searched subnets")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option maps onto a `SearchOptions` field."""
    p = Parser(prog="python -m pipeline.search", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--config", metavar="FILE.yaml", help="YAML file with any of these options (flags override it)")
    a(
        "--budget",
        dest="budgets",
        action="append",
        default=[],
        help="compute budget, repeatable: 2.3GFLOPs, 450MFLOPs, or 0.5x (a fraction of the full model)",
    )
    a(
        "--checkpoint",
        help="a checkpoint file, an MLflow run id or a runs:/ URI (default: the newest finished "
        "supertraining run in the MLflow store)",
    )
    a("--data", help="dataset (default: the one the checkpoint was trained on); the search split is held out")
    a("--space", help="search space YAML (default: search_spaces/<preset>.yaml)")
    a("--trials", type=int, default=24, help="evaluated trials per budget (default 24)")
    a("--sampler", default="tpe", choices=SAMPLERS, help="Optuna sampler (default tpe)")
    a(
        "--objective",
        default="accuracy",
        choices=["accuracy", "pareto"],
        help="accuracy: best top-1 under the budget; pareto: accuracy up and latency down (default accuracy)",
    )
    a("--latency-budget", help="extra constraint on measured latency, e.g. 5ms")
    a("--latency-batch", type=int, default=1, help="batch size latency is measured at (default 1)")
    a("--latency-runs", type=int, default=30, help="timed forwards per latency measurement (default 30)")
    a("--device", default="cpu", choices=["cpu", "cuda"], help="where trials run and latency is measured")
    a("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="latency dtype")
    a("--trial-cpus", type=int, help="CPUs per trial (default: every CPU Ray has here: latency holds the device)")
    a(
        "--latency-resource",
        metavar="RESOURCE",
        help="measure latency only on nodes with this Ray resource (e.g. accelerator_type:A10G), holding all of it",
    )
    a("--latency-threads", type=int, help="CPU threads for latency measurement (default: the trial's)")
    a(
        "--concurrent",
        type=int,
        default=1,
        help="trials at a time (default 1: reproducible, and latency holds the device; raise it with "
        "--latency-resource, which keeps one measurement per device)",
    )
    a("--max-failures", type=int, default=1, help="retries of a trial whose process died (default 1)")
    a("--latency-table", help="Parquet latency table (default ./latency_table.parquet)")
    a(
        "--no-warm-start",
        dest="warm_start",
        action="store_false",
        help="do not start from the uniform keep-rate subnets under the budget",
    )
    a("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    a("--storage", help="Ray Tune storage path (default ./ray_results)")
    a("--resume", nargs="?", const="", metavar="NAME", help="continue an interrupted search (default: the newest)")
    a("--mlflow-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    a("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    a("--name", help="search name in Ray storage and MLflow (default: search-<time>)")
    a("--seed", type=int, default=0, help="sampler seed (default 0)")
    return p


def main(argv: list[str] | None = None) -> SearchResult:
    """CLI entry: parse, search, print the answer per budget."""
    opts = parse_options(build_parser(), SearchOptions, argv)
    if not opts.budgets and opts.resume is None:
        raise UsageError("give at least one --budget (e.g. --budget 2.3GFLOPs or --budget 0.5x)")
    res = search(opts)
    print()
    print(
        "| budget | subnet | GFLOPs | search top-1 | test top-1 | latency ms "
        "| best uniform | its test top-1 | its latency ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in res.chosen:
        u = c.get("uniform") or {}
        print(
            f"| {c['budget']} | {c['subnet']} | {c['gflops']:.4f} | {c['top1']:.1f} | {c['test_top1']:.1f} | "
            f"{c['latency_ms']:.3f} | {u.get('subnet', '-')} | {u.get('test_top1', float('nan')):.1f} | "
            f"{u.get('latency_ms', float('nan')):.3f} |"
        )
    print(f"\nMLflow parent run {res.parent_run_id} ({res.tracking_uri})")
    print(f"open it with: {ui_command(res.tracking_uri)}")
    return res


if __name__ == "__main__":
    sys.exit(run_cli(main))
