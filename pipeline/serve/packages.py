"""AOTInductor packages of the ladder's programs, kept on disk so that a replica's restart loads them instead of
compiling them (``--mode packaged``).

A compiled rung cannot be cached across processes: freezing prepacks each linear layer's weight for MKL, and
Inductor's graph cache refuses graphs holding such tensors, so every start compiles every program again (7-10 s
each on 2 cores, measured). A package is compiled once per (architecture, weights, subnet, batch, dtype, hardware,
torch), ahead of time and frozen, and loads in milliseconds. It is not the same program: AOTInductor calls
oneDNN's linear where the compiled program calls MKL's packed GEMM, so a rung is timed as a package (its own rows,
mode ``packaged``, in the latency table) and the policy uses those times.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from supervit import SubnetConfig, SuperViT, hardware_fingerprint

__all__ = ["weights_digest", "package_path", "packaged_program"]


def weights_digest(model: SuperViT) -> str:
    """A hash of the supernet's weights (names, dtypes, shapes, values): a package never outlives its weights."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def package_path(
    root: str | os.PathLike, arch_key: str, digest: str, subnet: str, batch: int, device: str, dtype: str, threads: int
) -> Path:
    """Where the package of ``subnet`` at ``batch`` lives under ``root``: one folder per supernet's weights, one per
    hardware and torch version (the fingerprint hashes both, with the CPU thread count the kernels are built for)."""
    fingerprint, _ = hardware_fingerprint(device, threads if device == "cpu" else None)
    return Path(root) / f"{arch_key}-{digest[:12]}" / f"{device}-{fingerprint}" / f"{subnet}-b{batch}-{dtype}.pt2"


def packaged_program(
    model: SuperViT,
    subnet: SubnetConfig,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    path: Path,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], float, bool]:
    """The package at ``path`` loaded, built first when it is missing or cannot be loaded.

    Returns:
        ``(program, seconds, built)``: the callable, the time spent building and loading it, whether it was built.
    """
    from supervit.export import DEPLOY_OPTIONS, load_package, package_subnet

    t0 = time.perf_counter()
    if path.exists():
        try:
            return load_package(path), time.perf_counter() - t0, False
        except Exception:  # noqa: BLE001 - a damaged or foreign file: build it again
            path.unlink(missing_ok=True)
    # Built under a hidden name, then renamed: replicas starting together never load half a package.
    tmp = path.with_name(f".{path.stem}-{uuid.uuid4().hex[:8]}.pt2")
    try:
        package_subnet(model, subnet, tmp, device=device, dtype=dtype, batch_size=batch, options=dict(DEPLOY_OPTIONS))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return load_package(path), time.perf_counter() - t0, True
