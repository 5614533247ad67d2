"""The loop around the step: the optimizer and its parameter groups, warm-up + cosine, the EMA of the weights,
`train_one_epoch` (what the Ray Train workers and the benchmarks both run) and `evaluate` (every subnet in one
pass)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import SubnetConfig, TrainConfig
from .train import SubnetSampler, supertrain_step

__all__ = [
    "param_groups",
    "warmup_cosine",
    "Training",
    "EpochStats",
    "make_training",
    "scaled_lr",
    "train_one_epoch",
    "evaluate",
]


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
