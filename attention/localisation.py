"""Localisation with ground truth: Focus-style mosaics (Arias-Duart et al. 2022, "Focus! Rating XAI Methods and
Finding Biases"), 2x2 grids of photos of four different classes where the explained class sits in one known quadrant,
scored by the share of the map's positive mass in that quadrant (Focus) and the pointing game (Zhang et al. 2018,
"Top-down Neural Attention by Excitation Backprop": does the map's maximum fall on the object?). Focus's own
mosaics hold two photos of the explained class (chance 0.5); these hold one of four classes (chance 0.25). Quantus
(quantus.Focus, quantus.PointingGame) scores the same way given the quadrant as the mask, except for tied maxima."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Mosaics:
    """x: (M, C, H, W) mosaics; target: (M,) long, the class to explain; quadrant: (M,) long, where its photo is
    (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right); sources: (M, 4) long, the photo index in each
    quadrant (same order)."""

    x: Tensor
    target: Tensor
    quadrant: Tensor
    sources: Tensor


def make_mosaics(images: Tensor, labels: Tensor, count: int, seed: int = 0) -> Mosaics:
    """`count` Focus mosaics (Arias-Duart et al. 2022) from images: (N, C, H, W) already normalised and labels: (N,)
    their classes (pass only photos the model classifies correctly alone). Each mosaic: four photos of four
    different classes, each downscaled to (H/2, W/2) (bilinear, antialiased) into one quadrant, so the mosaic has
    the model's input size (quadrants stay on the patch grid when H/2, W/2 are multiples of the patch size). The
    classes, photos, their places and the explained quadrant come from numpy's Generator(seed): the same every run.
    ValueError when H or W is odd or the photos hold fewer than four classes."""
    (H, W), labels = images.shape[-2:], labels.cpu()
    if H % 2 or W % 2:
        raise ValueError(f"images of size {H}x{W} must have an even height and width to make 2x2 mosaics.")
    classes = labels.unique()
    if len(classes) < 4:
        raise ValueError(f"the photos hold {len(classes)} classes; a mosaic needs photos of 4 different classes.")
    rng = np.random.default_rng(seed)
    by_class = [torch.nonzero(labels == c)[:, 0].numpy() for c in classes]
    sources = torch.tensor(np.array([[rng.choice(by_class[c]) for c in rng.choice(len(classes), 4, replace=False)]
                                     for _ in range(count)]), dtype=torch.long).reshape(count, 4)
    quadrant = torch.from_numpy(rng.integers(0, 4, count)).long()
    small = F.interpolate(images, size=(H // 2, W // 2), mode="bilinear", antialias=True, align_corners=False)
    tiles = small[sources.to(images.device)]  # (M, 4, C, H/2, W/2)
    x = torch.cat([torch.cat([tiles[:, 0], tiles[:, 1]], 3), torch.cat([tiles[:, 2], tiles[:, 3]], 3)], 2)
    return Mosaics(x, labels[sources.gather(1, quadrant[:, None])[:, 0]].long(), quadrant, sources)


def _quadrants(heatmap: Tensor) -> Tensor:
    """(B, gh, gw) -> (B, 4, gh·gw/4) (an odd side is doubled first, so the middle row / column splits in half)."""
    B, gh, gw = heatmap.shape
    if gh % 2 or gw % 2:
        heatmap = heatmap.repeat_interleave(2, 1).repeat_interleave(2, 2)
        gh, gw = 2 * gh, 2 * gw
    q = heatmap.reshape(B, 2, gh // 2, 2, gw // 2).permute(0, 1, 3, 2, 4)
    return q.reshape(B, 4, -1)


def quadrant_share(heatmap: Tensor, quadrant: Tensor) -> Tensor:
    """Focus (Arias-Duart et al. 2022): heatmap (B, gh, gw), quadrant (B,) (0 TL, 1 TR, 2 BL, 3 BR) -> (B,) the
    share of the map's positive mass (negative values count as 0) inside the quadrant, in [0, 1]; 0.25 = chance,
    and a map with no positive mass scores 0.25."""
    mass = _quadrants(heatmap.float().clamp_min(0)).sum(2)  # (B, 4)
    total = mass.sum(1)
    inside = mass.gather(1, quadrant.long().to(mass.device)[:, None])[:, 0]
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.full_like(total, 0.25))


def pointing_game(heatmap: Tensor, quadrant: Tensor, seed: int = 0) -> Tensor:
    """Pointing game (Zhang et al. 2018) with the quadrant as the object: heatmap (B, gh, gw), quadrant (B,) ->
    (B,) bool, True when the map's maximum lies in the quadrant. Tied maxima (a centred map's four middle patches)
    are settled by a random pick fixed by `seed`, so a tie scores chance on average, neither always a hit (Quantus'
    PointingGame counts any tied maximum on the object) nor always a miss."""
    q = _quadrants(heatmap.float())
    top = (q == q.flatten(1).amax(1)[:, None, None]).flatten(1)  # (B, 4·n): the maxima
    pick = torch.rand(top.shape, generator=torch.Generator().manual_seed(seed)).to(top.device)
    return (pick * top).argmax(1) // q.shape[2] == quadrant.long().to(q.device)
