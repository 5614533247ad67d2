"""Measured latency of a subnet as deployed: warm-up, repeated timed forwards, median and spread, hardware.

What is timed is the subnet's deployable program (`supervit.export.FixedSubnet`: fixed token counts, the input
resize included) on images at the dataset's resolution, either as it is (``eager``) or compiled for the device
(``compiled``; the compile is timed apart and never counted as latency).
"""

from __future__ import annotations

import hashlib
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .config import SubnetConfig

__all__ = [
    "LatencyResult",
    "LATENCY_MODES",
    "default_latency_mode",
    "measure_latency",
    "time_program",
    "hardware_fingerprint",
]

LATENCY_MODES = ("eager", "compiled")


@dataclass(frozen=True)
class LatencyResult:
    """One latency measurement.

    ``median_ms`` is the statistic to compare; ``p10_ms``/``p90_ms`` and ``iqr_ms`` give the spread. ``mode``
    is ``eager`` or ``compiled``; ``compile_s`` is what compiling the program cost (0 for eager), whether it was
    compiled for this measurement or earlier in the process.
    """

    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    runs: int
    batch_size: int
    dtype: str
    threads: int
    device: str
    fingerprint: str
    hardware: str
    mode: str = "eager"
    compile_s: float = 0.0

    def to_dict(self) -> dict:
        """Flat dict for tables and logs."""
        return asdict(self)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_fingerprint(device: str | torch.device = "cpu", threads: int | None = None) -> tuple[str, str]:
    """Describe the hardware a latency figure belongs to.

    Returns:
        ``(fingerprint, description)``: a short stable hash (the cache key) and the readable text it hashes:
        CPU model and thread count, or GPU name, compute capability and CUDA version; plus the torch version.
    """
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cap = ".".join(map(str, torch.cuda.get_device_capability(idx)))
        text = f"cuda:{torch.cuda.get_device_name(idx)} sm{cap} cuda{torch.version.cuda}"
    else:
        text = f"cpu:{_cpu_model()} x{threads or torch.get_num_threads()}"
    text += f" torch{torch.__version__.split('+')[0]}"
    return hashlib.sha1(text.encode()).hexdigest()[:12], text


def _quantile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def default_latency_mode(device: str | torch.device) -> str:
    """The latency mode a deployment on ``device`` runs: ``compiled`` on every device.

    A subnet ships as one fixed program compiled for its device (DESIGN.md, "Deployment"). On CPU the compiled
    program is what makes latency follow FLOPs: eager overhead and MKL's unpacked small GEMMs invert the
    ranking of small subnets; on CUDA, eager launch overhead hides most of a pruned subnet's savings at small
    batches. Eager stays selectable (no compile cost, e.g. for a quick search of many subnets).
    """
    torch.device(device)  # validates the text
    return "compiled"


@torch.inference_mode()
def measure_latency(
    model: torch.nn.Module,
    subnet: SubnetConfig | None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 10,
    runs: int = 50,
    min_time_s: float = 0.0,
    threads: int | None = None,
    mode: str | None = None,
    compile_mode: str | None = None,
    compile_options: dict | None = None,
) -> LatencyResult:
    """Time forwards of ``subnet``'s deployable program on random images at the dataset's resolution.

    Args:
        model: A `SuperViT`; it is not modified (the program holds its own copy of the weights).
        subnet: The subnet to time (None: the full model).
        batch_size: Images per forward.
        device: Where to run; on CUDA the timed region is synchronised.
        dtype: Weights and input dtype (float32, bfloat16, float16).
        warmup: Untimed forwards first (allocator, kernels, caches, CUDA-graph capture).
        runs: Timed forwards.
        min_time_s: Keep timing past ``runs`` until this much time is spent (steadier medians for tiny
            models).
        threads: CPU threads (``torch.set_num_threads``) for the measurement; None keeps the current value.
        mode: ``eager`` or ``compiled`` (None: `default_latency_mode` of ``device``). A compiled program is
            cached per process (`supervit.export.compiled_subnet`): a subnet is compiled once.
        compile_mode: `torch.compile` mode for ``compiled`` (None: the device's default, see
            `supervit.export.compile_options`).
        compile_options: Inductor options over `supervit.export.DEPLOY_OPTIONS`, for ``compiled``.
    """
    from .export import FixedSubnet, compiled_subnet

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested, but CUDA is not available")
    mode = default_latency_mode(device) if mode is None else mode
    if mode not in LATENCY_MODES:
        raise ValueError(f"latency mode must be one of {', '.join(LATENCY_MODES)}, got {mode!r}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        compile_s = 0.0
        if mode == "compiled":
            # Compiled after the thread count is set: Inductor builds its CPU kernels for that many threads.
            program, _ = compiled_subnet(
                model,
                subnet,
                device=device,
                dtype=dtype,
                batch_size=batch_size,
                mode=compile_mode,
                options=compile_options,
            )
            compile_s = program.compile_s
        else:
            program = FixedSubnet(model, subnet).to(device=device, dtype=dtype).eval()
        arch = model.arch
        x = torch.randn(batch_size, arch.in_chans, arch.img_size, arch.img_size, device=device, dtype=dtype)
        return time_program(program, x, warmup, runs, min_time_s, mode=mode, compile_s=compile_s)
    finally:
        torch.set_num_threads(old_threads)


def time_program(
    program, x: torch.Tensor, warmup: int = 10, runs: int = 50, min_time_s: float = 0.0, **fields
) -> LatencyResult:
    """The latency protocol, for any program and input: ``warmup`` untimed calls, then ``runs`` timed ones (and
    more until ``min_time_s`` is spent), synchronised on CUDA; median and spread. ``fields`` fill the rest of the
    `LatencyResult` (``mode``, ``compile_s``). The thread count is the current one: set it before compiling."""
    device = x.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            program(x)
        sync()
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < runs or time.perf_counter() - start_all < min_time_s:
            t0 = time.perf_counter()
            program(x)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    threads = torch.get_num_threads()
    fp, text = hardware_fingerprint(device, threads)
    return LatencyResult(
        median_ms=statistics.median(times),
        mean_ms=statistics.fmean(times),
        p10_ms=_quantile(times, 0.1),
        p90_ms=_quantile(times, 0.9),
        iqr_ms=_quantile(times, 0.75) - _quantile(times, 0.25),
        runs=len(times),
        batch_size=x.shape[0],
        dtype=str(x.dtype).removeprefix("torch."),
        threads=threads,
        device=device.type,
        fingerprint=fp,
        hardware=text,
        **fields,
    )
