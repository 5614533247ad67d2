"""A command's run: where it is tracked (MLflow) and stored (Ray storage), how it resumes, what it is called.

Both commands go through the same steps: `resume_or_name` (the run's stable name, or the state of the run to
continue), validation of their own, `open_mlflow_run` (create, or reopen on resume), `save_state` (the JSON
record beside Ray's storage that `--resume` reads), and `finish_mlflow_run`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import UsageError

__all__ = [
    "STAGE_TAG",
    "RunState",
    "resolve_tracking_uri",
    "check_mlflow",
    "newest_finished_run",
    "ui_command",
    "init_ray",
    "default_storage",
    "atomic_write_text",
    "write_run_file",
    "read_run_file",
    "find_resume",
    "resume_or_name",
    "open_mlflow_run",
    "save_state",
    "finish_mlflow_run",
    "maybe_fail",
]

STAGE_TAG = "supervit.stage"  # supertrain, search, search-trial: how the search finds its supertraining
STATE_FILE = "supervit_state.json"


# ------------------------------------------------------------------------------------------ MLflow and Ray


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


def newest_finished_run(tracking_uri: str, stage: str):
    """The newest finished run of ``stage`` (``supertrain``, ``search``, ...) in the store, or None."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'"
    runs = client.search_runs(exps, query, order_by=["attributes.end_time DESC"], max_results=1) if exps else []
    return runs[0] if runs else None


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def init_ray(address: str | None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray; reuse one already connected.

    Unless ``verbose``, the Ray processes' own log lines stay in Ray's log files: what the commands print comes
    from the driver.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        _check_reachable(address)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": verbose}
    if not verbose:
        kwargs["logging_config"] = ray.LoggingConfig(log_level="ERROR")
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
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


# ------------------------------------------------------------------------------------------- run files


def default_storage() -> str:
    """``./ray_results``, absolute (Ray workers do not share the driver's working directory)."""
    return str(Path("ray_results").resolve())


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


# ------------------------------------------------------------------------------------------- run lifecycle


@dataclass
class RunState:
    """What ``--resume`` needs to continue a run into the same MLflow run: written beside Ray's storage."""

    mlflow_run_id: str
    tracking_uri: str
    status: str  # running | finished
    options: dict

    @classmethod
    def from_dict(cls, d: dict) -> RunState:
        """Inverse of `dataclasses.asdict`."""
        return cls(d["mlflow_run_id"], d["tracking_uri"], d["status"], d["options"])


def _slug(text: str) -> str:
    """A dataset spec or budget as a short name part: ``/data/imagenet/`` -> ``imagenet``, ``s3://b/shards/*.parquet``
    -> ``shards``."""
    parts = [p for p in text.split("/") if p and not any(c in p for c in "*?[")]
    text = parts[-1].removesuffix(".parquet") if parts else ""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")[:40] or "data"


def stable_name(storage: str, *parts: str) -> str:
    """``<parts>-<n>`` with the lowest ``n`` not yet used in ``storage``: meaningful, reproducible (no clock),
    and never an existing run's name."""
    prefix = "-".join(_slug(p) for p in parts)
    fs = _bucket(storage)
    if fs is None:
        root = Path(storage)
        taken = {p.name for p in root.iterdir()} if root.is_dir() else set()
    else:
        import pyarrow.fs as pafs

        fs, root = fs
        try:
            taken = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
        except OSError:
            taken = set()
    n = 1
    while f"{prefix}-{n}" in taken:
        n += 1
    return f"{prefix}-{n}"


def resume_or_name(
    opts: Any, storage: str, what: str, name_parts: tuple[str, ...], keep: tuple[str, ...]
) -> tuple[Any, str, RunState | None]:
    """The options, name and saved state of this run.

    With ``opts.resume`` set, the run to continue (its saved options, with the fields in ``keep`` taken from
    ``opts`` where given); else ``opts`` under the given name or a new `stable_name`.
    """
    if opts.resume is None:
        return opts, opts.name or stable_name(storage, *name_parts), None
    name, saved = find_resume(storage, opts.resume or None, STATE_FILE, what)
    state = RunState.from_dict(saved)
    overrides = {k: getattr(opts, k) for k in keep if getattr(opts, k) is not None}
    return type(opts)(**{**state.options, **overrides, "resume": opts.resume}), name, state


def open_mlflow_run(
    tracking_uri: str,
    experiment: str,
    name: str,
    state: RunState | None,
    tags: dict[str, str],
    params: dict[str, Any],
) -> str:
    """The MLflow run id: ``state``'s run reopened, or a new run named ``name`` with ``tags`` and ``params``."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient(tracking_uri)
    if state is not None:
        client.update_run(state.mlflow_run_id, status="RUNNING")
        return state.mlflow_run_id
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
    # MLflow caps a param value at 6000 characters.
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run_id


def save_state(storage: str, name: str, state: RunState) -> None:
    """Write the run's `RunState` beside Ray's storage (atomically)."""
    write_run_file(storage, name, STATE_FILE, dump_json(dataclasses.asdict(state)))


def finish_mlflow_run(tracking_uri: str, run_id: str, description: str, status: str = "FINISHED") -> None:
    """Mark the run ended (``status``: FINISHED, KILLED, FAILED), with ``description`` (Markdown) as the run's note
    in the MLflow UI."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    client.set_tag(run_id, "mlflow.note.content", description)
    client.set_terminated(run_id, status=status)


def maybe_fail(marker: str) -> None:
    """Failure drill: kill this process, once (the marker file remembers that it happened)."""
    if not os.path.exists(marker):
        Path(marker).write_text(f"killed at {time.strftime('%H:%M:%S')}\n")
        os.kill(os.getpid(), 9)
