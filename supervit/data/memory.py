"""In-memory datasets: scikit-learn's digits (the embedded default) and a synthetic set for tests. Small; they
keep their fast path (a DataLoader over tensors)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import ArchConfig
from .splits import SPLIT_SEED, Splits


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
