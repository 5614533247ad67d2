"""CUDA paths: forward agreement with the CPU, mixed-precision supertraining steps, synchronised latency."""

import pytest
import torch

from helpers import SMALL, RecordingSGD
from supervit import (
    RECIPES,
    SubnetConfig,
    SubnetSampler,
    SuperViT,
    get_arch,
    hardware_fingerprint,
    measure_latency,
    supertrain_step,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_forward_matches_cpu():
    torch.manual_seed(0)
    model = SuperViT(SMALL, num_classes=7).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    subnets = [None, SubnetConfig(8, 0.5), SubnetConfig(6, (0.9, 0.7, 0.5))]
    with torch.no_grad():
        expected = [model(x, s) for s in subnets]
        model.cuda()
        for s, e in zip(subnets, expected, strict=True):
            torch.testing.assert_close(model(x.cuda(), s).cpu(), e, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("recipe", RECIPES)
def test_bf16_supertraining_steps_on_cuda(recipe):
    torch.manual_seed(0)
    arch = get_arch("deit_s")
    model = SuperViT(arch, num_classes=10).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler = SubnetSampler(arch, recipe, schedules=True, seed=0)
    x = torch.randn(16, 3, 224, 224, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    for _ in range(3):
        losses = supertrain_step(model, x, y, sampler.sample(), opt, autocast_dtype=torch.bfloat16, clip_grad=1.0)
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32  # autocast: weights stay fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_precision_step_follows_the_full_precision_step(dtype):
    """bf16 autocast, and fp16 through a GradScaler, give the fp32 step's losses and gradient to their precision."""
    arch = get_arch("tiny")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 16, 16, generator=g).cuda(), torch.randint(0, 10, (32,), generator=g).cuda()
    roles = SubnetSampler(arch, "seed", seed=0).sample()  # one accumulated update: one gradient to compare
    runs = []
    for amp in (None, dtype):
        torch.manual_seed(0)
        model = SuperViT(arch, num_classes=10).cuda()
        opt = RecordingSGD(list(model.named_parameters()), lr=0.1)
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        losses = supertrain_step(model, x, y, roles, opt, autocast_dtype=amp, scaler=scaler)
        grad = torch.cat([g.flatten() for g in opt.seen[0].values() if g is not None])
        runs.append((losses, grad))
    (l32, g32), (lo, go) = runs
    for k in l32:
        assert lo[k] == pytest.approx(l32[k], rel=0.05, abs=2e-3), k
    assert torch.nn.functional.cosine_similarity(go, g32, dim=0) > 0.99
    assert (go.norm() / g32.norm()).item() == pytest.approx(1.0, rel=0.05)
    assert not torch.equal(go, g32)  # the step really ran in reduced precision


def test_cuda_latency_is_synchronised_and_fingerprinted():
    torch.manual_seed(0)
    model = SuperViT(get_arch("deit_s"), num_classes=1000)
    bf16 = measure_latency(model, None, batch_size=8, device="cuda", dtype=torch.bfloat16, warmup=5, runs=20)
    assert bf16.device == "cuda" and bf16.dtype == "bfloat16" and bf16.runs == 20
    fp, text = hardware_fingerprint("cuda")
    assert bf16.fingerprint == fp and torch.cuda.get_device_name() in text
    # Where compute, not kernel launches, sets the time (fp32, batch 256), fewer tokens are faster.
    full = measure_latency(model, SubnetConfig(8, 1.0), batch_size=256, device="cuda", warmup=3, runs=10)
    small = measure_latency(model, SubnetConfig(8, 0.5), batch_size=256, device="cuda", warmup=3, runs=10)
    assert small.median_ms < full.median_ms
