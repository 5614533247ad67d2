"""Serving: one supernet on Ray Serve, the subnet chosen per request and per load.

    python -m pipeline.serve                                  # the newest finished search in the MLflow store
    python -m pipeline.serve --search <run id> --slo-ms 50 --port 8080
    curl --data-binary @cat.jpg 'http://127.0.0.1:8000/predict?budget=0.5x'

The ladder is the search's Pareto front (and every budget's answer): each rung a program for the replica's device
with its latency per batch size and its held-out top-1. A request with ``budget`` or ``max_latency_ms`` runs the
most accurate rung within it; any other follows the SLO: per batch, the most accurate rung that meets it for the
batch's oldest request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from supervit import gflops

from ..common.cli import UsageError, parse_options, quiet_libraries
from ..common.latency_table import LatencyTable, arch_key
from ..common.runs import STAGE_TAG, finish_mlflow_run, init_ray, open_mlflow_run, resolve_tracking_uri
from ..search.latency import LatencySettings
from .ingress import check_ingress, local_ingress, running_ingress, set_local_env
from .ladder import LadderSource, load_ladder_source
from .options import ServeOptions
from .replica import LadderReplica, ReplicaSpec

__all__ = ["Server", "plan_serving", "start", "main"]

APP = "supervit"


@dataclass
class Server:
    """A running deployment: where it listens, the ladder as its first replica measured it, its MLflow run."""

    url: str
    ladder: list[dict]
    ingress: str
    run_id: str
    tracking_uri: str
    source: LadderSource
    _table: object
    _weights: object  # the ObjectRef of the supernet's weights, alive while the driver serves: replicas may restart
    _workdir: tempfile.TemporaryDirectory

    def stop(self) -> None:
        """Delete the application, stop Serve, mark the serving run finished."""
        with _signals_deferred():
            try:
                _shutdown_serve()
                finish_mlflow_run(self.tracking_uri, self.run_id, f"served {len(self.ladder)} subnets at {self.url}")
            finally:
                self._workdir.cleanup()


def _check_port(host: str, port: int) -> None:
    """Bad input now rather than a proxy that never binds: the address must resolve and the port be free."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _starts_local_ray(opts: ServeOptions) -> bool:
    import ray

    return (opts.address or os.environ.get("RAY_ADDRESS") or "local") == "local" and not ray.is_initialized()


def plan_serving(opts: ServeOptions, tracking_uri: str, workdir: Path) -> tuple[LadderSource, ReplicaSpec, Path]:
    """Validate everything and read the ladder from the store; bad input raises before Ray starts."""
    import torch

    opts.check()
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here")
    _check_port(opts.host, opts.port)
    if _starts_local_ray(opts):
        local_ingress(opts.ingress)  # haproxy asked for and missing
    if opts.mode == "packaged":
        # Checked, not created: bad input leaves nothing behind (the replica creates the folders it writes).
        existing = Path(opts.packages).resolve()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            why = "not a folder" if not existing.is_dir() else "not writable"
            raise UsageError(f"--packages {opts.packages}: {existing} is {why}")
    source = load_ladder_source(tracking_uri, opts.search, workdir, opts.max_rungs)
    model, params = source.model, source.search_params
    table = opts.latency_table or params.get("latency_table")
    table_path = Path(table if table and table != "None" else "latency_table.parquet").resolve()
    LatencyTable(table_path)  # a damaged table is bad input
    latency = LatencySettings(
        opts.device,
        opts.dtype,
        1,
        opts.latency_runs,
        opts.replica_cpus if opts.device == "cpu" else None,
        None,
        opts.mode,
    )
    spec = ReplicaSpec(
        arch=model.arch.to_dict(),
        num_classes=model.num_classes,
        state={k: v.cpu() for k, v in model.state_dict().items()},
        arch_key=arch_key(model.arch, model.num_classes),
        rungs=tuple((r["subnet"], r["gflops"], r["top1"]) for r in source.rungs),
        batch_sizes=opts.parsed_batch_sizes(),
        latency=latency,
        slo_ms=opts.slo_ms,
        batch_wait_s=opts.batch_wait_ms / 1e3,
        max_request_bytes=int(opts.max_request_mb * 1e6),
        token=opts.token(),
        full_gflops=gflops(model.arch, None, model.num_classes),
        packages=str(Path(opts.packages).resolve()) if opts.mode == "packaged" else None,
    )
    return source, spec, table_path


