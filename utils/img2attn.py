"""Where a ViT looks: class-token attention, attention rollout and gradient rollout, batched and any-size;
overlays and a summary figure; deletion / insertion scores of how faithful a map is.

`attn` below is what `model(x, return_attn=True)` returns: a list of num_layers tensors (B, heads, T, T) of
softmax probabilities, T = 1 + N, token 0 the class token, then the N patches in row-major order on a
(grid_h, grid_w) grid (`model.patch_grid(H, W)`). Every map comes back as (B, grid_h, grid_w); `grid`
omitted means a square grid. Rows stay rows: a map's [i, j] is the patch at rows i·p.., columns j·p...
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from utils.img_to_patch import patch_to_img

HEAD_FUSIONS = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}


def _patch_map(scores: Tensor, grid: tuple[int, int] | None) -> Tensor:
    """scores: (B, N) per patch -> (B, grid_h, grid_w); grid None: square."""
    if grid is None:
        side = math.isqrt(scores.shape[1])
        if side * side != scores.shape[1]:
            raise ValueError(f"{scores.shape[1]} patches do not make a square grid; pass grid=model.patch_grid(H, W).")
        grid = (side, side)
    return patch_to_img(scores, tuple(grid))


def _cls_row(mats: Sequence[Tensor]) -> Tensor:
    """Class-token row of mats[-1] @ ... @ mats[0] (layer 0 acts first): mats (B, T, T) -> (B, T)."""
    row = mats[-1][:, :1]
    for m in reversed(mats[:-1]):
        row = row @ m
    return row[:, 0]


def _check_layers(attn: Sequence[Tensor], start_layer: int) -> None:
    if not 0 <= start_layer < len(attn):
        raise ValueError(f"start_layer={start_layer} must be in [0, {len(attn) - 1}] for {len(attn)} layers.")


def cls_attention(attn: Sequence[Tensor], layer: int = -1, head: int | None = None,
                  grid: tuple[int, int] | None = None) -> Tensor:
    """The class token's attention to every patch in one layer -> (B, grid_h, grid_w).

    attn: full maps (B, heads, T, T) per layer, or the class-token rows (B, heads, T) of return_attn="cls".
    head: one head's map; None averages the heads.
    """
    a = attn[layer]
    a = a[:, :, 0] if a.dim() == 4 else a  # (B, heads, T)
    a = a.mean(1) if head is None else a[:, head]
    return _patch_map(a[:, 1:], grid)


def attention_rollout(attn: Sequence[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                      start_layer: int = 0, grid: tuple[int, int] | None = None) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) -> (B, grid_h, grid_w), the class-token row over the patches.

    attn: full maps, list of (B, heads, T, T). Per layer l >= start_layer:
      1. fuse the heads: A = mean / max / min over heads -> (B, T, T);
      2. discard: in every row, of the N entries in the patch columns 1..N, the floor(discard_ratio·N)
         smallest are set to 0. Column 0 (attention to the class token, which holds the class token's own
         diagonal entry) is never touched;
      3. Â = (A + I) / row sums: every row sums to 1 (also for max / min fusion and after discarding).
    Rollout = Â_L-1 @ ... @ Â_start_layer; its class-token row, columns 1..N, is the map (not rescaled).
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion={head_fusion!r} must be one of {sorted(HEAD_FUSIONS)}.")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio={discard_ratio!r} must be in [0, 1).")
    _check_layers(attn, start_layer)
    mats = []
    for a in attn[start_layer:]:
        if a.dim() != 4:
            raise ValueError("attention_rollout needs the full maps of model(x, return_attn=True), not 'cls' rows.")
        a = HEAD_FUSIONS[head_fusion](a)  # (B, T, T)
        cls_col, patches = a[..., :1], a[..., 1:]
        k = math.floor(discard_ratio * patches.shape[-1] + 1e-9)  # the epsilon absorbs float error in ratio·N
        if k:
            patches = patches.scatter(-1, patches.topk(k, dim=-1, largest=False).indices, 0.0)
        a = torch.cat([cls_col, patches], dim=-1) + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        mats.append(a / a.sum(-1, keepdim=True))
    return _patch_map(_cls_row(mats)[:, 1:], grid)


def _targets(target: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """A class per image, int or (B,) -> (B,) long."""
    target = torch.as_tensor(target, device=device).long()
    return target.expand(batch) if target.dim() == 0 else target


def gradient_rollout(model: nn.Module, x: Tensor, target: int | Tensor | None = None,
                     start_layer: int = 0) -> Tensor:
    """Class-specific rollout of Chefer, Gur & Wolf, ICCV 2021 ("Generic Attention-model Explainability").

    x: (B, C, H, W) -> (B, grid_h, grid_w) on model.patch_grid(H, W). target: class per image, int or (B,)
    (default: the predicted class). R = I; per layer l >= start_layer: Ā = mean over heads of
    clamp(∂y_t/∂A ⊙ A, min=0), R <- R + Ā R; the map is R's class-token row over the patches.
    One backward pass for the batch (images are independent in eval mode, so the gradient of the summed target
    logits is each image's own); runs in eval mode, then restores the mode; parameters' .grad are untouched.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # x as a leaf puts the attention in a graph even with frozen parameters
            logits, attn = model(x.detach().requires_grad_(), return_attn=True)
            _check_layers(attn, start_layer)
            t = logits.argmax(-1) if target is None else _targets(target, len(x), x.device)
            y = logits.gather(1, t[:, None]).sum()
            grads = torch.autograd.grad(y, attn[start_layer:])
    finally:
        model.train(was_training)
    eye = torch.eye(attn[0].shape[-1], dtype=attn[0].dtype, device=x.device)
    mats = [eye + (g * a.detach()).clamp(min=0).mean(1) for g, a in zip(grads, attn[start_layer:], strict=True)]
    return _patch_map(_cls_row(mats)[:, 1:], model.patch_grid(*x.shape[-2:]))


# ----------------------------------------------------------------------------------------------- rendering


def upsample(heatmap: Tensor, size: tuple[int, int]) -> Tensor:
    """heatmap: (B, gh, gw) (or (gh, gw)) -> (B, H, W) (or (H, W)), bilinear, each image min-max scaled to [0, 1].

    A constant map becomes all zeros.
    """
    h = torch.as_tensor(heatmap).float()
    squeeze = h.dim() == 2
    h = F.interpolate(h.reshape(-1, 1, *h.shape[-2:]), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = h.amin((1, 2), keepdim=True), h.amax((1, 2), keepdim=True)
    h = (h - lo) / (hi - lo).clamp(min=1e-12)
    return h[0] if squeeze else h


def _to_rgb(image: Tensor | np.ndarray) -> np.ndarray:
    """(H, W), (1|3, H, W) or (H, W, 1|3); uint8 or float in [0, 1] -> float32 (H, W, 3) in [0, 1]."""
    img = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if img.ndim == 3 and img.shape[-1] not in (1, 3):  # channels first
        img = img.transpose(1, 2, 0)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"image of shape {image.shape} must be (H, W), (C, H, W) or (H, W, C) with C = 1 or 3.")
    img = img.astype(np.float32) / 255 if img.dtype == np.uint8 else np.clip(img.astype(np.float32), 0, 1)
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


def overlay(image: Tensor | np.ndarray, heatmap: Tensor | np.ndarray, cmap: str = "jet",
            alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-mapped heatmap over an image -> uint8 RGB (H, W, 3).

    image: (H, W) or (1, H, W) grayscale, (H, W, 3) or (3, H, W) RGB; uint8, or float in [0, 1].
    heatmap: (gh, gw) or (H, W) (or with a leading 1); resized bilinearly to (H, W) and min-max scaled.
    out = (1 - alpha)·image + alpha·cmap(heatmap).
    """
    img = _to_rgb(image)
    h = heatmap.detach().cpu() if isinstance(heatmap, Tensor) else torch.as_tensor(np.asarray(heatmap))
    h = upsample(h.reshape(h.shape[-2:]), img.shape[:2]).numpy()
    colour = matplotlib.colormaps[cmap](h)[..., :3]
    return np.round(255 * ((1 - alpha) * img + alpha * colour)).astype(np.uint8)


def attention_figure(model: nn.Module, x: Tensor, image: Tensor | np.ndarray, class_names: Sequence[str] | None = None,
                     target: int | None = None, topk: int = 5) -> Figure:
    """One picture of where the model looks -> matplotlib Figure (save it with `save_figure`).

    x: (1, C, H, W) the model input (normalised); image: what to show, (H, W) / (H, W, 3) uint8 or float in [0, 1]
    (or channels first). Top row: the image, the top-k classes, attention rollout and gradient rollout (for
    `target`, default the top class). Below: the class token's attention in every layer (columns) × head
    (rows), each panel scaled to its own range.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, attn = model(x, return_attn=True)
    finally:
        model.train(was_training)
    grid = model.patch_grid(*x.shape[-2:])
    probs = logits.softmax(-1)[0]
    top = probs.topk(min(topk, probs.numel()))
    target = int(top.indices[0]) if target is None else int(target)

    def name(c: int) -> str:
        return class_names[c] if class_names is not None else f"class {c}"

    maps = {"attention rollout": attention_rollout(attn, grid=grid)[0],
            f"gradient rollout: {name(target)}": gradient_rollout(model, x, target)[0]}

    img = _to_rgb(image)
    k = max(1, -(-224 // max(img.shape[:2])))  # upscale small images (MNIST) so overlays are smooth
    img = img.repeat(k, 0).repeat(k, 1)
    n_layers, n_heads = len(attn), attn[0].shape[1]
    cell = min(max(1.25, 10 / n_layers), 2.0)  # inches a layer x head panel: 14 x 14 patches at 150 dpi, 13 px each
    width = max(n_layers * cell, 10) + 0.5
    top_h, low_h = width / 4 + 0.3, n_heads * cell + 0.6
    fig = Figure(figsize=(width, top_h + low_h), facecolor="white", layout="constrained")
    upper, lower = fig.subfigures(2, 1, height_ratios=[top_h, low_h])
    upper.suptitle(f"predicted: {name(int(top.indices[0]))}  ({float(top.values[0]):.1%})", fontsize=15,
                   fontweight="bold")
    ax = upper.subplots(1, 4)
    ax[0].imshow(img, interpolation="nearest")
    ax[0].set_title("input", fontsize=12)
    for i, (p, c) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
        ax[1].barh(i, p, height=0.3, color="#d62728" if c == target else "#8c96a3")
        ax[1].barh(i, 1, height=0.3, color="#8c96a3", alpha=0.15)
        ax[1].text(0, i - 0.28, name(c)[:28], fontsize=11, va="bottom")
        ax[1].text(1, i - 0.28, f"{p:.1%}", fontsize=11, va="bottom", ha="right")
    ax[1].set_xlim(0, 1)
    ax[1].set_ylim(len(top.values) - 0.5, -0.9)
    ax[1].set_title(f"top-{len(top.values)} classes", fontsize=12)
    for a, (title, m) in zip(ax[2:], maps.items(), strict=True):
        a.imshow(overlay(img, m), interpolation="bilinear")
        a.set_title(title, fontsize=12)
    ax[1].set_axis_off()
    for a in ax[[0, 2, 3]]:  # a thin frame keeps white images apart from the page
        a.set_xticks([])
        a.set_yticks([])
        a.spines[:].set_color("#bbbbbb")

    lower.suptitle("class-token attention in every layer × head (each panel scaled to its own range)", fontsize=12)
    axes = lower.subplots(n_heads, n_layers, squeeze=False)
    for h in range(n_heads):
        for layer in range(n_layers):
            a = axes[h, layer]
            a.set_xticks([])
            a.set_yticks([])
            a.imshow(cls_attention(attn, layer, h, grid)[0].cpu().numpy(), cmap="inferno", interpolation="nearest")
            if h == 0:
                a.set_title(f"layer {layer + 1}", fontsize=10)
            if layer == 0:
                a.set_ylabel(f"head {h + 1}", fontsize=10)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Save as PNG (or the suffix's format) at `dpi`, creating parent folders, then close the figure."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)


# ------------------------------------------------------------------------------------------- faithfulness


@torch.no_grad()
def deletion_score(model: nn.Module, x: Tensor, heatmap: Tensor, target: int | Tensor | None = None,
                   steps: int = 10, mode: str = "deletion", batch_size: int = 64) -> Tensor:
    """How faithful is a map? Area under the target-probability curve while patches go, most important first.

    x: (B, C, H, W); heatmap: (B, gh, gw), one score per patch (H, W multiples of gh, gw); target: class per
    image (default: the predicted class). Step s = 0..steps changes the round(s·N/steps) highest-scored patches
    (ties: lower patch index first): "deletion" replaces them with the image's per-channel mean (lower AUC =
    better map); "insertion" starts from the all-mean image and puts them back (higher = better).
    Returns (B,) trapezoid AUC of softmax[target] over the fraction of patches changed, in [0, 1].
    All (steps + 1)·B images go through the model in chunks of batch_size, in eval mode.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode={mode!r} must be 'deletion' or 'insertion'.")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    (B, _, H, W), (gh, gw) = x.shape, heatmap.shape[-2:]
    if heatmap.shape[0] != B or H % gh or W % gw:
        raise ValueError(f"heatmap of shape {tuple(heatmap.shape)} must be (B={B}, gh, gw) with gh, gw dividing "
                         f"the image size {H}x{W}.")
    rank = heatmap.reshape(B, -1).argsort(dim=1, descending=True, stable=True).argsort(dim=1).to(x.device)  # 0 = first
    count = torch.linspace(0, gh * gw, steps + 1, device=x.device).round()  # patches changed at each step
    mean = x.mean((2, 3), keepdim=True).expand_as(x)
    start, end = (x, mean) if mode == "deletion" else (mean, x)
    was_training = model.training
    model.eval()
    try:
        target = model(x).argmax(-1) if target is None else _targets(target, B, x.device)
        probs = []
        for idx in torch.arange((steps + 1) * B, device=x.device).split(batch_size):
            s, b = idx // B, idx % B
            changed = (rank[b] < count[s, None]).view(-1, 1, gh, gw)
            changed = changed.repeat_interleave(H // gh, 2).repeat_interleave(W // gw, 3)
            p = model(torch.where(changed, end[b], start[b])).softmax(-1)
            probs.append(p.gather(1, target[b, None])[:, 0])
    finally:
        model.train(was_training)
    return torch.trapezoid(torch.cat(probs).view(steps + 1, B).T, dx=1 / steps, dim=1)
