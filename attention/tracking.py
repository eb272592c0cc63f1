"""Attention through training: one epoch's attention statistics of fixed held-out images, and where the model
looked, epoch by epoch, as a GIF and a PNG strip of rollout overlays."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attention.inspection import attention_stats
from utils.checkpoint import atomic_write
from utils.img2attn import overlay
from utils.img_to_patch import mosaic


def track_attention(model: nn.Module, x: Tensor, *, rollout: int = 0,
                    batch_size: int = 32) -> tuple[dict[str, Any], Tensor | None]:
    """One epoch's attention tracking on a fixed held-out batch x (B, C, H, W) (`attention_stats`, eval mode, fp32,
    no RNG drawn, the mode restored) -> (metrics entries, rollout maps (rollout, gh, gw) on the CPU or None).

    The entries are plain floats and lists (JSON- and weights_only-safe): attn_distance / attn_entropy per layer
    (mean over heads), attn_distance_heads / attn_entropy_heads (layers x heads), inspect_s (its wall time).
    """
    start = time.perf_counter()
    stats = attention_stats(model, x, batch_size, rollout=rollout)
    row = {}
    for key in ("distance", "entropy"):
        values = stats[key].cpu()  # the one device sync
        row[f"attn_{key}"] = [round(v, 4) for v in values.mean(1).tolist()]
        row[f"attn_{key}_heads"] = [[round(v, 4) for v in layer] for layer in values.tolist()]
    maps = stats["rollout"].float().cpu() if rollout else None
    row["inspect_s"] = time.perf_counter() - start
    return row, maps


def save_attention_over_training(images: Tensor | np.ndarray, maps: Tensor, epochs: Sequence[int],
                                 gif_path: str | os.PathLike, png_path: str | os.PathLike | None = None, *,
                                 scale: int = 2, strip_rows: int = 8, frame_ms: int = 300, colors: int = 64) -> None:
    """Where the model looked, epoch by epoch: an animated GIF and a PNG strip of attention rollout overlays.

    images: (n, H, W) gray or (n, H, W, 3) RGB, uint8, what the model saw; maps: (E, n, gh, gw) their rollout after
    each of the E `epochs`. A frame is the n images (enlarged `scale` times) side by side, each under its map drawn
    as patch blocks (nearest: one colour per patch, which also keeps the GIF small), below the line "epoch e".
    The GIF shows every frame (the last one longer), the PNG stacks up to `strip_rows` of them (first, last and
    evenly spaced between); both in `colors` colours, without dithering, written atomically.
    """
    from PIL import Image, ImageDraw, ImageFont

    images = np.asarray(images.cpu() if isinstance(images, Tensor) else images)
    if len(maps) != len(epochs) or maps.shape[1] != len(images):
        raise ValueError(f"maps {tuple(maps.shape)} must be (E={len(epochs)}, n={len(images)}, gh, gw).")
    big = images.repeat(scale, 1).repeat(scale, 2)
    blocks = F.interpolate(torch.as_tensor(maps).float(), size=big.shape[1:3], mode="nearest")  # (E, n, H', W')
    font = ImageFont.load_default(size=12)
    frames = []
    for epoch, m in zip(epochs, blocks, strict=True):
        tiles = np.stack([overlay(img, h) for img, h in zip(big, m, strict=True)])
        strip = mosaic(tiles, cols=len(tiles), gap=2, fill=255).astype(np.uint8)
        frame = Image.new("RGB", (strip.shape[1], strip.shape[0] + 16), "white")
        frame.paste(Image.fromarray(strip), (0, 16))
        ImageDraw.Draw(frame).text((2, 1), f"epoch {epoch}", fill="black", font=font)
        frames.append(frame)

    def few_colours(im: Image.Image) -> Image.Image:
        return im.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)

    gif = [few_colours(f) for f in frames]
    durations = [frame_ms] * (len(gif) - 1) + [max(1500, frame_ms)]
    atomic_write(gif_path, lambda f: gif[0].save(f, format="GIF", save_all=True, append_images=gif[1:],
                                                        duration=durations, loop=0, optimize=True))
    if png_path is not None:
        picks = sorted({round(i) for i in np.linspace(0, len(frames) - 1, min(len(frames), strip_rows))})
        stacked = few_colours(Image.fromarray(np.concatenate([np.asarray(frames[i]) for i in picks])))
        atomic_write(png_path, lambda f: stacked.save(f, format="PNG", optimize=True))
