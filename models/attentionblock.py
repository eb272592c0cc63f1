"""Pre-norm transformer block with timm-compatible parameter names and numerics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

# What `return_attn` may ask for: nothing, every full map (True) or the class-token row only ("cls").
AttnRequest = bool | str


class Attention(nn.Module):
    """Multi-head self-attention with a fused `qkv` projection (timm's `Attention`).

    `fused_attn` (attribute, like timm's) picks F.scaled_dot_product_attention (default) or the explicit softmax
    when no maps are asked for; both give the same numbers. For a few dozen tokens on a CPU the explicit path is
    the faster one (bench.vit_speed).
    """

    def __init__(self, dim: int, num_heads: int, attn_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: Tensor, return_attn: AttnRequest = False,
                cls_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, D) -> (out (B, T, D), attn); out is (B, 1, D) when cls_only (class-token query only).

        attn is None (fused kernel), the softmax probabilities (B, heads, T, T) before attention
        dropout (return_attn=True), or the class token's row of them (B, heads, T) (return_attn="cls").
        """
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn, full_maps = None, return_attn is True
        if cls_only and not full_maps:  # only the class token's query is needed
            q = q[:, :, :1]
        if full_maps or not self.fused_attn:
            attn = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn[:, :, :1] if cls_only else attn) @ v
            if not full_maps:
                attn = attn[:, :, 0] if return_attn == "cls" else None
        else:
            p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            if return_attn == "cls":  # (B, h, 1, hd) @ (B, h, hd, T): O(T), never a T x T matrix
                attn = (q[:, :, :1] * self.scale @ k.transpose(-2, -1)).softmax(dim=-1).squeeze(2)
        x = self.proj(x.transpose(1, 2).flatten(2))
        return self.proj_drop(x), attn


class Mlp(nn.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout (timm's `Mlp`)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """x · gamma, a learned per-channel scale (CaiT / DeiT III / DINOv2; timm's `LayerScale`, key `gamma`)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class AttentionBlock(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); keys match timm's `Block`.

    Args:
        embed_dim: token width D.
        hidden_dim: MLP hidden width (typically 4·D).
        num_heads: attention heads; must divide embed_dim.
        dropout: dropout after the attention projection and in the MLP.
        attn_dropout: dropout on the attention probabilities.
        drop_path: stochastic-depth rate of both residual branches.
        init_values: LayerScale's initial gamma (ls1.gamma, ls2.gamma); None: no LayerScale (no parameters).
    """

    def __init__(self, embed_dim: int, hidden_dim: int, num_heads: int, dropout: float = 0.0,
                 *, attn_dropout: float = 0.0, drop_path: float = 0.0,
                 init_values: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attn = Attention(embed_dim, num_heads, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mlp = Mlp(embed_dim, hidden_dim, dropout)
        self.ls1, self.ls2 = ((LayerScale(embed_dim, init_values), LayerScale(embed_dim, init_values))
                              if init_values is not None else (nn.Identity(), nn.Identity()))
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, return_attn: AttnRequest = False,
                cls_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, D) -> (B, T, D) and the attention asked for (see `Attention.forward`).

        cls_only: update and return only the class token, (B, 1, D): all a classifier needs of the
        last block, at a fraction of its cost (keys and values still come from every token).
        """
        y, attn = self.attn(self.norm1(x), return_attn, cls_only)
        x = (x[:, :1] if cls_only else x) + self.drop_path(self.ls1(y))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, attn
