"""Subnet sampling and the supertraining step."""

import collections

import pytest
import torch

from supervit import SubnetSampler, SuperViT, get_arch, supertrain_step
from supervit.data import synthetic


def test_seed_recipe_roles():
    arch = get_arch("tiny")
    sampler = SubnetSampler(arch, "seed", seed=0)
    grids = collections.Counter()
    for _ in range(200):
        full, full_keep, grid, grid_keep = sampler.sample()
        assert (full.subnet, full.teacher) == (arch.largest, None)
        assert full_keep.subnet.grid == arch.largest.grid and full_keep.teacher == "full"
        assert full_keep.subnet.is_uniform and full_keep.subnet.keep_rates[0] < 1.0
        assert grid.subnet.grid < max(arch.grids) and grid.subnet.keep_rates == (1.0,) * arch.num_stages
        assert grid_keep.subnet.grid == grid.subnet.grid and grid_keep.teacher == "grid"
        assert grid_keep.subnet.keep_rates[0] < 1.0
        grids[grid.subnet.grid] += 1
    assert set(grids) == set(arch.grids[:-1])


def test_schedule_sampling_covers_every_trained_schedule():
    arch = get_arch("tiny")
    sampler = SubnetSampler(arch, "seed", schedules=True, seed=0)
    seen = {r.subnet.keep_rates for _ in range(3000) for r in sampler.sample() if r.teacher}
    n = len(arch.keep_rates) ** arch.num_stages - 1  # every combination but all-ones
    assert len(seen) == n
    assert all(min(rates) < 1.0 for rates in seen)


def test_sandwich_recipe_always_trains_the_smallest():
    arch = get_arch("tiny")
    sampler = SubnetSampler(arch, "sandwich", schedules=True, seed=0)
    for _ in range(50):
        roles = sampler.sample()
        assert roles[0].subnet == arch.largest and roles[0].teacher is None
        assert roles[1].subnet == arch.smallest
        assert all(r.teacher == "full" for r in roles[1:])
        for r in roles:
            r.subnet.validate(arch)


def test_sampler_is_seeded_and_resumable():
    arch = get_arch("tiny")
    a, b = SubnetSampler(arch, seed=3, schedules=True), SubnetSampler(arch, seed=3, schedules=True)
    assert [a.sample() for _ in range(5)] == [b.sample() for _ in range(5)]
    state = a.state_dict()
    nxt = a.sample()
    c = SubnetSampler(arch, seed=99, schedules=True)
    c.load_state_dict(state)
    assert c.sample() == nxt
    with pytest.raises(ValueError, match="unknown recipe 'best'"):
        SubnetSampler(arch, "best")


def test_step_accumulates_every_role_into_one_update():
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10)
    roles = SubnetSampler(arch, seed=0).sample()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    calls = []
    orig_step = opt.step
    opt.step = lambda *a, **k: (calls.append(1), orig_step(*a, **k))[1]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = supertrain_step(model, x, y, roles, opt)
    assert list(losses) == [r.name for r in roles] and all(v >= 0 for v in losses.values())
    assert len(calls) == 1
    used = {arch.grids.index(r.subnet.grid) for r in roles}
    for i in range(len(arch.grids)):
        changed = not torch.equal(before[f"pos_embed_list.{i}"], model.pos_embed_list[i].detach())
        assert changed == (i in used)


def test_distilled_role_gets_the_teachers_detached_output():
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10)
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    roles = SubnetSampler(arch, seed=0).sample()
    # The same subnet as its own teacher has zero KL: the teacher's output is the student's.
    from supervit.train import Role

    same = [roles[0], Role("copy", roles[0].subnet, teacher="full")]
    losses = supertrain_step(model.eval(), x, y, same, torch.optim.SGD(model.parameters(), lr=0.0))
    assert losses["copy"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
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
