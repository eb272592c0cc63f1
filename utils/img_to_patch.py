"""Images <-> patches, in the row-major patch order of `VisionTransformer` (token i+1 is patch i); tiles -> one
image (`mosaic`)."""

from __future__ import annotations

import numpy as np
from torch import Tensor


def img_to_patch(x: Tensor, patch_size: int, flatten_channels: bool = True) -> Tensor:
    """x: (B, C, H, W) -> (B, N, C·p·p), or (B, N, C, p, p) when flatten_channels=False.

    N = (H/p)·(W/p); patch n covers rows (n // (W/p))·p... and columns (n % (W/p))·p...; each patch is
    flattened as (C, p, p), the layout of the patch-embedding convolution's weight.
    """
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch_size={p}.")
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).flatten(1, 2)  # (B, N, C, p, p)
    return x.flatten(2) if flatten_channels else x


def patch_to_img(x: Tensor, grid: tuple[int, int], patch_size: int = 1) -> Tensor:
    """Inverse of `img_to_patch` on a (grid_h, grid_w) patch grid.

    x: (B, N, C·p·p) or (B, N, C, p, p) -> (B, C, grid_h·p, grid_w·p);
    x: (B, N) (one score per patch) -> (B, grid_h, grid_w).
    """
    gh, gw = grid
    B, N = x.shape[:2]
    if N != gh * gw:
        raise ValueError(f"{N} patches do not fill a {gh}x{gw} grid ({gh * gw} patches).")
    if x.dim() == 2:
        return x.reshape(B, gh, gw)
    p = patch_size
    x = x.reshape(B, gh, gw, -1, p, p)  # (B, gh, gw, C, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, x.shape[3], gh * p, gw * p)


def mosaic(tiles: np.ndarray, cols: int, gap: int = 1, fill: float = np.nan) -> np.ndarray:
    """tiles (n, h, w) or (n, h, w, 3) -> one float32 image of ceil(n / cols) rows x cols tiles, `gap` pixels of
    `fill` between them."""
    n, h, w = tiles.shape[:3]
    rows = -(-n // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, *tiles.shape[3:]), fill, dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return out
