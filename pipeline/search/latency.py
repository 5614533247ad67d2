"""Latency for the search: whole programs and parts, from the shared table or measured once and added to it.

Two ways a trial gets a subnet's latency (`LatencySettings.predict`):

- measured: the subnet's whole program, compiled as deployed (or eager), timed (`whole_row`);
- predicted: the sum of its parts' compiled programs (`supervit.parts`), calibrated on whole programs
  (`predicted_latency`). A part is compiled and timed once per (hardware, architecture, batch, dtype, mode) and
  kept in the table (``subnet`` = ``part:<name>``), so every later trial, node and search reads it. A part missing
  from the table is measured then, never summed short; a part that fails to compile makes that trial time its
  subnet whole, with one warning.

Rows are keyed by the table's `KEY`, the hardware fingerprint and the mode included: a row of other hardware or
another mode is never read. Everything here takes a ``ctx`` with ``arch``, ``num_classes``, ``arch_key``,
``table`` (the table's Ray actor), ``latency`` (`LatencySettings`) and ``model()`` (the search's `TrialContext`).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from supervit import Calibration, Part, SubnetConfig, SuperViT, fit_calibration, hardware_fingerprint, subnet_parts
from supervit.parts import PART_PREFIX

from ..common.latency_table import KEY

__all__ = [
    "LatencySettings",
    "LatencySource",
    "Latency",
    "whole_row",
    "measured_latency",
    "part_rows",
    "predicted_latency",
    "table_calibration",
    "on_latency_node",
]


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured: device, dtype, batch, timed runs, CPU threads, the Ray resource that marks the
    hardware it must run on (None: wherever the trial runs), the program's mode (``compiled``: as deployed, or
    ``eager``), and whether trials predict it from parts (whole programs are still measured for the answers)."""

    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    runs: int = 30
    threads: int | None = None
    resource: str | None = None
    mode: str = "compiled"
    predict: bool = False


class LatencySource(Protocol):
    """What the functions here need of a search's shared context."""

    arch: Any
    num_classes: int
    arch_key: str
    table: Any
    latency: LatencySettings

    def model(self, device: str = "cpu") -> SuperViT: ...


@dataclass(frozen=True)
class Latency:
    """A subnet's latency as a trial reports it."""

    ms: float
    p10_ms: float
    p90_ms: float
    cached: bool  # nothing was measured for it here
    compile_s: float  # compiled for it here (the parts', or the whole program's)
    source: str  # ``predicted`` or ``measured``
    predicted_ms: float  # nan when measured whole
    parts_ms: float  # the parts' sum before calibration (nan when measured whole)
    hardware: str
    node: str


def _key(ctx: LatencySource, name: str, threads: int, mode: str) -> tuple:
    lat = ctx.latency
    fingerprint, _ = hardware_fingerprint(lat.device, threads if lat.device == "cpu" else None)
    return (fingerprint, ctx.arch_key, name, lat.batch, lat.dtype, mode)


