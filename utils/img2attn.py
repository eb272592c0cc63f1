"""Where a ViT looks: per-layer attention -> heatmaps (class-token attention, attention rollout, gradient
rollout, token norms), all of them from one forward / backward (`explain`), and heatmaps overlaid on the image.

`attn` below is what `model(x, return_attn=True)` returns: a list of num_layers tensors (B, heads, T, T) of
softmax probabilities, T = P + N: P prefix tokens (`model.num_prefix_tokens`: the class token 0, then any
register tokens, which are tokens, not places in the image), then the N patches in row-major order on a
(grid_h, grid_w) grid (`model.patch_grid(H, W)`); the maps cover the N patches only. Given a grid, a function
takes P = T - grid_h·grid_w (so registers need no `prefix_tokens`; an explicit `prefix_tokens` must agree); without
one, P = `prefix_tokens` (default 1: the class token) and the N = T - P patches make a square grid. Every map comes
back as (B, grid_h, grid_w). Rows stay rows: a map's [i, j] is the patch at
rows i·p.., columns j·p... The model functions need only that protocol (plus `forward_features` /
`forward_head` / `blocks` for `explain` and `token_norms`), as this repo's VisionTransformer has it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.ema import eval_mode
from utils.img_to_patch import patch_to_img

HEAD_FUSIONS = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}



def grid_shape(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The (grid_h, grid_w) of n patches: `grid` itself, or a square one when None."""
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patches do not make a square grid; pass grid=model.patch_grid(H, W).")
        return side, side
    if grid[0] * grid[1] != n:
        raise ValueError(f"{n} patches do not fill a {grid[0]}x{grid[1]} grid ({grid[0] * grid[1]} patches).")
    return int(grid[0]), int(grid[1])



def prefix_count(tokens: int, grid: tuple[int, int] | None, prefix_tokens: int | None = None) -> int:
    """The P prefix tokens (class token, registers, a pool query) of T = `tokens`: T - grid_h·grid_w when a grid is
    given (checked against an explicit `prefix_tokens`), else `prefix_tokens` (None: 1). ValueError when they
    disagree or the grid holds more patches than there are tokens."""
    if grid is None:
        p = 1 if prefix_tokens is None else prefix_tokens
        if not 0 <= p < tokens:
            raise ValueError(f"prefix_tokens={p} must be in [0, {tokens - 1}] for {tokens} tokens.")
        return p
    p = tokens - grid[0] * grid[1]
    if p < 0:
        raise ValueError(f"{tokens} tokens cannot hold a {grid[0]}x{grid[1]} grid of patches ({grid[0] * grid[1]}); "
                         f"pass grid=model.patch_grid(H, W) of the input the maps come from.")
    if prefix_tokens is not None and prefix_tokens != p:
        raise ValueError(f"prefix_tokens={prefix_tokens} does not fit {tokens} tokens on a {grid[0]}x{grid[1]} grid, "
                         f"which leave {p} prefix tokens; omit prefix_tokens or pass {p}.")
    return p


def _patch_map(scores: Tensor, grid: tuple[int, int] | None) -> Tensor:
    """scores: (B, N) per patch -> (B, grid_h, grid_w); grid None: square."""
    return patch_to_img(scores, grid_shape(scores.shape[1], grid))



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
                  grid: tuple[int, int] | None = None, *, prefix_tokens: int | None = None) -> Tensor:
    """The class token's (token 0's) attention to every patch in one layer -> (B, grid_h, grid_w).

    attn: full maps (B, heads, T, T) per layer, or the class-token rows (B, heads, T) of return_attn="cls".
    head: one head's map; None averages the heads. prefix_tokens: see the module docstring (from the grid).
    """
    a = attn[layer]
    a = a[:, :, 0] if a.dim() == 4 else a  # (B, heads, T)
    a = a.mean(1) if head is None else a[:, head]
    return _patch_map(a[:, prefix_count(a.shape[-1], grid, prefix_tokens):], grid)


