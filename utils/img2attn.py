"""Where a ViT looks: class-token attention, attention rollout and gradient rollout, batched and any-size;
overlays and a summary figure; deletion / insertion scores of how faithful a map is. How it learned to look: the
ViT paper's inspection (Dosovitskiy et al. 2021, Fig. 7: patch-filter principal components, position-embedding
similarity, mean attention distance per head and layer) plus attention entropy, one figure of them, and the
same statistics tracked through training (metrics, curves, a GIF of the rollout epoch by epoch).

`attn` below is what `model(x, return_attn=True)` returns: a list of num_layers tensors (B, heads, T, T) of
softmax probabilities, T = P + N: P prefix tokens (`model.num_prefix_tokens`: the class token 0, then any
register tokens, which are tokens, not places in the image), then the N patches in row-major order on a
(grid_h, grid_w) grid (`model.patch_grid(H, W)`); the maps cover the N patches only. Every map comes back
as (B, grid_h, grid_w); `grid` omitted means a square grid. Rows stay rows: a map's [i, j] is the patch at
rows i·p.., columns j·p...
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from utils.img_to_patch import patch_to_img
from utils.training import _atomic_write

HEAD_FUSIONS = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}


def _grid(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The (grid_h, grid_w) of n patches: `grid` itself, or a square one when None."""
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patches do not make a square grid; pass grid=model.patch_grid(H, W).")
        return side, side
    if grid[0] * grid[1] != n:
        raise ValueError(f"{n} patches do not fill a {grid[0]}x{grid[1]} grid ({grid[0] * grid[1]} patches).")
    return int(grid[0]), int(grid[1])


def _patch_map(scores: Tensor, grid: tuple[int, int] | None) -> Tensor:
    """scores: (B, N) per patch -> (B, grid_h, grid_w); grid None: square."""
    return patch_to_img(scores, _grid(scores.shape[1], grid))


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
                  grid: tuple[int, int] | None = None, *, prefix_tokens: int = 1) -> Tensor:
    """The class token's attention to every patch in one layer -> (B, grid_h, grid_w).

    attn: full maps (B, heads, T, T) per layer, or the class-token rows (B, heads, T) of return_attn="cls".
    head: one head's map; None averages the heads.
    """
    a = attn[layer]
    a = a[:, :, 0] if a.dim() == 4 else a  # (B, heads, T)
    a = a.mean(1) if head is None else a[:, head]
    return _patch_map(a[:, prefix_tokens:], grid)


def attention_rollout(attn: Sequence[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                      start_layer: int = 0, grid: tuple[int, int] | None = None, *,
                      prefix_tokens: int = 1) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) -> (B, grid_h, grid_w), the class-token row over the patches.

    attn: full maps, list of (B, heads, T, T). Per layer l >= start_layer:
      1. fuse the heads: A = mean / max / min over heads -> (B, T, T);
      2. discard: in every row, of the N entries in the patch columns P..P+N-1, the floor(discard_ratio·N)
         smallest are set to 0. The prefix columns (class token, registers: P = prefix_tokens) are never
         touched;
      3. Â = (A + I) / row sums: every row sums to 1 (also for max / min fusion and after discarding).
    Rollout = Â_L-1 @ ... @ Â_start_layer; its class-token row over the patch columns is the map (not rescaled).
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
        cls_col, patches = a[..., :prefix_tokens], a[..., prefix_tokens:]
        k = math.floor(discard_ratio * patches.shape[-1] + 1e-9)  # the epsilon absorbs float error in ratio·N
        if k:
            patches = patches.scatter(-1, patches.topk(k, dim=-1, largest=False).indices, 0.0)
        a = torch.cat([cls_col, patches], dim=-1) + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        mats.append(a / a.sum(-1, keepdim=True))
    return _patch_map(_cls_row(mats)[:, prefix_tokens:], grid)


