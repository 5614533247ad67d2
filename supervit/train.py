"""Supertraining: which subnets a step trains (the sampler), the step itself, and the loop around it.

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
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ArchConfig, SubnetConfig, TrainConfig

__all__ = [
    "Role",
    "SubnetSampler",
    "RECIPES",
    "supertrain_step",
    "distill_loss",
    "Training",
    "EpochStats",
    "make_training",
    "scaled_lr",
    "warmup_cosine",
    "train_one_epoch",
    "evaluate",
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


# ------------------------------------------------------------------------------------------------ the loop


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices, none on norms, biases and the model's `no_weight_decay`."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


EMA_DECAY = 0.99996  # DeiT's model_ema_decay


@dataclass
class Training:
    """What a supertraining loop steps: optimizer, per-step schedule, task loss, precision, and DeiT's extras
    (mixup/cutmix of each batch, an EMA of the weights)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    autocast_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float | None = None
    mixup: Callable | None = None  # timm.data.Mixup: (images, labels) -> (mixed images, soft targets)
    ema: nn.Module | None = None  # timm.utils.ModelEmaV3; its weights are ``ema.module``

    def state_dict(self) -> dict:
        """Optimizer, schedule and scaler state, for exact resumption (the EMA's weights, ``ema.module``, are a
        model of their own: save them as one)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """``cfg.lr``, scaled linearly from ``cfg.lr_batch`` to ``global_batch`` images per step (DeiT's rule)."""
    return cfg.lr * global_batch / cfg.lr_batch if cfg.lr_batch else cfg.lr


def make_training(
    model: nn.Module,
    cfg: TrainConfig,
    steps_per_epoch: int,
    device: str | torch.device,
    num_classes: int,
    world_size: int = 1,
) -> Training:
    """Everything a training loop steps, from a preset's `TrainConfig`.

    AdamW with `param_groups` at `scaled_lr`, a per-step `warmup_cosine` schedule over ``cfg.epochs``; mixup and
    cutmix with soft-target cross-entropy when either alpha is set (label smoothing folded into the targets),
    else cross-entropy with label smoothing; an EMA of the weights with ``cfg.model_ema``; mixed precision on
    CUDA (bf16 where supported, else fp16 with a gradient scaler).
    """
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3

    lr = scaled_lr(cfg, cfg.batch_size * world_size)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr)
    schedule = warmup_cosine(int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes
        )
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    autocast_dtype, scaler = None, None
    if torch.device(device).type == "cuda":
        autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if autocast_dtype == torch.float16:
            scaler = torch.amp.GradScaler("cuda")
    return Training(
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        criterion,
        autocast_dtype,
        scaler,
        cfg.clip_grad,
        mixup,
        ModelEmaV3(model, decay=EMA_DECAY) if cfg.model_ema else None,
    )


@dataclass
class EpochStats:
    """One epoch's mean loss per role, images trained on, steps and training seconds."""

    losses: dict[str, float]
    images: int
    steps: int
    seconds: float


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    sampler: SubnetSampler,
    training: Training,
    on_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """Run `supertrain_step` on every batch (mixed first, with mixup/cutmix), then step the schedule and the EMA.

    Args:
        model: The (possibly DDP-wrapped) `SuperViT`, put in training mode here.
        batches: ``(images, targets)`` pairs; moved to the model's device when not already there.
        sampler: Draws each step's roles.
        training: From `make_training`.
        on_step: Called with the step index before each step (progress, test hooks).
    """
    model.train()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    images = steps = 0
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        if on_step is not None:
            on_step(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        images += len(y)
        if training.mixup is not None:
            # One mixed batch for every role: the distilled roles learn from the full model's output on it.
            x, y = training.mixup(x, y)
        losses = supertrain_step(
            model,
            x,
            y,
            sampler.sample(),
            training.optimizer,
            training.criterion,
            training.autocast_dtype,
            training.scaler,
            training.clip_grad,
        )
        training.scheduler.step()
        if training.ema is not None:
            training.ema.update(getattr(model, "module", model))
        steps += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
    seconds = time.perf_counter() - t0
    return EpochStats({k: v / max(1, steps) for k, v in sums.items()}, images, steps, seconds)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    subnets: Sequence[SubnetConfig],
    autocast_dtype: torch.dtype | None = None,
) -> dict[SubnetConfig, tuple[int, int]]:
    """(correct, seen) per subnet over ``batches``; a distributed caller sums them over workers."""
    model.eval()
    device = next(model.parameters()).device
    counts = {s: [0, 0] for s in subnets}
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            for s in subnets:
                counts[s][0] += int((model(x, s).argmax(1) == y).sum())
                counts[s][1] += len(y)
    return {s: (c[0], c[1]) for s, c in counts.items()}
