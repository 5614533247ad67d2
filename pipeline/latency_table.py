"""The latency lookup table: one Parquet file, one row per (hardware, architecture, subnet, batch, dtype).

A subnet already measured on a piece of hardware is not measured again. Every write goes to a temporary file
that is then renamed over the table, so a crash mid-write leaves the previous table intact and readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from supervit import ArchConfig

from .cli import UsageError

KEY = ("fingerprint", "arch", "subnet", "batch_size", "dtype")


def arch_key(arch: ArchConfig, num_classes: int) -> str:
    """Short stable name of an architecture (the preset name plus a hash of its shape)."""
    blob = json.dumps({**arch.to_dict(), "name": None, "num_classes": num_classes}, sort_keys=True)
    return f"{arch.name}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


class LatencyTable:
    """Rows keyed by `KEY`, persisted atomically to ``path`` after every `put`."""

    def __init__(self, path: str | os.PathLike) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            try:
                rows = pq.read_table(self.path).to_pylist()
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise UsageError(f"latency table {self.path} is not readable Parquet ({e})") from None
            missing = [k for k in KEY if rows and k not in rows[0]]
            if missing:
                raise UsageError(f"latency table {self.path} lacks columns {missing}")
            self.rows = {tuple(r[k] for k in KEY): r for r in rows}

    def get(self, key: tuple) -> dict | None:
        """The row measured for ``key``, or None."""
        return self.rows.get(tuple(key))

    def put(self, row: dict) -> None:
        """Add or replace a row and write the table."""
        self.rows[tuple(row[k] for k in KEY)] = row
        self.save()

    def __len__(self) -> int:
        return len(self.rows)

    def save(self) -> None:
        """Write every row to a temporary file beside the table, then rename it over the table."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(pa.Table.from_pylist(list(self.rows.values())), tmp)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
