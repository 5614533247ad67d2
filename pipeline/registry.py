"""Subnets as MLflow models: logged, registered, loadable with ``mlflow.pyfunc``."""

from __future__ import annotations

import torch

from supervit import SubnetConfig
from supervit.export import FixedSubnet

__all__ = ["log_subnet_model"]


def log_subnet_model(
    model: torch.nn.Module, subnet: SubnetConfig, *, tracking_uri: str, run_id: str, name: str, registered_model: str
) -> None:
    """Log ``subnet`` of ``model`` as MLflow model ``name`` of run ``run_id``, registered as ``registered_model``."""
    import mlflow

    arch = model.arch
    example = torch.randn(1, arch.in_chans, arch.img_size, arch.img_size)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            FixedSubnet(model, subnet), name=name, input_example=example.numpy(), registered_model_name=registered_model
        )
