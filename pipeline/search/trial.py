"""One search trial: a subnet's top-1 on the held-out split and its latency on the target hardware.

`TrialContext` is what every trial shares (shipped once through Ray's object store); `TrialResult` is what a
trial reports. Both are typed dataclasses, so nothing crossing a process boundary is read by string keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from ray.tune import Callback

from supervit import ArchConfig, Calibration, SubnetConfig, SuperViT, evaluate, gflops

from ..common.batches import HeldOut, raise_if_over, run_bad_images
from ..common.runs import dump_json, maybe_fail, write_run_file
from .latency import LatencySettings, trial_latency
from .space import SearchSpace

__all__ = [
    "TrialContext",
    "TrialResult",
    "run_trial",
    "FinishedRecord",
    "Progress",
]


@dataclass
class TrialContext:
    """What every trial of a search shares: the supernet, the held-out split, the latency table and settings."""

    arch: ArchConfig
    num_classes: int
    arch_key: str  # the architecture's key in the latency table
    space: SearchSpace
    state: dict[str, torch.Tensor]  # the supernet's weights
    search: HeldOut  # the search split (a class-balanced subset of the held-out split)
    table: Any  # a Ray actor serving the `LatencyTable`
    latency: LatencySettings
    calibration: Calibration | None  # predicted latency: the parts' sum calibrated on whole programs
    ledger: Any  # the search's `BadImageLedger` actor (None for in-memory data)
    max_bad_images: int
    inject_failure: str | None = None  # failure drill: a marker file; the first trial kills its process once

    def model(self, device: str = "cpu") -> SuperViT:
        """The supernet, in eval mode, on ``device``."""
        model = SuperViT(self.arch, num_classes=self.num_classes)
        model.load_state_dict(self.state)
        return model.eval().to(device)

    def top1(self, subnets: list[SubnetConfig], split: HeldOut) -> dict[SubnetConfig, float]:
        """Top-1 (%) of each subnet on ``split``, in one pass, on the latency device; undecodable images are
        skipped and counted for the search (past its cap: `DataError`)."""
        raise_if_over(self.ledger, self.max_bad_images)
        bad = run_bad_images(self.ledger, self.max_bad_images)
        counts = evaluate(self.model(self.latency.device), split.batches(bad), subnets)
        return {s: 100.0 * c / max(1, n) for s, (c, n) in counts.items()}


@dataclass(frozen=True)
class TrialResult:
    """What one trial reports to Tune (as a flat dict of its fields)."""

    subnet: str
    gflops: float
    top1: float
    latency_ms: float
    latency_p10_ms: float
    latency_p90_ms: float
    latency_cached: bool
    compile_s: float  # compiling the subnet's program (or its parts) for the measurement (0 when cached, or eager)
    uniform: bool
    trial_node: str
    latency_node: str
    latency_hardware: str
    latency_source: str = "measured"  # predicted from parts, or measured whole
    latency_predicted_ms: float = math.nan  # the parts' calibrated sum (nan: not predicted)
    latency_parts_ms: float = math.nan  # the parts' sum, before calibration

    @classmethod
    def from_metrics(cls, metrics: dict) -> TrialResult:
        """The result inside a Tune result dict (which adds its own keys; a record written before a field existed
        takes its default)."""
        return cls(**{f.name: metrics[f.name] for f in dataclasses.fields(cls) if f.name in metrics})

    @property
    def subnet_config(self) -> SubnetConfig:
        """The subnet, parsed from its name."""
        return SubnetConfig.parse(self.subnet)


def run_trial(config: dict, ctx: TrialContext) -> None:
    """One Tune trial: top-1 on the search split, then latency: predicted from its parts or measured whole (from
    the table, or measured once; see `pipeline.search.latency`).

    With a latency resource, the measurement runs as a task on a node that has the resource, holding all of
    it (one measurement per device at a time); the accuracy is computed wherever the trial runs.
    """
    import ray
    from ray import tune

    subnet = ctx.space.subnet(config).validate(ctx.arch)
    if ctx.inject_failure:
        maybe_fail(ctx.inject_failure)
    acc = ctx.top1([subnet], ctx.search)[subnet]
    lat = trial_latency(ctx, subnet, ctx.calibration)
    result = TrialResult(
        subnet=subnet.name,
        gflops=gflops(ctx.arch, subnet, ctx.num_classes),
        top1=acc,
        latency_ms=lat.ms,
        latency_p10_ms=lat.p10_ms,
        latency_p90_ms=lat.p90_ms,
        latency_cached=lat.cached,
        compile_s=lat.compile_s,
        uniform=subnet.is_uniform,
        trial_node=ray.get_runtime_context().get_node_id(),
        latency_node=lat.node,
        latency_hardware=lat.hardware,
        latency_source=lat.source,
        latency_predicted_ms=lat.predicted_ms,
        latency_parts_ms=lat.parts_ms,
    )
    tune.report(dataclasses.asdict(result))


# --------------------------------------------------------------------------------------- Tune callbacks


class FinishedRecord(Callback):
    """Tune callback keeping every trial that finished with a result, in `results` and whole (atomically) in
    ``<storage>/<name>/<filename>`` (Tune's own experiment state is written in place, and a killed driver can
    leave it empty). Failed trials are never chosen and are not recorded."""

    def __init__(self, storage: str, name: str, filename: str, results: list[TrialResult]) -> None:
        self.where, self.results = (storage, name, filename), list(results)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if "top1" in (trial.last_result or {}):
            self.results.append(TrialResult.from_metrics(trial.last_result))
            write_run_file(*self.where, dump_json([dataclasses.asdict(r) for r in self.results]))


class Progress(Callback):
    """Tune callback printing one line per finished trial."""

    def __init__(self, budget: str, trials: int, done: int = 0) -> None:
        self.budget, self.trials, self.done = budget, trials, done

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        m = trial.last_result or {}
        if "top1" in m:
            r = TrialResult.from_metrics(m)
            cached = " (cached)" if r.latency_cached else (f" (compiled in {r.compile_s:.1f} s)" if r.compile_s else "")
            kind = "predicted" if r.latency_source == "predicted" else "latency"
            print(
                f"[{self.budget}] trial {self.done}/{self.trials}: {r.subnet:<18} {r.gflops * 1e3:9.3f} MFLOPs  "
                f"top1 {r.top1:5.1f}  {kind} {r.latency_ms:.3f} ms{cached}",
                flush=True,
            )
