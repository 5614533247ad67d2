"""Supertraining in whole runs without Ray: it learns, and two DDP processes end where one process ends."""

import pytest
import torch

from supervit import SubnetSampler, SuperViT, get_arch, supertrain_step
from supervit.data import synthetic


def test_supertraining_learns_synthetic_data():
    torch.manual_seed(0)
    arch = get_arch("tiny")
    data = synthetic(arch, num_classes=4, train_size=256, test_size=128)
    model = SuperViT(arch, num_classes=4, pos_embed_init="sincos")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 16))
    sampler = SubnetSampler(arch, "sandwich", schedules=True, seed=0)
    loader = torch.utils.data.DataLoader(data.train, batch_size=32, shuffle=True)
    epoch_loss = []
    for _ in range(8):
        total = 0.0
        for x, y in loader:
            total += supertrain_step(model, x, y, sampler.sample(), opt, clip_grad=1.0)["full"]
            warmup.step()
        epoch_loss.append(total / len(loader))
    # Early ViT training plateaus for a varying number of steps, so the bar is set below what every torch
    # build we ran reached (0.54x here, 0.83x on another), above what no learning gives.
    assert epoch_loss[-1] < 0.9 * epoch_loss[0], epoch_loss


def _ddp_worker(rank: int, world: int, init: str, update_every_role: bool, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = torch.nn.parallel.DistributedDataParallel(SuperViT(arch, num_classes=10), find_unused_parameters=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = SubnetSampler(arch, "balanced", schedules=True, seed=0, update_every_role=update_every_role)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        supertrain_step(model, x[rank::world], y[rank::world], sampler.sample(), opt, clip_grad=1.0)
    if rank == 0:
        torch.save(model.module.state_dict(), out)
    dist.destroy_process_group()


@pytest.mark.parametrize("update_every_role", [False, True])
def test_ddp_step_matches_one_process(tmp_path, update_every_role):
    """Two gloo ranks on half batches end where one process on the whole batch ends: gradients are
    all-reduced exactly when an update follows (once per step, or once per role)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path}/store", update_every_role, out), nprocs=2, join=True)
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = SubnetSampler(arch, "balanced", schedules=True, seed=0, update_every_role=update_every_role)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        supertrain_step(model, x, y, sampler.sample(), opt, clip_grad=1.0)
    ddp = torch.load(out, weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, atol=2e-5, rtol=1e-4, msg=k)
