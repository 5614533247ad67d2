"""`ServeOptions`: everything a deployment depends on. The command line is generated from its fields; the rooms
that read the options import this one."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from ..common.cli import UsageError, option

__all__ = ["EXPERIMENT", "ServeOptions"]

EXPERIMENT = "supervit-serve"


@dataclass
class ServeOptions:
    """Everything a deployment depends on; the command line is generated from these fields."""

    search: str | None = option(
        None, help="MLflow run id of the search whose supernet and Pareto front to serve (default: the newest finished)"
    )
    host: str = option("127.0.0.1", help="address the HTTP server binds")
    port: int = option(8000, help="HTTP port", min=1)
    slo_ms: float = option(
        100.0,
        help="latency objective of requests without a budget: each batch runs the most accurate subnet that "
        "meets it for the batch's oldest request",
        min=0.001,
    )
    mode: str = option(
        "compiled",
        help="the rungs' programs: compiled for the replica's device (as the search measured them; every start "
        "compiles them), packaged (AOTInductor packages under --packages: built once, a restart loads them; timed "
        "as packages), or eager",
        choices=("compiled", "packaged", "eager"),
    )
    packages: str = option(
        "serve_packages", help="folder of the rungs' AOTInductor packages (--mode packaged), per node unless shared"
    )
    batch_sizes: str = option(
        "1,8", help="batch sizes each rung is compiled and measured at; a batch holds at most the largest"
    )
    batch_wait_ms: float = option(
        0.0,
        help="longest wait for a batch to fill before it runs (0: a batch takes what has queued while the one before "
        "ran, so a lone request never waits)",
        min=0.0,
    )
    max_rungs: int = option(8, help="most subnets on the ladder (the front is thinned evenly in GFLOPs)", min=1)
    min_replicas: int = option(1, help="fewest replicas (autoscaling between --min-replicas and --max-replicas)", min=1)
    max_replicas: int = option(1, help="most replicas", min=1)
    replica_cpus: int = option(1, help="CPUs per replica (and the threads its programs run and are timed with)", min=1)
    device: str = option("cpu", help="where the replicas run their programs", choices=("cpu", "cuda"))
    dtype: str = option("float32", help="the programs' dtype", choices=("float32", "bfloat16", "float16"))
    latency_runs: int = option(30, help="timed forwards per latency measurement the table lacks", min=1)
    latency_table: str | None = option(
        None, help="latency table to read and complete (default: the search's, else ./latency_table.parquet)"
    )
    max_request_mb: float = option(10.0, help="largest request body, in MB (larger: 413)", min=0.001)
    token_file: str | None = option(
        None, help="file holding a bearer token: requests without `Authorization: Bearer <token>` get 401"
    )
    log_model: bool = option(
        True, help="log the ladder to MLflow as one pyfunc model (`mlflow models serve` serves it)"
    )
    ingress: str = option(
        "auto",
        help="HTTP entry point: haproxy (Ray Serve's HAProxy ingress, straight to the replicas; ray[serve] brings the "
        "binary on Linux), proxy (Serve's Python HTTP proxy), auto (haproxy where Serve finds a binary)",
        choices=("auto", "haproxy", "proxy"),
    )
    address: str | None = option(None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    mlflow_uri: str | None = option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    experiment: str = option(EXPERIMENT, help="MLflow experiment of the serving run")

    def parsed_batch_sizes(self) -> tuple[int, ...]:
        """``"1,8"`` -> ``(1, 8)``, sorted, unique."""
        try:
            sizes = sorted({int(s) for s in self.batch_sizes.split(",") if s.strip()})
        except ValueError:
            sizes = []
        if not sizes or sizes[0] < 1:
            raise UsageError(f"--batch-sizes must be positive integers separated by commas, got {self.batch_sizes!r}")
        return tuple(sizes)

    def token(self) -> str | None:
        """The bearer token of ``--token-file`` (stripped), or None."""
        if self.token_file is None:
            return None
        try:
            token = Path(self.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--token-file {self.token_file}: {getattr(e, 'strerror', None) or e}") from None
        # ASCII only: HTTP headers arrive as latin-1, and a token that does not survive that could never match.
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise UsageError(f"--token-file {self.token_file} must hold one token (printable ASCII, no spaces)")
        return token

    def check(self) -> None:
        """Cross-field checks (each field's own bounds are checked by the parser)."""
        self.parsed_batch_sizes()
        self.token()
        if self.port > 65535:
            raise UsageError(f"--port must be at most 65535, got {self.port}")
        if self.max_replicas < self.min_replicas:
            raise UsageError(f"--max-replicas {self.max_replicas} is below --min-replicas {self.min_replicas}")


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (compared in constant time)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
