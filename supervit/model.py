"""The SuperViT model: one ViT that runs at several token grids and keeps the most attended tokens.

Built from timm's `Block` and `PatchEmbed`. Everything the paper adds sits in three small pieces:
`class_token_attention` (the class token's attention row, computed next to the fused attention),
`keep_tokens` (top-k gather) and `pruning_block_forward` (a timm `Block` forward with token keeping between
its attention and its MLP). A subnet is passed to `forward`; the model holds no "active subnet" state.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from .config import ArchConfig, SubnetConfig, keep_count

__all__ = [
    "SuperViT",
    "keep_tokens",
    "keep_block_forward",
    "pruning_block_forward",
    "attention_with_class_row",
    "patchify",
    "sincos_pos_embed",
]


def attention_with_class_row(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm `Attention` forward that also returns the class token's attention row, averaged over heads.

    The output uses fused `scaled_dot_product_attention` exactly as timm does; the class row costs one
    (1 x N) product per head instead of the full N x N matrix.

    Returns:
        ``(out, cls_attn)`` with ``out`` of shape (B, N, C) and ``cls_attn`` (B, N - 1): the attention the
        class token pays to each patch token.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    # Only the ranking is used, so no gradient flows through the scores.
    with torch.no_grad():
        scores = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # B, H, 1, N
        cls_attn = scores.float().softmax(dim=-1).mean(dim=1)[:, 0, 1:]
    return out, cls_attn


def keep_tokens(x: torch.Tensor, cls_attn: torch.Tensor, num_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the class token and the ``num_keep`` patch tokens with the highest class attention.

    Args:
        x: Tokens (B, N, C), class token first.
        cls_attn: Class-token attention to the patch tokens (B, N - 1).
        num_keep: Patch tokens to keep.

    Returns:
        ``(kept, keep_indices)``: kept tokens (B, 1 + num_keep, C), class token first, patch tokens in
        descending attention; and their indices into ``x`` (B, num_keep).
    """
    idx = cls_attn.topk(num_keep, dim=1, largest=True, sorted=True).indices + 1
    # One gather that also takes the class token (index 0): no second copy of the kept tokens by `cat`.
    rows = torch.cat([idx.new_zeros(idx.shape[0], 1), idx], dim=1)
    return torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1])), idx


def keep_block_forward(block: Block, x: torch.Tensor, num_keep: int) -> torch.Tensor:
    """A timm `Block` forward that keeps ``num_keep`` patch tokens between its attention and its MLP."""
    attn_out, cls_attn = attention_with_class_row(block.attn, block.norm1(x))
    x = x + block.drop_path1(block.ls1(attn_out))
    x, _ = keep_tokens(x, cls_attn, num_keep)
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def pruning_block_forward(block: Block, x: torch.Tensor, rate: float) -> torch.Tensor:
    """A timm `Block` forward that keeps ``keep_count(N, rate)`` patch tokens between attention and MLP."""
    num_keep = keep_count(x.shape[1], rate)
    if num_keep >= x.shape[1] - 1:
        return block(x)
    return keep_block_forward(block, x, num_keep)


