"""Latency from parts: a subnet's deployed latency predicted from compiled programs of its parts.

A subnet's program (`supervit.export.FixedSubnet`) is a sequence of parts whose cost depends only on their shapes:

- ``embed@g<grid>``: the input resize, the patch embedding, the class token and the grid's position embedding;
- ``block@<n>``: a transformer block at ``n`` tokens (class token included);
- ``prune@<n>><k>``: a pruning block, ``n`` tokens into its attention, ``k`` out of it into its MLP;
- ``head``: the final norm and the classifier, on the class token alone (so its cost is the same for every subnet).

Every block of an architecture has the same shapes, so one compiled program per part serves every layer of every
subnet and every search: the DeiT-S space (4 grids x 27 schedules) has 108 subnets but 75 parts. Each part is
compiled as the deployed program is (`supervit.export.compile_module`: frozen Inductor, the C++ wrapper on CPU,
CUDA graphs on CUDA) with static shapes: a part compiled once with a dynamic token dimension times 10-50 % slower
than the static program on this project's CPU (oneDNN instead of MKL's packed GEMM, symbolic loop bounds), so it
would not predict what a deployment runs.

A part timed alone pays what the whole program pays once: the call into the program and waking the CPU threads
(on a 2-core CPU about 0.2 ms, more than a `tiny` block computes). The sum of the parts is therefore calibrated on
whole programs: ``predicted = scale * sum + offset``, fitted by least squares on whole compiled programs of the same
hardware, architecture, batch, dtype and mode (`fit_calibration`; an offset alone from one program).
`benchmarks/latency_parts.py` measures how well this predicts whole programs it was not fitted on.
"""

from __future__ import annotations

import copy
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import ArchConfig, SubnetConfig
from .flops import token_counts
from .latency import LatencyResult, time_program
from .model import SuperViT, patchify

__all__ = [
    "Part",
    "PART_PREFIX",
    "subnet_parts",
    "space_parts",
    "PartModule",
    "measure_part",
    "Calibration",
    "fit_calibration",
    "predict_latency",
]

PART_PREFIX = "part:"  # a part's name in the latency table, never a subnet's
_NAME_RE = re.compile(r"^(?:embed@g(\d+)|block@(\d+)|prune@(\d+)>(\d+)|head)$")


@dataclass(frozen=True, order=True)
class Part:
    """One part of a subnet's program: its kind and the shapes its cost depends on.

    Attributes:
        kind: ``embed``, ``block``, ``prune`` or ``head``.
        tokens: ``embed``: the grid; ``block``/``prune``: tokens entering (class token included); ``head``: 0.
        keep: ``prune``: tokens leaving (class token included); else 0.
    """

    kind: str
    tokens: int = 0
    keep: int = 0

    @property
    def name(self) -> str:
        """``embed@g8``, ``block@65``, ``prune@65>47`` or ``head``."""
        return {
            "embed": f"embed@g{self.tokens}",
            "block": f"block@{self.tokens}",
            "prune": f"prune@{self.tokens}>{self.keep}",
            "head": "head",
        }[self.kind]

    @property
    def key(self) -> str:
        """The part's name in the latency table's ``subnet`` column."""
        return PART_PREFIX + self.name

    @classmethod
    def parse(cls, text: str) -> Part:
        """Inverse of `name` (and of `key`)."""
        m = _NAME_RE.match(text.removeprefix(PART_PREFIX))
        if not m:
            raise ValueError(f"not a part name: {text!r} (expected embed@g8, block@65, prune@65>47 or head)")
        g, n, pn, pk = m.groups()
        if g:
            return cls("embed", int(g))
        if n:
            return cls("block", int(n))
        if pn:
            return cls("prune", int(pn), int(pk))
        return cls("head")

    def __str__(self) -> str:
        return self.name


def subnet_parts(arch: ArchConfig, subnet: SubnetConfig | None) -> tuple[Part, ...]:
    """The parts of ``subnet``'s program, in order (None: the full model)."""
    subnet = (arch.largest if subnet is None else subnet).validate(arch)
    blocks = [Part("block", a) if a == b else Part("prune", a, b) for a, b in token_counts(arch, subnet)]
    return (Part("embed", subnet.grid), *blocks, Part("head"))


def space_parts(arch: ArchConfig, subnets: Iterable[SubnetConfig]) -> list[Part]:
    """Every distinct part of ``subnets``, sorted (what a search over them needs compiled once)."""
    return sorted({p for s in subnets for p in subnet_parts(arch, s)})


