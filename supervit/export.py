"""Deployable forms of one subnet: a fixed module, a `torch.export` program, a compiled program.

`FixedSubnet` pins a SuperViT to one (grid, keep-rate schedule): it holds only that subnet's weights (one
position embedding), resizes its input from the dataset's resolution as the supernet does, and keeps a fixed
number of tokens per block, so its forward has no branch on the subnet and traces into one static graph.
`export_subnet` turns it into a `torch.export` program with a dynamic batch dimension; `compile_subnet` into a
`torch.compile`d callable for one device; `package_subnet` into an AOTInductor package (a shared library that
runs without Python's compiler stack). `compiled_subnet` keeps one compiled program per
(model, subnet, device, dtype, batch, threads) for the life of the process, so a subnet is compiled once.
"""

from __future__ import annotations

import copy
import os
import time
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models.vision_transformer import Block
from torch import nn

from .config import SubnetConfig
from .flops import token_counts
from .model import SuperViT, keep_block_forward, patchify

__all__ = [
    "FixedSubnet",
    "KeepTokensBlock",
    "CompiledSubnet",
    "COMPILE_MODES",
    "DEPLOY_OPTIONS",
    "compile_options",
    "compile_module",
    "export_subnet",
    "compile_subnet",
    "compiled_subnet",
    "clear_compiled_cache",
    "compiled_cache_size",
    "package_subnet",
    "load_package",
]


class KeepTokensBlock(nn.Module):
    """A timm `Block` that keeps a fixed number of patch tokens between its attention and its MLP."""

    def __init__(self, block: Block, num_keep: int) -> None:
        super().__init__()
        self.block, self.num_keep = block, num_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return keep_block_forward(self.block, x, self.num_keep)

    def extra_repr(self) -> str:
        return f"num_keep={self.num_keep}"


