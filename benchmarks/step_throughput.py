"""Images per second of one supertraining step (every role's forward + backward, one optimizer step).

    python benchmarks/step_throughput.py --preset deit_s --device cuda --batch-size 128 --amp bf16

Compares the recipes and full precision against mixed precision in one run, on random data at the preset's
input size.
"""

from __future__ import annotations

import argparse
import time

import torch

from supervit import RECIPES, SubnetSampler, SuperViT, get_arch, supertrain_step


def throughput(preset: str, device: str, batch: int, recipe: str, amp: str | None, steps: int) -> float:
    torch.manual_seed(0)
    arch = get_arch(preset)
    model = SuperViT(arch, num_classes=1000).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler = SubnetSampler(arch, recipe, schedules=True, seed=0)
    x = torch.randn(batch, arch.in_chans, arch.img_size, arch.img_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
    scaler = torch.amp.GradScaler(device) if amp == "fp16" else None
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        supertrain_step(model, x, y, sampler.sample(), opt, autocast_dtype=dtype, scaler=scaler)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        supertrain_step(model, x, y, sampler.sample(), opt, autocast_dtype=dtype, scaler=scaler)
    sync()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="deit_s")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    print(
        f"# {args.preset}, batch {args.batch_size}, {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    )
    print("| recipe | precision | images/s |")
    print("|---|---|---|")
    amps = ["bf16", None] if args.device == "cuda" else [None]
    for recipe in RECIPES:
        for amp in amps:
            ips = throughput(args.preset, args.device, args.batch_size, recipe, amp, args.steps)
            print(f"| {recipe} | {amp or 'fp32'} | {ips:.0f} |")


if __name__ == "__main__":
    main()
