"""Supertraining: which subnets a step trains (the sampler) and the step itself.

A step runs a few subnets on one batch and accumulates their gradients into one optimizer step. Each
subnet has a *role*: trained by the task loss, or distilled (KL divergence) from the detached output of an
earlier role of the same step. The sampler decides the roles; the step knows nothing of recipes.

Recipes:
    ``seed``: the paper's four subnets: (largest grid, keep 1) and (a random smaller grid, keep 1) with the
        task loss, each followed by the same grid at a random keep rate distilled from it.
    ``sandwich``: the sandwich rule with in-place distillation (BigNAS, once-for-all): the full model with the
        task loss, then the smallest subnet and two random ones, all distilled from the full model.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ArchConfig, SubnetConfig

__all__ = ["Role", "SubnetSampler", "RECIPES", "supertrain_step", "distill_loss"]

RECIPES = ("seed", "sandwich")


@dataclass(frozen=True)
class Role:
    """One forward/backward of a step: a subnet and what it learns from.

    Args:
        name: Metric name of the role (``full``, ``full_keep``, ...).
        subnet: The subnet run.
        teacher: Name of an earlier role whose detached output this one is distilled from; None for the
            task loss.
    """

    name: str
    subnet: SubnetConfig
    teacher: str | None = None


class SubnetSampler:
    """Draws the roles of each supertraining step.

    Args:
        arch: The architecture (grids and trained keep rates).
        recipe: ``seed`` or ``sandwich``.
        schedules: Draw a keep rate per stage (any combination of ``arch.keep_rates``), so that every
            schedule a search may pick is trained; False draws one rate for all stages, as the paper does.
        seed: Seed of the sampler's own random stream (independent of torch's).
    """

    def __init__(self, arch: ArchConfig, recipe: str = "seed", schedules: bool = False, seed: int = 0) -> None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        if len(arch.grids) < 2 or len(arch.keep_rates) < 2:
            raise ValueError("supertraining needs at least two grids and a keep rate below 1")
        self.arch = arch
        self.recipe = recipe
        self.schedules = schedules
        self.rng = random.Random(seed)

    def _reduced(self, grid: int) -> SubnetConfig:
        """``grid`` at a random keep-rate schedule with at least one stage below 1."""
        low = [r for r in self.arch.keep_rates if r < 1.0]
        if not self.schedules:
            return SubnetConfig(grid, (self.rng.choice(low),) * self.arch.num_stages)
        while True:
            rates = tuple(self.rng.choice(self.arch.keep_rates) for _ in range(self.arch.num_stages))
            if min(rates) < 1.0:
                return SubnetConfig(grid, rates)

    def _any(self, grid: int) -> SubnetConfig:
        """``grid`` at any trained schedule, keep 1 included."""
        if self.schedules:
            rates = tuple(self.rng.choice(self.arch.keep_rates) for _ in range(self.arch.num_stages))
        else:
            rates = (self.rng.choice(self.arch.keep_rates),) * self.arch.num_stages
        return SubnetConfig(grid, rates)

    def sample(self) -> list[Role]:
        """The roles of one step, in the order they must run (teachers first)."""
        arch = self.arch
        full = arch.largest
        if self.recipe == "seed":
            grid = self.rng.choice(arch.grids[:-1])
            return [
                Role("full", full),
                Role("full_keep", self._reduced(full.grid), teacher="full"),
                Role("grid", SubnetConfig(grid, (1.0,) * arch.num_stages)),
                Role("grid_keep", self._reduced(grid), teacher="grid"),
            ]
        return [
            Role("full", full),
            Role("smallest", arch.smallest, teacher="full"),
            Role("random1", self._any(self.rng.choice(arch.grids)), teacher="full"),
            Role("random2", self._any(self.rng.choice(arch.grids)), teacher="full"),
        ]

    def state_dict(self) -> dict:
        """The random stream's state, for exact resumption."""
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`."""
        rng = state["rng"]
        # JSON turns the inner tuple into a list; random wants it back as a tuple.
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) on softmax outputs, batch-mean; the teacher is detached."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), dim=-1),
        F.log_softmax(teacher_logits.detach().float(), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def supertrain_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    roles: Sequence[Role],
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
) -> dict[str, float]:
    """One supertraining step: every role's forward and backward, then one optimizer step.

    Args:
        model: A `SuperViT`, possibly wrapped in DDP (gradients are then synchronised once, on the last
            backward, through ``no_sync``).
        images: Input batch (B, C, H, W) at the architecture's input size.
        targets: Class indices (B,).
        roles: From `SubnetSampler.sample`.
        optimizer: Stepped once; gradients are zeroed first.
        criterion: Task loss (default cross-entropy).
        autocast_dtype: Mixed-precision dtype (e.g. ``torch.bfloat16`` on GPU); None for full precision.
        scaler: Gradient scaler for float16.
        clip_grad: Max global gradient norm, or None.

    Returns:
        The loss of each role, by role name.
    """
    criterion = criterion or nn.CrossEntropyLoss()
    optimizer.zero_grad(set_to_none=True)
    outputs: dict[str, torch.Tensor] = {}
    losses: dict[str, torch.Tensor] = {}
    needed = {r.teacher for r in roles if r.teacher}
    no_sync = getattr(model, "no_sync", None)
    for i, role in enumerate(roles):
        last = i == len(roles) - 1
        # DDP: accumulate locally, all-reduce once with the last backward.
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(images, role.subnet)
                if role.teacher is None:
                    loss = criterion(logits.float(), targets)
                else:
                    loss = distill_loss(logits, outputs[role.teacher])
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if role.name in needed:
            outputs[role.name] = logits.detach()
        losses[role.name] = loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # One host sync for all losses, after the step.
    return {k: float(v) for k, v in losses.items()}
