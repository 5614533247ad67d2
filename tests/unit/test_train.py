"""Subnet sampling and the supertraining step."""

import collections
import json

import pytest
import torch

from helpers import RecordingSGD
from supervit import (
    Role,
    SubnetConfig,
    SubnetSampler,
    SuperViT,
    distill_loss,
    evaluate,
    get_arch,
    get_preset,
    make_training,
    supertrain_step,
    train_one_epoch,
)
from supervit.data import synthetic
from supervit.loop import warmup_cosine


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


def test_balanced_recipe_trains_every_grid_every_step():
    arch = get_arch("tiny")
    sampler = SubnetSampler(arch, "balanced", schedules=True, seed=0)
    assert sampler.update_every_role  # the recipe's own choice
    seen = collections.defaultdict(set)
    for step in range(2000):
        roles = sampler.sample()
        assert len(roles) == 4
        assert roles[0].subnet == arch.largest and roles[0].teacher is None
        assert all(r.teacher == "full" for r in roles[1:])
        # Three grids: every grid at every step, the largest at a reduced schedule (never the full model twice).
        assert sorted(r.subnet.grid for r in roles[1:]) == sorted(arch.grids)
        assert all(r.subnet != arch.largest for r in roles[1:])
        small = roles[1].subnet
        assert small.grid == min(arch.grids)
        if step % 4 == 0:  # the rotation: smallest subnet, keep 1, a random schedule, keep 1
            assert small == arch.smallest
        elif step % 2 == 1:
            assert small.keep_rates == (1.0,) * arch.num_stages
        for r in roles[1:]:
            r.subnet.validate(arch)
            seen[r.subnet.grid].add(r.subnet.keep_rates)
    n = len(arch.keep_rates) ** arch.num_stages
    assert len(seen[min(arch.grids)]) == n  # every schedule of the smallest grid, keep 1 included
    assert len(seen[max(arch.grids)]) == n - 1  # every reduced schedule of the largest


def test_balanced_recipe_with_four_grids_spreads_the_middle_roles():
    arch = get_arch("deit_s")
    sampler = SubnetSampler(arch, "balanced", schedules=True, seed=0)
    grids = collections.Counter()
    for _ in range(3000):
        roles = sampler.sample()
        assert len(roles) == 4 and roles[1].subnet.grid == min(arch.grids)
        assert roles[2].subnet.grid != roles[3].subnet.grid  # drawn without replacement
        grids.update(r.subnet.grid for r in roles[2:])
    # Two of the three grids above the smallest at each step: each at about 2/3 of the steps.
    assert set(grids) == set(arch.grids[1:])
    assert all(abs(c / 3000 - 2 / 3) < 0.05 for c in grids.values()), grids


@pytest.mark.parametrize("recipe", ["seed", "sandwich", "balanced"])
def test_sampler_is_seeded_and_resumable(recipe):
    arch = get_arch("tiny")
    a, b = (SubnetSampler(arch, recipe, seed=3, schedules=True) for _ in range(2))
    assert [a.sample() for _ in range(5)] == [b.sample() for _ in range(5)]
    state = json.loads(json.dumps(a.state_dict()))  # as a checkpoint stores it
    nxt = [a.sample() for _ in range(3)]
    c = SubnetSampler(arch, recipe, seed=99, schedules=True)
    c.load_state_dict(state)
    assert [c.sample() for _ in range(3)] == nxt
    with pytest.raises(ValueError, match="unknown recipe 'best'"):
        SubnetSampler(arch, "best")


def test_step_accumulates_every_role_into_one_update():
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10)
    roles = SubnetSampler(arch, "seed", seed=0).sample()  # one accumulated update per step
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


def test_distilled_role_gets_the_teachers_output():
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10)
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    roles = SubnetSampler(arch, seed=0).sample()
    # The same subnet as its own teacher has zero KL: the teacher's output is the student's.
    same = [roles[0], Role("copy", roles[0].subnet, teacher="full")]
    losses = supertrain_step(model.eval(), x, y, same, torch.optim.SGD(model.parameters(), lr=0.0))
    assert losses["copy"] == pytest.approx(0.0, abs=1e-6)


