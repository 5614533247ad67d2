"""Datasets: the embedded digits default, a synthetic set for tests, ImageNet-style folders, Parquet.

Every loader returns `Splits`: a train split (what supertraining trains on), a search split (held out, only
used to rank subnets) and a test split. Every item is ``(image, label)``: a float32 tensor of shape
``(in_chans, img_size, img_size)`` and an int. Datasets are plain picklable objects (they are shipped to
Ray workers) with a ``targets`` list. Image transforms use PIL + torch only (torchvision is no dependency).
"""

from __future__ import annotations

import glob
import io
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .config import ArchConfig

__all__ = [
    "DataError",
    "Splits",
    "TensorData",
    "ImageFiles",
    "ParquetImages",
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


# ---------------------------------------------------------------------------------------------- transforms


def _resize_short(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    nw, nh = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
    return img.resize((nw, nh), Image.BICUBIC)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = round((w - size) / 2), round((h - size) / 2)
    return img.crop((left, top, left + size, top + size))  # PIL pads if the image is smaller


def _random_resized_crop(img: Image.Image, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """Inception-style crop (as torchvision's RandomResizedCrop): random area and aspect, resized."""
    w, h = img.size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = w * h * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = random.randint(0, w - cw), random.randint(0, h - ch)
            break
    else:  # fall back to the largest centred crop with an aspect inside `ratio`
        cw, ch = w, h
        if w / h < ratio[0]:
            ch = round(w / ratio[0])
        elif w / h > ratio[1]:
            cw = round(h * ratio[1])
        left, top = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))


class _Images(Dataset):
    """Base for lazily decoded images: subclasses say how to open item ``i`` and what to call it in errors."""

    def __init__(self, targets: list[int], img_size: int, in_chans: int, train: bool):
        self.targets = [int(t) for t in targets]
        self.img_size, self.in_chans, self.train = img_size, in_chans, train
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if in_chans == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def _open(self, i: int) -> Image.Image:
        raise NotImplementedError

    def _where(self, i: int) -> str:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            with self._open(i) as img:
                img = img.convert("L" if self.in_chans == 1 else "RGB")  # convert() forces the full decode
        except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {self._where(i)}: {e}") from e
        if self.train:
            img = _random_resized_crop(img, self.img_size)
            if random.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = _center_crop(_resize_short(img, round(self.img_size * 256 / 224)), self.img_size)
        x = torch.from_numpy(np.array(img, dtype=np.uint8))
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return (x.float().div_(255) - self.mean) / self.std, self.targets[i]


class ImageFiles(_Images):
    """Image files on disk, decoded in ``__getitem__``."""

    def __init__(self, paths: list, targets: list[int], img_size: int, in_chans: int, train: bool = False):
        super().__init__(targets, img_size, in_chans, train)
        self.paths = [str(p) for p in paths]

    def _open(self, i: int) -> Image.Image:
        return Image.open(self.paths[i])

    def _where(self, i: int) -> str:
        return self.paths[i]


class ParquetImages(_Images):
    """Encoded image bytes held in memory (read from Parquet), decoded in ``__getitem__``."""

    def __init__(
        self,
        blobs: list,
        targets: list[int],
        sources: list[tuple[str, int]],
        img_size: int,
        in_chans: int,
        train: bool = False,
    ):
        super().__init__(targets, img_size, in_chans, train)
        self.blobs = blobs
        self.sources = sources  # (file, row) per item, for error messages

    def _open(self, i: int) -> Image.Image:
        if self.blobs[i] is None:
            raise ValueError("the image is null")
        return Image.open(io.BytesIO(self.blobs[i]))

    def _where(self, i: int) -> str:
        return "{} row {}".format(*self.sources[i])


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


# ---------------------------------------------------------------------------------------------- image folder


def _list_images(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS copies leave undecodable "._x.jpg" resource forks next to the images.
    files = (p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith("."))
    return sorted(p for p in files if p.is_file())


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def image_folder(root: str | Path, arch: ArchConfig, search_fraction: float = 0.05) -> Splits:
    """ImageNet layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``.

    Classes are the sorted folder names under ``train/``. The search split is held out of ``train/``
    (``search_fraction`` per class, fixed seed); the test split is ``val/``. Images are decoded lazily.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist" if not root.exists() else f"{root} is a file")
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise DataError(f"{root} has no train/ folder; expected root/train/<class>/*.jpg and root/val/...")
    classes = [d.name for d in _class_dirs(train_dir)]
    if not classes:
        raise DataError(f"{train_dir} has no class folders; expected {train_dir}/<class>/*.jpg")
    index = {c: i for i, c in enumerate(classes)}

    def scan(split_dir: Path) -> tuple[list[Path], list[int]]:
        paths, targets = [], []
        for d in _class_dirs(split_dir):
            if d.name not in index:
                raise DataError(f"class folder {d} is not among the classes of {train_dir}")
            files = _list_images(d)
            paths += files
            targets += [index[d.name]] * len(files)
        return paths, targets

    paths, targets = scan(train_dir)
    if not paths:
        raise DataError(f"{train_dir} has no images (looked for {', '.join(IMG_EXTENSIONS)})")
    empty = sorted(set(classes) - {classes[t] for t in targets})
    if empty:
        raise DataError(f"class folder {train_dir / empty[0]} has no images")
    if not val_dir.is_dir():
        raise DataError(f"{root} has no val/ folder; expected root/val/<class>/*.jpg for the test split")
    val_paths, val_targets = scan(val_dir)
    tr, se = _carve_search(targets, search_fraction)
    shape = (arch.img_size, arch.in_chans)

    def make(idx: list[int], train: bool) -> ImageFiles:
        return ImageFiles([paths[i] for i in idx], [targets[i] for i in idx], *shape, train)

    test = ImageFiles(val_paths, val_targets, *shape)
    return Splits(make(tr, True), make(se, False), test, len(classes), f"imagefolder:{root}")


# ---------------------------------------------------------------------------------------------- parquet


def _parquet_files(path_or_glob: str) -> list[Path]:
    p = Path(path_or_glob)
    if p.is_dir():
        files = sorted(p.rglob("*.parquet"))
        if not files:
            raise DataError(f"no .parquet files in {p}")
        return files
    if p.is_file():
        return [p]
    files = sorted(Path(f) for f in glob.glob(path_or_glob, recursive=True) if Path(f).is_file())
    if not files:
        raise DataError(f"no parquet files match {path_or_glob}")
    return files


def _read_parquet(path: Path) -> tuple[list, list[int]]:
    """(encoded image bytes, labels) of one file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a valid parquet file: {e}") from e
    img_col = next((c for c in IMAGE_COLUMNS if c in schema.names), None)
    label_col = next((c for c in LABEL_COLUMNS if c in schema.names), None)
    if img_col is None or label_col is None:
        missing = "image column (image/img)" if img_col is None else "label column (label/labels)"
        raise DataError(f"{path} has no {missing}; columns found: {', '.join(schema.names) or 'none'}")
    try:
        table = pq.read_table(path, columns=[img_col, label_col])
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    col, labels = table.column(img_col), table.column(label_col)
    if pa.types.is_struct(col.type):
        if col.type.get_field_index("bytes") < 0:
            raise DataError(f"{path}: image column '{img_col}' is a struct without 'bytes' ({col.type})")
        col = pa.chunked_array([c.field("bytes") for c in col.chunks], type=col.type.field("bytes").type)
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        raise DataError(f"{path}: image column '{img_col}' has type {col.type}; expected encoded image bytes")
    if not pa.types.is_integer(labels.type) or labels.null_count:
        raise DataError(f"{path}: label column '{label_col}' must be integers, no nulls (type {labels.type})")
    targets = labels.to_pylist()
    if targets and min(targets) < 0:
        raise DataError(f"{path}: label column '{label_col}' has negative labels")
    return col.to_pylist(), targets


def _split_of(path: Path) -> str | None:
    name, folder = path.name.lower(), path.parent.name.lower()
    # The file name's prefix decides (train-00000-of-00004.parquet), else a folder named exactly after the
    # split (train/0000.parquet): a prefix match on folders would misread e.g. "test_runs/data.parquet".
    if name.startswith("train") or folder == "train":
        return "train"
    if name.startswith(("val", "validation", "test")) or folder in ("val", "validation", "test"):
        return "test"
    return None


def parquet(path_or_glob: str, arch: ArchConfig, search_fraction: float = 0.05) -> Splits:
    """Images stored as encoded bytes in Parquet: one file, a directory of ``*.parquet`` or a glob.

    Columns: ``image`` (or ``img``), binary or a struct with a ``bytes`` field (Hugging Face layout), and an
    integer ``label`` (or ``labels``). Files named ``train*`` (or in a ``train/`` folder) are the train split,
    ``val*``/``validation*``/``test*`` the test split; with no file named by split, all rows are split 80/20
    (fixed seed). The search split is held out of train as in `image_folder`.

    All encoded bytes are held in memory (decoded lazily): shard huge datasets rather than load them whole.
    """
    files = _parquet_files(path_or_glob)
    by_split: dict[str | None, list[Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f), []).append(f)
    named = "train" in by_split or "test" in by_split
    if named and None in by_split:
        ignored = ", ".join(str(f) for f in by_split[None])
        warnings.warn(f"ignoring parquet files not named train*/val*/test*: {ignored}", stacklevel=2)
    if named and "train" not in by_split:
        raise DataError(f"{path_or_glob}: found test files but no train* parquet file")

    def read(paths: list[Path]) -> tuple[list, list[int], list[tuple[str, int]]]:
        blobs, targets, sources = [], [], []
        for f in paths:
            b, t = _read_parquet(f)
            blobs += b
            targets += t
            sources += [(str(f), r) for r in range(len(t))]
        return blobs, targets, sources

    pool = read(by_split.get("train") if named else files)
    if not pool[1]:
        raise DataError(f"{path_or_glob}: the parquet data has zero rows")
    if "test" in by_split:
        test = read(by_split["test"])
    else:  # one pool: a fixed-seed 80/20 split into train and test
        order = np.random.default_rng(SPLIT_SEED).permutation(len(pool[1]))
        n_test = round(0.2 * len(order))
        test = tuple([part[i] for i in sorted(order[:n_test])] for part in pool)
        pool = tuple([part[i] for i in sorted(order[n_test:])] for part in pool)
    tr, se = _carve_search(pool[1], search_fraction)

    def make(data, idx: list[int] | None = None, train: bool = False) -> ParquetImages:
        blobs, targets, sources = data if idx is None else ([part[i] for i in idx] for part in data)
        return ParquetImages(blobs, targets, sources, arch.img_size, arch.in_chans, train)

    num_classes = max(pool[1] + test[1]) + 1
    return Splits(make(pool, tr, True), make(pool, se), make(test), num_classes, f"parquet:{path_or_glob}")


# ---------------------------------------------------------------------------------------------- entry points


def load_data(spec: str, arch: ArchConfig, **kwargs) -> Splits:
    """Load a dataset from a spec: ``digits``, ``synthetic``, an ImageFolder root, a ``.parquet`` file, a
    directory of ``.parquet`` files, or a glob. ``kwargs`` go to the chosen loader."""
    spec = str(spec)
    if spec == "digits":
        return digits(arch, **kwargs)
    if spec == "synthetic":
        return synthetic(arch, **kwargs)
    p = Path(spec).expanduser()
    spec = str(p)
    if p.is_dir():
        train = p / "train"
        if (train.is_dir() and _class_dirs(train)) or not any(p.rglob("*.parquet")):
            return image_folder(p, arch, **kwargs)  # also gives the specific error for a malformed tree
        return parquet(spec, arch, **kwargs)
    if p.is_file() or any(c in spec for c in "*?["):
        return parquet(spec, arch, **kwargs)
    raise DataError(
        f"unknown dataset {spec!r}: expected 'digits', 'synthetic', an ImageFolder root"
        " (root/train/<class>/*.jpg), a .parquet file, a directory of .parquet files,"
        " or a glob like 'data/*.parquet'"
    )


def verify(splits: Splits, n: int = 4) -> None:
    """Decode the first ``n`` items of each split, so a corrupt dataset fails before training starts.

    Raises:
        DataError: an item cannot be decoded, or a split is empty.
    """
    for name in ("train", "search", "test"):
        ds = getattr(splits, name)
        if len(ds) == 0:
            raise DataError(f"{splits.name}: the {name} split is empty")
        for i in range(min(n, len(ds))):
            ds[i]
