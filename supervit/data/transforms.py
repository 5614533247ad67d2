"""Transforms: timm's ``create_transform`` for training (light by default, DeiT's recipe when asked) and
evaluation, and `load_image` (decode + transform: what reading one file-backed item costs)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps

from ..config import ArchConfig
from .decode import decode_image
from .splits import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 224 / 256  # DeiT's evaluation: resize to 256/224 of the input, then centre-crop


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation, in timm's terms (the defaults are light: crop, flip, nothing else).

    DeiT's recipe is `DEIT_AUGMENT`: RandAugment ``rand-m9-mstd0.5-inc1`` and random erasing 0.25 in
    ``pixel`` mode, bicubic. Mixup/cutmix act on batches, so they belong to the training step, not here.

    Attributes:
        aug: timm auto-augment policy (``rand-m9-mstd0.5-inc1``), or None (or ``none``) for none.
        reprob: Random-erasing probability (0 disables it).
        remode: Random-erasing fill: ``pixel`` (per-pixel noise, DeiT), ``rand`` or ``const``.
        color_jitter: Colour-jitter strength; timm applies it only when ``aug`` is None.
        interpolation: Resize interpolation of the random-resized crop.
        scale: Area range of the random-resized crop.
        hflip: Horizontal-flip probability.
    """

    aug: str | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    color_jitter: float = 0.0
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5


DEIT_AUGMENT = Augment(aug="rand-m9-mstd0.5-inc1", reprob=0.25)


def _mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans == 1:  # one channel: the average of ImageNet's three
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    return IMAGENET_MEAN, IMAGENET_STD


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, defined for 0 bits too (a black image, as TensorFlow's RandAugment and older Pillow
    give). DeiT's ``rand-m9-mstd0.5`` samples magnitude 10 about 2% of the time, which asks
    PosterizeIncreasing for 0 bits; Pillow >= 11 raises on that, so about 1 image in 700 would fail."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _safe_augment_ops(transform) -> None:
    """Swap timm's posterize for `_posterize` in the auto-augment ops of ``transform`` (in place)."""
    from timm.data import auto_augment

    for t in getattr(transform, "transforms", []):
        ops = list(getattr(t, "ops", []))
        for sub in getattr(t, "policy", []):
            ops += list(sub)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize


@functools.lru_cache(maxsize=16)
def _cached_transform(img_size: int, in_chans: int, train: bool, augment: Augment, crop_pct: float):
    from timm.data import create_transform

    mean, std = _mean_std(in_chans)
    common = dict(input_size=img_size, mean=mean, std=std)
    if not train:
        return create_transform(**common, is_training=False, interpolation="bicubic", crop_pct=crop_pct)
    try:
        transform = create_transform(
            **common,
            is_training=True,
            scale=tuple(augment.scale),
            hflip=augment.hflip,
            color_jitter=augment.color_jitter or None,  # timm adds a no-op ColorJitter for 0
            auto_augment=None if str(augment.aug).lower() in ("", "none") else augment.aug,
            interpolation=augment.interpolation,
            re_prob=augment.reprob,
            re_mode=augment.remode,
        )
    except (AssertionError, KeyError, ValueError) as e:
        raise DataError(
            f"augmentation {augment}: {e or type(e).__name__}; expected e.g. aug='rand-m9-mstd0.5-inc1' "
            "(or none), reprob in [0, 1], remode pixel/rand/const, interpolation bicubic/bilinear"
        ) from None
    _safe_augment_ops(transform)
    return transform


def build_transform(
    arch: ArchConfig,
    train: bool,
    aug: str | None = None,
    reprob: float = 0.0,
    *,
    remode: str = "pixel",
    color_jitter: float = 0.0,
    interpolation: str = "bicubic",
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    crop_pct: float = DEFAULT_CROP_PCT,
):
    """timm's transform for ``arch`` (PIL image in, normalised float32 ``(C, H, W)`` tensor out).

    Train: random-resized crop (``interpolation``), flip, RandAugment ``aug`` if given, colour jitter if
    ``color_jitter`` and no ``aug``, random erasing ``reprob``. Eval: resize the short side to
    ``img_size / crop_pct`` (256 for 224) bicubic, centre crop. ImageNet mean/std (averaged for one channel).
    The defaults are the light recipe; `DEIT_AUGMENT` holds DeiT's values.

    Raises:
        DataError: an option timm does not accept (e.g. an unknown ``aug`` policy).
    """
    augment = Augment(aug, reprob, remode, color_jitter, interpolation, tuple(scale), hflip)
    return _cached_transform(arch.img_size, arch.in_chans, bool(train), augment, float(crop_pct))


_SEEDED_PID = None


def _seed_process() -> None:
    """Seed torch's generator once per process from the OS: torch starts every process from one fixed seed,
    so worker processes would otherwise draw the same flips and erasing noise in lockstep."""
    global _SEEDED_PID
    if _SEEDED_PID != os.getpid():
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
        _SEEDED_PID = os.getpid()


def load_image(
    data: bytes | None, img_size: int, in_chans: int, train: bool, augment: Augment | None = None
) -> torch.Tensor:
    """Decode and transform one image: ``(in_chans, img_size, img_size)`` float32, normalised.

    Raises:
        DataError: the bytes are not a decodable image.
    """
    _seed_process()
    img = decode_image(data, in_chans)
    return _cached_transform(img_size, in_chans, bool(train), augment or Augment(), DEFAULT_CROP_PCT)(img)