def _deployment(opts: ServeOptions, spec: ReplicaSpec):
    from ray import serve

    scaling = (
        {
            "autoscaling_config": {
                "min_replicas": opts.min_replicas,
                "max_replicas": opts.max_replicas,
                "target_ongoing_requests": 2 * max(spec.batch_sizes),
            }
        }
        if opts.max_replicas > opts.min_replicas
        else {"num_replicas": opts.min_replicas}
    )
    actor = {"num_cpus": opts.replica_cpus} | ({"num_gpus": 1} if opts.device == "cuda" else {})
    return serve.deployment(
        LadderReplica,
        name="ladder",
        ray_actor_options=actor,
        # Enough queued requests per replica to fill several batches: the policy needs the queue to see a burst.
        max_ongoing_requests=8 * max(spec.batch_sizes),
        # A stopping replica checks for requests still running this often (Serve's default, 2 s, is most of a
        # stop's time; `ray job stop` kills a job that has not ended 3 s after its SIGTERM).
        graceful_shutdown_wait_loop_s=0.1,
        **scaling,
    )


def start(opts: ServeOptions, verbose: bool = False) -> Server:
    """Read the ladder, start Serve on Ray, wait until the replicas have built their programs, log the run.

    Whatever stops it part way (bad input found on the cluster, Ctrl-C, the command's SIGTERM) shuts Serve down
    again: its controller is detached and would otherwise serve on after this process is gone.
    """
    import ray

    tracking_uri = resolve_tracking_uri(opts.mlflow_uri)
    workdir = tempfile.TemporaryDirectory(prefix="supervit-serve-")
    try:
        source, spec, table_path = plan_serving(opts, tracking_uri, Path(workdir.name))
        local = _starts_local_ray(opts)
        if local:  # its entry point is the one set here
            ingress = local_ingress(opts.ingress)
            set_local_env(ingress)
        _init_ray_keeping_sigterm(opts.address, verbose)
        if not local:  # a running cluster's entry point is the one its `ray start` set up
            ingress = running_ingress()
            check_ingress(opts.ingress, ingress)
        if not verbose:  # Serve's own lines (started, deploying, ready) stay in its log files
            logging.getLogger("ray.serve").setLevel(logging.WARNING)
        # A replica Ray cannot place would leave Serve waiting for it forever.
        have = ray.cluster_resources()
        if have.get("CPU", 0) < opts.replica_cpus or (opts.device == "cuda" and have.get("GPU", 0) < 1):
            need = f"{opts.replica_cpus} CPUs" + (" and a GPU" if opts.device == "cuda" else "")
            raise UsageError(
                f"a replica needs {need}; the Ray cluster has {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs"
            )
    except BaseException:
        workdir.cleanup()
        raise
    from ray import serve

    try:
        table = ray.remote(LatencyTable).options(num_cpus=0).remote(table_path)
        # The weights go to the object store once; each replica (a restart, one more under autoscaling) fetches
        # them. Inside the init args they would be pickled into Serve's controller and copied into every replica.
        spec = dataclasses.replace(spec, state=ray.put(spec.state))
        # One HTTP entry point, on the head node (the driver's): `--host 0.0.0.0` opens it to the network.
        serve.start(proxy_location="HeadOnly", http_options={"host": opts.host, "port": opts.port})
        handle = serve.run(_deployment(opts, spec).bind(spec, table), name=APP, route_prefix="/")
        # This driver is not async: its handle needs a router on a loop of its own, which Serve's
        # throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1 here, as on a cluster started for HAProxy,
        # whose jobs inherit it) turns off; the call would then fail.
        handle._init(_run_router_in_separate_loop=True)
        measured = handle.describe.remote().result()
        by_name = {r["subnet"]: r for r in source.rungs}
        ladder = sorted(({**by_name[m["subnet"]], **m} for m in measured), key=lambda r: r["gflops"])
        url = f"http://{opts.host}:{opts.port}"
        run_id = _log_serving_run(opts, source, ladder, url, ingress, tracking_uri, Path(workdir.name))
    except BaseException:
        try:
            _shutdown_serve()  # nothing half-started is left serving (the run, if opened, was marked ended)
        finally:
            workdir.cleanup()
        raise
    return Server(url, ladder, ingress, run_id, tracking_uri, source, table, spec.state, workdir)


