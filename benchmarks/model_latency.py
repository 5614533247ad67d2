"""SuperViT(DeiT-S) latency as deployed, eager and compiled, per seed cell against its FLOPs; `tiny`'s FLOPs
order; the full model against timm's DeiT-S. One run, alternating rounds so drift hits every program alike.

    python benchmarks/model_latency.py [--mode eager|compiled|both] [--device cpu|cuda] [--dtype float32]
        [--batches 1,32] [--rounds 3] [--runs 10] [--threads 2] [--skip tiny,timm] [--out report.md]

What is timed is `measure_latency`'s program: the fixed subnet (input resize included) on images at 224 px,
as it is (eager) or compiled for the device (`supervit.export`; compile time reported apart). Prints, per
cell (grids 8/10/12/14 x keep 0.5/0.7/1.0) and batch: median latency per mode, compile seconds, the latency
ratio to the full model (median of the per-round ratios) and the reduction efficiency
(1 - latency ratio) / (1 - FLOPs ratio). Then whether each target is met:

- compiled <= eager at every cell and batch;
- efficiency at (14 x 14, keep 0.5), batch 1, >= 0.85;
- `tiny` (batch 1): latency in FLOPs order across its uniform cells (Spearman 1, no inverted pair);
- full model <= 1.02 x timm's `deit_small_patch16_224` (2 % for noise), eager against eager and compiled
  against the same compile of timm's model.

The machine may be shared: every figure is a median over rounds, and the per-round spread is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.search.latency_report import inverted_pairs, spearman  # noqa: E402
from supervit import SubnetConfig, SuperViT, get_arch, gflops, hardware_fingerprint, measure_latency  # noqa: E402
from supervit.export import compile_module, compiled_cache_size  # noqa: E402

MODES = ("eager", "compiled")


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _time(fn, x: torch.Tensor, warmup: int, runs: int, cudagraphs: bool = False) -> float:
    """Median ms of ``fn(x)``, the protocol of `measure_latency`."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    step = torch.compiler.cudagraph_mark_step_begin if cudagraphs else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            step()
            fn(x)
        sync()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            step()
            fn(x)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Bench:
    """Alternating rounds of `measure_latency` over (subnet, batch, mode) programs of one model."""

    def __init__(self, model: SuperViT, args: argparse.Namespace) -> None:
        self.model, self.args = model, args
        self.dtype = getattr(torch, args.dtype)
        self.ms: dict[tuple, list[float]] = {}
        self.compile_s: dict[tuple, float] = {}

    def runs(self, batch: int) -> int:
        scale = 10 if self.args.device == "cuda" else 1  # GPU forwards are short: more of them
        return (self.args.runs if batch == 1 else max(3, self.args.runs // 3)) * scale

    def measure(self, subnet: SubnetConfig, batch: int, mode: str, warmup: int) -> None:
        r = measure_latency(
            self.model,
            subnet,
            batch,
            self.args.device,
            self.dtype,
            warmup=warmup,
            runs=self.runs(batch),
            threads=self.args.threads,
            mode=mode,
        )
        self.ms.setdefault((subnet, batch, mode), []).append(r.median_ms)
        self.compile_s[(subnet, batch, mode)] = r.compile_s

    def run(self, subnets: list[SubnetConfig], batches: list[int], modes: list[str], rounds: int) -> None:
        for batch in batches:
            for mode in modes:
                for s in subnets:  # compile (first call) and warm every program once
                    self.measure(s, batch, mode, warmup=3)
                    if mode == "compiled":
                        print(f"  compiled {s} @{batch}: {self.compile_s[(s, batch, mode)]:.1f} s", flush=True)
                self.ms = {k: v for k, v in self.ms.items() if not (k[1] == batch and k[2] == mode)}
        for r in range(rounds):
            for batch in batches:
                for s in subnets:
                    for mode in modes:
                        self.measure(s, batch, mode, warmup=2)
            print(f"  round {r + 1}/{rounds} done (load {_load()})", flush=True)

    def median(self, s: SubnetConfig, batch: int, mode: str) -> float:
        return statistics.median(self.ms[(s, batch, mode)])

    def ratio(self, a: tuple, b: tuple) -> tuple[float, list[float]]:
        """Median and list of the per-round ratios ms[a] / ms[b]."""
        rs = [x / y for x, y in zip(self.ms[a], self.ms[b], strict=True)]
        return statistics.median(rs), rs


def deit_cells(args: argparse.Namespace, modes: list[str], batches: list[int], out: list[str]) -> dict:
    """DeiT-S per cell; returns the facts the targets need."""
    torch.manual_seed(0)
    arch = get_arch("deit_s")
    model = SuperViT(arch).eval()
    cells = [SubnetConfig(g, r) for g in arch.grids for r in (0.5, 0.7, 1.0)]
    if args.cells:
        cells = [SubnetConfig.parse(c) for c in args.cells.split(",")]
        cells = cells if arch.largest in cells else [*cells, SubnetConfig(max(arch.grids), 1.0)]
    full = SubnetConfig(max(arch.grids), 1.0)
    full_gf = gflops(arch)
    compiled_cache_size(len(cells) * len(batches) + 1)
    print(f"DeiT-S: {len(cells)} cells x batches {batches} x modes {modes} (load {_load()})", flush=True)
    bench = Bench(model, args)
    bench.run(cells, batches, modes, args.rounds)

    threads = args.threads or torch.get_num_threads()
    hardware = hardware_fingerprint(args.device, threads if args.device == "cpu" else None)[1]
    out += [f"## SuperViT(DeiT-S) per cell — {hardware}; {args.dtype}", ""]
    head = ["grid", "keep", "GFLOPs", "FLOPs ratio"]
    for b in batches:
        head += [f"{m} ms @{b}" for m in modes]
        if "compiled" in modes:
            head += [f"compile s @{b}"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in cells:
        gf = gflops(arch, s)
        row = [str(s.grid), "-".join(f"{r:g}" for r in s.keep_rates), f"{gf:.3f}", f"{gf / full_gf:.3f}"]
        for b in batches:
            row += [f"{bench.median(s, b, m):.2f}" for m in modes]
            if "compiled" in modes:
                row += [f"{bench.compile_s[(s, b, 'compiled')]:.0f}"]
        out.append("| " + " | ".join(row) + " |")
    out += ["", "Latency ratio to the full model (median of per-round ratios) and efficiency", ""]
    head = ["grid", "keep"] + [f"{m} @{b}: ratio / eff." for b in batches for m in modes]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    facts: dict = {"cells": cells, "bench": bench}
    for s in cells:
        fr = gflops(arch, s) / full_gf
        row = [str(s.grid), "-".join(f"{r:g}" for r in s.keep_rates)]
        for b in batches:
            for m in modes:
                lr, _ = bench.ratio((s, b, m), (full, b, m))
                eff = (1 - lr) / (1 - fr) if fr < 1 else float("nan")
                row.append(f"{lr:.3f} / {eff:.3f}")
                facts[("eff", s, b, m)] = eff
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    if len(modes) == 2:
        slower = []
        for b in batches:
            for s in cells:
                q, rs = bench.ratio((s, b, "compiled"), (s, b, "eager"))
                if q > 1.0:
                    slower.append(f"{s}@{b}: compiled/eager {q:.3f} (rounds {', '.join(f'{r:.2f}' for r in rs)})")
        facts["compiled_slower"] = slower
    spreads = [max(v) / min(v) for v in bench.ms.values() if len(v) > 1]
    if spreads:
        out.append(
            f"Spread over rounds (max/min of a program's round medians): median {statistics.median(spreads):.2f}, "
            f"worst {max(spreads):.2f}; load average at the end {_load()}"
        )
        out.append("")
    return facts


def tiny_order(args: argparse.Namespace, modes: list[str], out: list[str]) -> dict:
    """`tiny` at batch 1: latency against FLOPs across the uniform cells, per mode."""
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10).eval()
    cells = sorted((SubnetConfig(g, r) for g in arch.grids for r in (0.5, 0.7, 1.0)), key=lambda s: gflops(arch, s, 10))
    compiled_cache_size(len(cells) + 1)
    print(f"tiny: {len(cells)} cells x modes {modes} (load {_load()})", flush=True)
    targs = argparse.Namespace(**{**vars(args), "runs": max(200, args.runs * 20)})
    bench = Bench(model, targs)
    bench.run(cells, [1], modes, args.rounds)
    out += ["## tiny preset, batch 1: latency in FLOPs order?", ""]
    out += ["| subnet | MFLOPs | " + " | ".join(f"{m} ms" for m in modes) + " |", "|---|---|" + "---|" * len(modes)]
    for s in cells:
        ms = " | ".join(f"{bench.median(s, 1, m):.3f}" for m in modes)
        out.append(f"| {s} | {gflops(arch, s, 10) * 1e3:.2f} | {ms} |")
    facts = {}
    for m in modes:
        rows = [{"subnet": s.name, "gflops": gflops(arch, s, 10), "latency_ms": bench.median(s, 1, m)} for s in cells]
        rho = spearman([r["gflops"] for r in rows], [r["latency_ms"] for r in rows])
        inv = inverted_pairs(rows)
        facts[m] = (rho, inv)
        out.append("")
        out.append(f"{m}: Spearman {rho:.3f}; inverted pairs: {', '.join(f'{a}>{b}' for a, b in inv) or 'none'}")
    compile_s = [bench.compile_s[(s, 1, "compiled")] for s in cells] if "compiled" in modes else []
    if compile_s:
        out.append(f"compile s per cell: median {statistics.median(compile_s):.1f}, max {max(compile_s):.1f}")
    out.append("")
    return facts


def against_timm(args: argparse.Namespace, modes: list[str], batches: list[int], out: list[str]) -> dict:
    """The full model against timm's DeiT-S, eager against eager, compiled against compiled."""
    import timm

    from supervit import FixedSubnet

    torch.manual_seed(0)
    arch = get_arch("deit_s")
    dev, dtype = args.device, getattr(torch, args.dtype)
    ours = FixedSubnet(SuperViT(arch).eval()).to(dev, dtype)
    ref = timm.create_model("deit_small_patch16_224", pretrained=False).to(dev, dtype).eval()
    old = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    programs: dict[tuple, tuple] = {}
    for b in batches:
        x = torch.randn(b, 3, 224, 224, device=dev, dtype=dtype)
        for m in modes:
            for name, module in (("ours", ours), ("timm", ref)):
                if m == "eager":
                    programs[(name, b, m)] = (module, x, False)
                else:
                    fn, s, cg = compile_module(module, x)
                    print(f"  compiled {name} @{b}: {s:.1f} s", flush=True)
                    programs[(name, b, m)] = (fn, x, cg)
    ratios: dict[tuple, list[float]] = {}
    scale = 10 if dev == "cuda" else 1
    for _ in range(args.rounds):
        for b in batches:
            runs = (args.runs if b == 1 else max(3, args.runs // 3)) * scale
            for m in modes:
                a = _time(*programs[("ours", b, m)][:2], 2, runs, programs[("ours", b, m)][2])
                t = _time(*programs[("timm", b, m)][:2], 2, runs, programs[("timm", b, m)][2])
                ratios.setdefault((b, m), []).append(a / t)
    torch.set_num_threads(old)
    out += ["## Full model against timm deit_small_patch16_224 (ours / timm, median of rounds)", ""]
    facts = {}
    for (b, m), rs in ratios.items():
        facts[(b, m)] = statistics.median(rs)
        out.append(f"- batch {b}, {m}: {statistics.median(rs):.3f}x (rounds {', '.join(f'{r:.3f}' for r in rs)})")
    out.append("")
    return facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--mode", default="both", choices=["eager", "compiled", "both"])
    p.add_argument("--batches", default=None, help="comma-separated (default 1,32 on CPU, 1,256 on CUDA)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--runs", type=int, default=10, help="timed forwards per measurement at batch 1 (a third above)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's current)")
    p.add_argument("--cells", default=None, help="only these DeiT-S cells, e.g. g14_k0.5,g8_k1 (full model added)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: deit, tiny, timm")
    p.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = p.parse_args()
    modes = list(MODES) if args.mode == "both" else [args.mode]
    batches = [int(b) for b in (args.batches or ("1,256" if args.device == "cuda" else "1,32")).split(",")]
    skip = set(filter(None, args.skip.split(",")))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = [f"# SuperViT latency as deployed (torch {torch.__version__}; load average at start {_load()})", ""]
    verdicts = []
    if "deit" not in skip:
        facts = deit_cells(args, modes, batches, out)
        if 1 in batches:
            for m in modes:
                eff = facts[("eff", SubnetConfig(14, 0.5), 1, m)]
                ok = "met" if eff >= 0.85 else "NOT met"
                verdicts.append(f"efficiency (14, 0.5) @1 {m}: {eff:.3f} (target >= 0.85: {ok})")
        if "compiled_slower" in facts:
            slower = facts["compiled_slower"]
            verdicts.append(
                "compiled <= eager at every cell and batch: "
                + ("met" if not slower else f"NOT met at {len(slower)}: " + "; ".join(slower))
            )
    if "tiny" not in skip:
        for m, (rho, inv) in tiny_order(args, modes, out).items():
            ok = "met" if not inv else f"NOT met ({len(inv)} inverted pairs)"
            verdicts.append(f"tiny FLOPs order @1 {m}: Spearman {rho:.3f} (target: no inverted pair: {ok})")
    if "timm" not in skip:
        for (b, m), q in against_timm(args, modes, batches, out).items():
            verdicts.append(f"full vs timm @{b} {m}: {q:.3f}x (target <= 1.02: {'met' if q <= 1.02 else 'NOT met'})")
    out += ["## Targets", ""] + [f"- {v}" for v in verdicts] + [""]
    text = "\n".join(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
