"""Where a dataset's files live: local disks or buckets (``s3://``, ``gs://``, ``file://``) through ``pyarrow.fs``,
and the path rules both file-backed formats share (URIs, globs, credentials kept out of names)."""

from __future__ import annotations

import os
import re

from .splits import DataError

_URI_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_GLOB_CHARS = re.compile(r"[*?\[]")


def is_uri(spec: str) -> bool:
    """Whether ``spec`` is a URI (``scheme://...``) rather than a local path."""
    return bool(_URI_RE.match(spec))


def has_glob(path: str) -> bool:
    """Whether ``path`` holds glob characters (``*``, ``?``, ``[``)."""
    return bool(_GLOB_CHARS.search(path))


def glob_base(path: str) -> str:
    """The folder above the first glob character of ``path``."""
    return _GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]


class Storage:
    """Where a dataset's files live: a ``pyarrow.fs`` filesystem, and how to name its paths for people.

    Paths given to `read` are the filesystem's own (``bucket/key`` for S3, absolute for local disks); `name`
    turns one back into what the user would type (``s3://bucket/key``). Picklable: it travels to Ray tasks.
    """

    def __init__(self, fs=None, prefix: str = ""):
        import pyarrow.fs as pafs

        self.fs = fs if fs is not None else pafs.LocalFileSystem()
        self.prefix = prefix

    @classmethod
    def parse(cls, spec: str) -> tuple[Storage, str]:
        """(storage, path inside it) for a local path or a URI (``s3://``, ``gs://``, ``file://``, ...).

        Bucket options ride in the URI's query, as pyarrow reads them, e.g.
        ``s3://bucket/imagenet?endpoint_override=127.0.0.1:9000&scheme=http`` for an S3-compatible server.
        """
        import pyarrow as pa
        import pyarrow.fs as pafs

        m = _URI_RE.match(spec)
        if not m:
            return cls(), os.path.abspath(os.path.expanduser(spec))  # Ray workers do not share the driver's cwd
        try:
            fs, path = pafs.FileSystem.from_uri(spec)
        except (pa.ArrowException, ValueError, OSError) as e:
            raise DataError(f"cannot open {redact(spec)}: {e}") from None
        return cls(fs, f"{m.group(1).lower()}://"), path.rstrip("/") or "/"

    def name(self, path: str) -> str:
        """The path as a user would write it."""
        return self.prefix + path

    def read(self, path: str) -> bytes:
        """The whole file."""
        with self.fs.open_input_stream(path) as f:
            return f.readall()

    def kind(self, path: str) -> str:
        """``file``, ``dir`` or ``missing``."""
        import pyarrow.fs as pafs

        t = self.fs.get_file_info(path).type
        return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "missing")

    def walk(self, path: str) -> tuple[list[str], list[str]]:
        """(files, directories) anywhere under ``path``, each sorted (one listing: a bucket pages through it)."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
        dirs = sorted(i.path for i in infos if i.type == pafs.FileType.Directory)
        return files, dirs

    def subdirs(self, path: str) -> list[str]:
        """The folders right under ``path`` (a bucket lists their common prefixes), sorted."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.Directory)

    def __getstate__(self) -> dict:
        return {"fs": self.fs, "prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.fs, self.prefix = state["fs"], state["prefix"]


def redact(spec: str) -> str:
    """``spec`` without credentials (``s3://key:secret@bucket`` -> ``s3://***@bucket``): names end up in logs."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", spec)


def glob_regex(pattern: str) -> re.Pattern:
    """A path glob as a regex: ``*`` and ``?`` stay inside one folder, ``**/`` spans any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out, i = out + re.escape("["), i + 1
            else:
                cls = pattern[i + 1 : j]
                out, i = out + "[" + ("^" + cls[1:] if cls.startswith("!") else cls) + "]", j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")