def _init_ray_keeping_sigterm(address: str | None, verbose: bool) -> None:
    """`init_ray`, with the caller's SIGTERM handler (the command's: stop as Ctrl-C does) kept: `ray.init` puts in
    an exit of its own, and a stop while the replicas start must still shut Serve down."""
    caller = signal.getsignal(signal.SIGTERM)
    try:
        init_ray(address, verbose=verbose)
    except SystemExit as e:
        if e.code != signal.SIGTERM or not callable(caller):
            raise
        raise KeyboardInterrupt from None  # a SIGTERM that came while Ray started: Ray's own handler exited
    finally:
        if callable(caller) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, caller)


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C and SIGTERM ignored while Serve shuts down (a second one would leave its detached controller
    serving), then put back; in the main thread only, where Python handles signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _shutdown_serve() -> None:
    """Shut Serve down, uninterrupted; a failure to (Ray gone already) is reported, not raised over the reason
    for stopping."""
    from ray import serve

    with _signals_deferred():
        try:
            serve.shutdown()
        except Exception as e:  # noqa: BLE001
            logging.getLogger(__name__).warning("Serve did not shut down cleanly: %s", e)


def _log_serving_run(
    opts: ServeOptions, source: LadderSource, ladder: list[dict], url: str, ingress: str, tracking_uri: str, tmp: Path
) -> str:
    """The serving run (options, the ladder as measured) and, with ``--log-model``, the ladder's pyfunc model."""
    import mlflow

    arch = source.model.arch
    tags = {STAGE_TAG: "serve", "preset": arch.name, "search_run_id": source.search_run_id}
    params = dataclasses.asdict(opts) | {"url": url, "rungs": len(ladder), "ingress_used": ingress}
    run_id = open_mlflow_run(tracking_uri, opts.experiment, f"serve-{source.search_run_id[:8]}", None, tags, params)
    try:
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_dict(
                {"url": url, "ingress": ingress, "slo_ms": opts.slo_ms, "mode": opts.mode, "subnets": ladder},
                "ladder.json",
            )
            if opts.log_model:
                with warnings.catch_warnings():  # MLflow asks for type hints on predict (its params are typed)
                    warnings.simplefilter("ignore", UserWarning)
                    from .pyfunc import log_ladder_model

                log_ladder_model(
                    ladder, source.checkpoint, arch, source.model.num_classes, f"supervit-{arch.name}-ladder", tmp
                )
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        try:
            finish_mlflow_run(
                tracking_uri,
                run_id,
                "stopped while starting" if interrupted else f"failed while starting: {type(e).__name__}: {e}",
                status="KILLED" if interrupted else "FAILED",
            )
        except Exception:  # noqa: BLE001 - a store gone away must not hide why serving stopped
            pass
        raise
    return run_id


def _describe(server: Server) -> str:
    rungs = ", ".join(f"{r['subnet']} ({r['gflops']:.3g} GFLOPs, {r['top1']:.1f} %)" for r in server.ladder)
    return f"serving {server.url} through {server.ingress} (POST /predict, GET /subnets): {rungs}"


def main(argv: list[str] | None = None) -> None:
    """CLI entry: serve until Ctrl-C or SIGTERM."""
    opts, verbose = parse_options(ServeOptions, argv, "python -m pipeline.serve", __doc__.split("\n\n")[0])
    quiet_libraries(verbose)

    def interrupt(*_) -> None:
        raise KeyboardInterrupt

    # SIGTERM (`ray job stop`, a process manager) stops it as Ctrl-C does, from the start: a stop while the
    # replicas build their programs shuts Serve down too (`start` keeps this handler across `ray.init`).
    signal.signal(signal.SIGTERM, interrupt)
    server = start(opts, verbose)
    try:
        print(_describe(server), flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.stop()
        print("stopped", flush=True)
