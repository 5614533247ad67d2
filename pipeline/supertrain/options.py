"""`SupertrainOptions`: everything a supertraining run depends on. The command line is generated from its fields
(help text and defaults written once, here); the rooms that read the options import this one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from supervit import ArchConfig, TrainConfig, get_arch, get_preset
from supervit.data import Augment, Splits
from supervit.train import RECIPES

from ..common import cli
from ..common.cli import UsageError, option

__all__ = ["EXPERIMENT", "SupertrainOptions"]

EXPERIMENT = "supervit-supertrain"
_PRESET_DEFAULT = "the preset's default"


@dataclass
class SupertrainOptions:
    """Everything a supertraining run depends on; the command line is generated from these fields.

    Training fields left None take the preset's `TrainConfig`; `resolved` fills them.
    """

    preset: str = option("tiny", help="architecture preset: tiny, deit_ti or deit_s")
    data: str = option(
        "digits",
        help="digits (ships with scikit-learn), synthetic, an ImageFolder root (train/<class>/*, val/<class>/*), "
        "or a Parquet file, folder or glob (columns image, label)",
    )
    epochs: int | None = option(None, help=f"training epochs ({_PRESET_DEFAULT}: tiny 20, deit 300)", min=1)
    batch_size: int | None = option(None, help=f"images per worker per step ({_PRESET_DEFAULT})", min=1)
    lr: float | None = option(None, help=f"peak learning rate after warm-up ({_PRESET_DEFAULT})")
    warmup_epochs: float | None = option(None, help=f"linear warm-up before cosine decay ({_PRESET_DEFAULT})", min=0)
    weight_decay: float | None = option(None, help=f"AdamW weight decay ({_PRESET_DEFAULT})", min=0)
    label_smoothing: float | None = option(
        None,
        help=f"label smoothing of the task loss ({_PRESET_DEFAULT})",
        min=0,
        flag=("--smoothing", "--label-smoothing"),
    )
    drop_path: float | None = option(None, help=f"stochastic depth rate ({_PRESET_DEFAULT})", min=0)
    clip_grad: float | None = option(None, help=f"max gradient norm ({_PRESET_DEFAULT})", min=0)
    lr_batch: int | None = option(
        None, help=f"global batch --lr is given for; scaled linearly to the actual one ({_PRESET_DEFAULT})", min=1
    )
    aug: str | None = option(
        None,
        help=f"RandAugment policy of the training transform, or none ({_PRESET_DEFAULT}: deit "
        "rand-m9-mstd0.5-inc1, tiny none)",
    )
    reprob: float | None = option(None, help=f"random-erasing probability ({_PRESET_DEFAULT}: deit 0.25)", min=0)
    mixup: float | None = option(None, help=f"mixup alpha, 0 for none ({_PRESET_DEFAULT}: deit 0.8)", min=0)
    cutmix: float | None = option(None, help=f"cutmix alpha, 0 for none ({_PRESET_DEFAULT}: deit 1.0)", min=0)
    repeated_aug: bool | None = option(
        None, help=f"repeated augmentation: each image 3 times per epoch ({_PRESET_DEFAULT}: deit yes)"
    )
    model_ema: bool | None = option(None, help=f"keep and evaluate an EMA of the weights ({_PRESET_DEFAULT}: deit yes)")
    recipe: str = option(
        "balanced", help="supertraining recipe (seed: the paper's, for reproduction; see README)", choices=RECIPES
    )
    schedules: bool | None = option(
        None,
        help="also train per-stage keep-rate schedules, as a search may pick them (default: yes, except for "
        "--recipe seed, which trains one keep rate for all stages as the paper does)",
    )
    pos_init: str = option(
        "sincos",
        help="position-embedding initialisation (sincos trains faster from scratch; ignored with --init-from)",
        choices=("sincos", "trunc_normal"),
    )
    workers: int = option(1, help="Ray Train workers (DDP processes)", min=1)
    cpus_per_worker: float | None = option(
        None,
        help="CPUs per worker (default: the cluster's CPUs / workers; with file-backed data half of that, the rest "
        "decodes images)",
        min=0.01,
    )
    decode_cpus: float = cli.decode_cpus_option()
    max_bad_images: int = cli.max_bad_images_option()
    gpus_per_worker: float | None = option(
        None, help="GPUs per worker (default: 1 when the cluster has GPUs, else 0)", min=0
    )
    address: str | None = option(None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    storage: str | None = option(
        None, help="Ray storage for checkpoints: a local folder or a bucket URI (default ./ray_results)"
    )
    init_from: str | None = option(
        None, help="initialise from a timm DeiT, official SuperViT or own checkpoint", metavar="CKPT"
    )
    resume: str | None = option(
        None,
        help="continue an interrupted run into the same MLflow run (default: the newest unfinished one in --storage)",
        nargs="?",
        const="",
        metavar="RUN_NAME",
    )
    mlflow_uri: str | None = option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    experiment: str = option(EXPERIMENT, help="MLflow experiment")
    name: str | None = option(
        None, help="run name in Ray storage and MLflow (default: supertrain-<preset>-<data>-<n>)", flag="--run-name"
    )
    registered_model: str | None = option(None, help="MLflow registered model name (default supervit-<preset>)")
    seed: int = option(0, help="random seed")
    keep_checkpoints: int = option(3, help="checkpoints kept in Ray storage", min=1)
    max_failures: int = option(3, help="worker-group restarts from the last checkpoint", min=0)
    # Failure drill: the last worker kills itself once, at (epoch, step); the marker file makes it once only.
    inject_failure: tuple[int, int, str] | None = option(None, help="", cli=False)

    @property
    def arch(self) -> ArchConfig:
        """The preset's architecture."""
        return get_arch(self.preset)

    def resolved(self) -> SupertrainOptions:
        """Unset training fields from the preset's `TrainConfig`; ``schedules`` from the recipe."""
        try:
            train = get_preset(self.preset).train
        except ValueError as e:
            raise UsageError(str(e)) from None
        fill = {f.name: getattr(train, f.name) for f in dataclasses.fields(train) if getattr(self, f.name) is None}
        if self.schedules is None:
            fill["schedules"] = self.recipe != "seed"  # the paper: one keep rate for all stages
        return dataclasses.replace(self, **fill)

    def train_config(self) -> TrainConfig:
        """The resolved training fields."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def augment(self) -> Augment:
        """The training transform's augmentation (file-backed data)."""
        return Augment(aug=None if self.aug == "none" else self.aug, reprob=self.reprob)

    def validate(self) -> Splits:
        """Check everything checkable before Ray or training starts (resolved options); return the data, its
        training split augmented as the options say."""
        from supervit import SuperViT, load_pretrained
        from supervit.data import FileImages, build_transform, load_data, verify

        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise UsageError(f"--mixup/--cutmix mix pairs of images: --batch-size must be even, got {self.batch_size}")
        splits = load_data(self.data, self.arch)
        if isinstance(splits.train, FileImages):
            build_transform(self.arch, True, self.augment().aug, self.reprob)  # DataError: a policy timm lacks
            splits.train = splits.train.with_augment(self.augment())
        verify(splits, max_bad=self.max_bad_images)
        if len(splits.train) < self.batch_size * self.workers:
            raise UsageError(
                f"dataset {self.data}: {len(splits.train)} training images, fewer than one global batch "
                f"({self.batch_size} x {self.workers} workers)"
            )
        if self.init_from:  # CheckpointError if it does not fit
            load_pretrained(SuperViT(self.arch, num_classes=splits.num_classes), self.init_from)
        return splits