class FixedSubnet(nn.Module):
    """One subnet of a SuperViT as a plain module, for inference and export.

    The weights are copied (the supernet is left as it is, and a later ``.to()`` of one never moves the other);
    only the subnet's own position embedding is kept. Input: images at ``input_size`` (default the
    architecture's ``img_size``, the dataset's resolution), resized bilinearly (align_corners=True) to
    ``grid * patch`` pixels exactly as `SuperViT.forward` does. Output: logits equal to
    ``model(x, subnet)``.

    Args:
        model: The supernet.
        subnet: The subnet (None: the full model).
        input_size: Side of the images the module will be given.
    """

    def __init__(self, model: SuperViT, subnet: SubnetConfig | None = None, input_size: int | None = None) -> None:
        super().__init__()
        arch = model.arch
        subnet = model.resolve(subnet)
        self.arch, self.subnet, self.num_classes = arch, subnet, model.num_classes
        self.input_size = arch.img_size if input_size is None else int(input_size)
        size = subnet.grid * arch.patch_size
        # An input already at grid size is not resized, as in SuperViT.forward (bilinear to the same size is
        # the identity only up to rounding).
        self.resize = (
            nn.Identity()
            if self.input_size == size
            else nn.Upsample(size=(size, size), mode="bilinear", align_corners=True)
        )
        self.patch_size = arch.patch_size
        proj = model.patch_embed.proj
        self.patch_weight = nn.Parameter(proj.weight.detach().reshape(proj.weight.shape[0], -1).clone())
        self.patch_bias = None if proj.bias is None else nn.Parameter(proj.bias.detach().clone())
        self.patch_norm = copy.deepcopy(model.patch_embed.norm)
        self.cls_token = nn.Parameter(model.cls_token.detach().clone())
        self.pos_embed = nn.Parameter(model.pos_embed_list[arch.grids.index(subnet.grid)].detach().clone())
        blocks = []
        for block, (n_attn, n_mlp) in zip(copy.deepcopy(model.blocks), token_counts(arch, subnet), strict=True):
            blocks.append(block if n_mlp == n_attn else KeepTokensBlock(block, n_mlp - 1))
        self.blocks = nn.Sequential(*blocks)
        self.norm = copy.deepcopy(model.norm)
        self.head = copy.deepcopy(model.head)
        self.eval()

    @property
    def tokens(self) -> list[int]:
        """Tokens (class token included) leaving each block."""
        return [n_mlp for _, n_mlp in token_counts(self.arch, self.subnet)]

    def example_input(self, batch_size: int = 2, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Random images of the size and dtype this module takes, on its device."""
        p = self.patch_weight
        shape = (batch_size, self.arch.in_chans, self.input_size, self.input_size)
        return torch.randn(shape, device=p.device, dtype=dtype or p.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, in_chans, input_size, input_size)."""
        x = self.patch_norm(patchify(self.resize(x), self.patch_weight, self.patch_bias, self.patch_size))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        # LayerNorm is per token and only the class token reaches the head: normalising that one token gives the
        # same logits and makes the head's cost independent of how many tokens the subnet kept.
        return self.head(self.norm(self.blocks(x)[:, 0]))


def _fixed(model: SuperViT | FixedSubnet, subnet: SubnetConfig | None, input_size: int | None) -> FixedSubnet:
    """A new FixedSubnet of a supernet, or a copy of the FixedSubnet given (checked against ``subnet``)."""
    if not isinstance(model, FixedSubnet):
        return FixedSubnet(model, subnet, input_size)
    if subnet is not None and subnet.validate(model.arch) != model.subnet:
        raise ValueError(f"this FixedSubnet is {model.subnet}, not {subnet}")
    if input_size is not None and input_size != model.input_size:
        raise ValueError(f"this FixedSubnet takes {model.input_size}-pixel images, not {input_size}")
    return copy.deepcopy(model)


def export_subnet(
    model: SuperViT | FixedSubnet,
    subnet: SubnetConfig | None = None,
    *,
    input_size: int | None = None,
    example_batch: int = 2,
    max_batch: int | None = None,
) -> torch.export.ExportedProgram:
    """A `torch.export` program of one subnet that accepts any batch size from 1 (to ``max_batch``).

    The batch dimension is an explicit ``Dim(min=1)`` and the example has ``example_batch`` >= 2 images: an
    example batch of 1 would specialise the program to batch 1 (see STACK_NOTES). Height and width are static
    (``input_size``). Run it with ``program.module()(x)``.
    """
    if example_batch < 2:
        raise ValueError("example_batch must be at least 2 (a batch of 1 specialises the batch dimension)")
    fixed = _fixed(model, subnet, input_size)
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(fixed, (fixed.example_input(example_batch),), dynamic_shapes={"x": {0: batch}})


# ------------------------------------------------------------------------------------------- compiled forms

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Inductor settings of every deployed program. Freezing turns the weights into constants, so Inductor folds
# them and, on CPU, prepacks each linear layer's weight once for MKL's packed GEMM: MKL's unpacked sgemm runs
# the few-dozen-row products of a pruned DeiT-S at batch 1 2.5-3.5x slower (measured on 2 Xeon threads,
# 384 x 1536 weights: 27 rows 27 against 95 GMAC/s, 51 rows 44 against 112), which is where the eager pruned
# path lost most of its time. The size and alignment asserts re-check a static graph on every forward.
DEPLOY_OPTIONS: dict = {"freezing": True, "size_asserts": False, "alignment_asserts": False}


def compile_options(
    device: str | torch.device, mode: str | None = None, options: dict | None = None
) -> tuple[str, dict]:
    """The ``(mode, inductor options)`` a deployed program is compiled with on ``device``.

    Mode default: ``reduce-overhead`` on CUDA (CUDA graphs: at small batches a forward is a few hundred short
    kernels, and their launches, not their arithmetic, set the latency), ``default`` elsewhere. The mode's own
    options (`torch._inductor.list_mode_options`) come first, then `DEPLOY_OPTIONS` (plus the C++ wrapper on
    CPU), then ``options``.
    """
    device = torch.device(device)
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    # On CPU the wrapper that calls the kernels is generated as C++, not Python: the Python wrapper's calls
    # were a quarter of `tiny`'s batch-1 time. (On CUDA, CUDA graphs replay without any wrapper.)
    device_options = {"cpp_wrapper": True} if device.type == "cpu" else {}
    return mode, {**torch._inductor.list_mode_options(mode), **DEPLOY_OPTIONS, **device_options, **(options or {})}


class _Program(nn.Module):
    """The top-level module a compile traces: a thin wrapper around the module to compile."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _program(module: nn.Module) -> _Program:
    """`_Program` of ``module`` whose ``forward`` has a code object of its own.

    Dynamo keeps its compiled variants on the code object of the frame it compiles. Were every subnet compiled
    through one shared ``forward``, each new program would pile another guarded variant onto it: past 8,
    Dynamo refuses (its recompile limit), and below that every call first checks the guards of the
    variants before its own.
    """
    f = _Program.forward
    forward = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return type("_Program", (_Program,), {"forward": forward, "__module__": __name__})(module)


def compile_module(
    module: nn.Module,
    example: torch.Tensor,
    *,
    mode: str | None = None,
    options: dict | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], float, bool]:
    """Compile an inference module for inputs shaped like ``example`` (static shapes) and run it once.

    The module must already be on the example's device and dtype, in eval mode, and must not change
    afterwards: its weights are frozen into the program, so no guard checks them on each call (only the
    input's shape, dtype and device are checked). Returns ``(fn, compile_s, cudagraphs)``: the compiled
    callable, the wall time of the compile and first call, and whether it replays CUDA graphs (then call
    `torch.compiler.cudagraph_mark_step_begin` before each call; `CompiledSubnet` does).
    """
    import torch._inductor.config as inductor_config

    mode, opts = compile_options(example.device, mode, options)
    cudagraphs = example.device.type == "cuda" and bool(opts.get("triton.cudagraphs"))
    opts = {**opts, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    fn = torch.compile(_program(module), fullgraph=True, dynamic=False, options=opts)
    t0 = time.perf_counter()
    # Freezing applies only to graphs compiled without autograd, and only when set in the config around the
    # compile itself: torch.compile's ``options`` do not reach the check (the graph is compiled unfrozen).
    with torch.inference_mode(), inductor_config.patch(freezing=bool(opts.get("freezing"))):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        fn(example)
        if example.device.type == "cuda":
            torch.cuda.synchronize(example.device)
    return fn, time.perf_counter() - t0, cudagraphs


@dataclass
class CompiledSubnet:
    """A compiled fixed subnet and what compiling it cost.

    Call it like a module: ``compiled(x)``. ``compile_s`` is the wall time of the first call (graph capture,
    Inductor code generation and the C++/Triton builds, plus one forward), never counted as latency.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    module: FixedSubnet
    device: str
    dtype: str
    batch_size: int
    mode: str
    compile_s: float
    cudagraphs: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cudagraphs:
            # Each call is a new step: the CUDA-graph runtime may reuse the previous call's output buffers.
            torch.compiler.cudagraph_mark_step_begin()
        # Compiled under inference mode: a call with autograd on would fail the program's guard on the grad mode
        # and compile it again, slowly and without frozen weights.
        with torch.inference_mode():
            return self.fn(x)


def compile_subnet(
    model: SuperViT | FixedSubnet,
    subnet: SubnetConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    mode: str | None = None,
    input_size: int | None = None,
    options: dict | None = None,
) -> CompiledSubnet:
    """Compile one subnet for inference at ``batch_size`` on ``device`` and run it once (the compile).

    Args:
        model: A supernet (with ``subnet``) or a `FixedSubnet`; it is not modified.
        subnet: The subnet (None: the full model, or the FixedSubnet's own).
        device: Target device.
        dtype: Weights and input dtype.
        batch_size: The batch the program is specialised to (static shapes: packed GEMMs, fixed tiles).
        mode: A `torch.compile` mode (`COMPILE_MODES`); None picks per device (see `compile_options`).
        input_size: Side of the input images (default the architecture's ``img_size``).
        options: Inductor options over `DEPLOY_OPTIONS` (e.g. ``{"cpp_wrapper": True}``).
    """
    device = torch.device(device)
    mode = compile_options(device, mode)[0]
    fixed = _fixed(model, subnet, input_size).to(device=device, dtype=dtype).eval()
    fn, compile_s, cudagraphs = compile_module(fixed, fixed.example_input(batch_size), mode=mode, options=options)
    return CompiledSubnet(
        fn, fixed, device.type, str(dtype).removeprefix("torch."), batch_size, mode, compile_s, cudagraphs
    )


# One compiled program per (model, subnet, device, dtype, batch, threads, mode) for the life of the process.
# Keyed weakly on the supernet, so a cache entry never outlives (or serves other weights than) its model.
_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, CompiledSubnet]] = weakref.WeakKeyDictionary()
_CACHE_SIZE = [int(os.environ.get("SUPERVIT_COMPILED_CACHE", "8"))]


