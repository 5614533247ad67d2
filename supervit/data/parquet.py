"""Parquet shards of encoded images (columns ``image`` bytes or a struct with ``bytes``, and integer ``label``),
local or in a bucket: the index (only the label column is read up front) and the rows, read on demand."""

from __future__ import annotations

import copy
import glob
import os
import posixpath
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import ArchConfig
from .files import FileImages
from .splits import SPLIT_SEED, DataError, Splits, carve_search
from .storage import Storage, glob_base, glob_regex, has_glob, redact
from .transforms import Augment

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels")


@dataclass
class ParquetFile:
    """One Parquet file of a dataset: its path, image column, and the first row of each row group."""

    path: str
    image_column: str
    row_group_starts: list[int]

    def row_group(self, row: int) -> int:
        """The row group that holds ``row``."""
        return int(np.searchsorted(self.row_group_starts, row, side="right")) - 1


BATCH_ROWS = 64  # rows a reader decodes from Parquet at a time: ~3 MB of ImageNet JPEGs
_BUFFER = 1 << 20  # bytes of the file a reader holds while it streams a row group


class RowGroupReader:
    """Streams the encoded images of chosen rows of one Parquet row group, ``batch_rows`` rows at a time.

    A row group is read from its start in bounded record batches (buffered reads, no pre-buffering of the whole
    column chunk), only the rows asked for become Python bytes, and reading stops after the last of them: memory
    does not grow with the row group, and a group is read once for all the rows wanted of it. ``peak_rows`` is
    the most rows this reader has held materialised at once (what the tests check).

    Small and picklable (the files and the storage, no items): Ray tasks get this, not the dataset.
    """

    def __init__(self, storage: Storage, files: list[ParquetFile], batch_rows: int = BATCH_ROWS):
        self.storage, self.files, self.batch_rows = storage, files, batch_rows
        self.peak_rows = 0

    def iter_rows(
        self, file: int, row_group: int, rows: Iterable[int] | None = None
    ) -> Iterator[tuple[int, bytes | None]]:
        """``(row, image bytes)`` for each distinct row of ``rows`` (file row numbers, all in ``row_group``; None:
        every row of the group), in file order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        f = self.files[file]
        want = None if rows is None else sorted({int(r) for r in rows})
        if want == []:
            return
        k, offset = 0, f.row_group_starts[row_group]
        with self.storage.fs.open_input_file(f.path) as handle:
            pf = pq.ParquetFile(handle, buffer_size=_BUFFER, pre_buffer=False)
            batches = pf.iter_batches(batch_size=self.batch_rows, row_groups=[row_group], columns=[f.image_column])
            for batch in batches:
                col = batch.column(0)
                self.peak_rows = max(self.peak_rows, len(col))
                if pa.types.is_struct(col.type):
                    col = col.field("bytes")
                end = offset + len(col)
                if want is None:
                    for i in range(len(col)):
                        yield offset + i, col[i].as_py()
                else:
                    while k < len(want) and want[k] < end:
                        yield want[k], col[want[k] - offset].as_py()
                        k += 1
                    if k == len(want):
                        return  # the rest of the group is not read
                offset = end
        if want is not None and k < len(want):
            raise IndexError(f"{self.where(file, want[k])}: no such row in row group {row_group}")

    def where(self, file: int, row: int) -> str:
        return f"{self.storage.name(self.files[file].path)} row {row}"


class ParquetRows(FileImages):
    """Rows of Parquet files (one item per row: the file and the row number). Reading an item streams its row
    group up to that row (`RowGroupReader`) and keeps the stream, so reading a group's items in order reads the
    group once; memory stays one record batch, however large the row group."""

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
        self._stream: tuple[int, int, int, Iterator] | None = None  # (file, group, next row, rows of the group)

    @property
    def reader(self) -> RowGroupReader:
        return RowGroupReader(self.storage, self.files)

    @property
    def sources(self) -> list[tuple[str, int]]:
        names = [self.storage.name(f.path) for f in self.files]
        return [(names[f], int(r)) for f, r in zip(self.file_index, self.rows, strict=True)]

    def read(self, i: int) -> bytes | None:
        f, row = int(self.file_index[i]), int(self.rows[i])
        rg = self.files[f].row_group(row)
        if self._stream is None or self._stream[:2] != (f, rg) or self._stream[2] > row:
            self._stream = (f, rg, 0, self.reader.iter_rows(f, rg))  # from the group's start
        stream = self._stream[3]
        for r, data in stream:
            self._stream = (f, rg, r + 1, stream)
            if r == row:
                return data
        self._stream = None
        raise DataError(f"cannot read image {self.where(i)}: no such row")

    def where(self, i: int) -> str:
        return self.reader.where(int(self.file_index[i]), int(self.rows[i]))

    def _take(self, idx: np.ndarray) -> ParquetRows:
        out = copy.copy(self)
        out.file_index, out.rows = self.file_index[idx], self.rows[idx]
        out.targets = [self.targets[i] for i in idx]
        out._stream = None
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_stream"] = None  # an open read is not worth shipping (nor picklable)
        return state


def _parquet_files(spec: str) -> tuple[Storage, list[str]]:
    storage, path = Storage.parse(spec)
    shown = redact(spec)
    kind = storage.kind(path) if not has_glob(path) else "missing"
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
        base = glob_base(path)
        rx = glob_regex(path)
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
    tr, se = carve_search(pool[2], search_fraction)

    def make(index: Index, train: bool = False) -> ParquetRows:
        return ParquetRows(metas, *index, arch.img_size, arch.in_chans, train, augment, storage)

    num_classes = max(pool[2] + test[2]) + 1
    return Splits(make(take(pool, tr), True), make(take(pool, se)), make(test), num_classes, f"parquet:{shown}")
