"""Streaming input on Ray Data for file-backed splits (`supervit.data.ImageFiles`, `supervit.data.ParquetRows`).

A split holds an index (paths, or Parquet (file, row) references, and labels); this module turns it into a
``ray.data.Dataset`` whose rows are ready for ``iter_torch_batches``::

    {"image": float32 (C, H, W), normalised, "label": int64, "source": str, "error": str}

Reading, decoding and augmenting run as Ray Data tasks (1 CPU each, no GPU: CPU-only nodes can do them), so a
process's memory is bounded by Ray Data's buffers and the batches in flight, never by the dataset.
An image that cannot be read or decoded does not stop the pipeline: its row keeps a zero image, label -1 and
``error = "<file>: <reason>"``. `pipeline.common.batches.BadImages` (the ``collate_fn`` every consumer passes)
drops such rows, warns once per file, counts them, and past its cap raises `supervit.data.DataError` naming every file.

Training (Ray Train)::

    from pipeline.common.batches import BadImages
    from pipeline.common.data import data_config, train_dataset

    ds = train_dataset(splits.train, augment=DEIT_AUGMENT, repeated_aug=3)
    trainer = TorchTrainer(loop, datasets={"train": ds}, dataset_config=data_config(), ...)

    # in the worker, each epoch (each iteration re-runs the pipeline: new order, new augmentation):
    bad = BadImages(cap=opts.max_bad_images)            # one per worker, kept across epochs
    shard = ray.train.get_dataset_shard("train")
    for batch in shard.iter_torch_batches(batch_size=B, drop_last=True, collate_fn=bad):
        x, y = batch["image"], batch["label"]          # on the worker's device; a batch may be short
    mlflow metric: bad.count                           # files skipped so far (unique)

Every epoch yields exactly ``len(split)`` rows (split evenly across workers by Ray Train), with
``repeated_aug=k`` too: then ``ceil(n / k)`` images, each ``k`` times with independent augmentation (DeiT's
repeated augmentation; the copies sit next to each other, so they share a batch).

Search and evaluation (deterministic order)::

    ds = eval_dataset(splits.search.subset(balanced_subset(splits.search.targets, 10_000, seed=0)))
    ds = ds.materialize()      # once, in the object store, if it fits; else pass the lazy dataset
    # in each trial:
    for batch in ds.iter_torch_batches(batch_size=256, collate_fn=BadImages(cap)): ...

Resources: decode tasks take 1 CPU each (``remote_args`` changes that) and no GPU. They only run on CPUs the
training workers leave free: on a node whose CPUs the workers hold entirely, nothing decodes and the epoch
never starts; give workers fewer CPUs (``ScalingConfig(resources_per_worker=...)``) or add CPU-only nodes.
Ray Train replaces each dataset's execution options with the `data_config` ones (object-store cap).

The in-memory sets (digits, synthetic: `supervit.data.TensorData`) keep their DataLoader path; these
functions refuse them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from supervit.data import Augment, DataError, FileImages, ImageFiles, ParquetRows, load_image

__all__ = ["train_dataset", "eval_dataset", "data_config", "ROWS_PER_TASK"]

ROWS_PER_TASK = 64  # images per decode task: ~0.4 s of work at 224 px, a ~40 MB output block
SHUFFLE_ROWS = 1024  # encoded images a Parquet reader shuffles among (~45 MB of ImageNet JPEGs)
PARQUET_BLOCK_BYTES = 16 * 2**20  # largest block of a Parquet pipeline (~350 encoded or ~27 decoded 224-px images)
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ in Ray tasks


@dataclass(frozen=True)
class _Transform:
    """What a decode task makes of an image: its size and channels, and the train (augmented) or eval transform."""

    img_size: int
    in_chans: int
    train: bool
    augment: Augment


def _decode_rows(rows, make_bytes, names, labels, t: _Transform) -> dict[str, np.ndarray]:
    """Decode + transform items into one output batch; failures become flagged rows, never exceptions."""
    n = len(rows)
    images = np.zeros((n, t.in_chans, t.img_size, t.img_size), np.float32)
    errors = [""] * n
    last_key, last_data, last_err = None, None, ""
    for i, key in enumerate(rows):
        # Repeated augmentation sends an item k times in a row: read it once, augment each copy anew.
        if key != last_key:
            last_key, last_err = key, ""
            try:
                last_data = make_bytes(key)
            except Exception as e:  # an unreadable file (deleted, no permission) is a bad image too
                last_err = f"cannot read: {type(e).__name__}: {e}"
        if last_err:
            errors[i] = f"{names[i]}: {last_err}"
            continue
        try:
            images[i] = load_image(last_data, t.img_size, t.in_chans, t.train, t.augment).numpy()
        except Exception as e:  # any decoder failure (PIL raises many kinds) skips the image, never the run
            reason = str(e).removeprefix("cannot decode image: ") or type(e).__name__
            errors[i] = f"{names[i]}: {reason}"
    label = np.asarray(labels, np.int64).copy()
    bad = np.array([bool(e) for e in errors])
    label[bad] = -1
    return {
        "image": images,
        "label": label,
        "source": np.asarray(names, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def _decode_files(batch: dict, storage, transform: _Transform) -> dict[str, np.ndarray]:
    paths = [str(p) for p in batch["path"]]
    names = [storage.name(p) for p in paths]
    return _decode_rows(paths, storage.read, names, batch["label"], transform)


def _read_row_groups(batch: dict, reader, rows_out: int, shuffle: bool) -> Iterator[dict]:
    """One input row per Parquet row-group chunk: stream the chunk's rows of its row group (`RowGroupReader`:
    bounded record batches, the group read once, stopping after its last wanted row) and yield blocks of
    ``rows_out`` encoded images for the decode tasks. A task so holds at most one record batch and, when
    ``shuffle``, a buffer of `SHUFFLE_ROWS` encoded images (rows leave it in random order: a row group smaller
    than the buffer is fully permuted, a larger one shuffled within a window), however large the row group."""
    rng = np.random.default_rng()
    out: dict[str, list] = {"row": [], "data": [], "label": [], "source": [], "error": []}
    for file, rg, rows, labels in zip(batch["file"], batch["row_group"], batch["rows"], batch["labels"], strict=True):
        for row, data, label, error in _chunk_rows(reader, int(file), int(rg), rows, labels, shuffle, rng):
            for k, v in zip(out, (row, data, label, reader.where(int(file), row), error), strict=True):
                out[k].append(v)
            if len(out["row"]) >= rows_out:
                yield _block(out, rows_out)
    while out["row"]:
        yield _block(out, rows_out)


def _chunk_rows(reader, file: int, rg: int, rows, labels, shuffle: bool, rng) -> Iterator[tuple]:
    """``(row, bytes, label, error)`` for the chunk's rows; a row listed k times (repeated augmentation) comes k
    times in a row. An unreadable file or group makes its remaining rows bad images, never a failed run."""
    count: dict[int, int] = {}
    label: dict[int, int] = {}
    for r, lab in zip(np.asarray(rows, np.int64).tolist(), np.asarray(labels, np.int64).tolist(), strict=True):
        count[r] = count.get(r, 0) + 1
        label[r] = lab
    buffer: list[tuple[int, bytes | None]] = []
    done: set[int] = set()
    try:
        for row, data in reader.iter_rows(file, rg, count):
            done.add(row)
            if not shuffle:
                yield from [(row, data, label[row], "")] * count[row]
                continue
            buffer.append((row, data))
            if len(buffer) >= SHUFFLE_ROWS:  # swap a random entry out: O(1), the rest keeps its place
                i = int(rng.integers(len(buffer)))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                row, data = buffer.pop()
                yield from [(row, data, label[row], "")] * count[row]
    except Exception as e:
        for row in sorted(set(count) - done):
            yield from [(row, None, label[row], f"cannot read: {type(e).__name__}: {e}")] * count[row]
    for j in rng.permutation(len(buffer)) if buffer else ():
        row, data = buffer[j]
        yield from [(row, data, label[row], "")] * count[row]


def _block(out: dict[str, list], n: int | None = None) -> dict:
    """The first ``n`` rows of ``out`` (all of them by default) as a block, removed from it."""
    n = len(out["row"]) if n is None else min(n, len(out["row"]))
    block = {
        "row": np.asarray(out["row"][:n], np.int64),
        "data": np.asarray(out["data"][:n], dtype=object),
        "label": np.asarray(out["label"][:n], np.int64),
        "source": np.asarray(out["source"][:n], dtype=object),
        "error": np.asarray(out["error"][:n], dtype=object),
    }
    for v in out.values():
        del v[:n]
    return block


def _decode_encoded(batch: dict, transform: _Transform) -> dict[str, np.ndarray]:
    """Decode a block of encoded rows from `_read_row_groups` (a row that could not be read stays bad)."""
    data, errors = batch["data"], batch["error"]

    def get(i: int):
        if errors[i]:
            raise OSError(str(errors[i]).removeprefix("cannot read: "))
        return data[i]

    return _decode_rows(range(len(data)), get, list(batch["source"]), batch["label"], transform)


def _permute_items(table, repeats: int) -> Iterator:
    """A fresh permutation of the item index at every execution (= every epoch). With ``repeats`` k > 1:
    the first ceil(n / k) items of it, each k times in a row, cut to n rows."""
    rng = np.random.default_rng()  # OS entropy: a new order each time Ray Data re-runs the pipeline
    n = table.num_rows
    order = rng.permutation(n)
    if repeats > 1:
        order = np.repeat(order[: -(-n // repeats)], repeats)[:n]
    yield table.take(order)


def _permute_chunks(table, repeats: int) -> Iterator:
    """Parquet: a fresh order of row-group chunks and of the rows inside each; with ``repeats`` k > 1, the
    first ceil(n / k) rows of that order, each k times in a row, so the epoch still has exactly n rows."""
    import pyarrow as pa

    rng = np.random.default_rng()
    rows, labels = table.column("rows").to_pylist(), table.column("labels").to_pylist()
    n = sum(len(r) for r in rows)
    need = -(-n // repeats)
    out = {"file": [], "row_group": [], "start": [], "rows": [], "labels": []}
    total = 0
    for c in rng.permutation(table.num_rows):
        p = rng.permutation(len(rows[c]))[:need]
        need -= len(p)
        r = np.repeat(np.asarray(rows[c], np.int64)[p], repeats)
        lab = np.repeat(np.asarray(labels[c], np.int64)[p], repeats)
        keep = min(len(r), n - total)
        total += keep
        for k in ("file", "row_group", "start"):
            out[k].append(table.column(k)[int(c)].as_py())
        out["rows"].append(r[:keep].tolist())
        out["labels"].append(lab[:keep].tolist())
        if need <= 0:
            break
    yield pa.table(out, schema=table.schema)


# ------------------------------------------------------------------------------------------ index tables


def _file_index(split: ImageFiles):
    import pyarrow as pa

    return pa.table({"path": pa.array(split.paths, pa.string()), "label": pa.array(split.targets, pa.int64())})


def _chunk_index(split: ParquetRows):
    """One row per (file, row group) the split touches, with the split's rows of it (file row numbers) in
    item order; chunks in item order."""
    import pyarrow as pa

    keys: dict[tuple[int, int], int] = {}
    out = {"file": [], "row_group": [], "start": [], "rows": [], "labels": []}
    for f, r, t in zip(split.file_index.tolist(), split.rows.tolist(), split.targets, strict=True):
        meta = split.files[f]
        rg = meta.row_group(r)
        c = keys.get((f, rg))
        if c is None:
            c = keys[(f, rg)] = len(out["file"])
            out["file"].append(f)
            out["row_group"].append(rg)
            out["start"].append(meta.row_group_starts[rg])
            out["rows"].append([])
            out["labels"].append([])
        out["rows"][c].append(r)
        out["labels"][c].append(t)
    schema = pa.schema(
        [
            ("file", pa.int32()),
            ("row_group", pa.int32()),
            ("start", pa.int64()),
            ("rows", pa.list_(pa.int64())),
            ("labels", pa.list_(pa.int64())),
        ]
    )
    return pa.table(out, schema=schema)


def _check(split) -> None:
    if not isinstance(split, FileImages):
        raise TypeError(
            f"{type(split).__name__} is not file-backed: in-memory sets (digits, synthetic) use a DataLoader"
        )
    if len(split) == 0:
        raise DataError("the split is empty")


def _decode_op(ds, split: FileImages, train: bool, augment: Augment, rows_per_task: int, remote_args: dict):
    transform = _Transform(split.img_size, split.in_chans, train, augment)
    args = {"num_cpus": 1, **remote_args}
    if isinstance(split, ParquetRows):
        # Reading and decoding are two operators: one task streams a row group once (little CPU: a fraction of a
        # decode task's share, so Ray Data does not fuse the two), many tasks decode its blocks in parallel.
        kw = dict(reader=split.reader, rows_out=rows_per_task, shuffle=train)
        read_args = {**args, "num_cpus": args["num_cpus"] / 4}
        ds = ds.map_batches(_read_row_groups, batch_size=1, fn_kwargs=kw, **read_args)
        ds = ds.map_batches(_decode_encoded, batch_size=rows_per_task, fn_kwargs={"transform": transform}, **args)
        # Ray Data gathers what a task yields into blocks of up to 128 MB before it lets them go: a reader of one
        # large row group would hold ~2,800 encoded ImageNet images (measured: its process grew with the file).
        # Smaller blocks let each batch go as it is read (decoded blocks are cut to this size too).
        ds.context.target_max_block_size = PARQUET_BLOCK_BYTES  # this dataset's own context copy
        return ds
    kw = dict(storage=split.storage, transform=transform)
    return ds.map_batches(_decode_files, batch_size=rows_per_task, fn_kwargs=kw, **args)


# ------------------------------------------------------------------------------------------ public


def train_dataset(
    split: FileImages,
    augment: Augment | None = None,
    repeated_aug: int = 1,
    rows_per_task: int = ROWS_PER_TASK,
    remote_args: dict | None = None,
):
    """The training pipeline of a file-backed split: a new order and new augmentation at every iteration.

    Args:
        split: `ImageFiles` or `ParquetRows` (its ``img_size``/``in_chans`` give the output shape).
        augment: Train augmentation (`supervit.data.Augment`); default: the split's own.
        repeated_aug: k >= 1: each epoch takes ceil(n / k) images, each k times with its own augmentation;
            an epoch has n rows either way (DeiT: 3).
        rows_per_task: Images per decode task (and per output block).
        remote_args: Extra Ray options for the decode tasks, e.g. ``{"resources": {"cpu_node": 0.01}}`` to keep
            decoding on CPU-only nodes, or ``{"num_cpus": 0.5}``.

    Returns:
        A lazy ``ray.data.Dataset`` of ``len(split)`` rows per iteration, for ``TorchTrainer(datasets=...)``.
        Parquet is shuffled by row group and within it: shards written in random order (as Hugging Face's)
        need nothing more; class-sorted shards want ``iter_torch_batches(local_shuffle_buffer_size=...)``.
    """
    import ray.data

    _check(split)
    if repeated_aug < 1:
        raise ValueError(f"repeated_aug must be >= 1, got {repeated_aug}")
    augment = augment or split.augment
    # The index is one small block; permuting it is one short task per epoch (no all-to-all shuffle), and
    # the streaming repartition after it cuts the permuted index into decode-task-sized blocks.
    if isinstance(split, ParquetRows):
        ds = ray.data.from_arrow(_chunk_index(split))
        ds = ds.map_batches(
            _permute_chunks, batch_size=None, batch_format="pyarrow", fn_kwargs={"repeats": repeated_aug}, num_cpus=0.1
        )
        ds = ds.repartition(target_num_rows_per_block=1)
    else:
        ds = ray.data.from_arrow(_file_index(split))
        ds = ds.map_batches(
            _permute_items, batch_size=None, batch_format="pyarrow", fn_kwargs={"repeats": repeated_aug}, num_cpus=0.1
        )
        ds = ds.repartition(target_num_rows_per_block=rows_per_task)
    return _decode_op(ds, split, True, augment, rows_per_task, remote_args or {})


def eval_dataset(split: FileImages, rows_per_task: int = ROWS_PER_TASK, remote_args: dict | None = None):
    """The evaluation pipeline of a file-backed split: eval transform (resize 256/224, centre crop), items in
    split order at every iteration (``preserve_order``). ``.materialize()`` it to decode once and keep the
    result in the object store (float32: ~0.6 MB per 224-px image); iterate it lazily when it does not fit.
    """
    import ray.data

    _check(split)
    if isinstance(split, ParquetRows):
        index = _chunk_index(split)
        ds = ray.data.from_arrow(index, override_num_blocks=index.num_rows)
    else:
        index = _file_index(split)
        ds = ray.data.from_arrow(index, override_num_blocks=math.ceil(index.num_rows / rows_per_task))
    ds = _decode_op(ds, split, False, Augment(), rows_per_task, remote_args or {})
    ds.context.execution_options.preserve_order = True  # this dataset's own context copy
    return ds


def data_config(object_store_memory: int | None = None, datasets_to_split: str | list[str] = "all"):
    """``TorchTrainer(dataset_config=...)``: Ray Train replaces a dataset's execution options with these, so
    a cap on the input pipeline's object-store use (bytes; default: Ray Data's share of the store) goes here.
    """
    import ray.train
    from ray.data import DataContext, ExecutionOptions, ExecutionResources

    base = DataContext.get_current().execution_options
    limits = base.resource_limits
    if object_store_memory is not None:
        limits = ExecutionResources(cpu=limits.cpu, gpu=limits.gpu, object_store_memory=object_store_memory)
    options = ExecutionOptions(resource_limits=limits)
    return ray.train.DataConfig(datasets_to_split=datasets_to_split, execution_options=options)
