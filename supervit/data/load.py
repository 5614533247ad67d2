"""Entry points: `load_data` (a dataset from its spec) and `verify` (its first images decode)."""

from __future__ import annotations

from pathlib import Path

from ..config import ArchConfig
from .folder import class_folders, image_folder
from .memory import digits, synthetic
from .parquet import parquet
from .splits import DataError, Splits
from .storage import Storage, has_glob, is_uri, redact


def load_data(spec: str, arch: ArchConfig, **kwargs) -> Splits:
    """Load a dataset from a spec: ``digits``, ``synthetic``, an ImageFolder root, a ``.parquet`` file, a
    directory of ``.parquet`` files, or a glob; local paths or bucket URIs (``s3://``, ``gs://``,
    ``file://``). ``kwargs`` go to the chosen loader."""
    spec = str(spec)
    if spec == "digits":
        return digits(arch, **kwargs)
    if spec == "synthetic":
        return synthetic(arch, **kwargs)
    if not is_uri(spec):
        spec = str(Path(spec).expanduser())
    storage, path = Storage.parse(spec)
    kind = storage.kind(path) if not has_glob(path) else "missing"
    if kind == "dir":
        train = f"{path}/train"
        # Class folders under train/ mean ImageFolder; otherwise look for Parquet (a folder of a few shards).
        if storage.kind(train) == "dir" and class_folders(train, [], storage.subdirs(train)):
            return image_folder(spec, arch, **kwargs)
        if not any(f.endswith(".parquet") for f in storage.walk(path)[0]):
            return image_folder(spec, arch, **kwargs)  # gives the specific error for a malformed tree
        return parquet(spec, arch, **kwargs)
    if kind == "file" or has_glob(path):
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
