"""Deployable subnets in MLflow's model registry: one version per chosen subnet, an alias per budget.

A subnet is logged as its `FixedSubnet` program, exported by `mlflow.pytorch` with `torch.export` ("pt2"):
the pyfunc takes float32 images (any batch, ``in_chans x input_size x input_size``) and returns logits. The
input example has two images: MLflow marks the batch dimension ``Dim.AUTO``, which an example batch of 1
specialises to 1 (the program then refuses every other batch: ``Guard failed: x.size()[0] == 1``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import numpy as np
import torch

from supervit import Budget, FixedSubnet, SubnetConfig, SuperViT, gflops

__all__ = ["budget_alias", "log_subnet_model", "subnet_tags"]

_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def budget_alias(text: str) -> str:
    """The registry alias naming a budget: ``2.3GFLOPs`` -> ``budget-2_3GFLOPs``, ``0.5x`` -> ``budget-0_5x``.

    Aliases allow letters, digits, ``_`` and ``-`` only, so the decimal point becomes ``_``.

    Raises:
        ValueError: text that is not a budget (the forms `supervit.parse_budget` accepts).
    """
    return "budget-" + Budget.parse(text).canonical.replace(".", "_").replace("+", "")


def subnet_tags(model: SuperViT, subnet: SubnetConfig, input_size: int) -> dict[str, str]:
    """The tags every registered subnet carries: what it is and what it costs."""
    subnet = model.resolve(subnet)
    return {
        "subnet": subnet.name,
        "grid": str(subnet.grid),
        "keep_rates": ",".join(f"{r:g}" for r in subnet.keep_rates),
        "gflops": f"{gflops(model.arch, subnet, model.num_classes):.6g}",
        "arch": model.arch.name,
        "num_classes": str(model.num_classes),
        "input_size": str(input_size),
    }


def log_subnet_model(
    model: SuperViT,
    subnet: SubnetConfig | None,
    *,
    name: str,
    registered_model: str,
    alias: str | None = None,
    tags: dict[str, Any] | None = None,
    input_size: int | None = None,
    input_example: np.ndarray | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    description: str | None = None,
):
    """Log ``subnet`` of ``model`` as an MLflow model and register it as a new version.

    Args:
        model: The supernet (not modified: the logged program holds a float32 CPU copy of the weights).
        subnet: The subnet (None: the full model).
        name: Artifact name of the model in the run (e.g. ``model`` or ``budget-2_3GFLOPs``).
        registered_model: Registered model to add a version to (created if new).
        alias: Alias to point at the new version (e.g. `budget_alias` of the budget); moved if it exists.
        tags: Further version tags (top-1s, latency, hardware fingerprint, ...); values become strings.
        input_size: Side of the images the model takes (default the architecture's ``img_size``).
        input_example: Example images (float32, N x C x H x W); default two zero images. An example of one
            image is repeated to two (see the module docstring).
        run_id: Run to log into; None: the active run, or a new one.
        tracking_uri: Tracking store to use (set for the process, as `mlflow.set_tracking_uri` does); None
            keeps the current one.
        description: Version description; default names the subnet and its cost.

    Returns:
        The registered `ModelVersion` (with its tags and aliases as set here).
    """
    import mlflow

    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    if alias is not None and (not _ALIAS_RE.match(alias) or alias == "latest" or re.match(r"^v\d+$", alias)):
        raise ValueError(f"alias {alias!r} must be letters, digits, '_' or '-', and not 'latest' or v<number>")
    fixed = FixedSubnet(model, subnet, input_size).to(device="cpu", dtype=torch.float32)
    c, s = model.arch.in_chans, fixed.input_size
    all_tags = subnet_tags(model, fixed.subnet, s) | {k: str(v) for k, v in (tags or {}).items()}
    # Stated, not inferred: inference loads the model again in a subprocess, for a list that is known.
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    active = mlflow.active_run()
    use_active = run_id is None and active is not None
    with contextlib.nullcontext() if use_active else mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            fixed,
            name=name,
            input_example=_example(input_example, c, s),
            signature=_signature(c, s, model.num_classes),
            registered_model_name=registered_model,
            serialization_format="pt2",
            pip_requirements=requirements,
        )
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    for k, v in all_tags.items():
        client.set_model_version_tag(registered_model, version, k, v)
    text = description or (
        f"SuperViT {model.arch.name} subnet {fixed.subnet} ({all_tags['gflops']} GFLOPs), "
        f"float32 images {c}x{s}x{s}, any batch size"
    )
    client.update_model_version(registered_model, version, description=text)
    if alias is not None:
        client.set_registered_model_alias(registered_model, alias, version)
    return client.get_model_version(registered_model, version)


def _example(images: np.ndarray | None, c: int, s: int) -> np.ndarray:
    """The input example: two images at least (one would fix the exported batch dimension to 1)."""
    images = np.zeros((2, c, s, s), dtype=np.float32) if images is None else np.asarray(images, dtype=np.float32)
    if images.shape[1:] != (c, s, s):
        raise ValueError(f"input_example must be N x {c} x {s} x {s}, got {tuple(images.shape)}")
    return np.concatenate([images] * 2)[:2] if len(images) < 2 else images


def _signature(c: int, s: int, num_classes: int):
    """Float32 images of any batch size in, logits out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, s, s))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )
