"""SuperViT: one Vision Transformer for many compute budgets (token grids x token keep rates).

Pure PyTorch + timm; no Ray, MLflow or Optuna in here.
"""

from .checkpoint import CheckpointError, load_checkpoint, load_pretrained, save_checkpoint
from .config import PRESETS, ArchConfig, Preset, SubnetConfig, TrainConfig, get_arch, get_preset, keep_count
from .export import FixedSubnet, compile_subnet, compiled_subnet, export_subnet
from .flops import Budget, gflops, macs, parse_budget
from .latency import LATENCY_MODES, LatencyResult, default_latency_mode, hardware_fingerprint, measure_latency
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
    "FixedSubnet",
    "LATENCY_MODES",
    "LatencyResult",
    "PRESETS",
    "RECIPES",
    "Role",
    "SubnetConfig",
    "SubnetSampler",
    "SuperViT",
    "compile_subnet",
    "compiled_subnet",
    "default_latency_mode",
    "distill_loss",
    "export_subnet",
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
