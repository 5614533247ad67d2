"""`python -m pipeline.supertrain`: supertrain one SuperViT on Ray Train, tracked in MLflow.

Rooms, from the bottom: `options` (`SupertrainOptions`), `report` (the accuracy table), `worker` (what each Ray
Train worker runs), `trainer` (the driver's side: placement, streamed data, the `TorchTrainer`), `command`
(`supertrain` and `main`, on top).
"""

from .command import SupertrainResult, main, supertrain
from .options import EXPERIMENT, SupertrainOptions

__all__ = ["EXPERIMENT", "SupertrainOptions", "SupertrainResult", "supertrain", "main"]
