"""ImageNet-style folders (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``), local or in a bucket."""

from __future__ import annotations

import posixpath
from pathlib import Path

from ..config import ArchConfig
from .files import ImageFiles
from .splits import DataError, Splits, carve_search
from .storage import Storage, redact
from .transforms import Augment

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _is_image(path: str) -> bool:
    # Hidden files are skipped: macOS copies leave undecodable "._x.jpg" resource forks next to the images.
    name = posixpath.basename(path)
    return posixpath.splitext(name)[1].lower() in IMG_EXTENSIONS and not name.startswith(".")


def class_folders(split_dir: str, files: list[str], dirs: list[str]) -> dict[str, list[str]]:
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
    train_classes = class_folders(train_dir, *storage.walk(train_dir))
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
    val_paths, val_targets = flatten(class_folders(val_dir, *storage.walk(val_dir)), storage.name(val_dir))
    tr, se = carve_search(targets, search_fraction)
    shape = (arch.img_size, arch.in_chans)

    def make(idx: list[int], train: bool) -> ImageFiles:
        return ImageFiles([paths[i] for i in idx], [targets[i] for i in idx], *shape, train, augment, storage)

    test = ImageFiles(val_paths, val_targets, *shape, storage=storage)
    return Splits(make(tr, True), make(se, False), test, len(classes), f"imagefolder:{shown}")
