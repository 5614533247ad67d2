"""Deployable forms of one subnet."""

from __future__ import annotations

import torch

from .config import SubnetConfig

__all__ = ["FixedSubnet"]


class FixedSubnet(torch.nn.Module):
    """A SuperViT pinned to one subnet: a plain ``forward(x)``."""

    def __init__(self, model: torch.nn.Module, subnet: SubnetConfig) -> None:
        super().__init__()
        self.model, self.subnet = model, subnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.subnet)
