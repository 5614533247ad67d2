"""Architecture presets and sub-network descriptions.

`ArchConfig` describes one SuperViT (the weights); `SubnetConfig` names one sub-network of it: a token grid and
a keep-rate schedule, one rate per pruning stage. Both are frozen and hashable, so a subnet is at once the
latency-cache key, the search's parameter set and the MLflow parameters. A `Preset` is everything a name like
``deit_s`` stands for, in one place: the architecture, its training defaults and its search space file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

__all__ = ["ArchConfig", "SubnetConfig", "TrainConfig", "Preset", "get_arch", "get_preset", "PRESETS", "keep_count"]


@dataclass(frozen=True)
class ArchConfig:
    """The shape of a SuperViT.

    Args:
        patch_size: Side of one patch in pixels, after the input is resized to ``grid * patch_size``.
        embed_dim: Token width.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        grids: Token grids (tokens per side) the supernet serves, ascending.
        prune_blocks: 0-based indices of the blocks that keep only the most attended tokens.
        keep_rates: Keep rates the supernet is trained on (per stage, any combination); includes 1.0.
        in_chans: Input image channels.
        qkv_bias: Bias on the qkv projection (DeiT: True).
        name: Preset name, for display and checkpoints.
    """

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    grids: tuple[int, ...] = (8, 10, 12, 14)
    prune_blocks: tuple[int, ...] = (3, 6, 9)
    keep_rates: tuple[float, ...] = (0.5, 0.7, 1.0)
    in_chans: int = 3
    qkv_bias: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        # Lists arrive from JSON/YAML; store tuples so the config stays hashable.
        for f in ("grids", "prune_blocks", "keep_rates"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        object.__setattr__(self, "grids", tuple(sorted(int(g) for g in self.grids)))
        object.__setattr__(self, "keep_rates", tuple(sorted(float(r) for r in self.keep_rates)))
        if not self.grids or min(self.grids) < 1:
            raise ValueError(f"grids must be positive integers, got {self.grids}")
        if len(set(self.grids)) != len(self.grids):
            raise ValueError(f"grids must be distinct, got {self.grids}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if list(self.prune_blocks) != sorted(set(self.prune_blocks)) or any(
            not 0 <= b < self.depth for b in self.prune_blocks
        ):
            raise ValueError(
                f"prune_blocks must be ascending, distinct and in [0, {self.depth}), got {self.prune_blocks}"
            )
        if not self.keep_rates or any(not 0.0 < r <= 1.0 for r in self.keep_rates) or self.keep_rates[-1] != 1.0:
            raise ValueError(f"keep_rates must lie in (0, 1] and include 1.0, got {self.keep_rates}")

    @property
    def num_stages(self) -> int:
        """Number of pruning stages (one keep rate each)."""
        return len(self.prune_blocks)

    @property
    def img_size(self) -> int:
        """Input side the data is prepared at: the largest grid's."""
        return max(self.grids) * self.patch_size

    @property
    def largest(self) -> SubnetConfig:
        """The full model: largest grid, every token kept."""
        return SubnetConfig(max(self.grids), (1.0,) * self.num_stages)

    @property
    def smallest(self) -> SubnetConfig:
        """The cheapest trained subnet: smallest grid, lowest keep rate at every stage."""
        return SubnetConfig(min(self.grids), (min(self.keep_rates),) * self.num_stages)

    def to_dict(self) -> dict:
        """JSON-ready dict (round-trips through ``ArchConfig(**d)``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ArchConfig:
        """Inverse of `to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class TrainConfig:
    """Training defaults of a preset; the supertraining command's flags override each of them.

    Every field is required, so a preset cannot leave one to a silent fallback.

    Args:
        epochs: Training epochs.
        batch_size: Images per worker per step.
        lr: Peak learning rate, reached after the warm-up.
        warmup_epochs: Linear warm-up before the cosine decay.
        weight_decay: AdamW weight decay (not applied to norms, biases and embeddings).
        label_smoothing: Label smoothing of the task loss.
        drop_path: Stochastic depth rate of the last block.
        clip_grad: Max global gradient norm, or None.
        lr_batch: The global batch ``lr`` is given for: the learning rate is scaled linearly to the actual global
            batch (DeiT: 5e-4 at 512); None uses ``lr`` as it is.
        aug: timm RandAugment policy of the training transform (``rand-m9-mstd0.5-inc1``), or ``none``.
        reprob: Random-erasing probability.
        mixup: Mixup alpha (0: off).
        cutmix: CutMix alpha (0: off).
        repeated_aug: Repeated augmentation (each image three times per epoch, independently augmented, in as
            many steps as without).
        model_ema: Keep an exponential moving average of the weights (decay 0.99996, DeiT's), evaluated beside
            the model and saved with it.
    """

    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: float
    weight_decay: float
    label_smoothing: float
    drop_path: float
    clip_grad: float | None
    lr_batch: int | None
    aug: str
    reprob: float
    mixup: float
    cutmix: float
    repeated_aug: bool
    model_ema: bool


@dataclass(frozen=True)
class Preset:
    """A named SuperViT: its architecture, training defaults and search space (``search_spaces/<space>``)."""

    arch: ArchConfig
    train: TrainConfig
    space: str

    def __post_init__(self) -> None:
        if not isinstance(self.arch, ArchConfig) or not isinstance(self.train, TrainConfig):
            raise TypeError(f"preset {self.arch!r}: needs an ArchConfig and a TrainConfig")

    @property
    def name(self) -> str:
        """The preset's name (its architecture's)."""
        return self.arch.name


# DeiT's ImageNet recipe, which the seed trained both DeiT presets with.
_DEIT_TRAIN = TrainConfig(
    epochs=300,
    batch_size=256,
    lr=5e-4,
    warmup_epochs=5,
    weight_decay=0.05,
    label_smoothing=0.1,
    drop_path=0.1,
    clip_grad=None,
    lr_batch=512,
    aug="rand-m9-mstd0.5-inc1",
    reprob=0.25,
    mixup=0.8,
    cutmix=1.0,
    repeated_aug=True,
    model_ema=True,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # The paper's SuperViT(DeiT-S).
        Preset(ArchConfig(name="deit_s"), _DEIT_TRAIN, "deit_s.yaml"),
        Preset(ArchConfig(embed_dim=192, num_heads=3, name="deit_ti"), _DEIT_TRAIN, "deit_ti.yaml"),
        # The embedded default: digits (8x8 greyscale) upsampled to 16x16, patch 2 -> grids of 4, 6, 8 tokens a
        # side; light training defaults so the whole loop runs in minutes on 2 CPU cores.
        Preset(
            ArchConfig(
                patch_size=2,
                embed_dim=64,
                depth=6,
                num_heads=2,
                mlp_ratio=2.0,
                grids=(4, 6, 8),
                prune_blocks=(1, 3, 5),
                keep_rates=(0.5, 0.7, 1.0),
                in_chans=1,
                name="tiny",
            ),
            TrainConfig(
                epochs=20,
                batch_size=32,
                lr=1e-3,
                warmup_epochs=2,
                weight_decay=0.05,
                label_smoothing=0.0,
                drop_path=0.0,
                clip_grad=1.0,
                lr_batch=None,
                aug="none",
                reprob=0.0,
                mixup=0.0,
                cutmix=0.0,
                repeated_aug=False,
                model_ema=False,
            ),
            "tiny.yaml",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """Return the preset called ``name`` (``deit_s``, ``deit_ti``, ``tiny``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None


def get_arch(name: str) -> ArchConfig:
    """The architecture of preset ``name``."""
    return get_preset(name).arch


def keep_count(num_tokens: int, rate: float) -> int:
    """Patch tokens kept by a pruning stage (the seed's rule).

    ``num_tokens`` counts the class token; the stage keeps the class token plus ``ceil(rate * num_tokens)``
    patch tokens, never more than there are.
    """
    return min(num_tokens - 1, math.ceil(rate * num_tokens))


_NAME_RE = re.compile(r"^g(\d+)_k([0-9.]+(?:-[0-9.]+)*)$")


@dataclass(frozen=True)
class SubnetConfig:
    """One sub-network: a token grid and a keep-rate schedule (one rate per pruning stage).

    A single float, or a one-element tuple, means the same rate at every stage; `validate` expands it.
    """

    grid: int
    keep_rates: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        rates = self.keep_rates
        if isinstance(rates, (int, float)):
            rates = (rates,)
        try:
            rates = tuple(float(r) for r in rates)
        except (TypeError, ValueError):
            raise ValueError(f"keep_rates must be a number or a sequence of numbers, got {self.keep_rates!r}") from None
        if not rates:
            raise ValueError("keep_rates is empty")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int):
            if isinstance(self.grid, float) and self.grid.is_integer():
                object.__setattr__(self, "grid", int(self.grid))
            else:
                raise ValueError(f"grid must be an integer, got {self.grid!r}")
        object.__setattr__(self, "keep_rates", rates)

    def validate(self, arch: ArchConfig) -> SubnetConfig:
        """Check against ``arch`` and return the subnet with one rate per stage.

        Raises:
            ValueError: unknown grid, a rate outside (0, 1], or a schedule of the wrong length.
        """
        if self.grid not in arch.grids:
            raise ValueError(f"grid {self.grid} is not one of the architecture's grids {list(arch.grids)}")
        bad = [r for r in self.keep_rates if not (0.0 < r <= 1.0) or math.isnan(r)]
        if bad:
            raise ValueError(f"keep rate {bad[0]} is outside (0, 1]")
        if len(self.keep_rates) == 1:
            return SubnetConfig(self.grid, self.keep_rates * arch.num_stages)
        if len(self.keep_rates) != arch.num_stages:
            raise ValueError(
                f"keep-rate schedule {list(self.keep_rates)} has {len(self.keep_rates)} rates; "
                f"the architecture has {arch.num_stages} pruning stages (give one rate or {arch.num_stages})"
            )
        return self

    @property
    def is_uniform(self) -> bool:
        """Whether every stage keeps the same rate."""
        return len(set(self.keep_rates)) == 1

    @property
    def name(self) -> str:
        """Short, parseable name: ``g14_k0.7`` (uniform) or ``g14_k0.9-0.7-0.5`` (schedule)."""
        rates = self.keep_rates[:1] if self.is_uniform else self.keep_rates
        return f"g{self.grid}_k" + "-".join(f"{r:g}" for r in rates)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> SubnetConfig:
        """Inverse of `name`: ``g14_k0.7`` or ``g14_k0.9-0.7-0.5``."""
        m = _NAME_RE.match(text.strip())
        if not m:
            raise ValueError(f"cannot parse subnet {text!r}; expected e.g. g14_k0.7 or g14_k0.9-0.7-0.5")
        return cls(int(m.group(1)), tuple(float(r) for r in m.group(2).split("-")))

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"grid": self.grid, "keep_rates": list(self.keep_rates)}
