"""Datasets: the embedded digits default, a synthetic set for tests, ImageNet-style folders, Parquet.

Every loader returns `Splits`: a train split (what supertraining trains on), a search split (held out, only
used to rank subnets) and a test split. Every item is ``(image, label)``: a float32 tensor of shape
``(in_chans, img_size, img_size)`` and an int. Datasets are plain picklable objects with a ``targets`` list.

Two kinds of dataset:

- In memory (`TensorData`): digits and synthetic. Small; they keep their fast path (a DataLoader over tensors).
- File-backed (`ImageFiles`, `ParquetRows`, both `FileImages`): ImageFolder trees and Parquet shards, on a
  local disk or in a bucket (``s3://``, ``gs://``, ``file://``, read through ``pyarrow.fs``). They hold an
  index, never the encoded bytes: ImageFolder items are paths; Parquet items are (file, row) references, and
  only the label column is read up front. Reading one image reads its file, or its Parquet row group. Each is
  a map-style torch ``Dataset`` (a plain DataLoader can iterate it) and exposes its items (``sources``,
  ``targets``) so `pipeline.data` can stream it through Ray Data.

Every decoding path goes through `decode_image` (the formats real folders hold: RGB/greyscale/CMYK JPEG, RGBA
and 16-bit PNG, palette GIF, WebP, EXIF-rotated files, images smaller than the crop) and every transform
comes from `build_transform` (timm's ``create_transform``: DeiT's recipe when asked, light by default).
"""

from __future__ import annotations

import copy
import functools
import glob
import io
import math
import os
import posixpath
import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .config import ArchConfig

