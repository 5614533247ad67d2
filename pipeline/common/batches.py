"""The consumer side of streamed input: batches for the training loop and the trials, and undecodable images.

A Ray Data pipeline (`pipeline.common.data`) never fails on a bad image: its row carries the error. Consumers drop such
rows with `BadImages` (the ``collate_fn`` of ``iter_torch_batches``), which warns once per file; a run's
`pipeline.common.ledger.BadImageLedger` actor counts distinct bad files across its workers, trials and restarts,
and past the run's cap (``--max-bad-images``) the consumer raises one `DataError` naming every file.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from supervit.data import DataError

__all__ = [
    "BadImages",
    "run_bad_images",
    "raise_if_over",
    "ledger_over",
    "too_many_bad_images",
    "Batches",
    "fits_in_object_store",
    "HeldOut",
    "held_out",
]

log = logging.getLogger(__name__)


class BadImages(NumpyBatchCollateFn):
    """``collate_fn`` for ``iter_torch_batches``: drops the rows of undecodable images, warns once per file,
    and raises past ``cap`` distinct files.

    Returns ``{"image": float32 tensor, "label": int64 tensor}`` (Ray moves it to the device). Keep one per
    consumer across epochs: a file seen again is not counted again.

    Attributes:
        names: The skipped files with the reason, in the order first seen.
        count: ``len(names)`` (log it: an MLflow metric).
        rows: Rows dropped so far (a file counts once per time it was met).
    """

    def __init__(
        self,
        cap: int = 10,
        warn: Callable[[str], None] | None = None,
        on_new: Callable[[str, str], None] | None = None,
    ):
        super().__init__()
        if cap < 0:
            raise ValueError(f"cap must be >= 0, got {cap}")
        self.cap = cap
        self.warn = warn or log.warning
        self.on_new = on_new  # called with (file, "<file>: <reason>") for each file met the first time
        self.names: list[str] = []
        self.rows = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()  # Ray collates prefetched batches on several threads

    @property
    def count(self) -> int:
        return len(self.names)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        image, label = batch["image"], batch["label"]
        errors = batch.get("error")
        bad = np.array([bool(e) for e in errors]) if errors is not None else np.zeros(len(label), bool)
        if bad.any():
            sources = batch.get("source")
            keys = [str(s) for s in sources[bad]] if sources is not None else [str(e) for e in errors[bad]]
            self._record(keys, [str(e) for e in errors[bad]])
            image, label = image[~bad], label[~bad]
        # Blocks read from the object store are read-only; torch wants to own writable memory.
        if not image.flags.writeable:
            image = image.copy()
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "label": torch.tensor(label, dtype=torch.int64)}

    def _record(self, sources: list[str], errors: list[str]) -> None:
        with self._lock:
            self.rows += len(errors)
            for source, error in zip(sources, errors, strict=True):
                if source not in self._seen:  # one file, one count, whatever the reason said each time
                    self._seen.add(source)
                    self.names.append(error)
                    self.warn(f"skipping undecodable image {error}")
                    if self.on_new is not None:
                        self.on_new(source, error)
            if len(self.names) > self.cap:
                raise too_many_bad_images(self.names, self.cap)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def too_many_bad_images(names: list[str], cap: int) -> DataError:
    """The one-line error of a run that met more than ``cap`` undecodable images."""
    return DataError(f"{len(names)} undecodable images, more than --max-bad-images {cap}: " + "; ".join(names))


def ledger_over(ledger) -> bool:
    """Whether the run's ledger is past its cap. A run without a ledger (in-memory data: nothing to decode)
    never is."""
    import ray

    return ledger is not None and ray.get(ledger.over.remote())


def raise_if_over(ledger, cap: int) -> None:
    """Raise `too_many_bad_images` if the run's ledger is past its cap (a consumer about to start, or a driver
    after its workers or trials stopped)."""
    import ray

    if ledger_over(ledger):
        raise too_many_bad_images(ray.get(ledger.report.remote()), cap)


def run_bad_images(ledger, cap: int, say: Callable[[str], None] | None = None) -> BadImages | None:
    """A consumer's `BadImages` that reports each new bad file to the run's ledger (and ``say``s it), and
    raises `too_many_bad_images` once the run's count passes ``cap``; None without a ledger (in-memory data)."""
    import ray

    if ledger is None:
        return None

    def warn(text: str) -> None:
        (say or log.warning)(f"warning: {text}")

    def on_new(source: str, error: str) -> None:
        if ray.get(ledger.add.remote(source, error)) > cap:
            raise too_many_bad_images(ray.get(ledger.report.remote()), cap)

    return BadImages(cap=2**62, warn=warn, on_new=on_new)  # the ledger holds the run's cap


class Batches:
    """``(images, labels)`` batches of a Ray dataset or Ray Train shard, with a length (the steps it gives).

    Each iteration is one pass over the data (for a training shard: a new order and new augmentation).
    """

    def __init__(self, ds, batch_size: int, collate: BadImages, steps: int, drop_last: bool = False) -> None:
        self.ds, self.batch_size, self.collate, self.steps, self.drop_last = ds, batch_size, collate, steps, drop_last

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.ds.iter_torch_batches(
            batch_size=self.batch_size, drop_last=self.drop_last, collate_fn=self.collate
        )
        for batch in batches:
            if len(batch["label"]):  # a batch of bad images only leaves nothing
                yield batch["image"], batch["label"]


def fits_in_object_store(n_images: int, img_size: int, in_chans: int, share: float = 0.3) -> bool:
    """Whether ``n_images`` decoded float32 images take at most ``share`` of the cluster's object store."""
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0)
    return n_images * in_chans * img_size * img_size * 4 <= share * store


@dataclass
class HeldOut:
    """A split that trials or the driver evaluate: in memory (``images``, ``labels``), or a Ray dataset of an
    eval pipeline (``dataset``: materialized in the object store when it fits, else streamed at each pass)."""

    size: int
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    dataset: Any = None

    def batches(self, bad: BadImages | None, batch_size: int = 256) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the split; ``bad`` drops (and reports) undecodable images of a dataset."""
        if self.dataset is not None:
            return Batches(self.dataset, batch_size, bad or BadImages(), 0)
        return (
            (self.images[i : i + batch_size], self.labels[i : i + batch_size]) for i in range(0, self.size, batch_size)
        )


def held_out(split, remote_args: dict | None = None, materialize: bool = True) -> HeldOut:
    """A split as `HeldOut`: tensors for an in-memory split; an eval pipeline for a file-backed one,
    materialized (decoded once) when ``materialize`` and it takes under a third of the object store."""
    from supervit.data import FileImages

    from .data import eval_dataset

    if not isinstance(split, FileImages):
        return HeldOut(len(split), split.tensors[0], torch.as_tensor(split.tensors[1]))
    ds = eval_dataset(split, remote_args=remote_args)
    if materialize and fits_in_object_store(len(split), split.img_size, split.in_chans):
        ds = ds.materialize()
    return HeldOut(len(split), dataset=ds)