def _targets(target: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """A class per image, int or (B,) -> (B,) long."""
    target = torch.as_tensor(target, device=device).long()
    return target.expand(batch) if target.dim() == 0 else target


def gradient_rollout(model: nn.Module, x: Tensor, target: int | Tensor | None = None,
                     start_layer: int = 0) -> Tensor:
    """Class-specific rollout of Chefer, Gur & Wolf, ICCV 2021 ("Generic Attention-model Explainability").

    x: (B, C, H, W) -> (B, grid_h, grid_w) on model.patch_grid(H, W). target: class per image, int or (B,)
    (default: the predicted class). R = I; per layer l >= start_layer: Ā = mean over heads of
    clamp(∂y_t/∂A ⊙ A, min=0), R <- R + Ā R; the map is R's class-token row over the patches (registers left out).
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
    return _patch_map(_cls_row(mats)[:, getattr(model, "num_prefix_tokens", 1):], model.patch_grid(*x.shape[-2:]))


@torch.no_grad()
def token_norms(model: nn.Module, x: Tensor) -> Tensor:
    """The L2 norm of every patch token's output, per layer -> (B, L, grid_h, grid_w), in eval mode (restored).

    x: (B, C, H, W). Layer l's map is ||block_l(...)|| of each patch token (prefix tokens left out), before the
    final norm. High-norm outlier patches in the later layers are the artifacts of Darcet et al. 2024 ("Vision
    Transformers Need Registers"), which register tokens absorb.
    """
    outs: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda m, inp, out: outs.append(out[0])) for b in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model.forward_features(x)  # every token through every block (forward() shortcuts the last one)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    grid, p = model.patch_grid(*x.shape[-2:]), getattr(model, "num_prefix_tokens", 1)
    return torch.stack([_patch_map(t[:, p:].float().norm(dim=-1), grid) for t in outs], 1)


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
    (or channels first). Top row: the image, the top-k classes, attention rollout, gradient rollout (for
    `target`, default the top class) and the last layer's token norms (`token_norms`); a model without a head
    (model.config["num_classes"] == 0: DINO, DINOv2) gets no top-k and no gradient panel. Below: the class
    token's attention in every layer (columns) × head (rows), each panel scaled to its own range. Register
    tokens (model.num_prefix_tokens > 1) are left out of every map.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, attn = model(x, return_attn=True)
    finally:
        model.train(was_training)
    grid, prefix = model.patch_grid(*x.shape[-2:]), getattr(model, "num_prefix_tokens", 1)
    has_head = getattr(model, "config", {}).get("num_classes", 1) > 0
    probs = logits.softmax(-1)[0]
    top = probs.topk(min(topk, probs.numel()))
    target = int(top.indices[0]) if target is None else int(target)

    def name(c: int) -> str:
        return class_names[c] if class_names is not None else f"class {c}"

    maps = {"attention rollout": attention_rollout(attn, grid=grid, prefix_tokens=prefix)[0]}
    if has_head:
        maps[f"gradient rollout: {name(target)}"] = gradient_rollout(model, x, target)[0]
    maps[f"token norm, layer {len(attn)}"] = token_norms(model, x)[0, -1]

    img = _to_rgb(image)
    k = max(1, -(-224 // max(img.shape[:2])))  # upscale small images (MNIST) so overlays are smooth
    img = img.repeat(k, 0).repeat(k, 1)
    n_layers, n_heads = len(attn), attn[0].shape[1]
    cell = min(max(1.25, 10 / n_layers), 2.0)  # inches a layer x head panel: 14 x 14 patches at 150 dpi, 13 px each
    width = max(n_layers * cell, 10) + 0.5
    top_h, low_h = width / 4 + 0.3, n_heads * cell + 0.6
    fig = Figure(figsize=(width, top_h + low_h), facecolor="white", layout="constrained")
    upper, lower = fig.subfigures(2, 1, height_ratios=[top_h, low_h])
    upper.suptitle(f"predicted: {name(int(top.indices[0]))}  ({float(top.values[0]):.1%})" if has_head else
                   "no classification head: attention maps only", fontsize=15, fontweight="bold")
    ax = upper.subplots(1, 1 + has_head + len(maps))
    ax[0].imshow(img, interpolation="nearest")
    ax[0].set_title("input", fontsize=12)
    for i, (p, c) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True) if has_head else ()):
        ax[1].barh(i, p, height=0.3, color="#d62728" if c == target else "#8c96a3")
        ax[1].barh(i, 1, height=0.3, color="#8c96a3", alpha=0.15)
        ax[1].text(0, i - 0.28, name(c)[:28], fontsize=11, va="bottom")
        ax[1].text(1, i - 0.28, f"{p:.1%}", fontsize=11, va="bottom", ha="right")
    if has_head:
        ax[1].set_xlim(0, 1)
        ax[1].set_ylim(len(top.values) - 0.5, -0.9)
        ax[1].set_title(f"top-{len(top.values)} classes", fontsize=12)
        ax[1].set_axis_off()
    panels = ax[1 + has_head:]
    for a, (title, m) in zip(panels, maps.items(), strict=True):
        a.imshow(overlay(img, m), interpolation="bilinear")
        a.set_title(title, fontsize=12)
    for a in [ax[0], *panels]:  # a thin frame keeps white images apart from the page
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
            a.imshow(cls_attention(attn, layer, h, grid, prefix_tokens=prefix)[0].cpu().numpy(), cmap="inferno",
                     interpolation="nearest")
            if h == 0:
                a.set_title(f"layer {layer + 1}", fontsize=10)
            if layer == 0:
                a.set_ylabel(f"head {h + 1}", fontsize=10)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Save as PNG (or the suffix's format) at `dpi`, atomically (a temp file, then a rename; parent folders are
    created), then close the figure."""
    path = Path(path)
    try:
        _atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:].lower() or "png", dpi=dpi,
                                                  bbox_inches="tight", facecolor="white"))
    finally:
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


