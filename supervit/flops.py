"""Analytic FLOPs of a subnet, in the DeiT/EViT/SuperViT papers' convention (one multiply-add = one FLOP).

Counted: the patch embedding, every linear layer, the two attention products, the class-token attention row
of each pruning stage, and the classifier. Not counted (as in the papers' 4.6 G for DeiT-S): LayerNorm,
softmax, GELU, additions and the input resize, each well under 1% of the total.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ArchConfig, SubnetConfig, keep_count

__all__ = ["Budget", "gflops", "macs", "token_counts", "parse_budget"]


def token_counts(arch: ArchConfig, subnet: SubnetConfig) -> list[tuple[int, int]]:
    """Per block, the tokens entering its attention and its MLP (class token included)."""
    subnet = subnet.validate(arch)
    n = subnet.grid**2 + 1
    stages = {b: s for s, b in enumerate(arch.prune_blocks)}
    counts = []
    for i in range(arch.depth):
        n_attn = n
        if i in stages and subnet.keep_rates[stages[i]] < 1.0:
            n = 1 + keep_count(n, subnet.keep_rates[stages[i]])
        counts.append((n_attn, n))
    return counts


def macs(arch: ArchConfig, subnet: SubnetConfig, num_classes: int = 1000) -> int:
    """Multiply-adds of one forward of ``subnet`` on one image."""
    subnet = subnet.validate(arch)
    d = arch.embed_dim
    hidden = int(d * arch.mlp_ratio)
    total = subnet.grid**2 * arch.patch_size**2 * arch.in_chans * d  # patch embedding
    for n_attn, n_mlp in token_counts(arch, subnet):
        total += n_attn * d * 3 * d  # qkv
        total += 2 * n_attn * n_attn * d  # q k^T and attn v
        total += n_attn * d * d  # output projection
        if n_mlp < n_attn:
            total += n_attn * d  # class-token attention row of a stage that drops tokens
        total += 2 * n_mlp * d * hidden  # MLP
    return total + d * num_classes


def gflops(arch: ArchConfig, subnet: SubnetConfig | None = None, num_classes: int = 1000) -> float:
    """GFLOPs (giga multiply-adds) of one forward of ``subnet`` (None: the full model) on one image."""
    return macs(arch, arch.largest if subnet is None else subnet, num_classes) / 1e9


_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(gflops|mflops|x)\s*$", re.IGNORECASE)
_ACCEPTED = "accepted forms: 2.3GFLOPs, '2.3 GFLOPs', 450MFLOPs, 0.5x (a fraction of the full model)"


@dataclass(frozen=True)
class Budget:
    """A compute budget as written (``2.3GFLOPs``, ``450MFLOPs``, ``0.5x``), parsed once.

    ``value`` is in GFLOPs, or a fraction of the full model when ``relative``; `gflops` resolves it for an
    architecture.
    """

    text: str
    value: float
    relative: bool
    unit: str = "GFLOPs"  # as written: GFLOPs, MFLOPs or x

    @property
    def canonical(self) -> str:
        """The budget in its own unit, normalised: ``2.3 gflops`` -> ``2.3GFLOPs``, ``450mflops`` -> ``450MFLOPs``."""
        number = self.value * 1e3 if self.unit == "MFLOPs" else self.value
        return f"{number:g}{self.unit}"

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``2.3GFLOPs``, ``2.3 GFLOPs``, ``450MFLOPs`` or ``0.5x``, case-insensitive.

        Raises:
            ValueError: anything else, or a budget that is not positive.
        """
        m = _BUDGET_RE.match(str(text))
        if not m:
            raise ValueError(f"cannot parse budget {text!r}; {_ACCEPTED}")
        value, unit = float(m.group(1)), m.group(2).lower()
        if value <= 0:
            raise ValueError(f"budget {text!r} must be positive; {_ACCEPTED}")
        units = {"gflops": "GFLOPs", "mflops": "MFLOPs", "x": "x"}
        return cls(str(text).strip(), value / 1e3 if unit == "mflops" else value, unit == "x", units[unit])

    def gflops(self, arch: ArchConfig, num_classes: int = 1000) -> float:
        """The budget in GFLOPs for ``arch`` (a fraction is of its full model)."""
        return self.value * gflops(arch, None, num_classes) if self.relative else self.value


def parse_budget(text: str, arch: ArchConfig, num_classes: int = 1000) -> float:
    """`Budget.parse` then `Budget.gflops`: the budget ``text`` in GFLOPs for ``arch``."""
    return Budget.parse(text).gflops(arch, num_classes)
