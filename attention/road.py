"""ROAD: RemOve And Debias (Rong et al., ICML 2022, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods"). Pixels are removed most-relevant-first (MoRF) or least-relevant-first (LeRF) and filled by noisy linear
imputation, so the filled region does not give its own shape away as a flat mean would; a faithful map makes the
target's probability fall fast under MoRF and slowly under LeRF (a large LeRF - MoRF gap)."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor, nn

from attention.faithfulness import check_heatmap, pixel_order, target_probs
from utils.ema import eval_mode
from utils.img2attn import per_image_targets

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# NoisyLinearImputer's neighbours (road/imputations.py of the paper's code): (dy, dx) -> weight; they sum to 1.
NEIGHBOURS = {(1, 1): 1 / 12, (0, 1): 1 / 6, (-1, 1): 1 / 12, (1, -1): 1 / 12, (0, -1): 1 / 6, (-1, -1): 1 / 12,
              (1, 0): 1 / 6, (-1, 0): 1 / 6}


def _scipy():
    try:
        import scipy.sparse
        import scipy.sparse.linalg
    except ImportError as e:
        raise ImportError("ROAD's imputation needs SciPy: pip install -r requirements-bench.txt") from e
    return scipy.sparse, scipy.sparse.linalg


@functools.lru_cache(maxsize=8)
def _dissection(h: int, w: int, leaf: int = 16) -> np.ndarray:
    """A nested-dissection rank of the h x w pixels (George 1973): halve the longer side of a box at a one-pixel
    line (which cuts every 8-neighbour link), rank the two halves first and the line last, down to boxes of <= leaf
    pixels. Any subset of pixels taken in this order keeps the sparse factor small."""
    rank, nxt = np.empty((h, w), dtype=np.int64), 0

    def split(r0: int, r1: int, c0: int, c1: int) -> None:
        nonlocal nxt
        if r0 >= r1 or c0 >= c1:
            return
        if (r1 - r0) * (c1 - c0) <= leaf:
            lines = [(r0, r1, c0, c1)]
        elif r1 - r0 >= c1 - c0:
            mid = (r0 + r1) // 2
            split(r0, mid, c0, c1), split(mid + 1, r1, c0, c1)
            lines = [(mid, mid + 1, c0, c1)]
        else:
            mid = (c0 + c1) // 2
            split(r0, r1, c0, mid), split(r0, r1, mid + 1, c1)
            lines = [(r0, r1, mid, mid + 1)]
        for a, b, c, d in lines:
            n = (b - a) * (d - c)
            rank[a:b, c:d] = np.arange(nxt, nxt + n).reshape(b - a, d - c)
            nxt += n

    split(0, h, 0, w)
    return rank.reshape(-1)


def _impute(imgs: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """imgs (k, C, H, W) float64 sharing one removed (H, W) mask -> the images with the removed pixels solved: one
    sparse LU of the mask's system, the k·C channels as its right-hand sides."""
    sparse, linalg = _scipy()
    (k, C, H, W), idx = imgs.shape, np.flatnonzero(removed)
    n = len(idx)
    idx = idx[np.argsort(_dissection(H, W)[idx])]  # unknowns in nested-dissection order: no reordering needed
    var = np.full(H * W, -1)
    var[idx] = np.arange(n)
    r, c = np.divmod(idx, W)
    flat, rem, diag = imgs.reshape(k * C, H * W), removed.reshape(-1), np.zeros(n)
    rhs, rows, cols, vals = np.zeros((n, k * C)), [np.arange(n)], [np.arange(n)], []
    for (dy, dx), w in NEIGHBOURS.items():
        inside = (r + dy >= 0) & (r + dy < H) & (c + dx >= 0) & (c + dx < W)
        i, j = np.flatnonzero(inside), ((r + dy) * W + c + dx)[inside]
        diag[i] += w  # an equation weighs only the neighbours inside the image
        unknown = rem[j]
        rows.append(i[unknown]), cols.append(var[j[unknown]]), vals.append(np.full(unknown.sum(), -w))
        rhs[i[~unknown]] += w * flat[:, j[~unknown]].T  # i is unique for one offset
    a = sparse.csc_matrix((np.concatenate([diag, *vals]), (np.concatenate(rows), np.concatenate(cols))), (n, n))
    # symmetric and diagonally dominant: no pivoting, the dissection order as it is
    lu = linalg.splu(a, permc_spec="NATURAL", diag_pivot_thresh=0, options={"SymmetricMode": True})
    out = flat.copy()
    out[:, idx] = lu.solve(rhs).T
    return out.reshape(k, C, H, W)


