"""How many trials the search needs to find the best subnet under a budget, against random sampling.

    python benchmarks/search_efficiency.py --checkpoint ckpt.safetensors [--budget 0.5x] [--seeds 10]
    python benchmarks/search_efficiency.py --mlflow-uri sqlite:///mlflow.db   # newest finished supertraining

On the `tiny` space with one fixed supernet: every subnet under the budget is evaluated on the held-out search
split (the exhaustive optimum); then the project's searcher (`BudgetedOptunaSearch`: proposals over budget
ruled out, repeats answered from memory) is driven with a table lookup as the trial, for several seeds and
samplers. Reported: trials until a trial's top-1 is within 0.5 points of the optimum, median over seeds, as a
share of the feasible subnets. Target: TPE's median under 25%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from pipeline.common.runs import resolve_tracking_uri
from pipeline.search.plan import resolve_checkpoint
from pipeline.search.searcher import BudgetedOptunaSearch, make_sampler
from pipeline.search.space import default_space_path, load_space
from supervit import evaluate, gflops, load_checkpoint, parse_budget
from supervit.checkpoint import read_checkpoint_metadata
from supervit.data import load_data


def trials_to_target(
    table: dict, space, arch, num_classes, budget, sampler: str, seed: int, warm: bool, target: float, max_trials: int
) -> int:
    """Trials the searcher needs until one reaches ``target`` top-1 (max_trials + 1 if never)."""
    warm_points = [s for s in space.uniform_subnets() if s.validate(arch).name in table] if warm else ()
    searcher = BudgetedOptunaSearch(
        space,
        arch,
        num_classes,
        budget,
        metric="top1",
        mode="max",
        sampler=make_sampler(sampler, space, seed, max_trials),
        warm_start=warm_points,
    )
    for i in range(1, min(max_trials, len(table)) + 1):
        config = searcher.suggest(str(i))
        subnet = space.subnet(config).validate(arch)
        acc = table[subnet.name]
        searcher.on_trial_complete(str(i), {"top1": acc, "latency_ms": 0.0})
        if acc >= target:
            return i
    return max_trials + 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="tiny supernet (file, run id or runs:/); default: newest in the store")
    p.add_argument("--mlflow-uri")
    p.add_argument("--budget", default="0.5x")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--tolerance", type=float, default=0.5, help="points below the optimum that count as found")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path, _ = resolve_checkpoint(args.checkpoint, resolve_tracking_uri(args.mlflow_uri), Path(tmp))
        model = load_checkpoint(path).eval()
        data_spec = read_checkpoint_metadata(path)["extra"]["data"]
    arch, num_classes = model.arch, model.num_classes
    space = load_space(default_space_path(arch.name))
    budget = parse_budget(args.budget, arch, num_classes)
    search = torch.utils.data.DataLoader(load_data(data_spec, arch).search, batch_size=512)
    subnets = [s.validate(arch) for s in space.subnets() if gflops(arch, s, num_classes) <= budget]
    counts = evaluate(model, search, subnets)  # the exhaustive search, in one pass
    table = {s.name: 100.0 * c / n for s, (c, n) in counts.items()}
    best = max(table, key=table.get)
    target = table[best] - args.tolerance
    n = len(table)
    print(
        f"# {arch.name}, data {data_spec}, budget {args.budget} = {budget * 1e3:.3f} MFLOPs: "
        f"{n} of {len(space.subnets())} subnets feasible; exhaustive optimum {best} at {table[best]:.2f}% "
        f"(target >= {target:.2f}%; {sum(v >= target for v in table.values())} subnets reach it)"
    )
    print("| sampler | warm start | trials per seed | median | median / feasible |")
    print("|---|---|---|---|---|")
    for sampler, warm in (("tpe", True), ("tpe", False), ("random", False)):
        counts = [
            trials_to_target(table, space, arch, num_classes, budget, sampler, seed, warm, target, n)
            for seed in range(args.seeds)
        ]
        med = statistics.median(counts)
        print(
            f"| {sampler} | {'uniform cells' if warm else 'no'} | {', '.join(map(str, counts))} | {med:g} | "
            f"{100 * med / n:.0f}% |"
        )


if __name__ == "__main__":
    main()
