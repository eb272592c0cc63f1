"""How faithful is a map? Deletion / insertion curves (Petsiuk et al. 2018, RISE): the target's probability
while the patches a map ranks highest are removed from (or put back into) the image. Also the pieces ROAD
(attention.road) and SaCo (attention.saco) share: the pixel order of a patch map and chunked target probabilities."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from utils.ema import eval_mode
from utils.img2attn import per_image_targets


def check_heatmap(x: Tensor, heatmap: Tensor) -> tuple[int, int]:
    """The (gh, gw) of a patch map for images x: (B, C, H, W); ValueError unless heatmap is (B, gh, gw) with gh, gw
    dividing H, W."""
    (B, _, H, W), (gh, gw) = x.shape, heatmap.shape[-2:]
    if heatmap.dim() != 3 or heatmap.shape[0] != B or H % gh or W % gw:
        raise ValueError(f"heatmap of shape {tuple(heatmap.shape)} must be (B={B}, gh, gw) with gh, gw dividing "
                         f"the image size {H}x{W}.")
    return gh, gw


def pixel_order(heatmap: Tensor, size: tuple[int, int], seed: int = 0) -> Tensor:
    """Pixels, most relevant first: heatmap (B, gh, gw) upsampled (nearest: a patch's pixels share its score) to
    size = (H, W) -> (B, H·W) flat pixel indices. Ties (the pixels of one patch, equal patches) are broken by one
    random permutation of the pixels drawn from `seed`, so a partly removed patch loses scattered pixels and the
    order is the same every run."""
    (B, gh, gw), (H, W) = heatmap.shape, size
    score = heatmap.float().repeat_interleave(H // gh, 1).repeat_interleave(W // gw, 2).reshape(B, H * W)
    perm = torch.randperm(H * W, generator=torch.Generator().manual_seed(seed)).to(heatmap.device)
    return perm[score[:, perm].argsort(dim=1, descending=True, stable=True)]


def target_probs(model: nn.Module, make: Callable[[Tensor], Tensor], count: int, target: Tensor,
                 batch_size: int = 64) -> Tensor:
    """softmax[target] of `count` images made on demand: make(idx) -> (len(idx), C, H, W) for the image indices
    idx, target[idx] their classes; chunks of batch_size, no gradients. Returns (count,) probabilities and the
    (count,) top-1 hits (bool) as one (2, count) float tensor."""
    out = []
    for idx in torch.arange(count, device=target.device).split(batch_size):
        p = model(make(idx)).softmax(-1)
        out.append(torch.stack([p.gather(1, target[idx, None])[:, 0], (p.argmax(-1) == target[idx]).float()]))
    return torch.cat(out, 1) if out else torch.zeros(2, 0, device=target.device)


@torch.no_grad()
def deletion_score(model: nn.Module, x: Tensor, heatmap: Tensor, target: int | Tensor | None = None,
                   steps: int = 10, mode: str = "deletion", batch_size: int = 64, ends: Tensor | None = None
                   ) -> Tensor:
    """How faithful is a map? Area under the target-probability curve while patches go, most important first.

    x: (B, C, H, W); heatmap: (B, gh, gw), one score per patch (H, W multiples of gh, gw); target: class per
    image (default: the predicted class). Step s = 0..steps changes the round(s·N/steps) highest-scored patches
    (ties: lower patch index first): "deletion" replaces them with the image's per-channel mean (lower AUC =
    better map); "insertion" starts from the all-mean image and puts them back (higher = better).
    Returns (B,) trapezoid AUC of softmax[target] over the fraction of patches changed, in [0, 1].
    All (steps + 1)·B images go through the model in chunks of batch_size (target_probs), in eval mode; with
    ends = (2, B) softmax[target] of x and of the all-mean image (known from an earlier call), the steps' end
    points are not run again: (steps - 1)·B images.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode={mode!r} must be 'deletion' or 'insertion'.")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    (B, _, H, W), (gh, gw) = x.shape, check_heatmap(x, heatmap)
    rank = heatmap.reshape(B, -1).argsort(dim=1, descending=True, stable=True).argsort(dim=1).to(x.device)  # 0 = first
    count = torch.linspace(0, gh * gw, steps + 1, device=x.device).round()  # patches changed at each step
    mean = x.mean((2, 3), keepdim=True).expand_as(x)
    start, end = (x, mean) if mode == "deletion" else (mean, x)

    def make(idx: Tensor) -> Tensor:  # image idx = s·B + b: image b at step s
        s, b = idx // B, idx % B
        changed = (rank[b] < count[s, None]).view(-1, 1, gh, gw)
        changed = changed.repeat_interleave(H // gh, 2).repeat_interleave(W // gw, 3)
        return torch.where(changed, end[b], start[b])

    with eval_mode(model):
        target = model(x).argmax(-1) if target is None else per_image_targets(target, B, x.device)
        if ends is None:
            probs = target_probs(model, make, (steps + 1) * B, target.repeat(steps + 1), batch_size)[0]
        else:  # the images of steps 1 .. steps - 1 only
            inner = target_probs(model, lambda idx: make(idx + B), (steps - 1) * B, target.repeat(steps - 1),
                                 batch_size)[0]
            first, last = (ends[0], ends[1]) if mode == "deletion" else (ends[1], ends[0])
            probs = torch.cat([first.to(inner), inner, last.to(inner)])
    return torch.trapezoid(probs.view(steps + 1, B).T, dx=1 / steps, dim=1)
