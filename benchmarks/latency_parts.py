"""Latency from compiled parts against whole compiled programs, and what each costs to compile.

    python benchmarks/latency_parts.py --arch tiny --batches 1,32 [--subnets 18] [--calibrate 2] [--runs 50]
    python benchmarks/latency_parts.py --arch deit_s --batches 1,32 --subnets 16 --out deit_s.md

For one architecture and each batch size, on this machine (CPU, or ``--device cuda``):

1. every part of the preset's whole search space (`supervit.parts.space_parts`) is compiled as deployed and timed
   (`measure_part`), each compile timed apart;
2. ``--subnets`` whole programs covering every grid, uniform and mixed schedules, are compiled
   (`compile_subnet`), and every program is timed in ``--rounds`` interleaved rounds (`time_program`: the same
   protocol as `measure_latency`), its figure the median of its per-round medians;
3. the calibration (`fit_calibration`) is fitted on ``--calibrate`` of them (the smallest and largest sums: what a
   search fits on) and the prediction is scored on the others only: share within +-10 %, median and worst
   relative error, Spearman's rank correlation of predicted with measured latency.

Compile cost of the whole space: the parts' compile seconds, summed, against the mean whole-program compile times
the space's size (every subnet compiled; an extrapolation from the measured programs, printed as such).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.search.latency_report import spearman  # noqa: E402
from pipeline.search.space import default_space_path, load_space  # noqa: E402
from supervit import SubnetConfig, SuperViT, fit_calibration, get_arch, predict_latency, time_program  # noqa: E402
from supervit.export import compile_module, compile_subnet  # noqa: E402
from supervit.parts import PartModule, space_parts, subnet_parts  # noqa: E402


def sample_subnets(arch, space, n: int) -> list[SubnetConfig]:
    """``n`` subnets, round-robin over the grids: per grid the uniform schedules first, then mixed ones in a
    fixed shuffled order (every grid, several schedules)."""
    import random

    rng = random.Random(0)
    per_grid = {}
    for g in space.grids:
        subs = [SubnetConfig(g, rs) for rs in itertools.product(*space.keep_rates)]
        uniform = [s for s in subs if len(set(s.keep_rates)) == 1]
        mixed = [s for s in subs if len(set(s.keep_rates)) > 1]
        rng.shuffle(mixed)
        per_grid[g] = uniform[::-1] + mixed
    out = []
    for i in itertools.count():
        for g in space.grids:
            if i < len(per_grid[g]) and len(out) < n:
                out.append(per_grid[g][i].validate(arch))
        if len(out) >= n or i > 100:
            return out


def run(args, batch: int) -> dict:
    arch = get_arch(args.arch)
    space = load_space(default_space_path(arch.name))
    torch.manual_seed(0)
    model = SuperViT(arch, num_classes=args.classes).eval()
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    every = list(space.subnets())
    parts = space_parts(arch, every)
    programs, compile_s = {}, {}
    t0 = time.perf_counter()
    for p in parts:  # every part compiled once, as deployed
        module = PartModule(model, p).to(device=device, dtype=dtype).eval()
        x = module.example_input(batch, device, dtype)
        fn, compile_s[p], _ = compile_module(module, x)
        programs[p] = (fn, x)
        print(f"  part {p.name:<14} compiled in {compile_s[p]:5.1f} s", flush=True)
    parts_wall = time.perf_counter() - t0
    wholes = sample_subnets(arch, space, args.subnets)
    for s in wholes:
        c = compile_subnet(model, s, device=device, dtype=dtype, batch_size=batch)
        programs[s] = (c, c.module.example_input(batch, dtype))
        compile_s[s] = c.compile_s
        print(f"  whole {s.name:<18} compiled in {c.compile_s:5.1f} s", flush=True)
    # Rounds: every program timed once a round, in the same order, so drift and noise on a shared machine hit
    # every program alike; a program's figure is the median of its per-round medians.
    per_round = {k: [] for k in programs}
    for i in range(args.rounds):
        for k, (fn, x) in programs.items():
            per_round[k].append(time_program(fn, x, args.warmup, args.runs).median_ms)
        print(f"  round {i + 1}/{args.rounds} timed", flush=True)
    ms = {k: statistics.median(v) for k, v in per_round.items()}
    part_ms = {p: ms[p] for p in parts}
    rows = []
    for s in wholes:
        total = sum(part_ms[p] for p in subnet_parts(arch, s))
        spread = (max(per_round[s]) - min(per_round[s])) / ms[s]
        rows.append(
            {"subnet": s.name, "measured_ms": ms[s], "parts_sum_ms": total, "compile_s": compile_s[s], "spread": spread}
        )
    by_sum = sorted(rows, key=lambda r: r["parts_sum_ms"])
    fit_on = {by_sum[0]["subnet"], by_sum[-1]["subnet"]} if args.calibrate >= 2 else {by_sum[0]["subnet"]}
    for r in by_sum[1:-1]:  # more calibration programs, spread over the range
        if len(fit_on) >= args.calibrate:
            break
        fit_on.add(r["subnet"])
    cal = fit_calibration([(r["parts_sum_ms"], r["measured_ms"]) for r in rows if r["subnet"] in fit_on])
    for r in rows:
        pred = predict_latency(arch, SubnetConfig.parse(r["subnet"]), part_ms, cal)
        r |= {"predicted_ms": pred, "rel_err": pred / r["measured_ms"] - 1, "calibration": r["subnet"] in fit_on}
    test = [r for r in rows if not r["calibration"]]
    errs = [abs(r["rel_err"]) for r in test]
    mean_whole = statistics.fmean(r["compile_s"] for r in rows)
    return {
        "rounds": args.rounds,
        "whole_round_spread_median": statistics.median(r["spread"] for r in rows),
        "arch": arch.name,
        "batch": batch,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads() if args.threads is None else args.threads,
        "parts": len(parts),
        "space": len(every),
        "parts_compile_s": sum(compile_s[p] for p in parts),
        "parts_wall_s": parts_wall,
        "whole_compile_mean_s": mean_whole,
        "whole_space_compile_s_extrapolated": mean_whole * len(every),
        "calibration": {"scale": cal.scale, "offset_ms": cal.offset_ms, "fitted_on": sorted(fit_on)},
        "scored": len(test),
        "within_10pct": sum(e <= 0.10 for e in errs) / len(errs),
        "median_rel_err": statistics.median(errs),
        "worst_rel_err": max(errs),
        "spearman": spearman([r["predicted_ms"] for r in test], [r["measured_ms"] for r in test]),
        "rows": rows,
        "part_ms": {p.name: part_ms[p] for p in parts},
    }


def markdown(res: list[dict]) -> str:
    lines = [
        "| arch | batch | parts / subnets | compile: parts (s) | compile: every subnet (s, extrapolated) | ratio "
        "| scored | within ±10 % | median err | worst err | Spearman | calibration | threads | round spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        c = r["calibration"]
        lines.append(
            f"| {r['arch']} | {r['batch']} | {r['parts']} / {r['space']} | {r['parts_compile_s']:.0f} | "
            f"{r['whole_space_compile_s_extrapolated']:.0f} ({r['whole_compile_mean_s']:.1f} each) | "
            f"{r['parts_compile_s'] / r['whole_space_compile_s_extrapolated']:.3f} | {r['scored']} | "
            f"{100 * r['within_10pct']:.0f} % | {100 * r['median_rel_err']:.1f} % | {100 * r['worst_rel_err']:.1f} % | "
            f"{r['spearman']:.3f} | {c['scale']:.3f} x sum {c['offset_ms']:+.4f} ms | {r['threads']} | "
            f"{100 * r['whole_round_spread_median']:.0f} % |"
        )
    out = ["\n".join(lines), ""]
    for r in res:
        out += [
            f"### {r['arch']}, batch {r['batch']}: predicted against measured (ms)",
            "",
            "| subnet | measured | predicted | error | parts sum | round spread | fitted on |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in sorted(r["rows"], key=lambda x: x["measured_ms"]):
            out.append(
                f"| {row['subnet']} | {row['measured_ms']:.4f} | {row['predicted_ms']:.4f} | "
                f"{100 * row['rel_err']:+.1f} % | {row['parts_sum_ms']:.4f} | {100 * row['spread']:.0f} % | "
                f"{'yes' if row['calibration'] else ''} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="tiny", choices=("tiny", "deit_ti", "deit_s"))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--subnets", type=int, default=18, help="whole programs compiled and timed (>= 16 to score)")
    ap.add_argument("--calibrate", type=int, default=2, help="whole programs the calibration is fitted on")
    ap.add_argument("--classes", type=int, default=None, help="classifier outputs (default: tiny 10, deit 1000)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50, help="timed calls per program per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over every program")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here (and JSON beside it)")
    args = ap.parse_args()
    if args.classes is None:
        args.classes = 10 if args.arch == "tiny" else 1000
    res = []
    for b in [int(x) for x in args.batches.split(",")]:
        print(f"{args.arch}, batch {b}:", flush=True)
        res.append(run(args, b))
    text = markdown(res)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
