"""SuperViT: one Vision Transformer for many compute budgets (token grids x token keep rates).

Pure PyTorch + timm; no Ray, MLflow or Optuna in here.
"""

from .checkpoint import CheckpointError, load_checkpoint, load_pretrained, save_checkpoint
from .config import PRESETS, ArchConfig, Preset, SubnetConfig, TrainConfig, get_arch, get_preset, keep_count
from .flops import Budget, gflops, macs, parse_budget
from .latency import LatencyResult, hardware_fingerprint, measure_latency
from .model import SuperViT
from .train import (
    RECIPES,
    EpochStats,
    Role,
    SubnetSampler,
    Training,
    distill_loss,
    evaluate,
    make_training,
    supertrain_step,
    train_one_epoch,
)

__all__ = [
    "ArchConfig",
    "Budget",
    "EpochStats",
    "Preset",
    "TrainConfig",
    "Training",
    "evaluate",
    "get_preset",
    "make_training",
    "train_one_epoch",
    "CheckpointError",
    "LatencyResult",
    "PRESETS",
    "RECIPES",
    "Role",
    "SubnetConfig",
    "SubnetSampler",
    "SuperViT",
    "distill_loss",
    "get_arch",
    "gflops",
    "hardware_fingerprint",
    "keep_count",
    "load_checkpoint",
    "load_pretrained",
    "macs",
    "measure_latency",
    "parse_budget",
    "save_checkpoint",
    "supertrain_step",
]
