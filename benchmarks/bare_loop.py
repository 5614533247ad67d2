"""The training loop of `pipeline.supertrain`'s worker without Ray, for benchmarks that compare against it.

Same data, model construction, DataLoader, optimizer, schedule and step (`make_optimizer`,
`SubnetSampler` + `supertrain_step`) as `train_loop_per_worker` with one CPU worker.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.supertrain import SupertrainOptions, make_optimizer  # noqa: E402
from supervit import SubnetSampler, SuperViT, get_arch, supertrain_step  # noqa: E402
from supervit.data import Splits, load_data  # noqa: E402


def bare_train(
    opts: SupertrainOptions,
    threads: int,
    sampler=None,
    epoch_end: Callable[[SuperViT, Splits], None] | None = None,
) -> tuple[SuperViT, Splits, list[tuple[float, float]]]:
    """Train as the worker does, here; returns the model, the data and (seconds, images/s) per epoch.

    Args:
        opts: Resolved options (``opts.resolved()``).
        threads: torch threads.
        sampler: Anything with ``sample() -> list[Role]``; default the options' `SubnetSampler`.
        epoch_end: Called after each epoch (outside the timing), e.g. to evaluate as the worker does.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(opts.seed)
    arch = get_arch(opts.preset)
    splits = load_data(opts.data, arch)
    model = SuperViT(arch, num_classes=splits.num_classes, drop_path_rate=opts.drop_path, pos_embed_init=opts.pos_init)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=opts.batch_size, shuffle=True, drop_last=True)
    optimizer, scheduler, criterion = make_optimizer(model, opts, len(loader))
    sampler = sampler or SubnetSampler(arch, opts.recipe, schedules=opts.schedules, seed=opts.seed)
    rows = []
    for _ in range(opts.epochs):
        model.train()
        t0, seen = time.perf_counter(), 0
        for x, y in loader:
            supertrain_step(model, x, y, sampler.sample(), optimizer, criterion, None, None, opts.clip_grad)
            scheduler.step()
            seen += len(y)
        dt = time.perf_counter() - t0
        rows.append((dt, seen / dt))
        if epoch_end is not None:
            epoch_end(model, splits)
    return model, splits, rows