def noisy_linear_impute(x: Tensor, removed: Tensor, noise: float = 0.01, generator: torch.Generator | None = None,
                        workers: int | None = None) -> Tensor:
    """ROAD's NoisyLinearImputer: every removed pixel becomes the weighted mean of its 8 neighbours (weights 1/6 for
    the 4 edge neighbours, 1/12 for the 4 corners, only those inside the image: road/imputations.py of the paper),
    all removed pixels of an image solved together as ONE sparse linear system (scipy.sparse.linalg.splu in a
    nested-dissection order, the channels as right-hand sides; images with the same mask share one factorisation),
    then Gaussian noise of std `noise` (in x's units; the paper's default 0.01; drawn on the CPU from `generator`) is
    added to the imputed pixels, as the paper's code does (NoisyLinearImputer in tleemann/road_evaluation).

    x: (B, C, H, W); removed: (B, H, W) bool -> (B, C, H, W), x's device and dtype. SuperLU releases the GIL, so
    `workers` threads (default torch.get_num_threads()) factorise different masks at once. ValueError when a mask
    removes every pixel of its image (nothing to impute from). Needs SciPy.
    """
    if removed.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"removed of shape {tuple(removed.shape)} must be (B, H, W) = {(x.shape[0], *x.shape[2:])}.")
    if bool(removed.flatten(1).all(1).any()):
        raise ValueError("removed covers a whole image; keep at least one pixel to impute from.")
    out, masks = x.detach().cpu().double().numpy().copy(), removed.cpu().numpy()
    groups: dict[bytes, list[int]] = {}
    for b, m in enumerate(masks):
        if m.any():
            groups.setdefault(np.packbits(m).tobytes(), []).append(b)
    workers = min(workers or torch.get_num_threads(), len(groups))
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        filled = list(pool.map(lambda same: _impute(out[same], masks[same[0]]), groups.values()))
    for same, f in zip(groups.values(), filled, strict=True):
        out[same] = f
    out = torch.from_numpy(out)
    if noise:
        gone = removed.cpu()[:, None].expand_as(out)
        out[gone] += noise * torch.randn(int(gone.sum()), generator=generator, dtype=out.dtype)
    return out.to(x)


@torch.no_grad()
def road(model: nn.Module, x: Tensor, heatmap: Tensor, target: int | Tensor | None = None,
         fractions: tuple[float, ...] = FRACTIONS, order: str = "morf", batch_size: int = 64, noise: float = 0.01,
         generator: torch.Generator | None = None, seed: int = 0, workers: int | None = None
         ) -> tuple[Tensor, Tensor]:
    """ROAD curves (Rong et al. 2022): the target's probability after removing a fraction of the pixels.

    x: (B, C, H, W) normalised images; heatmap: (B, gh, gw) patch map; target: class per image (default: the
    predicted class). Pixels are ranked by the map upsampled to (H, W) (nearest: a patch's pixels share its score),
    ties broken by a random pixel order fixed by `seed` (attention.faithfulness.pixel_order), so whole patches go
    first and only the last patch of a fraction loses scattered pixels. order="morf" removes the round(f·H·W)
    highest-ranked pixels for each f in `fractions`, "lerf" the lowest-ranked ones; noisy_linear_impute fills them
    (noise std `noise` from `generator`, `workers` threads). Model in eval mode, chunks of batch_size.
    Returns ((B, F) softmax probability of the target, (B, F) bool: the target is still the top-1 class).
    Cost: one sparse LU per image and fraction, about 0.1 s of CPU per 224x224 image (more at high fractions).
    """
    if order not in ("morf", "lerf"):
        raise ValueError(f"order={order!r} must be 'morf' or 'lerf'.")
    if not fractions or not all(0 <= f < 1 for f in fractions):
        raise ValueError(f"fractions={fractions} must be in [0, 1).")
    (B, _, H, W), F = x.shape, len(fractions)
    check_heatmap(x, heatmap)
    rank = pixel_order(heatmap, (H, W), seed)
    if order == "lerf":
        rank = rank.flip(1)
    pos = rank.argsort(1)  # (B, H·W): where each pixel comes in the removal order
    count = torch.tensor([round(f * H * W) for f in fractions], device=x.device)
    with eval_mode(model):
        target = model(x).argmax(-1) if target is None else per_image_targets(target, B, x.device)

        def make(idx: Tensor) -> Tensor:  # fraction-major: a chunk holds images of one fraction (shared masks)
            f, b = idx // B, idx % B
            return noisy_linear_impute(x[b], (pos[b] < count[f, None]).view(-1, H, W), noise, generator, workers)

        out = target_probs(model, make, F * B, target.repeat(F), batch_size)
    return out[0].view(F, B).T, out[1].view(F, B).T.bool()
