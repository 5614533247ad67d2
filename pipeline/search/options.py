"""`SearchOptions`: everything a search depends on. The command line is generated from its fields (help text and
defaults written once, here); the rooms that read the options import this one."""

from __future__ import annotations

import re
from dataclasses import dataclass

from supervit import LATENCY_MODES, Budget

from ..common import cli
from ..common.cli import UsageError, option
from .searcher import SAMPLERS

__all__ = ["EXPERIMENT", "SEARCH_LATENCY_MODES", "SearchOptions"]

# How trials get latency: `pipeline.search.latency`.
SEARCH_LATENCY_MODES = ("predicted", *LATENCY_MODES)

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
    latency_mode: str = option(
        "predicted",
        help="what trials time: predicted (each subnet's compiled parts, summed and calibrated on whole programs; "
        "every answer and the Pareto front are then compiled and measured whole), compiled (every subnet's whole "
        "program compiled for the device, as deployed) or eager (its eager forward); compile time is recorded "
        "apart, never counted",
        choices=SEARCH_LATENCY_MODES,
    )
    latency_report: bool = option(
        True, help="log predicted against measured latency and latency against GFLOPs for what the search measured"
    )
    latency_report_all: bool = option(
        False, help="for the report, also compile and time every uniform cell and every trial whole, in both modes"
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
