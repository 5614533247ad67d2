"""Does one supernet match separately trained models? Test top-1 per cell, mean ± std over seeds.

    python benchmarks/fidelity.py [--seeds 0 1 2] [--recipes seed sandwich balanced] [--procs 2]

For each seed: one supernet per recipe, and one model of the same architecture per cell (every grid at keep 1
and at the lowest keep rate) trained at that cell only, with the task loss, the same options (the preset's
`pipeline.supertrain` defaults: epochs, batch, AdamW, schedule) and the same seed. Training is the worker's own
objects and epoch without Ray (`pipeline.supertrain.worker.make_worker`, `supervit.train_one_epoch`); every
job runs in its own process with one torch thread, ``--procs`` at a time. Compute is counted as training FLOPs
(a forward and backward taken as 3x the forward's FLOPs, summed over every subnet a step runs) and as
CPU-seconds of training.

A recipe may carry `SubnetSampler` options as ``recipe:option=value,...`` (``task_weight``,
``update_every_role``, ``smallest_grid_rotation`` as ``a/b/...``), e.g.
``balanced:update_every_role=0,smallest_grid_rotation=smallest/any``.
``--results FILE`` keeps one JSON line per finished job and skips jobs already there, so an interrupted run
continues. Targets (the default recipe): every cell's mean >= the separately trained mean - 0.5, and the
largest cell's mean >= the separately trained one.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.supertrain import SupertrainOptions  # noqa: E402
from pipeline.supertrain.worker import make_worker  # noqa: E402
from supervit import RECIPES, Role, SubnetConfig, SubnetSampler, evaluate, get_arch, gflops  # noqa: E402
from supervit import train_one_epoch as train_epoch  # noqa: E402

SEPARATE = "separate"


class CountingSampler:
    """Wraps a sampler; counts forward FLOPs per image of every role drawn (one step = one batch)."""

    def __init__(self, inner, arch, num_classes: int) -> None:
        self.inner, self.arch, self.num_classes = inner, arch, num_classes
        self.fwd_gflops = 0.0  # per image, summed over steps
        self.passes = 0
        self._cache: dict[SubnetConfig, float] = {}

    def sample(self) -> list[Role]:
        roles = self.inner.sample()
        for r in roles:
            if r.subnet not in self._cache:
                self._cache[r.subnet] = gflops(self.arch, r.subnet, self.num_classes)
            self.fwd_gflops += self._cache[r.subnet]
            self.passes += 1
        return roles


class FixedSampler:
    """One subnet, task loss only: a separately trained model."""

    def __init__(self, subnet: SubnetConfig) -> None:
        self.roles = [Role("full", subnet)]

    def sample(self) -> list[Role]:
        return self.roles


def target_cells(arch) -> list[SubnetConfig]:
    """Every grid at keep 1 and at the lowest keep rate, largest grid first."""
    low = min(arch.keep_rates)
    return [SubnetConfig(g, (r,) * arch.num_stages) for g in reversed(arch.grids) for r in (1.0, low)]


def parse_kind(kind: str) -> tuple[str, dict]:
    """``recipe[:option=value,...]`` -> (recipe, `SubnetSampler` keyword arguments)."""
    recipe, _, rest = kind.partition(":")
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "task_weight":
            kwargs[key] = float(value)
        elif key == "update_every_role":
            kwargs[key] = value not in ("0", "false", "")
        elif key == "smallest_grid_rotation":
            kwargs[key] = tuple(value.split("/"))
        else:
            raise ValueError(f"unknown recipe option {key!r} in {kind!r}")
    return recipe, kwargs


def run_job(kind: str, cell: str | None, seed: int, preset: str, data: str, epochs: int | None) -> dict:
    """Train one model (a supernet under recipe ``kind``, or a separate model at ``cell``) and test it."""
    opts = SupertrainOptions(preset=preset, data=data, epochs=epochs, seed=seed, cpus_per_worker=1).resolved()
    arch = get_arch(preset)
    num_classes = 10 if data == "digits" else None
    if kind == SEPARATE:
        inner = FixedSampler(SubnetConfig.parse(cell))
    else:
        recipe, kwargs = parse_kind(kind)
        inner = SubnetSampler(arch, recipe, schedules=opts.schedules, seed=seed, **kwargs)
    sampler = CountingSampler(inner, arch, num_classes or 1000)
    t0 = time.process_time()
    w = make_worker(opts)
    for _ in range(opts.epochs):
        train_epoch(w.model, w.loader, sampler, w.training)
    cpu_s = time.process_time() - t0
    cells = target_cells(arch) if kind != SEPARATE else [SubnetConfig.parse(cell)]
    counts = evaluate(w.model, w.test_loader, cells)
    return {
        "kind": kind,
        "cell": cell,
        "seed": seed,
        "epochs": opts.epochs,
        "test_top1": {s.name: 100.0 * c / n for s, (c, n) in counts.items()},
        "train_tflops": 3 * sampler.fwd_gflops * opts.batch_size / 1e3,
        "passes_per_step": sampler.passes / max(1, opts.epochs * len(w.loader)),
        "cpu_s": cpu_s,
    }


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "—"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.1f} ± {sd:.1f}"


def report(rows: list[dict], arch, kinds: list[str], seeds: list[int], default: str) -> tuple[str, bool]:
    """Markdown table (cells x approaches, then compute) and whether the default recipe meets the targets."""
    rows = [r for r in rows if r["seed"] in seeds]
    cells = [c.name for c in target_cells(arch)]

    def sep(cell):
        return [r["test_top1"][cell] for r in rows if r["kind"] == SEPARATE and r["cell"] == cell]

    def sup(kind, cell):
        return [r["test_top1"][cell] for r in rows if r["kind"] == kind]

    head = ["cell", "GFLOPs", "separately trained"] + [f"supernet: {k}" for k in kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ok = default in kinds
    for cell in cells:
        s = sep(cell)
        row = [cell, f"{gflops(arch, SubnetConfig.parse(cell), 10):.4f}", mean_std(s)]
        for k in kinds:
            v = sup(k, cell)
            gap = f" ({statistics.mean(v) - statistics.mean(s):+.1f})" if v and s else ""
            row.append(mean_std(v) + gap)
            if k == default:
                ok &= bool(v and s) and statistics.mean(v) >= statistics.mean(s) - (0.0 if cell == cells[0] else 0.5)
        lines.append("| " + " | ".join(row) + " |")

    def compute(sel):
        if not sel:
            return "—", "—"
        per_seed = {}
        for r in sel:
            f, c = per_seed.get(r["seed"], (0.0, 0.0))
            per_seed[r["seed"]] = (f + r["train_tflops"], c + r["cpu_s"])
        fl = statistics.mean(v[0] for v in per_seed.values())
        cpu = statistics.mean(v[1] for v in per_seed.values())
        return f"{fl:.2f}", f"{cpu:.0f}"

    comp = [compute([r for r in rows if r["kind"] == SEPARATE])] + [
        compute([r for r in rows if r["kind"] == k]) for k in kinds
    ]
    lines.append("| training TFLOPs per seed (all cells) | | " + " | ".join(c[0] for c in comp) + " |")
    lines.append("| training CPU-s per seed (all cells) | | " + " | ".join(c[1] for c in comp) + " |")
    return "\n".join(lines), ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipe[:option=value,...]")
    p.add_argument("--default", default=None, help="recipe the targets are checked for (default: the CLI's)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default="digits")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's supertraining default")
    p.add_argument("--procs", type=int, default=2, help="jobs at a time, one torch thread each")
    p.add_argument("--no-separate", action="store_true", help="skip the separately trained models")
    p.add_argument("--results", type=Path, default=None, help="JSON lines of finished jobs, reused on rerun")
    args = p.parse_args()
    for k in args.recipes:
        try:
            recipe, kwargs = parse_kind(k)
            SubnetSampler(get_arch(args.preset), recipe, **kwargs)  # bad values fail here, not in a job
        except (ValueError, KeyError) as e:
            p.error(str(e))
    if args.default is None:
        args.default = SupertrainOptions.recipe
    arch = get_arch(args.preset)

    done = []
    if args.results and args.results.exists():
        done = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    epochs = SupertrainOptions(preset=args.preset, epochs=args.epochs).resolved().epochs
    have = {(r["kind"], r["cell"], r["seed"]) for r in done if r["epochs"] == epochs}
    done = [r for r in done if r["epochs"] == epochs]
    jobs = []
    for seed in args.seeds:
        if not args.no_separate:
            jobs += [(SEPARATE, c.name, seed) for c in target_cells(arch)]
        jobs += [(k, None, seed) for k in args.recipes]
    jobs = [j for j in jobs if j not in have]
    # Seed by seed (a partial run is already a comparison), supernets (longest) first within a seed.
    jobs.sort(key=lambda j: (args.seeds.index(j[2]), j[0] == SEPARATE))
    print(f"{len(jobs)} jobs to run ({len(have)} reused), {args.procs} at a time, {epochs} epochs", flush=True)
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(args.procs) as pool:
        futs = {pool.submit(run_job, k, c, s, args.preset, args.data, args.epochs): (k, c, s) for k, c, s in jobs}
        for f in cf.as_completed(futs):
            r = f.result()
            done.append(r)
            if args.results:
                with args.results.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")
            top = " ".join(f"{k}={v:.1f}" for k, v in r["test_top1"].items())
            at = time.perf_counter() - t0
            print(f"[{at:6.0f} s] {r['kind']} {r['cell'] or ''} seed {r['seed']}: {top}", flush=True)
    kinds = list(dict.fromkeys(args.recipes))
    table, ok = report(done, arch, kinds, args.seeds, args.default)
    print(f"\n{args.preset} on {args.data}, {epochs} epochs, seeds {args.seeds}; test top-1 %", end=" ")
    print("(mean ± std; gap to the separately trained mean)\n")
    print(table)
    verdict = "met" if ok else ("NOT met" if args.default in kinds else "not measured (add it to --recipes)")
    print(f"\ntargets for the default recipe `{args.default}`", end=" ")
    print(f"(every cell >= separate - 0.5, largest >= separate): {verdict}")
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
