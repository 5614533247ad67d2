"""SuperViT: one Vision Transformer for many compute budgets (token grids x token keep rates).

Pure PyTorch + timm; no Ray, MLflow or Optuna in here.

The names below load on first use: a process that needs only `supervit.config` or `supervit.data` (a data-loading
task, a small actor) does not pay for importing timm, which takes seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the submodule that defines it
_EXPORTS = {
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "load_pretrained": "checkpoint",
    "save_checkpoint": "checkpoint",
    "PRESETS": "config",
    "ArchConfig": "config",
    "Preset": "config",
    "SubnetConfig": "config",
    "TrainConfig": "config",
    "get_arch": "config",
    "get_preset": "config",
    "keep_count": "config",
    "FixedSubnet": "export",
    "compile_subnet": "export",
    "compiled_subnet": "export",
    "export_subnet": "export",
    "Budget": "flops",
    "gflops": "flops",
    "macs": "flops",
    "parse_budget": "flops",
    "LATENCY_MODES": "latency",
    "LatencyResult": "latency",
    "default_latency_mode": "latency",
    "hardware_fingerprint": "latency",
    "measure_latency": "latency",
    "time_program": "latency",
    "SuperViT": "model",
    "Calibration": "parts",
    "Part": "parts",
    "fit_calibration": "parts",
    "measure_part": "parts",
    "predict_latency": "parts",
    "subnet_parts": "parts",
    "RECIPES": "train",
    "EpochStats": "loop",
    "Role": "train",
    "SubnetSampler": "train",
    "Training": "loop",
    "distill_loss": "train",
    "evaluate": "loop",
    "make_training": "loop",
    "supertrain_step": "train",
    "train_one_epoch": "loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # the same names, for type checkers and editors
    from .checkpoint import CheckpointError, load_checkpoint, load_pretrained, save_checkpoint  # noqa: F401
    from .config import PRESETS, ArchConfig, Preset, SubnetConfig, TrainConfig, get_arch, get_preset, keep_count  # noqa: F401
    from .export import FixedSubnet, compile_subnet, compiled_subnet, export_subnet  # noqa: F401
    from .flops import Budget, gflops, macs, parse_budget  # noqa: F401
    from .latency import (  # noqa: F401
        LATENCY_MODES,
        LatencyResult,
        default_latency_mode,
        hardware_fingerprint,
        measure_latency,
        time_program,
    )
    from .loop import EpochStats, Training, evaluate, make_training, train_one_epoch  # noqa: F401
    from .model import SuperViT  # noqa: F401
    from .parts import Calibration, Part, fit_calibration, measure_part, predict_latency, subnet_parts  # noqa: F401
    from .train import RECIPES, Role, SubnetSampler, distill_loss, supertrain_step  # noqa: F401
