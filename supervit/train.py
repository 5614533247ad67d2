"""Supertraining: which subnets a step trains (the sampler) and the step itself (the loop around it: `loop`).

A step runs a few subnets (four in every recipe) on one batch. Each subnet has a *role*: trained by the
task loss, or distilled (KL divergence) from the detached output of an earlier role of the same step. The
roles' gradients are accumulated into one optimizer step, or (``balanced``) each role takes its own
optimizer step right after its backward. The sampler decides the roles; the step knows nothing of recipes.

Recipes:
    ``seed``: the paper's four subnets: (largest grid, keep 1) and (a random smaller grid, keep 1) with the
        task loss, each followed by the same grid at a random keep rate distilled from it.
    ``sandwich``: the sandwich rule with in-place distillation (BigNAS, once-for-all): the full model with the
        task loss, then the smallest subnet and two random ones, all distilled from the full model.
    ``balanced`` (the pipeline's default; `benchmarks/fidelity.py` measures why): the full model with the
        task loss; then, distilled from it, the smallest grid in rotation at its smallest subnet, at keep 1,
        at a random schedule and at keep 1 again, and two roles drawn without replacement from the largest grid at a
        reduced schedule and every middle grid at a random schedule (with three grids, every grid at every
        step); one optimizer step per role.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ArchConfig, SubnetConfig

__all__ = [
    "Role",
    "SubnetSampler",
    "RECIPES",
    "supertrain_step",
    "distill_loss",
]

RECIPES = ("seed", "sandwich", "balanced")


@dataclass(frozen=True)
class Role:
    """One forward/backward of a step: a subnet and what it learns from.

    Args:
        name: Metric name of the role (``full``, ``full_keep``, ...).
        subnet: The subnet run.
        teacher: Name of an earlier role whose detached output this one is distilled from; None for the
            task loss.
        task_weight: For a distilled role, the weight of the task loss mixed into its loss
            (``(1 - w) * distillation + w * task``).
        update: Take an optimizer step right after this role's backward (the last role always does).
    """

    name: str
    subnet: SubnetConfig
    teacher: str | None = None
    task_weight: float = 0.0
    update: bool = False


class SubnetSampler:
    """Draws the roles of each supertraining step.

    Args:
        arch: The architecture (grids and trained keep rates).
        recipe: One of `RECIPES` (default ``balanced``).
        schedules: Draw a keep rate per stage (any combination of ``arch.keep_rates``), so that every
            schedule a search may pick is trained; False draws one rate for all stages, as the paper does.
        seed: Seed of the sampler's own random stream (independent of torch's).
        task_weight: Weight of the task loss mixed into every distilled role's loss (0: distillation only).
        update_every_role: One optimizer step per role instead of one per step (gradients not accumulated);
            None: the recipe's choice (``balanced`` only).
        smallest_grid_rotation: ``balanced`` only: what the smallest grid's role trains, step after step, in
            rotation: ``smallest`` (its lowest keep rate at every stage), ``keep1`` (every token), ``any`` (a
            random schedule).
    """

    def __init__(
        self,
        arch: ArchConfig,
        recipe: str = "balanced",
        schedules: bool = False,
        seed: int = 0,
        task_weight: float = 0.0,
        update_every_role: bool | None = None,
        smallest_grid_rotation: Sequence[str] = ("smallest", "keep1", "any", "keep1"),
    ) -> None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        if len(arch.grids) < 2 or len(arch.keep_rates) < 2:
            raise ValueError("supertraining needs at least two grids and a keep rate below 1")
        self.arch = arch
        self.recipe = recipe
        self.schedules = schedules
        self.task_weight = task_weight
        self.update_every_role = recipe == "balanced" if update_every_role is None else update_every_role
        if not smallest_grid_rotation or set(smallest_grid_rotation) - {"smallest", "keep1", "any"}:
            raise ValueError(f"smallest_grid_rotation takes smallest, keep1 and any; got {smallest_grid_rotation}")
        self.smallest_grid_rotation = tuple(smallest_grid_rotation)
        self.rng = random.Random(seed)
        self._steps = 0

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
        roles = self._sample()
        if self.update_every_role:
            roles = [dataclasses.replace(r, update=True) for r in roles]
        return roles

    def _sample(self) -> list[Role]:
        arch = self.arch
        full = arch.largest
        w = self.task_weight
        step, self._steps = self._steps, self._steps + 1
        if self.recipe == "seed":
            grid = self.rng.choice(arch.grids[:-1])
            return [
                Role("full", full),
                Role("full_keep", self._reduced(full.grid), "full", w),
                Role("grid", SubnetConfig(grid, (1.0,) * arch.num_stages)),
                Role("grid_keep", self._reduced(grid), "grid", w),
            ]
        if self.recipe == "sandwich":
            return [
                Role("full", full),
                Role("smallest", arch.smallest, "full", w),
                Role("random1", self._any(self.rng.choice(arch.grids)), "full", w),
                Role("random2", self._any(self.rng.choice(arch.grids)), "full", w),
            ]
        # balanced: rotate the smallest grid through its cells (the sandwich's bottom every few steps; keep 1
        # half the time, which the fidelity benchmark found its keep-1 cell needs), and draw the other two
        # roles without replacement so that no grid starves.
        phase = self.smallest_grid_rotation[step % len(self.smallest_grid_rotation)]
        if phase == "smallest":
            small = arch.smallest
        elif phase == "keep1":
            small = SubnetConfig(arch.grids[0], (1.0,) * arch.num_stages)
        else:
            small = self._any(arch.grids[0])
        slots = [lambda: self._reduced(full.grid)] + [lambda g=g: self._any(g) for g in arch.grids[1:-1]]
        picks = self.rng.sample(slots, min(2, len(slots)))
        return [Role("full", full), Role("smallest_grid", small, "full", w)] + [
            Role(f"grid{i + 1}", pick(), "full", w) for i, pick in enumerate(picks)
        ]

    def state_dict(self) -> dict:
        """The random stream's state, for exact resumption."""
        return {"rng": self.rng.getstate(), "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`."""
        rng = state["rng"]
        # JSON turns the inner tuple into a list; random wants it back as a tuple.
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self._steps = state.get("steps", 0)


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
    """One supertraining step: every role's forward and backward, and an optimizer step after each role that
    asks for one (`Role.update`) and after the last.

    Args:
        model: A `SuperViT`, possibly wrapped in DDP (gradients are then all-reduced only with the backward an
            optimizer step follows, through ``no_sync``).
        images: Input batch (B, C, H, W) at the architecture's input size.
        targets: Class indices (B,).
        roles: From `SubnetSampler.sample`.
        optimizer: Stepped after each updating role (once per step when only the last role updates);
            gradients are zeroed first and after each step.
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
        update = role.update or i == len(roles) - 1
        # DDP: accumulate locally, all-reduce once with the backward an update follows.
        sync = contextlib.nullcontext() if update or no_sync is None else no_sync()
        with sync:
            with torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(images, role.subnet)
                if role.teacher is None:
                    loss = criterion(logits.float(), targets)
                else:
                    loss = distill_loss(logits, outputs[role.teacher])
                    if role.task_weight:
                        loss = (1.0 - role.task_weight) * loss + role.task_weight * criterion(logits.float(), targets)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if role.name in needed:
            outputs[role.name] = logits.detach()
        losses[role.name] = loss.detach()
        if update:
            _update(model, optimizer, scaler, clip_grad)
    # One host sync for all losses, after the step.
    return {k: float(v) for k, v in losses.items()}


def _update(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, clip_grad: float | None) -> None:
    """Clip, step (through the scaler, if any) and zero the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
