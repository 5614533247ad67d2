"""Checkpoints: the project's own format, and import of timm DeiT and official SuperViT checkpoints.

Own format: one ``.safetensors`` file whose header metadata holds the architecture, the number of classes and
any caller extras as JSON, so weights and architecture travel together and nothing is unpickled.

Foreign formats are read with ``torch.load(weights_only=True)``; the official SuperViT file also stores its
training arguments as an ``argparse.Namespace``, which is the one class allowed beyond tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed

from .config import PRESETS, ArchConfig, get_arch
from .model import SuperViT

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "convert_state_dict",
    "load_pretrained",
]

FORMAT = "supervit"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def save_checkpoint(path: str | os.PathLike, model: SuperViT, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` with its architecture to ``path`` (safetensors), atomically.

    Args:
        path: Destination; conventionally ``*.safetensors``.
        model: The model to save (a DDP/compiled wrapper is unwrapped).
        extra: JSON-serialisable metadata kept beside the weights (epoch, dataset, ...).
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": json.dumps(model.arch.to_dict()),
        "num_classes": str(model.num_classes),
        "extra": json.dumps(extra or {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Architecture, class count and extras of an own-format checkpoint, without reading the weights."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a damaged header
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file, but not a SuperViT checkpoint (no '{FORMAT}' metadata)")
    try:
        return {
            "arch": ArchConfig.from_dict(json.loads(meta["arch"])),
            "num_classes": int(meta["num_classes"]),
            "extra": json.loads(meta.get("extra", "{}")),
        }
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({e})") from None


def load_checkpoint(
    path: str | os.PathLike,
    arch: ArchConfig | str | None = None,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
) -> SuperViT:
    """Build a `SuperViT` from a checkpoint file.

    Reads the project's own format (architecture from the file), a timm DeiT checkpoint or the official
    SuperViT(DeiT-S) one. For a foreign file the architecture is ``arch`` or, if None, the preset whose
    shapes match; the class count is the file's head.

    Args:
        path: Checkpoint file.
        arch: Expected architecture (config or preset name); a file of another architecture is an error.
        num_classes: Expected number of classes; None accepts the file's.
        map_location: Device for the weights.

    Raises:
        CheckpointError: missing, damaged, or of another architecture.
    """
    if isinstance(arch, str):
        try:
            arch = get_arch(arch)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    path = _existing(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file

        meta = read_checkpoint_metadata(path)
        if arch is not None and meta["arch"] != arch:
            raise CheckpointError(
                f"{path}: checkpoint of architecture {meta['arch'].name} ({_describe(meta['arch'])}), "
                f"expected {arch.name} ({_describe(arch)})"
            )
        n_cls = meta["num_classes"]
        _check_classes(path, n_cls, num_classes)
        model = SuperViT(meta["arch"], num_classes=n_cls)
        try:
            state = load_file(str(path), device=str(map_location))
        except Exception as e:
            raise CheckpointError(f"{path}: damaged weights ({e})") from None
        _load_strict(model, state, path)
        return model

    state = _torch_load(path)
    state = _unwrap_state(state, path)
    arch = arch or _infer_arch(state, path)
    head = state.get("head.weight")
    n_cls = int(head.shape[0]) if head is not None else 1000
    _check_classes(path, n_cls, num_classes)
    model = SuperViT(arch, num_classes=n_cls)
    _load_strict(model, convert_state_dict(state, model, path), path)
    return model.to(map_location)


def load_pretrained(model: SuperViT, path: str | os.PathLike) -> list[str]:
    """Initialise ``model`` from any supported checkpoint (own, timm DeiT, official SuperViT).

    The backbone must match; the classifier is taken only when its shape matches (fine-tuning to a new class
    count keeps the fresh head).

    Returns:
        Names of the parameters left as they were (the head, when its shape differs).
    """
    path = _existing(path)
    if _is_safetensors(path):
        src = load_checkpoint(path)
        if src.arch != model.arch:
            raise CheckpointError(
                f"{path}: checkpoint of architecture {src.arch.name} ({_describe(src.arch)}), "
                f"expected {model.arch.name} ({_describe(model.arch)})"
            )
        state = src.state_dict()
    else:
        state = convert_state_dict(_unwrap_state(_torch_load(path), path), model, path)
    own = model.state_dict()
    skipped = [k for k in ("head.weight", "head.bias") if k in state and k in own and state[k].shape != own[k].shape]
    for k in skipped:
        state.pop(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit the model: {_key_summary(missing, unexpected)}")
    return skipped


def convert_state_dict(state: dict[str, torch.Tensor], model: SuperViT, path: Any = "checkpoint") -> dict:
    """Map a timm DeiT or official SuperViT state dict onto ``model``'s names (pure dict -> dict).

    timm: the single 14x14 ``pos_embed`` is resampled to every grid (``resample_abs_pos_embed``).
    Official: ``pos_embed_list.{i}`` are taken as they are (smallest grid first).
    """
    arch = model.arch
    out = {k: v for k, v in state.items() if k not in ("pos_embed", "dist_token", "head_dist.weight", "head_dist.bias")}
    if "dist_token" in state:
        raise CheckpointError(f"{path}: a distilled DeiT (dist_token); use a plain DeiT checkpoint")
    if "pos_embed" in state:
        pe = state["pos_embed"]
        for i, g in enumerate(arch.grids):
            out[f"pos_embed_list.{i}"] = resample_abs_pos_embed(
                pe.float(), new_size=(g, g), num_prefix_tokens=1, verbose=False
            ).to(pe.dtype)
    else:
        found = sorted(k for k in state if k.startswith("pos_embed_list."))
        if len(found) != len(arch.grids):
            raise CheckpointError(
                f"{path}: has {len(found)} position embeddings, the architecture has {len(arch.grids)} grids"
            )
    for i, g in enumerate(arch.grids):
        pe = out.get(f"pos_embed_list.{i}")
        if pe is not None and pe.shape[1] != g * g + 1:
            raise CheckpointError(
                f"{path}: position embedding {i} has {pe.shape[1]} tokens, grid {g} needs {g * g + 1}"
            )
    return out


# ---------------------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> SuperViT:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    if not isinstance(model, SuperViT):
        raise TypeError(f"expected a SuperViT, got {type(model).__name__}")
    return model


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


def _is_safetensors(path: Path) -> bool:
    # A safetensors file starts with an 8-byte header length and then '{'; torch files are zip or pickle.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({msg})") from None


def _unwrap_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict of tensors found (expected a model, 'model' or 'state_dict')")
    # Checkpoints saved from DDP or torch.compile carry a prefix.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _infer_arch(state: dict[str, torch.Tensor], path: Path) -> ArchConfig:
    try:
        dim = state["cls_token"].shape[-1]
        proj = state["patch_embed.proj.weight"]
    except KeyError as e:
        raise CheckpointError(f"{path}: not a ViT checkpoint (no {e.args[0]})") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for arch in (p.arch for p in PRESETS.values()):
        if (arch.embed_dim, arch.depth, arch.patch_size, arch.in_chans) == (dim, depth, proj.shape[-1], proj.shape[1]):
            return arch
    raise CheckpointError(
        f"{path}: no preset has dim {dim}, depth {depth}, patch {proj.shape[-1]}, {proj.shape[1]} channels; "
        "pass the architecture explicitly"
    )


def _load_strict(model: SuperViT, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        detail = _key_summary(missing, unexpected)
        if wrong:
            detail += f"; shape mismatch: {', '.join(wrong[:3])}" + (" ..." if len(wrong) > 3 else "")
        raise CheckpointError(f"{path}: checkpoint of another architecture: {detail}")
    model.load_state_dict(state, strict=True)


def _key_summary(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
    return "; ".join(parts) or "no differences"


def _check_classes(path: Path, found: int, expected: int | None) -> None:
    if expected is not None and found != expected:
        raise CheckpointError(f"{path}: checkpoint has {found} classes, expected {expected}")


def _describe(arch: ArchConfig) -> str:
    return f"dim {arch.embed_dim}, depth {arch.depth}, patch {arch.patch_size}, grids {list(arch.grids)}"