def compiled_cache_size(size: int | None = None) -> int:
    """Programs kept per model by `compiled_subnet` (set it with ``size``); returns the current value."""
    if size is not None:
        if size < 1:
            raise ValueError(f"the compiled-program cache holds at least 1 program, not {size}")
        _CACHE_SIZE[0] = size
    return _CACHE_SIZE[0]


def compiled_subnet(
    model: SuperViT,
    subnet: SubnetConfig | None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    mode: str | None = None,
    input_size: int | None = None,
    options: dict | None = None,
) -> tuple[CompiledSubnet, bool]:
    """`compile_subnet`, cached per process; returns ``(compiled, from_cache)``.

    The key includes the CPU thread count, which Inductor bakes into its C++ kernels, and the weights' version
    (a model trained or reloaded since is compiled again). The cache holds the `compiled_cache_size` (default 8,
    or ``SUPERVIT_COMPILED_CACHE``) most recently used programs per model: each holds a copy of the weights.
    """
    device = torch.device(device)
    subnet = model.resolve(subnet)
    mode = compile_options(device, mode)[0]
    input_size = model.arch.img_size if input_size is None else input_size
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    # Every in-place change of a parameter (an optimizer step, load_state_dict) bumps its version: a program
    # compiled from older weights is not served for the new ones.
    weights = sum(p._version for p in model.parameters())
    key = (
        subnet,
        str(device),
        dtype,
        batch_size,
        threads,
        mode,
        input_size,
        tuple(sorted((options or {}).items())),
        weights,
    )
    per_model = _CACHE.setdefault(model, OrderedDict())
    if key in per_model:
        per_model.move_to_end(key)
        return per_model[key], True
    compiled = compile_subnet(
        model,
        subnet,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        mode=mode,
        input_size=input_size,
        options=options,
    )
    per_model[key] = compiled
    while len(per_model) > _CACHE_SIZE[0]:
        per_model.popitem(last=False)
    return compiled, False


