"""The ladder as one MLflow pyfunc model: ``predict(images, params={"budget": "0.5x"})`` runs the most accurate
subnet within the budget (or ``max_latency_ms``; neither: the most accurate rung), with the supernet's own forward,
one set of weights for every rung. `mlflow models serve` serves it as it is."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import mlflow
import numpy as np

from .policy import Rung, best, parse_request_budget, within_budget

__all__ = ["LadderModel", "log_ladder_model"]


class LadderModel(mlflow.pyfunc.PythonModel):
    """Artifacts: ``checkpoint`` (the supernet, safetensors) and ``ladder`` (JSON: the rungs)."""

    def load_context(self, context) -> None:
        from supervit import gflops, load_checkpoint

        rungs = json.loads(Path(context.artifacts["ladder"]).read_text())
        self.ladder = [
            Rung(r["subnet"], r["gflops"], r["top1"], {int(b): ms for b, ms in r["latency_ms"].items()}) for r in rungs
        ]
        self.model = load_checkpoint(context.artifacts["checkpoint"]).eval()
        self.full_gflops = gflops(self.model.arch, None, self.model.num_classes)

    def predict(self, context, model_input, params: dict | None = None):
        """Images (float32, N x C x H x W, prepared as the held-out images are) -> one row per image: ``label``,
        ``probability``, ``subnet``, ``gflops``."""
        import pandas as pd
        import torch

        from supervit import SubnetConfig

        query = {k: str(v) for k, v in (params or {}).items() if v not in (None, "", 0, 0.0)}
        budget = parse_request_budget(query, self.full_gflops)  # BadRequest is a ValueError: MLflow answers 400
        rung = within_budget(self.ladder, budget) if budget else best(self.ladder)
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            probs = self.model(x, SubnetConfig.parse(rung.subnet)).softmax(dim=1)
        p, label = probs.max(dim=1)
        n = len(x)
        return pd.DataFrame(
            {"label": label.numpy(), "probability": p.numpy(), "subnet": [rung.subnet] * n, "gflops": [rung.gflops] * n}
        )


def log_ladder_model(
    ladder: list[dict], checkpoint: Path, arch, num_classes: int, registered_model: str, workdir: Path
):
    """Log the ladder into the active run as the pyfunc model ``ladder`` and register it as a new version."""
    import pandas as pd
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    path = workdir / "ladder.json"
    path.write_text(json.dumps(ladder, indent=1))
    s = arch.img_size
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, arch.in_chans, s, s))]),
        outputs=Schema(
            [
                ColSpec("long", "label"),
                ColSpec("float", "probability"),
                ColSpec("string", "subnet"),
                ColSpec("double", "gflops"),
            ]
        ),
        params=ParamSchema([ParamSpec("budget", "string", ""), ParamSpec("max_latency_ms", "double", 0.0)]),
    )
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        f"pandas=={pd.__version__}",
    ] + [f"{m}=={__import__(m).__version__}" for m in ("timm", "safetensors")]
    # MLflow warns that a python_model object is pickled and that no input example was given: both are meant (the
    # class is this module's, and an example would run a forward at logging time).
    with warnings.catch_warnings(), _quiet("mlflow.pyfunc"):
        warnings.simplefilter("ignore", UserWarning)
        return _log(path, checkpoint, signature, requirements, registered_model)


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _log(path: Path, checkpoint: Path, signature, requirements: list[str], registered_model: str):
    import pipeline
    import supervit

    return mlflow.pyfunc.log_model(
        name="ladder",
        python_model=LadderModel(),
        artifacts={"checkpoint": str(checkpoint), "ladder": str(path)},
        signature=signature,
        # The model's code travels with it: a process that loads it needs torch and timm, not this project.
        code_paths=[str(Path(supervit.__file__).parent), str(Path(pipeline.__file__).parent)],
        pip_requirements=requirements,
        registered_model_name=registered_model,
    )