def patchify(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, patch: int) -> torch.Tensor:
    """Non-overlapping ``patch`` x ``patch`` patches of ``x`` (B, C, H, W) through one matrix product.

    ``weight`` is the patch convolution's weight flattened to (dim, C * patch * patch); returns (B, N, dim).
    """
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return F.linear(x.reshape(B, (H // patch) * (W // patch), C * patch * patch), weight, bias)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """2D sin-cos position table (MAE), (1, 1 + grid * grid, dim), zeros for the class token."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        angle = pos[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat(parts, dim=1)]).float()[None]


class SuperViT(nn.Module):
    """A Vision Transformer that serves every (token grid, keep-rate schedule) of its `ArchConfig`.

    Parameter names follow timm's ViT, with one position embedding per grid as ``pos_embed_list.{i}``
    (smallest grid first), so the official SuperViT(DeiT-S) checkpoint loads as it is.

    Args:
        arch: The architecture.
        num_classes: Classifier outputs.
        drop_rate: Dropout after the position embedding.
        drop_path_rate: Stochastic depth, rising linearly to this value over the blocks.
        pos_embed_init: ``trunc_normal`` (timm's DeiT) or ``sincos`` (fixed 2D sin-cos values as the starting
            point of the learned embeddings; trains markedly faster from scratch on small data).
    """

    def __init__(
        self,
        arch: ArchConfig,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pos_embed_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if pos_embed_init not in ("trunc_normal", "sincos"):
            raise ValueError(f"pos_embed_init must be trunc_normal or sincos, got {pos_embed_init!r}")
        self.pos_embed_init = pos_embed_init
        self.arch = arch
        self.num_classes = num_classes
        dim = arch.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        # img_size=None: the grid is chosen per forward, so PatchEmbed must not fix the input size.
        self.patch_embed = PatchEmbed(img_size=None, patch_size=arch.patch_size, in_chans=arch.in_chans, embed_dim=dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed_list = nn.ParameterList([nn.Parameter(torch.zeros(1, g * g + 1, dim)) for g in arch.grids])
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, arch.depth).tolist()
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=dim,
                    num_heads=arch.num_heads,
                    mlp_ratio=arch.mlp_ratio,
                    qkv_bias=arch.qkv_bias,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                )
                for i in range(arch.depth)
            ]
        )
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._grid_index = {g: i for i, g in enumerate(arch.grids)}
        self._stage_of_block = {b: s for s, b in enumerate(arch.prune_blocks)}
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT initialisation."""
        for pe, grid in zip(self.pos_embed_list, self.arch.grids, strict=True):
            if self.pos_embed_init == "sincos":
                with torch.no_grad():
                    pe.copy_(sincos_pos_embed(self.arch.embed_dim, grid))
            else:
                trunc_normal_(pe, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for name, module in self.named_modules():
            if module is not self:
                init_weights_vit_timm(module, name)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay (timm's convention)."""
        return {"cls_token"} | {f"pos_embed_list.{i}" for i in range(len(self.pos_embed_list))}

    def resolve(self, subnet: SubnetConfig | None) -> SubnetConfig:
        """The validated subnet with one rate per stage; None means the full model."""
        return self.arch.largest if subnet is None else subnet.validate(self.arch)

    def forward_features(self, x: torch.Tensor, subnet: SubnetConfig | None = None) -> torch.Tensor:
        """Tokens after the final norm: (B, 1 + kept, C)."""
        subnet = self.resolve(subnet)
        size = subnet.grid * self.arch.patch_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)
        x = self._patchify(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed_list[self._grid_index[subnet.grid]])
        for i, block in enumerate(self.blocks):
            stage = self._stage_of_block.get(i)
            if stage is None or subnet.keep_rates[stage] >= 1.0:
                x = block(x)
            else:
                x = pruning_block_forward(block, x, subnet.keep_rates[stage])
        return self.norm(x)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """The patch embedding as one matrix product over non-overlapping patches.

        Same weights and result as ``self.patch_embed`` (a stride-p conv), but cuDNN runs that conv as a slow
        implicit GEMM in bf16 (a sixth of DeiT-S's time at batch 256 on an H200); a plain GEMM does not.
        """
        proj = self.patch_embed.proj
        weight = proj.weight.reshape(proj.weight.shape[0], -1)
        return self.patch_embed.norm(patchify(x, weight, proj.bias, self.arch.patch_size))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token logits."""
        return self.head(x[:, 0])

    def forward(self, x: torch.Tensor, subnet: SubnetConfig | None = None) -> torch.Tensor:
        """Logits of ``subnet`` (None: largest grid, every token kept)."""
        return self.forward_head(self.forward_features(x, subnet))