def test_distill_loss_is_kl_from_teacher_to_student():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    p_t, p_s = teacher.softmax(-1), student.softmax(-1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()  # KL(teacher || student), mean over the batch
    torch.testing.assert_close(distill_loss(student, teacher), expected)
    assert float(distill_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    # Not symmetric: the direction matters.
    assert float(distill_loss(teacher, student)) != pytest.approx(float(expected), rel=1e-3)
    # The teacher is detached: no gradient reaches it, while the student gets one.
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    distill_loss(s, t).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_distilled_role_leaves_the_teacher_untouched():
    """A distilled role's update carries exactly the gradient of KL(student || detached teacher): nothing flows
    back into the teacher's forward (the largest grid's own position embedding gets no gradient)."""
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10).eval()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    student = SubnetConfig(min(arch.grids), (0.5,) * arch.num_stages)
    roles = [Role("full", arch.largest, update=True), Role("student", student, "full", update=True)]
    opt = RecordingSGD(list(model.named_parameters()), lr=0.0)  # lr 0: the weights stay as they are
    supertrain_step(model, x, y, roles, opt)
    student_step = opt.seen[1]
    teacher_pe = f"pos_embed_list.{arch.grids.index(arch.largest.grid)}"
    assert opt.seen[0][teacher_pe] is not None  # the teacher's own step did train it
    assert student_step[teacher_pe] is None  # the student's did not touch it
    expected = torch.autograd.grad(
        distill_loss(model(x, student), model(x, arch.largest).detach()),
        [p for _, p in model.named_parameters()],
        allow_unused=True,
    )
    for (name, _), g in zip(model.named_parameters(), expected, strict=True):
        if g is None:
            assert student_step[name] is None, name
        else:
            torch.testing.assert_close(student_step[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_mixed_precision_step_follows_the_full_precision_step():
    """A bf16-autocast step (CPU here; CUDA in test_gpu.py) gives the losses and gradient of the fp32 step,
    to bf16's precision."""
    arch = get_arch("tiny")
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    roles = SubnetSampler(arch, "seed", seed=0).sample()  # one accumulated update: one gradient to compare
    runs = []
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = SuperViT(arch, num_classes=10)
        opt = RecordingSGD(list(model.named_parameters()), lr=0.1)
        losses = supertrain_step(model, x, y, roles, opt, autocast_dtype=dtype)
        grad = torch.cat([g.flatten() for g in opt.seen[0].values() if g is not None])
        runs.append((losses, grad))
    (l32, g32), (l16, g16) = runs
    assert l16.keys() == l32.keys()
    for k in l32:
        assert l16[k] == pytest.approx(l32[k], rel=0.05, abs=2e-3), k
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert (g16.norm() / g32.norm()).item() == pytest.approx(1.0, rel=0.05)
    assert not torch.equal(g16, g32)  # ... and the step really ran in bf16


def test_training_loop_pieces():
    torch.manual_seed(0)
    arch = get_arch("tiny")
    cfg = get_preset("tiny").train
    model = SuperViT(arch, num_classes=4)
    training = make_training(model, cfg, steps_per_epoch=10, device="cpu", num_classes=4)
    decay, no_decay = training.optimizer.param_groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and model.cls_token in no_decay["params"]
    factors = [warmup_cosine(20, 200)(i) for i in range(201)]
    assert factors[0] == pytest.approx(1 / 20) and factors[19] == pytest.approx(1.0)  # linear warm-up
    assert factors[110] == pytest.approx(0.5, abs=0.01) and factors[200] == pytest.approx(0.0)  # cosine to 0
    assert all(a >= b for a, b in zip(factors[19:], factors[20:], strict=False))
    data = synthetic(arch, num_classes=4, train_size=64, search_size=16, test_size=16)
    batches = list(torch.utils.data.DataLoader(data.train, batch_size=16))
    steps = []
    stats = train_one_epoch(model, batches, SubnetSampler(arch, seed=0), training, on_step=steps.append)
    assert steps == [0, 1, 2, 3] and stats.steps == 4 and stats.images == 64 and stats.seconds > 0
    assert set(stats.losses) == {"full", "smallest_grid", "grid1", "grid2"}
    assert training.scheduler.last_epoch == 4  # one schedule step per training step
    counts = evaluate(model, torch.utils.data.DataLoader(data.test, batch_size=5), [arch.largest, arch.smallest])
    assert {s: n for s, (_, n) in counts.items()} == {arch.largest: 16, arch.smallest: 16}
    assert all(0 <= c <= 16 for c, _ in counts.values())


def test_task_weight_mixes_the_task_loss_into_distilled_roles():
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10).eval()
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    student = SubnetConfig(min(arch.grids), (0.5,) * arch.num_stages)
    with torch.no_grad():
        ce = float(torch.nn.functional.cross_entropy(model(x, student), y))
        kd = float(distill_loss(model(x, student), model(x, arch.largest)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for w in (0.0, 0.3, 1.0):
        roles = [Role("full", arch.largest), Role("student", student, "full", task_weight=w)]
        got = supertrain_step(model, x, y, roles, opt)["student"]
        assert got == pytest.approx((1 - w) * kd + w * ce, rel=1e-5)
    sampler = SubnetSampler(arch, "balanced", seed=0, task_weight=0.3)
    assert {r.task_weight for r in sampler.sample()[1:]} == {0.3}
    with pytest.raises(ValueError, match="smallest_grid_rotation"):
        SubnetSampler(arch, "balanced", smallest_grid_rotation=("smallest", "half"))


def test_per_role_updates_take_one_optimizer_step_per_role():
    torch.manual_seed(0)
    arch = get_arch("tiny")
    model = SuperViT(arch, num_classes=10)
    sampler = SubnetSampler(arch, "balanced", seed=0, update_every_role=True)
    roles = sampler.sample()
    assert all(r.update for r in roles)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    orig_step = opt.step
    opt.step = lambda *a, **k: (calls.append(1), orig_step(*a, **k))[1]
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    supertrain_step(model, x, y, roles, opt)
    assert len(calls) == len(roles)
    assert all(p.grad is None for p in model.parameters())  # zeroed after the last update


def test_per_role_updates_through_a_grad_scaler_match_plain_updates():
    """The float16 path (GradScaler: unscale, step, update once per update) gives the plain result: the
    scale is a power of two, so scaling and unscaling are exact."""
    arch = get_arch("tiny")
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    params = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        torch.manual_seed(0)
        model = SuperViT(arch, num_classes=10)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sampler = SubnetSampler(arch, "balanced", schedules=True, seed=0)
        for _ in range(2):
            supertrain_step(model, x, y, sampler.sample(), opt, scaler=scaler, clip_grad=1.0)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=1e-6, rtol=1e-5)


def test_deit_recipe_mixes_each_batch_once_for_every_role_and_keeps_an_ema():
    import dataclasses

    from timm.loss import SoftTargetCrossEntropy

    from supervit.loop import scaled_lr

    torch.manual_seed(0)
    arch = get_arch("tiny")
    deit = dataclasses.replace(get_preset("deit_s").train, batch_size=8, epochs=1, warmup_epochs=0)
    assert scaled_lr(deit, 1024) == pytest.approx(1e-3) and scaled_lr(get_preset("tiny").train, 1024) == 1e-3
    model = SuperViT(arch, num_classes=4)
    training = make_training(model, deit, steps_per_epoch=2, device="cpu", num_classes=4, world_size=2)
    assert training.optimizer.param_groups[0]["initial_lr"] == pytest.approx(5e-4 * 16 / 512)  # global batch 16
    assert isinstance(training.criterion, SoftTargetCrossEntropy) and training.ema is not None
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    original = x.clone()  # timm mixes in place
    ema_before = [p.clone() for p in training.ema.module.parameters()]
    stats = train_one_epoch(model, [(x, y)], SubnetSampler(arch, seed=0), training)
    assert len(seen) == 4 and all(torch.equal(s, seen[0]) for s in seen)  # every role, the same mixed batch
    assert not torch.equal(seen[0], original)  # ... mixed (mixup or cutmix)
    assert stats.images == 8 and all(v == v for v in stats.losses.values())
    moved = [not torch.equal(a, b) for a, b in zip(ema_before, training.ema.module.parameters(), strict=True)]
    assert any(moved)  # the EMA followed the update
    assert set(training.ema.module.state_dict()) == set(model.state_dict())  # a SuperViT of its own