# ------------------------------------------------------------------------- inspection (ViT paper, Fig. 7)

AttnMaps = Sequence[Tensor] | Tensor  # per-layer (B, heads, T, T) maps, or all of them stacked (L, B, heads, T, T)


def _layers(attn: AttnMaps) -> list[Tensor]:
    """attn: list of (B, heads, T, T) per layer, or (L, B, heads, T, T) -> list of (B, heads, T, T), fp32 or wider."""
    layers = list(attn.unbind(0)) if isinstance(attn, Tensor) and attn.dim() == 5 else list(attn)
    if not layers or any(a.dim() != 4 or a.shape[-1] != a.shape[-2] for a in layers):
        raise ValueError("attention statistics need the full maps of model(x, return_attn=True): a list of "
                         "(B, heads, T, T) per layer or one (L, B, heads, T, T) tensor, not 'cls' rows.")
    return [a.to(torch.promote_types(a.dtype, torch.float32)) for a in layers]


def patch_distances(grid: tuple[int, int], patch_size: float = 1.0, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, N), N = grid_h·grid_w: the Euclidean distance between the centres of patches i and j (row-major order)
    in pixels, i.e. in patch steps times patch_size."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], 1)
    d = torch.cdist(centres, centres, compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros on the diagonal
    return (d * patch_size).to(device=device, dtype=dtype)


def mean_attention_distance(attn: AttnMaps, grid: tuple[int, int] | None = None, patch_size: float = 1.0, *,
                            prefix_tokens: int = 1) -> Tensor:
    """Mean attention distance (ViT paper, Fig. 7 right), in pixels -> (layers, heads).

    attn: per-layer (B, heads, T, T) maps (model(x, return_attn=True)) or (L, B, heads, T, T); T = prefix_tokens
    + N, the prefix tokens (class token; registers) first, then the N patches of a (grid_h, grid_w) grid (default:
    square). Prefix tokens are left out as queries and as keys: for every query patch, the distance from its centre
    to each key patch's centre (`patch_distances`, patch steps x patch_size) is weighted by its attention over the
    N patch keys, renormalised to sum to 1 (the ViT paper's / timm's patch-to-patch definition). The result is
    averaged over the N query patches and the B images. A row with all its weight on prefix tokens counts 0.
    """
    out = []
    for a in _layers(attn):
        if not 0 <= prefix_tokens < a.shape[-1]:
            raise ValueError(f"prefix_tokens={prefix_tokens} must be in [0, {a.shape[-1] - 1}] for {a.shape[-1]} "
                             f"tokens.")
        a = a[..., prefix_tokens:, prefix_tokens:]  # (B, heads, N, N): patch queries x patch keys
        d = patch_distances(_grid(a.shape[-1], grid), patch_size, a.device, a.dtype)
        per_query = torch.einsum("bhqk,qk->bhq", a, d) / a.sum(-1).clamp_min(torch.finfo(a.dtype).tiny)
        out.append(per_query.mean((0, 2)))
    return torch.stack(out)


def attention_entropy(attn: AttnMaps) -> Tensor:
    """Mean entropy of the attention rows, in nats -> (layers, heads).

    attn as for `mean_attention_distance`. Every query row (all T tokens, prefix tokens included) over all T keys,
    as the softmax gives it: -sum p log p (0 log 0 = 0), averaged over the T queries and the B images; log T for
    uniform rows, 0 for one-hot rows. Its collapse towards 0 precedes unstable training (Zhai et al. 2023).
    """
    return torch.stack([-torch.special.xlogy(a, a).sum(-1).mean((0, 2)) for a in _layers(attn)])


@torch.no_grad()
def position_similarity(model: nn.Module, *, prefix_tokens: int | None = None) -> Tensor:
    """Cosine similarity of the learned position embeddings (ViT paper, Fig. 7 centre) -> (gh, gw, gh, gw), CPU.

    [i, j] is the map (gh, gw) of the similarity of patch (row i, column j)'s embedding with every patch's, on
    model.grid_size. model.pos_embed is (1, prefix_tokens + N, D); its prefix entries (class token, registers) are
    dropped: prefix_tokens None takes all entries before the last N (0 for no_embed_class models).
    """
    gh, gw = model.grid_size
    table = model.pos_embed.detach()[0].float().cpu()
    prefix = len(table) - gh * gw if prefix_tokens is None else prefix_tokens
    pos = table[prefix:]  # (N, D)
    if prefix < 0 or len(pos) != gh * gw:
        raise ValueError(f"pos_embed has {len(table)} entries: not {prefix} prefix token(s) + the {gh}x{gw} patches "
                         f"of model.grid_size.")
    pos = F.normalize(pos, dim=-1)
    return (pos @ pos.T).reshape(gh, gw, gh, gw)


@torch.no_grad()
def patch_filter_components(model: nn.Module, k: int = 28) -> tuple[Tensor, Tensor]:
    """Principal components of the patch-embedding filters (ViT paper, Fig. 7 left), CPU
    -> (components (k, C, p, p), explained-variance ratios (k,)).

    The D filters of model.patch_embed.proj (weight (D, C, p, p)) are D samples of C·p·p values: centred, then
    torch.linalg.svd; component i is the i-th right singular vector (unit norm) with its largest-magnitude entry
    made positive (a deterministic sign), its ratio s_i² / sum(s²). k is capped at min(D, C·p·p).
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1.")
    w = model.patch_embed.proj.weight.detach().float().cpu()
    flat = w.flatten(1)
    _, s, vh = torch.linalg.svd(flat - flat.mean(0), full_matrices=False)
    comps = vh[:k]
    sign = comps.gather(1, comps.abs().argmax(1, keepdim=True)).sign()
    comps = (comps * torch.where(sign == 0, 1.0, sign)).reshape(len(comps), *w.shape[1:])
    var = s.square()
    return comps, var[:len(comps)] / var.sum().clamp_min(torch.finfo(var.dtype).tiny)


@torch.no_grad()
def attention_stats(model: nn.Module, x: Tensor, batch_size: int = 32, *, rollout: int = 0,
                    prefix_tokens: int | None = None) -> dict[str, Any]:
    """Attention statistics of `model` over images x (B, C, H, W) (the model's input), in eval mode, in chunks of
    batch_size (the mode is restored) -> {"distance": (L, heads) px, "entropy": (L, heads) nats, both means over
    the B images (`mean_attention_distance`, `attention_entropy`), "tokens": T, "grid": (gh, gw),
    "rollout": (rollout, gh, gw) the attention rollout of the first `rollout` images, or None}, on x's device.
    prefix_tokens: left out of the distance; None: model.num_prefix_tokens (class token + registers), else 1.
    """
    if prefix_tokens is None:
        prefix_tokens = getattr(model, "num_prefix_tokens", 1)
    if rollout and prefix_tokens != 1:
        raise ValueError("the rollout of a model with register tokens is not supported here; pass rollout=0.")
    if not 0 <= rollout <= len(x):
        raise ValueError(f"rollout={rollout} must be in [0, {len(x)}], the number of images.")
    grid = model.patch_grid(*x.shape[-2:])
    was_training = model.training
    model.eval()
    distance = entropy = tokens = 0
    maps: list[Tensor] = []
    try:
        for chunk in x.split(batch_size):
            _, attn = model(chunk, return_attn=True)
            w = len(chunk) / len(x)
            distance = distance + w * mean_attention_distance(attn, grid, model.patch_size, prefix_tokens=prefix_tokens)
            entropy = entropy + w * attention_entropy(attn)
            need = rollout - sum(map(len, maps))
            if need > 0:
                maps.append(attention_rollout([a[:need] for a in attn], grid=grid))
            tokens = attn[0].shape[-1]
    finally:
        model.train(was_training)
    return {"distance": distance, "entropy": entropy, "tokens": tokens, "grid": grid,
            "rollout": torch.cat(maps) if rollout else None}


def attention_table(stats: dict[str, Any]) -> str:
    """A Markdown table of `attention_stats`: per layer, the distance and entropy of every head and their means."""
    lines = ["| layer | mean attention distance per head (px) | mean | attention entropy per head (nats) | mean |",
             "|---:|---|---:|---|---:|"]
    for i, (d, e) in enumerate(zip(stats["distance"].tolist(), stats["entropy"].tolist(), strict=True)):
        lines.append(f"| {i + 1} | {' '.join(f'{v:.1f}' for v in d)} | {sum(d) / len(d):.1f} | "
                     f"{' '.join(f'{v:.2f}' for v in e)} | {sum(e) / len(e):.2f} |")
    return "\n".join(lines)


def _mosaic(tiles: np.ndarray, cols: int, gap: int = 1, fill: float = np.nan) -> np.ndarray:
    """tiles (n, h, w) or (n, h, w, 3) -> one float32 image of ceil(n / cols) rows x cols tiles, `gap` pixels of
    `fill` between them."""
    n, h, w = tiles.shape[:3]
    rows = -(-n // cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, *tiles.shape[3:]), fill, dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return out


def _per_layer(ax, values: Tensor, reference: float, ref_label: str, ylabel: str, title: str) -> None:
    """values (L, heads): one dot per head against depth, the mean over heads as a line, a dashed reference."""
    layers, heads = values.shape
    x = np.arange(1, layers + 1)
    v = values.cpu().numpy()
    cmap = matplotlib.colormaps["tab10" if heads <= 10 else "viridis"]
    for h in range(heads):
        ax.scatter(x, v[:, h], s=22, color=cmap(h if heads <= 10 else h / (heads - 1)), zorder=3,
                   label=f"head {h + 1}" if heads <= 10 else None)
    ax.plot(x, v.mean(1), color="black", lw=1.2, label="mean over heads")
    ax.axhline(reference, color="gray", ls="--", lw=1, label=ref_label)
    ax.set(xlabel="network depth (layer)", ylabel=ylabel, title=title, xticks=x,
           ylim=(0, 1.08 * max(float(v.max()), reference)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")


def inspection_figure(model: nn.Module, x: Tensor, *, stats: dict[str, Any] | None = None, name: str = "ViT",
                      k: int = 28) -> Figure:
    """The ViT paper's Fig. 7 for `model`, plus attention entropy -> matplotlib Figure (save it with `save_figure`).

    x: (B, C, H, W) model inputs (normalised) whose attention is averaged; stats: `attention_stats(model, x)` if
    already computed. Panels: the first k principal components of the patch-embedding filters (each scaled to its
    own range; RGB for 3 channels, gray otherwise), the position-embedding cosine similarity of every patch with
    all (the grid of grids), the mean attention distance of every head against depth (dashed: uniform attention
    over the grid) and the attention entropy (dashed: log T, uniform rows).
    """
    stats = attention_stats(model, x) if stats is None else stats
    comps, ratio = patch_filter_components(model, k)
    sim = position_similarity(model).numpy()
    (gh, gw), p = stats["grid"], model.patch_size
    layers, heads = stats["distance"].shape

    fig = Figure(figsize=(12, 10.5), facecolor="white", layout="constrained")
    fig.suptitle(f"{name}: D={model.patch_embed.proj.out_channels}, {layers} layers x {heads} heads, patch {p}, "
                 f"{gh}x{gw} patches; attention over {len(x)} image{'s' * (len(x) != 1)}", fontsize=13,
                 fontweight="bold")
    ax = fig.subplots(2, 2)

    c = comps.numpy()
    c = (c - c.min((1, 2, 3), keepdims=True)) / np.maximum(np.ptp(c, (1, 2, 3), keepdims=True), 1e-12)
    tiles = c.transpose(0, 2, 3, 1) if c.shape[1] == 3 else np.repeat(c.mean(1)[..., None], 3, -1)  # (k, p, p, 3)
    ax[0, 0].imshow(_mosaic(tiles, cols=min(7, len(tiles)), fill=1.0), interpolation="nearest")
    ax[0, 0].set_title(f"patch-embedding filters: first {len(c)} principal components\n"
                       f"({float(ratio.sum()):.0%} of the variance; row by row, largest first)", fontsize=11)
    ax[0, 0].set_axis_off()

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    sh, sw = sim.shape[:2]  # the position table's own grid (the input's may differ)
    mosaic = _mosaic(sim.reshape(sh * sw, sh, sw), cols=sw)
    im = ax[0, 1].imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    step = max(1, round(max(sh, sw) / 8))  # tick every step-th tile, at its centre
    cols, rows = range(0, sw, step), range(0, sh, step)
    ax[0, 1].set_xticks([j * (sw + 1) + (sw - 1) / 2 for j in cols], [str(j + 1) for j in cols])
    ax[0, 1].set_yticks([i * (sh + 1) + (sh - 1) / 2 for i in rows], [str(i + 1) for i in rows])
    ax[0, 1].set(xlabel="input patch column", ylabel="input patch row")
    ax[0, 1].set_title("position embedding similarity", fontsize=11)
    fig.colorbar(im, ax=ax[0, 1], shrink=0.85, label="cosine similarity")

    uniform = float(patch_distances((gh, gw), p).mean())
    _per_layer(ax[1, 0], stats["distance"], uniform, f"uniform attention ({uniform:.1f} px)",
               "mean attention distance (pixels)", "mean attention distance per head")
    tokens = stats["tokens"]
    _per_layer(ax[1, 1], stats["entropy"], math.log(tokens), f"uniform rows (log {tokens} = {math.log(tokens):.2f})",
               "attention entropy (nats)", "attention entropy per head")
    return fig


# ----------------------------------------------------------------------------------------- through training


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


def plot_attention_curves(metrics: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Mean attention distance (left) and entropy (right) of every layer against epoch, from the metrics rows that
    `track_attention` filled; saved atomically (PNG). No tracked rows: nothing is written."""
    rows = [m for m in metrics if "attn_distance" in m]
    if not rows:
        return
    epochs = [m["epoch"] for m in rows]
    layers = len(rows[-1]["attn_distance"])
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, layers))
    fig = Figure(figsize=(9, 3.4), facecolor="white", layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "attn_distance", "mean attention distance (pixels)"),
                           (axes[1], "attn_entropy", "attention entropy (nats)")):
        for i in range(layers):
            ax.plot(epochs, [m[key][i] if len(m[key]) > i else np.nan for m in rows], marker=".", color=colours[i],
                    label=f"layer {i + 1}")
        ax.set(xlabel="epoch", ylabel=label, title=label.split(" (")[0] + " per layer (mean over heads)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=1 + layers // 7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=100)


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
        strip = _mosaic(tiles, cols=len(tiles), gap=2, fill=255).astype(np.uint8)
        frame = Image.new("RGB", (strip.shape[1], strip.shape[0] + 16), "white")
        frame.paste(Image.fromarray(strip), (0, 16))
        ImageDraw.Draw(frame).text((2, 1), f"epoch {epoch}", fill="black", font=font)
        frames.append(frame)

    def few_colours(im: Image.Image) -> Image.Image:
        return im.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)

    gif = [few_colours(f) for f in frames]
    durations = [frame_ms] * (len(gif) - 1) + [max(1500, frame_ms)]
    _atomic_write(Path(gif_path), lambda f: gif[0].save(f, format="GIF", save_all=True, append_images=gif[1:],
                                                        duration=durations, loop=0, optimize=True))
    if png_path is not None:
        picks = sorted({round(i) for i in np.linspace(0, len(frames) - 1, min(len(frames), strip_rows))})
        stacked = few_colours(Image.fromarray(np.concatenate([np.asarray(frames[i]) for i in picks])))
        _atomic_write(Path(png_path), lambda f: stacked.save(f, format="PNG", optimize=True))
