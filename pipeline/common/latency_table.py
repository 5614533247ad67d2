"""The latency lookup table, shared by every search that uses it: a directory of immutable Parquet part files.

One row per (hardware, architecture, subnet, batch, dtype, latency mode): a subnet measured once on a piece
of hardware, in one mode, is not measured again. Several searches may use one table at once (two terminals, a
team on shared storage, trials on several nodes):

- every `put` writes one new part file whole and never touches another's: a local part goes to a hidden
  temporary file that is then renamed (atomic, also on NFS), a bucket part is one object upload (an object
  store never shows half an object). No writer can lose another's rows, and a crash mid-write leaves at most
  a hidden temporary file, which readers skip;
- readers take the union of the parts; where a key was measured twice, the newest row (``written_ns``) wins.
  A lookup that misses reads the parts written since (by any process) before it gives up.

An old single-file table is read as it is; the first `put` converts it into a directory (its rows become the
first part; the old file is kept beside it as ``<name>.v1``). Rows without a mode are eager measurements.
`compact` merges many small parts into one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

from supervit import ArchConfig

from .cli import UsageError

KEY = ("fingerprint", "arch", "subnet", "batch_size", "dtype", "mode")
LEGACY_MODE = "eager"  # tables written before the mode was part of the key hold eager forwards only
_PART_PREFIX = "part-"


def arch_key(arch: ArchConfig, num_classes: int) -> str:
    """Short stable name of an architecture (the preset name plus a hash of its shape)."""
    blob = json.dumps({**arch.to_dict(), "name": None, "num_classes": num_classes}, sort_keys=True)
    return f"{arch.name}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def row_key(row: dict) -> tuple:
    """The `KEY` tuple of a row."""
    return tuple(row[k] for k in KEY)


def _is_part(name: str) -> bool:
    return name.startswith(_PART_PREFIX) and name.endswith(".parquet")


class LatencyTable:
    """Rows keyed by `KEY` in a shared directory of part files (a local path or a bucket URI).

    ``rows`` maps each key to its newest row among the parts read so far; `refresh` reads the newer parts.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import pyarrow.fs as pafs

        text = str(path)
        self._fs = None
        self.path: Path | str = Path(path)
        if "://" in text:
            fs, root = pafs.FileSystem.from_uri(text)
            if isinstance(fs, pafs.LocalFileSystem):
                self.path = Path(root)  # a file:// URI: the local path, with atomic renames
            else:
                self._fs, self.path = fs, root.rstrip("/")
        self.rows: dict[tuple, dict] = {}
        self._seen: set[str] = set()
        self.refresh()

    # ------------------------------------------------------------------------------------------ reading

    def refresh(self) -> None:
        """Read the part files not read yet (written by any process since the last look)."""
        for _ in range(3):
            legacy = self._legacy_file()
            if legacy is not None and "<legacy>" not in self._seen:
                self._merge(self._read(legacy))
                self._seen.add("<legacy>")
            vanished = False
            for name in sorted(set(self._list_parts()) - self._seen):
                try:
                    rows = self._read(self._join(name))
                except FileNotFoundError:
                    vanished = True  # merged into a newer part by `compact`: list again
                    continue
                self._merge(rows)
                self._seen.add(name)
            if not vanished:
                return

    def get(self, key: tuple) -> dict | None:
        """The newest row measured for ``key`` (a `KEY` tuple), or None."""
        key = tuple(key)
        if len(key) != len(KEY):
            raise ValueError(f"a latency-table key has {len(KEY)} fields {KEY}, got {len(key)}: {key}")
        row = self.rows.get(key)
        if row is None:
            self.refresh()  # another search may have measured it meanwhile
            row = self.rows.get(key)
        return row

    def get_many(self, keys: list[tuple]) -> list[dict | None]:
        """`get` of each key, reading the newer parts once at most."""
        if any(tuple(k) not in self.rows for k in keys):
            self.refresh()
        return [self.rows.get(tuple(k)) for k in keys]

    def matching(self, fingerprint: str, arch: str, batch_size: int, dtype: str, mode: str) -> list[dict]:
        """Every row of one hardware, architecture, batch, dtype and mode (subnets and parts)."""
        self.refresh()
        want = (fingerprint, arch, batch_size, dtype, mode)
        return [r for k, r in self.rows.items() if (k[0], k[1], k[3], k[4], k[5]) == want]

    def __len__(self) -> int:
        return len(self.rows)

    def to_arrow(self):
        """Every row (the union, newest per key) as one pyarrow Table."""
        import pyarrow as pa

        return pa.Table.from_pylist(list(self.rows.values()))

    def write_snapshot(self, path: str | os.PathLike) -> Path:
        """Write the union as one ordinary Parquet file (e.g. to log it as a run artifact)."""
        import pyarrow.parquet as pq

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.to_arrow(), path)
        return path

    # ------------------------------------------------------------------------------------------ writing

    def put(self, row: dict) -> None:
        """Add a row (newest wins over an older row of the same key) as a new part file."""
        missing = [k for k in KEY if k not in row or row[k] is None or row[k] == ""]
        if missing:
            raise ValueError(f"latency row lacks key fields {missing}")
        row = {**row, "written_ns": time.time_ns(), "writer": f"{socket.gethostname()}:{os.getpid()}"}
        self._convert_legacy()
        self._write_part([row])
        self._merge([row])

    def compact(self) -> int:
        """Merge every part read so far into one new part, then delete those parts; returns parts merged.

        Safe while others read and write: the merged part is complete before any part is deleted, and parts
        written meanwhile are neither read nor deleted here.
        """
        self.refresh()
        parts = sorted(n for n in self._seen if n != "<legacy>")
        if len(parts) < 2:
            return 0
        name = self._write_part(sorted(self.rows.values(), key=lambda r: r.get("written_ns", 0)))
        self._seen.add(name)
        for old in parts:
            self._delete(self._join(old))
            self._seen.discard(old)
        if self._fs is None:  # temporary files that crashed writers left behind, a day old or more
            for n in os.listdir(self.path):
                p = self.path / n
                if n.startswith(f".{_PART_PREFIX}") and n.endswith(".tmp") and time.time() - p.stat().st_mtime > 86400:
                    self._delete(p)
        return len(parts)

    # ---------------------------------------------------------------------------------------- internals

    def _merge(self, rows: list[dict]) -> None:
        for r in rows:
            key = row_key(r)
            old = self.rows.get(key)
            if old is None or r.get("written_ns", 0) >= old.get("written_ns", 0):
                self.rows[key] = r

    def _read(self, where) -> list[dict]:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(where, filesystem=self._fs).to_pylist()
        except FileNotFoundError:
            raise
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UsageError(f"latency table {self.path}: {where} is not readable Parquet ({e})") from None
        for r in rows:
            if r.get("mode") is None:
                r["mode"] = LEGACY_MODE
            r.setdefault("written_ns", 0)
        missing = [k for k in KEY if rows and k not in rows[0]]
        if missing:
            raise UsageError(f"latency table {self.path}: {where} lacks columns {missing}")
        return rows

    def _join(self, name: str):
        return f"{self.path}/{name}" if self._fs is not None else self.path / name

    def _list_parts(self) -> list[str]:
        if self._fs is None:
            if not self.path.is_dir():
                return []
            return [n for n in os.listdir(self.path) if _is_part(n)]
        import pyarrow.fs as pafs

        infos = self._fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [i.base_name for i in infos if i.type == pafs.FileType.File and _is_part(i.base_name)]

    def _legacy_file(self):
        """The single-file table at the path, if there is one (or its backup, mid-conversion)."""
        if self._fs is not None:
            import pyarrow.fs as pafs

            info = self._fs.get_file_info(self.path)
            return self.path if info.type == pafs.FileType.File else None
        if self.path.is_file():
            return self.path
        backup = self._backup()
        if not self.path.exists() and backup.is_file():
            return backup  # a conversion was interrupted between its two renames
        return None

    def _backup(self) -> Path:
        return self.path.with_name(self.path.name + ".v1")

    def _convert_legacy(self) -> None:
        """Turn an old single-file table into a directory whose first part holds its rows.

        Two renames (file to backup, prepared directory to the path): a reader in between finds the backup,
        and a concurrent converter's directory, holding the same rows, is discarded.
        """
        legacy = self._legacy_file()
        if legacy is None:
            return
        if self._fs is not None:
            raise UsageError(
                f"latency table {self.path} is an old single-file table on a bucket: it can be read, not added "
                "to; copy its rows into a new table directory"
            )
        rows = self._read(legacy)
        staging = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.convert-"))
        try:
            self._write_part(rows, directory=staging)
            if legacy == self.path:
                try:
                    os.replace(self.path, self._backup())
                except FileNotFoundError:
                    pass  # another process converted it first
            try:
                os.rename(staging, self.path)
            except OSError:
                pass  # another process's directory is in place already, with the same rows
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_part(self, rows: list[dict], directory: Path | None = None) -> str:
        """Write ``rows`` as one new part file, whole or not at all; returns its name."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"{_PART_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        table = pa.Table.from_pylist(rows)
        if self._fs is not None:
            self._fs.create_dir(self.path, recursive=True)
            with self._fs.open_output_stream(f"{self.path}/{name}") as f:
                pq.write_table(table, f)
            return name
        directory = directory or self.path
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, directory / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return name

    def _delete(self, where) -> None:
        try:
            if self._fs is not None:
                self._fs.delete_file(where)
            else:
                os.unlink(where)
        except FileNotFoundError:
            pass
