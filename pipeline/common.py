"""What both commands share: bad-input handling, MLflow and Ray connection, YAML config files."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "UsageError",
    "run_cli",
    "resolve_tracking_uri",
    "check_mlflow",
    "init_ray",
    "parse_with_config",
    "parse_options",
    "atomic_write_text",
    "write_run_file",
    "read_run_file",
    "find_resume",
    "Parser",
    "ui_command",
]


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2."""


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a command's ``main``, turning bad input into one line on stderr and exit status 2."""
    from supervit.checkpoint import CheckpointError
    from supervit.data import DataError

    try:
        main(argv)
    except (UsageError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def resolve_tracking_uri(uri: str | None) -> str:
    """``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's local default (``./mlflow.db``).

    Relative SQLite paths are made absolute: Ray actors do not share the driver's working directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    elif "://" not in uri:  # a bare path: MLflow treats it as a file store
        uri = str(Path(uri).resolve())
    return uri


def check_mlflow(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with one clear line, when the tracking store cannot be reached or written, or when a tracking
    server refuses the login given by MLflow's ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise UsageError(f"MLflow server at {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UsageError(f"MLflow server at {uri} is unreachable ({reason})") from None
        _check_mlflow_login(uri, timeout)
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise UsageError(f"MLflow store {uri}: folder {parent} does not exist or is not writable")


def _check_mlflow_login(uri: str, timeout: float) -> None:
    """One read with this client's login (/health needs none), so a refused login is one line, not a traceback
    from the first logging call. Statuses other than 401/403 are left to MLflow's own client."""
    import base64

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    headers = {}
    if user and password is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code == 401 and not headers:
            raise UsageError(
                f"MLflow server at {uri} requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            ) from None
        if e.code == 401:
            who = f"user {user!r}" if user else "MLFLOW_TRACKING_TOKEN"
            raise UsageError(
                f"MLflow server at {uri} refused the login of {who} "
                "(check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
            ) from None
        if e.code == 403:
            raise UsageError(f"MLflow server at {uri}: user {user!r} may not read experiments") from None
    except (urllib.error.URLError, OSError):
        pass  # reachable a moment ago (/health); let MLflow's client retry and report


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray; reuse one already connected."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        _check_reachable(address)
    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot connect to Ray at {address or 'a new local instance'}: {msg}") from None


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """A TCP connect to the Ray address: ray.init itself retries for minutes before giving up."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"Ray address {address!r} is not host:port (or ray://host:port)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"cannot connect to Ray at {address}: {e.strerror or e}") from None


class Parser(argparse.ArgumentParser):
    """argparse with its errors as `UsageError`: one line and exit status 2, like every other bad input."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``--config FILE.yaml`` supplies defaults for the same options, flags override it."""
    import yaml

    pre, _ = parser.parse_known_args(argv)
    path = getattr(pre, "config", None)
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise UsageError(f"config file {path} does not exist") from None
        except (yaml.YAMLError, OSError) as e:
            raise UsageError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UsageError(f"config file {path} must hold a mapping of option: value")
        known = {a.dest for a in parser._actions}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known - {"config"})
        if unknown:
            raise UsageError(f"config file {path}: unknown options {', '.join(unknown)}")
        parser.set_defaults(**data)
    return parser.parse_args(argv)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def dump_json(obj: Any) -> str:
    """Stable, readable JSON."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def _bucket(storage: str):
    """(pyarrow filesystem, root path) of a bucket URI, or None for a local path."""
    if "://" not in storage:
        return None
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(storage)


def write_run_file(storage: str, name: str, filename: str, text: str) -> None:
    """Write ``<storage>/<name>/<filename>`` whole: a local file atomically (temporary file + rename), a bucket
    object by one upload (object stores never show half an object)."""
    fs = _bucket(storage)
    if fs is None:
        atomic_write_text(Path(storage) / name / filename, text)
        return
    fs, root = fs
    fs.create_dir(f"{root}/{name}", recursive=True)
    with fs.open_output_stream(f"{root}/{name}/{filename}") as f:
        f.write(text.encode())


def read_run_file(storage: str, name: str, filename: str) -> str | None:
    """The text of ``<storage>/<name>/<filename>``, or None where it does not exist."""
    fs = _bucket(storage)
    try:
        if fs is None:
            return (Path(storage) / name / filename).read_text()
        fs, root = fs
        with fs.open_input_stream(f"{root}/{name}/{filename}") as f:
            return f.read().decode()
    except (FileNotFoundError, OSError):
        return None


def find_resume(storage: str, name: str | None, filename: str, what: str) -> tuple[str, dict]:
    """The name and saved state (JSON in ``<storage>/<name>/<filename>``) of the ``what`` (``run``,
    ``search``) to resume: ``name``, or on a local storage the newest unfinished one.

    Raises:
        UsageError: nothing matches, or it already finished.
    """
    if _bucket(storage) is not None:
        # Listing a bucket for the newest state would be slow and racy; the name is printed at the start.
        if not name:
            raise UsageError(f"--resume on a bucket storage needs the {what} name (--resume NAME)")
        text = read_run_file(storage, name, filename)
        if text is None:
            raise UsageError(f"nothing to resume: no {what} {name!r} in {storage}")
        found = [(0.0, name, json.loads(text))]
    else:
        root = Path(storage)
        found = []
        for f in root.glob(f"*/{filename}") if root.is_dir() else []:
            state = json.loads(f.read_text())
            if (name is None and state.get("status") != "finished") or f.parent.name == name:
                found.append((f.stat().st_mtime, f.parent.name, state))
        if not found:
            raise UsageError(
                f"nothing to resume: no {what + ' ' + repr(name) if name else 'unfinished ' + what} in {storage}"
            )
    _, found_name, state = max(found, key=lambda t: t[0])
    if state.get("status") == "finished":
        raise UsageError(f"nothing to resume: {what} {found_name!r} in {storage} already finished")
    return found_name, state


def parse_options(parser: argparse.ArgumentParser, options_type: type, argv: list[str] | None):
    """`parse_with_config`, then the command's options dataclass built from the parsed fields it has."""
    import dataclasses

    args = parse_with_config(parser, argv)
    fields = {f.name for f in dataclasses.fields(options_type)}
    return options_type(**{k: v for k, v in vars(args).items() if k in fields})
