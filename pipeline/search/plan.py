"""A search, validated and loaded: the supernet, its search space, the budgets in GFLOPs, the data, the latency
table. Building a `SearchPlan` checks every input and writes nothing, so bad input fails before a run exists."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from supervit import Budget, SuperViT, gflops
from supervit.data import Splits

from ..common.cli import UsageError
from ..common.latency_table import LatencyTable
from ..common.runs import check_mlflow, newest_finished_run
from .space import SearchSpace, default_space_path, load_space

if TYPE_CHECKING:
    from .options import SearchOptions
    from .trial import TrialContext

__all__ = ["SearchPlan", "SearchRun", "resolve_checkpoint", "plan_search", "task_resources"]


@dataclass
class SearchPlan:
    """A validated search: what every budget's search uses. Building it writes nothing."""

    opts: SearchOptions
    model: SuperViT
    space: SearchSpace
    budgets: list[tuple[Budget, float]]  # as written, in GFLOPs for this model
    latency_budget: float | None
    data_spec: str
    splits: Splits
    supertrain_run: str | None
    table_path: Path


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
    path = "checkpoint/model.safetensors"
    if spec is None:
        run = newest_finished_run(tracking_uri, "supertrain")
        if run is None:
            raise UsageError(
                f"no finished supertraining run in the MLflow store {tracking_uri}; run "
                "`python -m pipeline.supertrain` first or pass --checkpoint"
            )
        run_id = run.info.run_id
    elif spec.startswith("runs:/"):
        run_id, _, given = spec[len("runs:/") :].partition("/")
        path = given or path
    elif re.fullmatch(r"[0-9a-f]{32}", spec):
        run_id = spec
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


def plan_search(opts: SearchOptions, tracking_uri: str) -> SearchPlan:
    """Validate everything and load the supernet, space and data; bad input raises before anything is written."""
    from supervit import load_checkpoint
    from supervit.checkpoint import read_checkpoint_metadata
    from supervit.data import balanced_subset, load_data

    budgets = opts.parsed_budgets()
    latency_budget = opts.parsed_latency_budget()
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here")
    check_mlflow(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_path, supertrain_run = resolve_checkpoint(opts.checkpoint, tracking_uri, Path(tmp))
        meta = read_checkpoint_metadata(ckpt_path)
        model = load_checkpoint(ckpt_path).eval()
    arch, num_classes = model.arch, model.num_classes
    space_path = Path(opts.space) if opts.space else default_space_path(arch.name)
    space = load_space(space_path)
    space.check(arch, where=f"search space {space_path}")
    smallest = min(gflops(arch, s, num_classes) for s in space.subnets())
    resolved = [(b, b.gflops(arch, num_classes)) for b in budgets]
    for b, value in resolved:
        if value < smallest:
            raise UsageError(
                f"budget {b.text} ({value:.4g} GFLOPs) is below the smallest subnet of the space "
                f"({smallest:.4g} GFLOPs = {smallest * 1e3:.4g} MFLOPs)"
            )
    data_spec = opts.data or meta["extra"].get("data")
    if not data_spec:
        raise UsageError(f"checkpoint {ckpt_path.name} does not say which data it was trained on: pass --data")
    if "://***@" in data_spec:
        raise UsageError(f"checkpoint {ckpt_path.name} names its data without credentials ({data_spec}): pass --data")
    splits = load_data(data_spec, arch)
    if splits.num_classes != num_classes:
        raise UsageError(f"data {data_spec} has {splits.num_classes} classes, the checkpoint {num_classes}")
    if len(splits.search) > opts.search_images:  # a fixed, class-balanced subset: every trial sees the same images
        splits.search = splits.search.subset(balanced_subset(splits.search.targets, opts.search_images))
    table_path = Path(opts.latency_table or "latency_table.parquet").resolve()
    LatencyTable(table_path)  # a damaged table is bad input: say so before anything starts
    return SearchPlan(opts, model, space, resolved, latency_budget, data_spec, splits, supertrain_run, table_path)


@dataclass
class SearchRun:
    """A running search: its name, storage, MLflow parent run and the context every trial shares."""

    plan: SearchPlan
    name: str
    storage: str
    tracking_uri: str
    parent_id: str
    resumed: bool
    ctx: TrialContext
    study_storage: object  # Optuna storage the studies are persisted in
    study_path: Path
    resources: dict  # a trial's (and a measuring task's) resources, fixed at the start (`task_resources`)


def task_resources(opts: SearchOptions) -> dict:
    """A trial's resources: ``--trial-cpus`` (default: every CPU Ray has free), and a GPU on CUDA."""
    import ray

    cpus = opts.trial_cpus or max(1, int(ray.available_resources().get("CPU", 1)))
    return {"num_cpus": cpus} | ({"num_gpus": 1} if opts.device == "cuda" else {})
