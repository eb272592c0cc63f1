"""SaCo: the Salience-guided Faithfulness Coefficient (Wu et al., CVPR 2024, "On the Faithfulness of Vision
Transformer Explanations"). A faithful map's more salient pixels should, perturbed on their own, lower the
prediction more than its less salient ones, by a margin that grows with the salience gap."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attention.faithfulness import check_heatmap, pixel_order, target_probs
from utils.ema import eval_mode
from utils.img2attn import per_image_targets


def saco_from_drops(salience: Tensor, drop: Tensor) -> Tensor:
    """SaCo's coefficient (Wu et al. 2024, Algorithm 1) from salience: (B, K) group salience s(G_i), most salient
    group first, and drop: (B, K) the prediction's drop p(x) - p(x without G_i). Every pair i < j adds
    s(G_i) - s(G_j) when drop_i >= drop_j and subtracts it otherwise; the sum over the sum of |s(G_i) - s(G_j)|
    -> (B,) in [-1, 1] (0 where all groups are equally salient)."""
    i, j = torch.triu_indices(salience.shape[1], salience.shape[1], 1, device=salience.device)
    gap = salience[:, i] - salience[:, j]
    signed = torch.where(drop[:, i] >= drop[:, j], gap, -gap)
    total = gap.abs().sum(1)
    return torch.where(total > 0, signed.sum(1) / total.clamp_min(1e-30), torch.zeros_like(total))


@torch.no_grad()
def saco(model: nn.Module, x: Tensor, heatmap: Tensor, target: int | Tensor | None = None, groups: int = 10,
         batch_size: int = 64, seed: int = 0, full: Tensor | None = None) -> Tensor:
    """SaCo (Wu et al. 2024): x (B, C, H, W), heatmap (B, gh, gw) patch map, target class per image (default: the
    predicted class) -> (B,) in [-1, 1]; 1 = salience order and size agree with the model, -1 = reversed.

    As in the paper, pixels (the map upsampled nearest to (H, W); ties broken by a random pixel order fixed by
    `seed`, attention.faithfulness.pixel_order) are ranked by salience and cut into `groups` = K groups of
    H·W/K pixels (most salient first); s(G_i) = the summed salience of the group's pixels; each group alone is
    replaced by the image's per-channel mean (the paper's per-sample mean), drop_i = softmax[target](x) -
    softmax[target](perturbed); then saco_from_drops. B·K perturbed images go through the model in eval mode (and
    the B images themselves unless `full`, their (B,) softmax[target], is given).
    """
    if groups < 2:
        raise ValueError(f"groups={groups} must be at least 2.")
    (B, _, H, W), (gh, gw) = x.shape, check_heatmap(x, heatmap)
    rank = pixel_order(heatmap, (H, W), seed)
    group = torch.empty_like(rank)
    group.scatter_(1, rank, (torch.arange(H * W, device=x.device) * groups // (H * W)).expand(B, -1))  # (B, H·W)
    pixel = heatmap.float().repeat_interleave(H // gh, 1).repeat_interleave(W // gw, 2).reshape(B, H * W)
    salience = torch.zeros(B, groups, device=x.device).scatter_add_(1, group, pixel)
    mean = x.mean((2, 3), keepdim=True)
    with eval_mode(model):
        target = model(x).argmax(-1) if target is None else per_image_targets(target, B, x.device)
        if full is None:
            full = target_probs(model, lambda idx: x[idx], B, target, batch_size)[0]

        def make(idx: Tensor) -> Tensor:
            b, k = idx // groups, idx % groups
            return torch.where((group[b] == k[:, None]).view(-1, 1, H, W), mean[b], x[b])

        probs = target_probs(model, make, B * groups, target.repeat_interleave(groups), batch_size)[0]
    return saco_from_drops(salience, full[:, None] - probs.view(B, groups))