def _row(key: tuple, r, kind: str) -> dict:
    import ray

    return dict(zip(KEY, key, strict=True)) | {
        "kind": kind,
        "hardware": r.hardware,
        "compile_s": r.compile_s,
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


def whole_row(
    ctx: LatencySource,
    subnet: SubnetConfig,
    threads: int,
    mode: str | None = None,
    measure: bool = True,
    program=None,
    compile_s: float = 0.0,
) -> tuple[dict | None, bool]:
    """The latency of ``subnet``'s whole program on this node's hardware in ``mode`` (default the search's): from
    the shared table, or (``measure``) measured once and added. Compilation time is recorded beside it, never
    counted in it. ``program``: a program built elsewhere (a loaded package, built in ``compile_s``), timed by the
    same protocol instead of one built here for ``mode``.

    Returns:
        ``(row, cached)``: the table row (None if absent and not measured), and whether it was there already.
    """
    import ray

    from supervit import measure_latency
    from supervit.latency import time_program

    lat = ctx.latency
    mode = mode or lat.mode
    key = _key(ctx, subnet.name, threads, mode)
    row = ray.get(ctx.table.get.remote(key))
    if row is not None or not measure:
        return row, row is not None
    warmup = max(3, lat.runs // 5)
    if program is not None:
        shape = (lat.batch, ctx.arch.in_chans, ctx.arch.img_size, ctx.arch.img_size)
        x = torch.randn(shape, device=lat.device, dtype=getattr(torch, lat.dtype))
        r = time_program(program, x, warmup, lat.runs, mode=mode, compile_s=compile_s)
    else:
        r = measure_latency(
            ctx.model(),
            subnet,
            lat.batch,
            lat.device,
            getattr(torch, lat.dtype),
            runs=lat.runs,
            warmup=warmup,
            threads=threads if lat.device == "cpu" else None,
            mode=mode,
        )
    row = _row(key, r, "subnet")
    ray.get(ctx.table.put.remote(row))
    return row, False


def on_latency_node(ctx: LatencySource, fn, *args):
    """``fn(ctx, *args, threads)`` where latency is measured: here, or with a latency resource as a task on a node
    that has it, holding all of it (one measurement per device at a time)."""
    import ray

    threads = ctx.latency.threads or torch.get_num_threads()
    if not ctx.latency.resource:
        return fn(ctx, *args, threads)
    # Outside the trial's placement group: the measurement goes wherever the resource is.
    task = ray.remote(fn).options(
        num_cpus=0, num_gpus=0, resources={ctx.latency.resource: 1}, scheduling_strategy="DEFAULT"
    )
    return ray.get(task.remote(ctx, *args, threads))


def measured_latency(
    ctx: LatencySource, subnet: SubnetConfig, mode: str | None = None, measure: bool = True
) -> tuple[dict | None, bool]:
    """`whole_row` on the node where latency is measured."""
    return on_latency_node(ctx, _whole, subnet, mode, measure)


def _whole(ctx: LatencySource, subnet: SubnetConfig, mode: str | None, measure: bool, threads: int):
    return whole_row(ctx, subnet, threads, mode, measure)


def part_rows(ctx: LatencySource, parts: list[Part], threads: int) -> tuple[dict[Part, dict], list[Part]]:
    """The table rows of ``parts`` (compiled mode), measuring the missing ones here and adding them.

    Returns:
        ``(rows, measured)``: a row per part, and the parts measured now.

    Raises:
        Whatever compiling a part raises (the caller falls back to the whole program).
    """
    import ray

    from supervit import measure_part

    lat = ctx.latency
    keys = {p: _key(ctx, p.key, threads, "compiled") for p in parts}
    found = ray.get(ctx.table.get_many.remote(list(keys.values())))
    rows = {p: r for p, r in zip(keys, found, strict=True) if r is not None}
    measured = []
    for p in parts:
        if p in rows:
            continue
        r = measure_part(
            ctx.model(),
            p,
            lat.batch,
            lat.device,
            getattr(torch, lat.dtype),
            warmup=max(3, lat.runs // 5),
            runs=lat.runs,
            threads=threads if lat.device == "cpu" else None,
        )
        rows[p] = _row(keys[p], r, "part")
        ray.get(ctx.table.put.remote(rows[p]))
        measured.append(p)
    return rows, measured


_WARNED: set[str] = set()


def _predict(ctx: LatencySource, subnet: SubnetConfig, calibration: Calibration | None, threads: int) -> Latency:
    parts = list(dict.fromkeys(subnet_parts(ctx.arch, subnet)))
    try:
        rows, measured = part_rows(ctx, parts, threads)
    except Exception as e:  # a part Inductor cannot build: this subnet is timed whole instead
        msg = f"latency: a part of {subnet.name} did not compile ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
        if subnet.name not in _WARNED:
            warnings.warn(msg + "timing the subnet whole", stacklevel=2)
            _WARNED.add(subnet.name)
        row, cached = whole_row(ctx, subnet, threads, "compiled")
        return _measured(row, cached)
    total = sum(rows[p]["median_ms"] for p in subnet_parts(ctx.arch, subnet))
    ms = (calibration or Calibration())(total)
    first = rows[parts[0]]
    return Latency(
        ms=ms,
        p10_ms=math.nan,
        p90_ms=math.nan,
        cached=not measured,
        compile_s=float(sum(rows[p]["compile_s"] for p in measured)),
        source="predicted",
        predicted_ms=ms,
        parts_ms=total,
        hardware=first["hardware"],
        node=first.get("node_id", ""),
    )


def _measured(row: dict, cached: bool) -> Latency:
    return Latency(
        ms=row["median_ms"],
        p10_ms=row["p10_ms"],
        p90_ms=row["p90_ms"],
        cached=cached,
        compile_s=0.0 if cached else float(row.get("compile_s", 0.0)),
        source="measured",
        predicted_ms=math.nan,
        parts_ms=math.nan,
        hardware=row["hardware"],
        node=row.get("node_id", ""),
    )


def predicted_latency(ctx: LatencySource, subnet: SubnetConfig, calibration: Calibration | None) -> Latency:
    """``subnet``'s latency predicted from its parts (measured first where the table lacks them), calibrated."""
    return on_latency_node(ctx, _predict, subnet, calibration)


def trial_latency(ctx: LatencySource, subnet: SubnetConfig, calibration: Calibration | None) -> Latency:
    """What a trial reports: predicted from parts, or the whole program measured (the search's setting)."""
    if ctx.latency.predict:
        return predicted_latency(ctx, subnet, calibration)
    return _measured(*measured_latency(ctx, subnet))


def _calibration_points(ctx: LatencySource, threads: int) -> list[tuple[str, float, float]]:
    import ray

    lat = ctx.latency
    fingerprint = _key(ctx, "", threads, "compiled")[0]
    rows = ray.get(ctx.table.matching.remote(fingerprint, ctx.arch_key, lat.batch, lat.dtype, "compiled"))
    parts = {r["subnet"]: r["median_ms"] for r in rows if r["subnet"].startswith(PART_PREFIX)}
    points = []
    for r in rows:
        if r["subnet"].startswith(PART_PREFIX):
            continue
        try:
            subnet = SubnetConfig.parse(r["subnet"]).validate(ctx.arch)
        except ValueError:
            continue
        names = [p.key for p in subnet_parts(ctx.arch, subnet)]
        if all(n in parts for n in names):  # only programs whose every part is known
            points.append((subnet.name, sum(parts[n] for n in names), r["median_ms"]))
    return points


def table_calibration(ctx: LatencySource) -> tuple[Calibration, list[tuple[str, float, float]]]:
    """The calibration fitted on every whole compiled program of this hardware, architecture, batch and dtype in
    the table whose parts are all there too; returns it and its points ``(subnet, parts sum, measured)``."""
    points = on_latency_node(ctx, _calibration_points)
    return fit_calibration([(s, m) for _, s, m in points]), points
