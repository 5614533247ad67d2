"""SuperViT(DeiT-S) latency per seed cell against its FLOPs, and against timm's DeiT-S, in one run.

    python benchmarks/model_latency.py [--device cpu|cuda] [--dtype float32|bfloat16] [--runs 7]

Prints, per cell (grids 8/10/12/14 x keep 0.5/0.7/1.0): GFLOPs, FLOPs ratio to full, median latency at batch 1
and 32, latency ratio to full (batch 32), and the "reduction efficiency" (1 - latency ratio) / (1 - FLOPs ratio).
Then our full model against timm's `deit_small_patch16_224`, timed in alternating rounds so drift hits both.
Targets: full <= 1.02x timm; efficiency at (14, 0.5), batch 32 >= 0.95.
"""

from __future__ import annotations

import argparse
import statistics

import timm
import torch

from supervit import SubnetConfig, SuperViT, get_arch, gflops, measure_latency


def _time_timm(model: torch.nn.Module, batch: int, device: str, dtype: torch.dtype, warmup: int, runs: int) -> float:
    """Median ms of timm's model, with the same protocol as `measure_latency`."""
    import time

    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--runs", type=int, default=7, help="timed forwards per measurement at batch 32")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds for the timm comparison")
    p.add_argument("--batch", type=int, default=32, help="the large batch (default 32; on a GPU use e.g. 256)")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    dev = args.device
    torch.manual_seed(0)

    arch = get_arch("deit_s")
    ours = SuperViT(arch).to(dev, dtype).eval()
    ref = timm.create_model("deit_small_patch16_224", pretrained=False).to(dev, dtype).eval()
    full_gf = gflops(arch)
    scale = 10 if dev == "cuda" else 1  # GPU forwards are short: more runs for a steady median

    cells = [SubnetConfig(g, r) for g in arch.grids for r in (0.5, 0.7, 1.0)]
    lat = {}
    for s in cells:
        b1 = measure_latency(ours, s, 1, dev, dtype, warmup=5 * scale, runs=4 * args.runs * scale)
        b32 = measure_latency(ours, s, args.batch, dev, dtype, warmup=2 * scale, runs=args.runs * scale)
        lat[s] = (b1.median_ms, b32.median_ms)
    full = arch.largest
    f1, f32 = lat[SubnetConfig(14, 1.0)]
    print(f"# {b32.hardware}; dtype {args.dtype}; threads {b32.threads}")
    print(
        f"| grid | keep | GFLOPs | FLOPs ratio | ms @1 | ms @{args.batch} | latency ratio @{args.batch} | efficiency |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s in cells:
        gf = gflops(arch, s)
        fr = gf / full_gf
        lr = lat[s][1] / f32
        eff = (1 - lr) / (1 - fr) if fr < 1 else float("nan")
        print(
            f"| {s.grid} | {s.keep_rates[0]:g} | {gf:.3f} | {fr:.3f} | {lat[s][0]:.2f} | {lat[s][1]:.1f} | "
            f"{lr:.3f} | {eff:.3f} |"
        )

    # Ours against timm, alternating so both see the same machine state.
    ratios = {1: [], args.batch: []}
    for _ in range(args.rounds):
        for batch in (1, args.batch):
            runs = (4 * args.runs if batch == 1 else args.runs) * scale
            a = measure_latency(ours, full, batch, dev, dtype, warmup=2 * scale, runs=runs).median_ms
            b = _time_timm(ref, batch, dev, dtype, warmup=2 * scale, runs=runs)
            ratios[batch].append(a / b)
    for batch, rs in ratios.items():
        print(
            f"full config vs timm deit_small_patch16_224, batch {batch}: {statistics.median(rs):.3f}x "
            f"(rounds: {', '.join(f'{r:.3f}' for r in rs)})"
        )
    fr = gflops(arch, SubnetConfig(14, 0.5)) / full_gf
    lr = lat[SubnetConfig(14, 0.5)][1] / f32
    print(
        f"grid 14 keep 0.5, batch 32: latency reduction / FLOPs reduction = {(1 - lr) / (1 - fr):.3f} (target >= 0.95)"
    )


if __name__ == "__main__":
    main()
