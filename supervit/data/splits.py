"""The three splits of a dataset, the error every loader raises, and the fixed-seed ways items are split."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

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


def carve_search(targets: list[int], fraction: float) -> tuple[list[int], list[int]]:
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
