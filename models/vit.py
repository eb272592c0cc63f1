"""Vision Transformer (Dosovitskiy et al. 2021) whose forward can return every layer's attention.

Parameter names and numerics are those of timm's `VisionTransformer` (class-token pooling, LayerNorm
eps 1e-6, exact GELU, fused qkv), so timm / DeiT checkpoints load with `strict=True`; with timm's options
init_values (LayerScale), reg_tokens and no_embed_class, so do DeiT III and DINOv2 (with or without registers).
pos_embed_interp picks how the position table is resampled to another grid: timm's rule or DINO / DINOv2's.
Token order: class token, R register tokens, then the N patches (row-major).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attentionblock import AttentionBlock, AttnRequest
from utils.img_to_patch import img_to_patch

# How the patch part of the position table is resampled to another grid (bicubic in each case):
#   "timm": to the output size, antialiased (timm's resample_abs_pos_embed, dynamic_img_size).
#   "dino", "dinov2": by the scale factor (g + 0.1) / g0 per side, no antialiasing, as the official
#       interpolate_pos_encoding of DINO (vision_transformer.py) and of DINOv2's torch.hub models
#       (hub/backbones.py: interpolate_offset=0.1, interpolate_antialias=False); the 0.1 moves the sample points.
POS_EMBED_INTERP = ("timm", "dino", "dinov2")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class VisionTransformer(nn.Module):
    """ViT classifier.

    Args:
        embed_dim: token width D; must be divisible by num_heads (nothing else is required).
        hidden_dim: MLP hidden width, typically 4·D.
        num_heads: attention heads.
        num_layers: transformer blocks.
        patch_size: side p of the square patches; image sides must be multiples of it.
        num_channels: input channels C (1 for MNIST, 3 for RGB).
        num_patches: patches of a training image, (H/p)·(W/p); sets the position-embedding grid.
        num_classes: outputs of the head; 0 means no head (forward returns class-token features).
        dropout: dropout after the position embedding, attention projection, MLP and before the head.
        grid_size: (grid_h, grid_w) of the position embedding for non-square training images;
            default: a square grid of num_patches.
        attn_dropout: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, rising linearly from 0 to this value over the blocks.
        init_values: LayerScale (ls1.gamma, ls2.gamma in every block) with this initial value; None: none.
        reg_tokens: R register tokens (Darcet et al. 2024), `reg_token` (1, R, D), after the class token.
        no_embed_class: the position embedding covers the patches only, (1, N, D), and is added before the
            class / register tokens are prepended (DeiT III, timm's DINOv2 with registers); default (1, 1+R+N, D).
        pos_embed_interp: how the position table is resampled for another input grid, one of POS_EMBED_INTERP:
            "timm" (default) or the official rule of "dino" / "dinov2" (the same formula).
    """

    def __init__(self, embed_dim: int, hidden_dim: int, num_heads: int, num_layers: int, patch_size: int,
                 num_channels: int, num_patches: int, num_classes: int, dropout: float = 0.0, *,
                 grid_size: tuple[int, int] | None = None, attn_dropout: float = 0.0,
                 drop_path_rate: float = 0.0, init_values: float | None = None, reg_tokens: int = 0,
                 no_embed_class: bool = False, pos_embed_interp: str = "timm"):
        super().__init__()
        sizes = dict(embed_dim=embed_dim, hidden_dim=hidden_dim, num_heads=num_heads, num_layers=num_layers,
                     patch_size=patch_size, num_channels=num_channels, num_patches=num_patches)
        for name, value in sizes.items():
            _check(isinstance(value, int) and value > 0, f"{name}={value!r} must be a positive integer.")
        _check(isinstance(num_classes, int) and num_classes >= 0,
               f"num_classes={num_classes!r} must be a non-negative integer (0 = no head, return features).")
        _check(embed_dim % num_heads == 0,
               f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; pick num_heads among the "
               f"divisors of embed_dim (e.g. embed_dim // 64).")
        _check(isinstance(reg_tokens, int) and reg_tokens >= 0,
               f"reg_tokens={reg_tokens!r} must be a non-negative integer.")
        _check(pos_embed_interp in POS_EMBED_INTERP,
               f"pos_embed_interp={pos_embed_interp!r} must be one of {', '.join(POS_EMBED_INTERP)}.")
        for name, p in dict(dropout=dropout, attn_dropout=attn_dropout, drop_path_rate=drop_path_rate).items():
            _check(0.0 <= p < 1.0, f"{name}={p!r} must be in [0, 1).")
        if grid_size is None:
            side = math.isqrt(num_patches)
            _check(side * side == num_patches,
                   f"num_patches={num_patches} is not a square number; pass grid_size=(H/patch_size, "
                   f"W/patch_size) for non-square training images.")
            grid_size = (side, side)
        grid_size = tuple(grid_size)
        _check(len(grid_size) == 2 and grid_size[0] * grid_size[1] == num_patches,
               f"grid_size={grid_size} does not hold num_patches={num_patches} patches; "
               f"num_patches must equal grid_h * grid_w.")

        self.patch_size, self.grid_size, self.num_heads = patch_size, grid_size, num_heads
        self.num_prefix_tokens, self.no_embed_class = 1 + reg_tokens, no_embed_class  # class + register tokens
        self.pos_embed_interp = pos_embed_interp
        # Constructor arguments as plain values: what a checkpoint needs to rebuild this model (the newer
        # options only when set, so the configs of earlier checkpoints stay equal).
        options = dict(init_values=init_values, reg_tokens=reg_tokens, no_embed_class=no_embed_class,
                       pos_embed_interp=pos_embed_interp)
        self.config = dict(sizes, num_classes=num_classes, dropout=dropout, grid_size=list(grid_size),
                           attn_dropout=attn_dropout, drop_path_rate=drop_path_rate,
                           **{k: v for k, v in options.items() if v not in (None, 0, False, "timm")})
        self.patch_embed = nn.Module()  # timm's key names: patch_embed.proj.{weight,bias}
        self.patch_embed.proj = nn.Conv2d(num_channels, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + (0 if no_embed_class else 1 + reg_tokens),
                                                  embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        rates = torch.linspace(0, drop_path_rate, num_layers, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList(
            AttentionBlock(embed_dim, hidden_dim, num_heads, dropout, attn_dropout=attn_dropout, drop_path=r,
                           init_values=init_values)
            for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm / DeiT init: trunc-normal(0.02) position embedding and Linear weights, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(grid_h, grid_w) of the patches of an image of height x width pixels."""
        p = self.patch_size
        _check(height % p == 0 and width % p == 0,
               f"image size {height}x{width} is not a multiple of patch_size={p}; resize or crop it to "
               f"{height // p * p}x{width // p * p} or {-(-height // p) * p}x{-(-width // p) * p}.")
        return height // p, width // p

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(1, 1 + R + gh·gw, D), or (1, gh·gw, D) when no_embed_class: the learned table, its patch part
        resampled by the rule `pos_embed_interp` (see POS_EMBED_INTERP) when `grid` differs from the training grid."""
        if grid == self.grid_size:
            return self.pos_embed
        k = 0 if self.no_embed_class else self.num_prefix_tokens
        cls_pos, patch_pos = self.pos_embed[:, :k], self.pos_embed[:, k:]
        compute = torch.promote_types(patch_pos.dtype, torch.float32)  # float32 for half / bfloat16 weights
        patch_pos = patch_pos.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2).to(compute)
        if self.pos_embed_interp == "timm":
            patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", antialias=True)
        else:  # the output size is floor(g0 · (g + 0.1) / g0) = g; the scale factor sets the sample points
            scale = tuple((g + 0.1) / g0 for g, g0 in zip(grid, self.grid_size, strict=True))
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic")
        patch_pos = patch_pos.to(self.pos_embed.dtype).flatten(2).transpose(1, 2)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward_features(self, x: Tensor, return_attn: AttnRequest = False,
                         cls_only: bool = False) -> tuple[Tensor, list[Tensor]]:
        """x: (B, C, H, W) -> normed tokens (B, 1 + R + N, D) and the per-layer attention asked for.

        cls_only: the last block updates only the class token, the only one the head reads, so the tokens
        are (B, 1, D); the logits and every attention map are the same, the last block is ~T times cheaper.
        """
        c = self.patch_embed.proj.in_channels
        _check(x.dim() == 4 and x.shape[1] == c,
               f"input of shape {tuple(x.shape)} is not a batch (B, {c}, H, W) of {c}-channel images; "
               + ("add the batch dimension (x[None])." if x.dim() == 3 else f"give {c}-channel images "
                  f"({'convert gray to RGB' if c == 3 else 'convert to gray' if c == 1 else 'change the channels'})."))
        grid = self.patch_grid(x.shape[-2], x.shape[-1])
        w = self.patch_embed.proj.weight  # the Conv2d's weights, applied as one matmul (faster backward on a CPU)
        x = F.linear(img_to_patch(x, self.patch_size), w.flatten(1), self.patch_embed.proj.bias)  # (B, N, D)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pos = self.position_embedding(grid)
        x = torch.cat(prefix + [x + pos], dim=1) if self.no_embed_class else torch.cat(prefix + [x], dim=1) + pos
        x = self.pos_drop(x)
        attns = []
        for i, block in enumerate(self.blocks):
            x, attn = block(x, return_attn, cls_only and i == len(self.blocks) - 1)
            if attn is not None:
                attns.append(attn)
        return self.norm(x), attns

    def forward(self, x: Tensor, return_attn: AttnRequest = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """x: (B, C, H, W) -> logits (B, num_classes) (or features (B, D) when num_classes=0).

        return_attn=True also returns a list of num_layers tensors (B, heads, T, T), T = P + N with
        P = num_prefix_tokens = 1 + R: the softmax attention of every layer (explicit path).
        return_attn="cls" returns (B, heads, T): the class token's row only, computed beside the fused
        kernel. Token 0 is the class token, tokens 1..R the registers (not places in the image).
        """
        if return_attn not in (False, True, "cls"):
            raise ValueError(f"return_attn={return_attn!r} must be False, True or 'cls'.")
        tokens, attns = self.forward_features(x, return_attn, cls_only=True)
        logits = self.forward_head(tokens)
        return (logits, attns) if return_attn else logits

    def forward_head(self, tokens: Tensor) -> Tensor:
        """tokens: (B, T, D) from forward_features -> logits (B, num_classes) of the class token (timm's name)."""
        return self.head(self.head_drop(tokens[:, 0]))