def attention_rollout(attn: Sequence[Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                      start_layer: int = 0, grid: tuple[int, int] | None = None, *,
                      prefix_tokens: int | None = None) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) -> (B, grid_h, grid_w), the class-token row over the patches.

    attn: full maps, list of (B, heads, T, T). Per layer l >= start_layer:
      1. fuse the heads: A = mean / max / min over heads -> (B, T, T);
      2. discard: in every row, of the N entries in the patch columns P..P+N-1, the floor(discard_ratio·N)
         smallest are set to 0. The prefix columns (class token, registers: P = T - grid_h·grid_w, or
         prefix_tokens without a grid; see the module docstring) are never touched;
      3. Â = (A + I) / row sums: every row sums to 1 (also for max / min fusion and after discarding).
    Rollout = Â_L-1 @ ... @ Â_start_layer; its class-token row over the patch columns is the map (not rescaled).
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion={head_fusion!r} must be one of {sorted(HEAD_FUSIONS)}.")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio={discard_ratio!r} must be in [0, 1).")
    _check_layers(attn, start_layer)
    prefix_tokens = prefix_count(attn[0].shape[-1], grid, prefix_tokens)
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


def per_image_targets(target: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """A class per image, int or (B,) -> (B,) long."""
    target = torch.as_tensor(target, device=device).long()
    return target.expand(batch) if target.dim() == 0 else target



def _autograd_on() -> contextlib.ExitStack:
    """Gradients on, also inside torch.no_grad() or torch.inference_mode() (a clone made here is a normal tensor)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def gradient_rollout(model: nn.Module, x: Tensor, target: int | Tensor | None = None,
                     start_layer: int = 0) -> Tensor:
    """Class-specific rollout of Chefer, Gur & Wolf, ICCV 2021 ("Generic Attention-model Explainability").

    x: (B, C, H, W) -> (B, grid_h, grid_w) on model.patch_grid(H, W). target: class per image, int or (B,)
    (default: the predicted class). R = I; per layer l >= start_layer: Ā = mean over heads of
    clamp(∂y_t/∂A ⊙ A, min=0), R <- R + Ā R; the map is R's class-token row over the patches (registers left out).
    One backward pass for the batch (images are independent in eval mode, so the gradient of the summed target
    logits is each image's own); runs in eval mode, then restores the mode; parameters' .grad are untouched;
    the same inside torch.no_grad() or torch.inference_mode().
    """
    with eval_mode(model), _autograd_on():  # x as a leaf puts the attention in a graph even with frozen parameters
        logits, attn = model(x.clone().requires_grad_(), return_attn=True)
        _check_layers(attn, start_layer)
        t = logits.argmax(-1) if target is None else per_image_targets(target, len(x), x.device)
        grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), attn[start_layer:])
    grid = model.patch_grid(*x.shape[-2:])
    return _relevance(attn[start_layer:], grads, _model_prefix(model), grid)


def _model_prefix(model: nn.Module) -> int | None:
    """model.num_prefix_tokens, checked against the grid by prefix_count; None when the model does not say."""
    return getattr(model, "num_prefix_tokens", None)


def _relevance(attn: Sequence[Tensor], grads: Sequence[Tensor], prefix_tokens: int | None,
               grid: tuple[int, int]) -> Tensor:
    """Chefer et al.'s rule over (attention, its gradient) pairs of the layers used -> (B, grid_h, grid_w)."""
    eye = torch.eye(attn[0].shape[-1], dtype=attn[0].dtype, device=attn[0].device)
    mats = [eye + (g * a.detach()).clamp(min=0).mean(1) for g, a in zip(grads, attn, strict=True)]
    return _patch_map(_cls_row(mats)[:, prefix_count(eye.shape[0], grid, prefix_tokens):], grid)


@torch.no_grad()
def token_norms(model: nn.Module, x: Tensor) -> Tensor:
    """The L2 norm of every patch token's output, per layer -> (B, L, grid_h, grid_w), in eval mode (restored).

    x: (B, C, H, W). Layer l's map is ||block_l(...)|| of each patch token (the T - grid_h·grid_w prefix tokens of
    the block's output left out), before the final norm. High-norm outlier patches in the later layers are the
    artifacts of Darcet et al. 2024 ("Vision Transformers Need Registers"), which register tokens absorb.
    """
    with eval_mode(model), _block_outputs(model) as outs:
        model.forward_features(x)  # every token through every block (forward() shortcuts the last one)
    return _norm_maps(outs, model.patch_grid(*x.shape[-2:]))


@contextlib.contextmanager
def _block_outputs(model: nn.Module, detach: bool = True) -> Iterator[list[Tensor]]:
    """A list that collects every block's output tokens (B, T, D) while the block runs (detached, or in the graph
    with detach=False). A block returns the tokens (timm, transformers' newer layers) or a tuple whose first item
    they are (this repo's blocks)."""
    outs: list[Tensor] = []

    def keep(module: nn.Module, inputs: object, out: Tensor | tuple[Tensor, ...]) -> None:
        tokens = out if isinstance(out, Tensor) else out[0]
        outs.append(tokens.detach() if detach else tokens)

    hooks = [b.register_forward_hook(keep) for b in model.blocks]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


def _norm_maps(outs: Sequence[Tensor], grid: tuple[int, int]) -> Tensor:
    """Block outputs (B, T, D) per layer -> the L2 norm of every patch token (the last grid_h·grid_w tokens: a
    wrapper's pool-query token is not in the blocks' output), (B, layers, grid_h, grid_w)."""
    return torch.stack([_patch_map(o[:, prefix_count(o.shape[1], grid):].float().norm(dim=-1), grid) for o in outs], 1)


@dataclass
class Explanation:
    """The maps of a batch x (B, C, H, W), each (B, grid_h, grid_w) on `grid`, from `explain`."""

    attn: list[Tensor]  # every layer's attention (B, heads, T, T)
    grid: tuple[int, int]
    prefix_tokens: int  # class token + registers, left out of every map
    rollout: Tensor  # attention rollout (Abnar & Zuidema 2020)
    token_norms: Tensor  # (B, layers, grid_h, grid_w): every block's output norm per patch (Darcet et al. 2024)
    logits: Tensor | None = None  # (B, classes); None for a model without a head
    target: Tensor | None = None  # (B,) the class the gradient rollout explains
    gradient_rollout: Tensor | None = None  # Chefer et al. 2021, for `target`


def explain(model: nn.Module, x: Tensor, target: int | Tensor | None = None) -> Explanation:
    """Every map of x (B, C, H, W) from one forward of all tokens (attention and block outputs kept) and, when the
    model has a head (model.config["num_classes"] > 0), one backward for the gradient rollout of `target` (class
    per image, int or (B,); default the predicted one). Eval mode (restored); parameters' .grad are untouched;
    the same inside torch.no_grad() or torch.inference_mode().
    The maps equal `attention_rollout`, `gradient_rollout` and `token_norms` computed one by one."""
    has_head = getattr(model, "config", {}).get("num_classes", 1) > 0
    with eval_mode(model), _block_outputs(model) as outs, _autograd_on():
        tokens, attn = model.forward_features(x.clone().requires_grad_(has_head), return_attn=True)
        logits = t = grads = None
        if has_head:
            logits = model.forward_head(tokens)
            t = logits.argmax(-1) if target is None else per_image_targets(target, len(x), x.device)
            grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), attn)
    grid = model.patch_grid(*x.shape[-2:])
    prefix = prefix_count(attn[0].shape[-1], grid, _model_prefix(model))
    attn = [a.detach() for a in attn]
    norms = _norm_maps(outs, grid)
    return Explanation(attn, grid, prefix, attention_rollout(attn, grid=grid, prefix_tokens=prefix), norms,
                       logits.detach() if has_head else None, t,
                       _relevance(attn, grads, prefix, grid) if has_head else None)



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


def to_rgb(image: Tensor | np.ndarray) -> np.ndarray:
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
    from matplotlib import colormaps  # only when drawing: the trainers import this module without matplotlib

    img = to_rgb(image)
    h = heatmap.detach().cpu() if isinstance(heatmap, Tensor) else torch.as_tensor(np.asarray(heatmap))
    h = upsample(h.reshape(h.shape[-2:]), img.shape[:2]).numpy()
    colour = colormaps[cmap](h)[..., :3]
    return np.round(255 * ((1 - alpha) * img + alpha * colour)).astype(np.uint8)