__all__ = [
    "DataError",
    "Splits",
    "TensorData",
    "Storage",
    "FileImages",
    "ImageFiles",
    "ParquetRows",
    "Augment",
    "DEIT_AUGMENT",
    "decode_image",
    "build_transform",
    "load_image",
    "balanced_subset",
    "digits",
    "synthetic",
    "image_folder",
    "parquet",
    "load_data",
    "verify",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")
SPLIT_SEED = 0  # splits never depend on the training seed, so every run searches on the same held-out images
DEFAULT_CROP_PCT = 224 / 256  # DeiT's evaluation: resize to 256/224 of the input, then centre-crop


class DataError(ValueError):
    """A dataset that cannot be used; the message names the offending path or file."""


@dataclass
class Splits:
    """The three splits of one dataset.

    Attributes:
        train: What supertraining trains on.
        search: Held-out split for subnet search; never trained on.
        test: Final test split.
        num_classes: Number of classes (labels are ``0 .. num_classes - 1``).
        name: Where the data came from, e.g. ``digits`` or ``imagefolder:/data/imagenet``.
    """

    train: Dataset
    search: Dataset
    test: Dataset
    num_classes: int
    name: str


# ---------------------------------------------------------------------------------------------- in memory


class TensorData(Dataset):
    """Images and labels held as tensors (like ``TensorDataset``, plus ``targets`` and source ``indices``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray | None = None):
        self.tensors = (images, labels)
        self.targets = labels.tolist()
        # Row numbers in the source data, so callers can check that splits are disjoint.
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tensors[0][i], self.targets[i]

    def subset(self, idx: Sequence[int]) -> TensorData:
        """The items at positions ``idx`` (e.g. from `balanced_subset`)."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return TensorData(self.tensors[0][idx], self.tensors[1][idx], self.indices[idx.numpy()])


def _to_arch(x: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
    """Resize (N, 1, h, w) images to the architecture's input once and give them its channel count."""
    if x.shape[-2:] != (arch.img_size, arch.img_size):
        x = F.interpolate(x, size=(arch.img_size, arch.img_size), mode="bilinear", align_corners=False)
    # expand() is a view: a 3-channel copy of greyscale digits would triple the memory for nothing.
    return x.expand(-1, arch.in_chans, -1, -1)


def digits(arch: ArchConfig) -> Splits:
    """scikit-learn's handwritten digits (1797 8x8 greyscale images, 10 classes; ships with the package).

    Stratified split with a fixed seed: test 20% (360), search 10% (180), train the rest (1257). Pixels are
    scaled to [0, 1], normalised with the train split's mean and std, and resized once to ``arch.img_size``.
    """
    from sklearn.datasets import load_digits  # sklearn is slow to import; only this loader needs it
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    n = len(y)
    idx = np.arange(n)
    split = dict(random_state=SPLIT_SEED)
    rest, test = train_test_split(idx, test_size=math.ceil(0.2 * n), stratify=d.target, **split)
    train, search = train_test_split(rest, test_size=math.ceil(0.1 * n), stratify=d.target[rest], **split)
    train, search, test = np.sort(train), np.sort(search), np.sort(test)
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    # Index before resizing: each split is then resized once, with no full-size copy of the whole set.
    return Splits(*(TensorData(_to_arch(x[i], arch), y[i], i) for i in (train, search, test)), 10, "digits")


def synthetic(
    arch: ArchConfig,
    num_classes: int = 10,
    train_size: int = 256,
    search_size: int = 64,
    test_size: int = 64,
    seed: int = 0,
) -> Splits:
    """A learnable in-memory dataset for tests: a fixed coarse random pattern per class plus Gaussian noise.

    The three splits are disjoint draws from the same generator; labels are balanced within each split.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, arch.in_chans, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=arch.img_size, mode="bilinear", align_corners=False)

    def draw(n: int) -> TensorData:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = patterns[y] + 0.5 * torch.randn(n, arch.in_chans, arch.img_size, arch.img_size, generator=g)
        return TensorData(x, y)

    return Splits(draw(train_size), draw(search_size), draw(test_size), num_classes, "synthetic")


# ---------------------------------------------------------------------------------------------- storage

_URI_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class Storage:
    """Where a dataset's files live: a ``pyarrow.fs`` filesystem, and how to name its paths for people.

    Paths given to `read` are the filesystem's own (``bucket/key`` for S3, absolute for local disks); `name`
    turns one back into what the user would type (``s3://bucket/key``). Picklable: it travels to Ray tasks.
    """

    def __init__(self, fs=None, prefix: str = ""):
        import pyarrow.fs as pafs

        self.fs = fs if fs is not None else pafs.LocalFileSystem()
        self.prefix = prefix

    @classmethod
    def parse(cls, spec: str) -> tuple[Storage, str]:
        """(storage, path inside it) for a local path or a URI (``s3://``, ``gs://``, ``file://``, ...).

        Bucket options ride in the URI's query, as pyarrow reads them, e.g.
        ``s3://bucket/imagenet?endpoint_override=127.0.0.1:9000&scheme=http`` for an S3-compatible server.
        """
        import pyarrow as pa
        import pyarrow.fs as pafs

        m = _URI_RE.match(spec)
        if not m:
            return cls(), os.path.abspath(os.path.expanduser(spec))  # Ray workers do not share the driver's cwd
        try:
            fs, path = pafs.FileSystem.from_uri(spec)
        except (pa.ArrowException, ValueError, OSError) as e:
            raise DataError(f"cannot open {redact(spec)}: {e}") from None
        return cls(fs, f"{m.group(1).lower()}://"), path.rstrip("/") or "/"

    def name(self, path: str) -> str:
        """The path as a user would write it."""
        return self.prefix + path

    def read(self, path: str) -> bytes:
        """The whole file."""
        with self.fs.open_input_stream(path) as f:
            return f.readall()

    def kind(self, path: str) -> str:
        """``file``, ``dir`` or ``missing``."""
        import pyarrow.fs as pafs

        t = self.fs.get_file_info(path).type
        return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "missing")

    def walk(self, path: str) -> tuple[list[str], list[str]]:
        """(files, directories) anywhere under ``path``, each sorted (one listing: a bucket pages through it)."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
        dirs = sorted(i.path for i in infos if i.type == pafs.FileType.Directory)
        return files, dirs

    def subdirs(self, path: str) -> list[str]:
        """The folders right under ``path`` (a bucket lists their common prefixes), sorted."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.Directory)

    def __getstate__(self) -> dict:
        return {"fs": self.fs, "prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.fs, self.prefix = state["fs"], state["prefix"]


def redact(spec: str) -> str:
    """``spec`` without credentials (``s3://key:secret@bucket`` -> ``s3://***@bucket``): names end up in logs."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", spec)


# ---------------------------------------------------------------------------------------------- decoding

_ORIENTATION = 0x0112
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, TypeError, EOFError, IndexError, Image.DecompressionBombError)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Deep greyscale (16-bit PNG/TIFF: modes I;16*, I, F) scaled to 8 bits: PIL's own convert() clips
    values above 255, which turns a 16-bit photo white."""
    if img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode == "I":
        a = np.asarray(img).astype(np.int64)
        # Mode I comes from 16-bit sources; one whose values all fit in 8 bits is already on that scale.
        if a.max(initial=0) > 255:
            a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if a.max(initial=0) <= 1.0:
            a = a * 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img


def decode_image(data: bytes | None, in_chans: int = 3) -> Image.Image:
    """Decode encoded image bytes into an 8-bit PIL image with ``in_chans`` channels (``L`` or ``RGB``).

    Applies the EXIF orientation; scales 16-bit images to 8 bits; composites transparent images (RGBA, LA,
    palette with transparency) onto white, since the colour under a transparent pixel is arbitrary; converts
    CMYK and palette images. Animated files give their first frame.

    Raises:
        DataError: the bytes are not a decodable image (the message says why, not where: callers add that).
    """
    if data is None:
        raise DataError("the image is null")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # the full decode happens here, so a truncated or corrupt file fails here
        if img.getexif().get(_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_8bit(img)
        if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return img.convert("L" if in_chans == 1 else "RGB")
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image: {e}") from e


# ---------------------------------------------------------------------------------------------- transforms


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


# ---------------------------------------------------------------------------------------------- file-backed


class FileImages(Dataset):
    """Base of file-backed datasets: items are references (``sources``) with ``targets``; `__getitem__`
    reads, decodes and transforms one item (train transform with ``augment`` if ``train``, else eval)."""

    def __init__(
        self,
        targets: Sequence[int],
        img_size: int,
        in_chans: int,
        train: bool = False,
        augment: Augment | None = None,
        storage: Storage | None = None,
    ):
        self.targets = [int(t) for t in targets]
        self.img_size, self.in_chans, self.train = img_size, in_chans, train
        self.augment = augment or Augment()
        self.storage = storage or Storage()

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def sources(self) -> list:
        """One reference per item, in item order, as it appears in messages."""
        raise NotImplementedError

    def read(self, i: int) -> bytes | None:
        """Encoded bytes of item ``i``."""
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Item ``i``'s name in messages."""
        raise NotImplementedError

    def _take(self, idx: np.ndarray) -> FileImages:
        raise NotImplementedError

    def subset(self, idx: Sequence[int]) -> FileImages:
        """The items at positions ``idx`` (e.g. from `balanced_subset`), same transform."""
        return self._take(np.asarray(idx, dtype=np.int64))

    def with_augment(self, augment: Augment | None = None, train: bool | None = None) -> FileImages:
        """A copy with another augmentation recipe (e.g. the preset's) and/or train flag."""
        out = copy.copy(self)
        out.augment = augment or self.augment
        out.train = self.train if train is None else train
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            data = self.read(i)
        except OSError as e:
            raise DataError(f"cannot read image {self.where(i)}: {e}") from e
        try:
            x = load_image(data, self.img_size, self.in_chans, self.train, self.augment)
        except DataError as e:
            why = str(e).removeprefix("cannot decode image: ")
            raise DataError(f"cannot decode image {self.where(i)}: {why}") from e
        return x, self.targets[i]


class ImageFiles(FileImages):
    """Image files (one item per file), read and decoded in ``__getitem__``."""

    def __init__(
        self,
        paths: Sequence,
        targets: Sequence[int],
        img_size: int,
        in_chans: int,
        train: bool = False,
        augment: Augment | None = None,
        storage: Storage | None = None,
    ):
        super().__init__(targets, img_size, in_chans, train, augment, storage)
        self.paths = [str(p) for p in paths]  # the filesystem's paths; local ones are absolute

    @property
    def sources(self) -> list[str]:
        return [self.storage.name(p) for p in self.paths] if self.storage.prefix else list(self.paths)

    def read(self, i: int) -> bytes:
        return self.storage.read(self.paths[i])

    def where(self, i: int) -> str:
        return self.storage.name(self.paths[i])

    def _take(self, idx: np.ndarray) -> ImageFiles:
        out = copy.copy(self)
        out.paths = [self.paths[i] for i in idx]
        out.targets = [self.targets[i] for i in idx]
        return out


@dataclass
class ParquetFile:
    """One Parquet file of a dataset: its path, image column, and the first row of each row group."""

    path: str
    image_column: str
    row_group_starts: list[int]

    def row_group(self, row: int) -> int:
        """The row group that holds ``row``."""
        return int(np.searchsorted(self.row_group_starts, row, side="right")) - 1


class RowGroupReader:
    """Reads the encoded images of one Parquet row group (and nothing else): what every image read costs.

    Small and picklable (the files and the storage, no items): Ray tasks get this, not the dataset.
    """

    def __init__(self, storage: Storage, files: list[ParquetFile]):
        self.storage, self.files = storage, files

    def read(self, file: int, row_group: int) -> list[bytes | None]:
        """The image bytes of every row of ``row_group`` of file number ``file``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        f = self.files[file]
        with self.storage.fs.open_input_file(f.path) as handle:
            col = pq.ParquetFile(handle).read_row_group(row_group, columns=[f.image_column]).column(0)
        if pa.types.is_struct(col.type):
            col = pa.chunked_array([c.field("bytes") for c in col.chunks], type=col.type.field("bytes").type)
        return col.to_pylist()

    def where(self, file: int, row: int) -> str:
        return f"{self.storage.name(self.files[file].path)} row {row}"


class ParquetRows(FileImages):
    """Rows of Parquet files (one item per row: the file and the row number); reading an item reads its
    row group, which the dataset keeps until an item of another row group is read (sequential reads of
    one row group cost one read)."""

    def __init__(
        self,
        files: list[ParquetFile],
        file_index: np.ndarray,
        rows: np.ndarray,
        targets: Sequence[int],
        img_size: int,
        in_chans: int,
        train: bool = False,
        augment: Augment | None = None,
        storage: Storage | None = None,
    ):
        super().__init__(targets, img_size, in_chans, train, augment, storage)
        self.files = files
        self.file_index = np.asarray(file_index, dtype=np.int32)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._cache: tuple[tuple[int, int], list] | None = None

    @property
    def reader(self) -> RowGroupReader:
        return RowGroupReader(self.storage, self.files)

    @property
    def sources(self) -> list[tuple[str, int]]:
        names = [self.storage.name(f.path) for f in self.files]
        return [(names[f], int(r)) for f, r in zip(self.file_index, self.rows, strict=True)]

    def read(self, i: int) -> bytes | None:
        f, row = int(self.file_index[i]), int(self.rows[i])
        meta = self.files[f]
        rg = meta.row_group(row)
        if self._cache is None or self._cache[0] != (f, rg):
            self._cache = ((f, rg), self.reader.read(f, rg))
        return self._cache[1][row - meta.row_group_starts[rg]]

    def where(self, i: int) -> str:
        return self.reader.where(int(self.file_index[i]), int(self.rows[i]))

    def _take(self, idx: np.ndarray) -> ParquetRows:
        out = copy.copy(self)
        out.file_index, out.rows = self.file_index[idx], self.rows[idx]
        out.targets = [self.targets[i] for i in idx]
        out._cache = None
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # a decoded row group is not worth shipping
        return state


# ---------------------------------------------------------------------------------------------- splitting


def _carve_search(targets: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """Split item indices into (train, search): per class, ``fraction`` of the items (at least one when the
    class has two or more), picked by a fixed-seed shuffle of the class's items in their given order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"search_fraction must be in [0, 1), got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    rng, search = random.Random(SPLIT_SEED), []
    for c in sorted(by_class):
        items = by_class[c]
        n = len(items)
        # At least one per class (when the class can spare it), so every class is searched on.
        k = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
        rng.shuffle(items)
        search += items[:k]
    held = set(search)
    return [i for i in range(len(targets)) if i not in held], sorted(search)


def balanced_subset(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """A fixed, class-balanced choice of ``n`` item positions (sorted), e.g. for ``--search-images N``.

    Classes take turns (in a seeded order) giving their next item (in a seeded per-class order), so class
    counts differ by at most one unless a class runs out, whose share goes to the others. Pure and
    deterministic: the same (targets, n, seed) always give the same positions. ``n >= len(targets)`` gives
    every position.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n >= len(targets):
        return list(range(len(targets)))
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    queues = [list(rng.permutation(by_class[c])) for c in sorted(by_class)]
    order = rng.permutation(len(queues))
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for q in order:
            if depth < len(queues[q]):
                picked.append(int(queues[q][depth]))
                if len(picked) == n:
                    break
        depth += 1
    return sorted(picked)


# ---------------------------------------------------------------------------------------------- image folder


def _is_image(path: str) -> bool:
    # Hidden files are skipped: macOS copies leave undecodable "._x.jpg" resource forks next to the images.
    name = posixpath.basename(path)
    return posixpath.splitext(name)[1].lower() in IMG_EXTENSIONS and not name.startswith(".")


def _classes_of(split_dir: str, files: list[str], dirs: list[str]) -> dict[str, list[str]]:
    """Class folder name -> its image files (sorted), for the folders right under ``split_dir``. A folder
    with no image counts (with an empty list): buckets have no empty folders, local disks do."""
    out: dict[str, list[str]] = {}
    base = split_dir.rstrip("/") + "/"
    for d in dirs:
        rel = d[len(base) :]
        if "/" not in rel and not rel.startswith("."):
            out.setdefault(rel, [])
    for f in files:
        rel = f[len(base) :]
        if "/" in rel and _is_image(f):
            c = rel.split("/", 1)[0]
            if not c.startswith("."):
                out.setdefault(c, []).append(f)
    return dict(sorted(out.items()))


def image_folder(
    root: str | Path, arch: ArchConfig, search_fraction: float = 0.05, augment: Augment | None = None
) -> Splits:
    """ImageNet layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``, local or in a bucket.

    Classes are the sorted folder names under ``train/``. The search split is held out of ``train/``
    (``search_fraction`` per class, fixed seed); the test split is ``val/``. Images are read lazily; the
    train split uses ``augment`` (default: the light recipe).
    """
    spec = str(root)
    storage, path = Storage.parse(spec)
    shown = redact(spec)
    kind = storage.kind(path)
    if kind != "dir":
        raise DataError(f"dataset folder {shown} does not exist" if kind == "missing" else f"{shown} is a file")
    train_dir, val_dir = f"{path}/train", f"{path}/val"
    if storage.kind(train_dir) != "dir":
        raise DataError(f"{shown} has no train/ folder; expected root/train/<class>/*.jpg and root/val/...")
    train_classes = _classes_of(train_dir, *storage.walk(train_dir))
    shown_train = storage.name(train_dir)
    if not train_classes:
        raise DataError(f"{shown_train} has no class folders; expected {shown_train}/<class>/*.jpg")
    classes = list(train_classes)
    index = {c: i for i, c in enumerate(classes)}

    def flatten(by_class: dict[str, list[str]], where: str) -> tuple[list[str], list[int]]:
        paths, targets = [], []
        for c, files in by_class.items():
            if c not in index:
                raise DataError(f"class folder {where}/{c} is not among the classes of {shown_train}")
            paths += files
            targets += [index[c]] * len(files)
        return paths, targets

    paths, targets = flatten(train_classes, shown_train)
    if not paths:
        raise DataError(f"{shown_train} has no images (looked for {', '.join(IMG_EXTENSIONS)})")
    empty = [c for c, files in train_classes.items() if not files]
    if empty:
        raise DataError(f"class folder {shown_train}/{empty[0]} has no images")
    if storage.kind(val_dir) != "dir":
        raise DataError(f"{shown} has no val/ folder; expected root/val/<class>/*.jpg for the test split")
    val_paths, val_targets = flatten(_classes_of(val_dir, *storage.walk(val_dir)), storage.name(val_dir))
    tr, se = _carve_search(targets, search_fraction)
    shape = (arch.img_size, arch.in_chans)

    def make(idx: list[int], train: bool) -> ImageFiles:
        return ImageFiles([paths[i] for i in idx], [targets[i] for i in idx], *shape, train, augment, storage)

    test = ImageFiles(val_paths, val_targets, *shape, storage=storage)
    return Splits(make(tr, True), make(se, False), test, len(classes), f"imagefolder:{shown}")


# ---------------------------------------------------------------------------------------------- parquet

_GLOB_CHARS = re.compile(r"[*?\[]")


def _glob_regex(pattern: str) -> re.Pattern:
    """A path glob as a regex: ``*`` and ``?`` stay inside one folder, ``**/`` spans any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out, i = out + re.escape("["), i + 1
            else:
                cls = pattern[i + 1 : j]
                out, i = out + "[" + ("^" + cls[1:] if cls.startswith("!") else cls) + "]", j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _parquet_files(spec: str) -> tuple[Storage, list[str]]:
    storage, path = Storage.parse(spec)
    shown = redact(spec)
    kind = storage.kind(path) if not _GLOB_CHARS.search(path) else "missing"
    if kind == "dir":
        files = [f for f in storage.walk(path)[0] if f.endswith(".parquet")]
        if not files:
            raise DataError(f"no .parquet files in {shown}")
        return storage, files
    if kind == "file":
        return storage, [path]
    if not storage.prefix:  # a local glob: Python's own rules, as before buckets were supported
        files = sorted(os.path.abspath(f) for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    else:
        base = _GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
        rx = _glob_regex(path)
        files = [f for f in storage.walk(base)[0] if rx.match(f)] if storage.kind(base) == "dir" else []
    if not files:
        raise DataError(f"no parquet files match {shown}")
    return storage, files


def _parquet_index(storage: Storage, path: str) -> tuple[ParquetFile, list[int]]:
    """One file's row groups and labels: only the label column is read, never the images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shown = storage.name(path)
    try:
        with storage.fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle)
            schema = pf.schema_arrow
            img_col = next((c for c in IMAGE_COLUMNS if c in schema.names), None)
            label_col = next((c for c in LABEL_COLUMNS if c in schema.names), None)
            if img_col is None or label_col is None:
                missing = "image column (image/img)" if img_col is None else "label column (label/labels)"
                found = ", ".join(schema.names) or "none"
                raise DataError(f"{shown} has no {missing}; columns found: {found}")
            col_type = schema.field(img_col).type
            if pa.types.is_struct(col_type):
                if col_type.get_field_index("bytes") < 0:
                    raise DataError(f"{shown}: image column '{img_col}' is a struct without 'bytes' ({col_type})")
                col_type = col_type.field("bytes").type
            if not (pa.types.is_binary(col_type) or pa.types.is_large_binary(col_type)):
                raise DataError(f"{shown}: image column '{img_col}' has type {col_type}; expected encoded image bytes")
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
            labels = pf.read(columns=[label_col]).column(0)
    except DataError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{shown} is not a valid parquet file: {e}") from e
    if not pa.types.is_integer(labels.type) or labels.null_count:
        raise DataError(f"{shown}: label column '{label_col}' must be integers, no nulls (type {labels.type})")
    targets = labels.to_pylist()
    if targets and min(targets) < 0:
        raise DataError(f"{shown}: label column '{label_col}' has negative labels")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist() if sizes else [0]
    return ParquetFile(path, img_col, starts), targets


def _split_of(path: str) -> str | None:
    name, folder = posixpath.basename(path).lower(), posixpath.basename(posixpath.dirname(path)).lower()
    # The file name's prefix decides (train-00000-of-00004.parquet), else a folder named exactly after the
    # split (train/0000.parquet): a prefix match on folders would misread e.g. "test_runs/data.parquet".
    if name.startswith("train") or folder == "train":
        return "train"
    if name.startswith(("val", "validation", "test")) or folder in ("val", "validation", "test"):
        return "test"
    return None


def parquet(
    path_or_glob: str, arch: ArchConfig, search_fraction: float = 0.05, augment: Augment | None = None
) -> Splits:
    """Images stored as encoded bytes in Parquet: one file, a directory of ``*.parquet`` or a glob, local or
    in a bucket (``s3://bucket/imagenet``, ``gs://...``, ``file://...``).

    Columns: ``image`` (or ``img``), binary or a struct with a ``bytes`` field (Hugging Face layout), and an
    integer ``label`` (or ``labels``). Files named ``train*`` (or in a ``train/`` folder) are the train split,
    ``val*``/``validation*``/``test*`` the test split; with no file named by split, all rows are split 80/20
    (fixed seed). The search split is held out of train as in `image_folder`.

    Only the label column is read here; an image is read with its row group when it is needed, so keep row
    groups modest (Hugging Face's shards use a few hundred rows; ``pyarrow``'s default is a million).
    """
    storage, files = _parquet_files(path_or_glob)
    shown = redact(path_or_glob)
    by_split: dict[str | None, list[str]] = {}
    for f in files:
        by_split.setdefault(_split_of(f), []).append(f)
    named = "train" in by_split or "test" in by_split
    if named and None in by_split:
        ignored = ", ".join(storage.name(f) for f in by_split[None])
        warnings.warn(f"ignoring parquet files not named train*/val*/test*: {ignored}", stacklevel=2)
    if named and "train" not in by_split:
        raise DataError(f"{shown}: found test files but no train* parquet file")

    metas: list[ParquetFile] = []
    Index = tuple[np.ndarray, np.ndarray, list[int]]  # (file number, row in file, label) per item

    def read(paths: list[str]) -> Index:
        fi, rows, targets = [], [], []
        for p in paths:
            meta, t = _parquet_index(storage, p)
            fi.append(np.full(len(t), len(metas), np.int32))
            rows.append(np.arange(len(t), dtype=np.int64))
            targets += t
            metas.append(meta)
        cat = np.concatenate
        return (cat(fi) if fi else np.zeros(0, np.int32)), (cat(rows) if rows else np.zeros(0, np.int64)), targets

    pool = read(by_split["train"] if named else files)
    if not pool[2]:
        raise DataError(f"{shown}: the parquet data has zero rows")

    def take(index: Index, idx) -> Index:
        idx = np.asarray(idx, dtype=np.int64)
        return index[0][idx], index[1][idx], [index[2][i] for i in idx]

    if "test" in by_split:
        test = read(by_split["test"])
    else:  # one pool: a fixed-seed 80/20 split into train and test
        order = np.random.default_rng(SPLIT_SEED).permutation(len(pool[2]))
        n_test = round(0.2 * len(order))
        test, pool = take(pool, np.sort(order[:n_test])), take(pool, np.sort(order[n_test:]))
    tr, se = _carve_search(pool[2], search_fraction)

    def make(index: Index, train: bool = False) -> ParquetRows:
        return ParquetRows(metas, *index, arch.img_size, arch.in_chans, train, augment, storage)

    num_classes = max(pool[2] + test[2]) + 1
    return Splits(make(take(pool, tr), True), make(take(pool, se)), make(test), num_classes, f"parquet:{shown}")


# ---------------------------------------------------------------------------------------------- entry points


def load_data(spec: str, arch: ArchConfig, **kwargs) -> Splits:
    """Load a dataset from a spec: ``digits``, ``synthetic``, an ImageFolder root, a ``.parquet`` file, a
    directory of ``.parquet`` files, or a glob; local paths or bucket URIs (``s3://``, ``gs://``,
    ``file://``). ``kwargs`` go to the chosen loader."""
    spec = str(spec)
    if spec == "digits":
        return digits(arch, **kwargs)
    if spec == "synthetic":
        return synthetic(arch, **kwargs)
    if not _URI_RE.match(spec):
        spec = str(Path(spec).expanduser())
    storage, path = Storage.parse(spec)
    kind = storage.kind(path) if not _GLOB_CHARS.search(path) else "missing"
    if kind == "dir":
        train = f"{path}/train"
        # Class folders under train/ mean ImageFolder; otherwise look for Parquet (a folder of a few shards).
        if storage.kind(train) == "dir" and _classes_of(train, [], storage.subdirs(train)):
            return image_folder(spec, arch, **kwargs)
        if not any(f.endswith(".parquet") for f in storage.walk(path)[0]):
            return image_folder(spec, arch, **kwargs)  # gives the specific error for a malformed tree
        return parquet(spec, arch, **kwargs)
    if kind == "file" or _GLOB_CHARS.search(path):
        return parquet(spec, arch, **kwargs)
    raise DataError(
        f"unknown dataset {redact(spec)!r}: expected 'digits', 'synthetic', an ImageFolder root"
        " (root/train/<class>/*.jpg), a .parquet file, a directory of .parquet files,"
        " or a glob like 'data/*.parquet'; local, or a bucket URI (s3://, gs://, file://)"
    )


def verify(splits: Splits, n: int = 4, max_bad: int = 0) -> None:
    """Decode the first ``n`` items of each split, so a dataset that cannot be read fails before training starts.

    Args:
        splits: The dataset.
        n: Items decoded per split.
        max_bad: Undecodable items tolerated among them (a run skips up to ``--max-bad-images`` anyway); a split
            none of whose first items decodes fails whatever this says.

    Raises:
        DataError: more than ``max_bad`` items (or all of them) cannot be decoded, or a split is empty.
    """
    for name in ("train", "search", "test"):
        ds = getattr(splits, name)
        if len(ds) == 0:
            raise DataError(f"{splits.name}: the {name} split is empty")
        errors = []
        for i in range(min(n, len(ds))):
            try:
                ds[i]
            except DataError as e:
                errors.append(e)
        if len(errors) > max_bad or len(errors) == min(n, len(ds)):
            raise errors[0]