class PartModule(nn.Module):
    """One part as a module, with its own copy of the weights it needs (block parts use the first block's: every
    block has the same shapes, and the cost of a dense forward does not depend on the values).

    Input: ``embed``: images at the architecture's ``img_size``; other parts: tokens (B, n, dim); the ``head``
    takes the class token's (B, dim).
    """

    def __init__(self, model: SuperViT, part: Part) -> None:
        super().__init__()
        from .export import FixedSubnet, KeepTokensBlock

        arch = model.arch
        self.arch, self.part = arch, part
        if part.kind == "embed":
            fixed = FixedSubnet(model, SubnetConfig(part.tokens, (1.0,) * arch.num_stages))
            self.resize, self.patch_size = fixed.resize, fixed.patch_size
            self.patch_weight, self.patch_bias, self.patch_norm = fixed.patch_weight, fixed.patch_bias, fixed.patch_norm
            self.cls_token, self.pos_embed = fixed.cls_token, fixed.pos_embed
        elif part.kind == "block":
            self.inner = copy.deepcopy(model.blocks[0])
        elif part.kind == "prune":
            self.inner = KeepTokensBlock(copy.deepcopy(model.blocks[0]), part.keep - 1)
        elif part.kind == "head":
            self.inner = nn.Sequential(copy.deepcopy(model.norm), copy.deepcopy(model.head))
        else:
            raise ValueError(f"unknown part kind {part.kind!r}")
        self.eval()

    def example_input(self, batch_size: int, device: str | torch.device = "cpu", dtype=torch.float32) -> torch.Tensor:
        """Random input of this part's shape."""
        a, p = self.arch, self.part
        shape = {
            "embed": (batch_size, a.in_chans, a.img_size, a.img_size),
            "block": (batch_size, p.tokens, a.embed_dim),
            "prune": (batch_size, p.tokens, a.embed_dim),
            "head": (batch_size, a.embed_dim),
        }[p.kind]
        return torch.randn(shape, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.part.kind != "embed":
            return self.inner(x)
        # The same operations as FixedSubnet.forward's first two lines.
        x = self.patch_norm(patchify(self.resize(x), self.patch_weight, self.patch_bias, self.patch_size))
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed


@torch.inference_mode()
def measure_part(
    model: SuperViT,
    part: Part,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    warmup: int = 10,
    runs: int = 50,
    min_time_s: float = 0.0,
    threads: int | None = None,
    mode: str = "compiled",
) -> LatencyResult:
    """Compile one part as a deployed program is compiled and time it with `measure_latency`'s protocol.

    Args:
        model: The supernet the part's weights come from (not modified).
        part: The part.
        mode: ``compiled`` (the deployed form) or ``eager``.
        Others: as `supervit.measure_latency`.

    Raises:
        Whatever compiling raises (a caller may fall back to timing the subnet whole).
    """
    from .export import compile_module

    device = torch.device(device)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        module = PartModule(model, part).to(device=device, dtype=dtype).eval()
        x = module.example_input(batch_size, device, dtype)
        compile_s = 0.0
        program = module
        if mode == "compiled":
            # Compiled after the thread count is set: Inductor builds its CPU kernels for that many threads.
            fn, compile_s, cudagraphs = compile_module(module, x)
            program = _step(fn) if cudagraphs else fn
        elif mode != "eager":
            raise ValueError(f"latency mode must be eager or compiled, got {mode!r}")
        return time_program(program, x, warmup, runs, min_time_s, mode=mode, compile_s=compile_s)
    finally:
        torch.set_num_threads(old)


def _step(fn):
    def call(x):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(x)

    return call


@dataclass(frozen=True)
class Calibration:
    """``predicted = scale * sum_of_parts + offset_ms``, fitted on ``points`` whole programs."""

    scale: float = 1.0
    offset_ms: float = 0.0
    points: int = 0

    def __call__(self, parts_sum_ms: float) -> float:
        return self.scale * parts_sum_ms + self.offset_ms


def fit_calibration(pairs: Sequence[tuple[float, float]], min_spread: float = 0.1) -> Calibration:
    """Fit `Calibration` to ``(sum of parts, measured whole)`` pairs, in ms.

    Least squares for scale and offset when the sums spread over at least ``min_spread`` of their mean (two
    programs far apart pin both); otherwise an offset alone (the median difference). No pairs: the plain sum.
    """
    if not pairs:
        return Calibration()
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    if len(pairs) >= 2 and max(xs) - min(xs) >= min_spread * mx:
        sxx = sum((x - mx) ** 2 for x in xs)
        scale = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        if scale > 0:  # a negative slope is noise on too few points: fall back to an offset
            return Calibration(scale, my - scale * mx, len(pairs))
    return Calibration(1.0, statistics.median(y - x for x, y in pairs), len(pairs))


def predict_latency(
    arch: ArchConfig,
    subnet: SubnetConfig | None,
    part_ms: Mapping[Part, float],
    calibration: Calibration | None = None,
) -> float:
    """Predicted latency (ms) of ``subnet``'s whole program from its parts' measured medians.

    Args:
        arch: The architecture.
        subnet: The subnet (None: the full model).
        part_ms: Median latency of (at least) every part of the subnet, e.g. from `measure_part`.
        calibration: From `fit_calibration` on whole programs of the same hardware, batch, dtype and mode
            (None: the plain sum).

    Raises:
        KeyError: a part of the subnet has no measurement (a partial set is never summed short).
    """
    parts = subnet_parts(arch, subnet)
    missing = [p.name for p in parts if p not in part_ms]
    if missing:
        raise KeyError(f"no measurement of parts {', '.join(missing)}")
    total = sum(part_ms[p] for p in parts)
    return (calibration or Calibration())(total)
