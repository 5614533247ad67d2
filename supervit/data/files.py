"""File-backed datasets: `FileImages` (items are references, read, decoded and transformed one at a time) and
`ImageFiles` (one item per image file). Parquet rows are `supervit.data.parquet.ParquetRows`."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .splits import DataError
from .storage import Storage
from .transforms import Augment, load_image


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