def clear_compiled_cache() -> None:
    """Drop every cached compiled program (and the compiler's own caches of their graphs)."""
    _CACHE.clear()
    torch._dynamo.reset()


def package_subnet(
    model: SuperViT | FixedSubnet,
    subnet: SubnetConfig | None,
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    input_size: int | None = None,
    batch_size: int | None = None,
    options: dict | None = None,
) -> Path:
    """Export one subnet and compile it ahead of time with AOTInductor into ``path``.

    ``batch_size`` None: any batch (a dynamic batch dimension); else that batch only (static shapes, as
    `compile_subnet` compiles). ``options``: Inductor settings of the compile (e.g. ``{"freezing": True}``). The
    package (``*.pt2``) loads with `load_package` in a process that has torch but compiles nothing.
    """
    device = torch.device(device)
    fixed = _fixed(model, subnet, input_size).to(device=device, dtype=dtype).eval()
    if batch_size is None:
        program = export_subnet(fixed)
    else:
        with torch.no_grad():
            program = torch.export.export(fixed, (fixed.example_input(batch_size),))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        return Path(
            torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options or {})
        )


def load_package(path: str | os.PathLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load a `package_subnet` package as a callable ``f(x) -> logits``."""
    runner = torch._inductor.aoti_load_package(str(path))
    return lambda x: runner(x)
