"""How a ViT learned to look (Dosovitskiy et al. 2021, Fig. 7): principal components of the patch-embedding
filters, position-embedding similarity, mean attention distance per head and layer, plus attention entropy.

`attn` as in `utils.img2attn`: per-layer (B, heads, T, T) softmax maps, the P prefix tokens first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.ema import eval_mode
from utils.img2attn import attention_rollout, grid_shape

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
        d = patch_distances(grid_shape(a.shape[-1], grid), patch_size, a.device, a.dtype)
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
    A model whose token 0 is a pool query (models.any_vit: no class token) gives its blocks' statistics only, not
    the pool's extra last layer.
    """
    if prefix_tokens is None:
        prefix_tokens = getattr(model, "num_prefix_tokens", 1)
    blocks = slice(0, -1) if getattr(model, "pool_query", False) else slice(None)
    if not 0 <= rollout <= len(x):
        raise ValueError(f"rollout={rollout} must be in [0, {len(x)}], the number of images.")
    grid = model.patch_grid(*x.shape[-2:])
    distance = entropy = tokens = 0
    maps: list[Tensor] = []
    with eval_mode(model):
        for chunk in x.split(batch_size):
            _, attn = model(chunk, return_attn=True)
            attn = attn[blocks]
            w = len(chunk) / len(x)
            distance = distance + w * mean_attention_distance(attn, grid, model.patch_size, prefix_tokens=prefix_tokens)
            entropy = entropy + w * attention_entropy(attn)
            need = rollout - sum(map(len, maps))
            if need > 0:
                maps.append(attention_rollout([a[:need] for a in attn], grid=grid, prefix_tokens=prefix_tokens))
            tokens = attn[0].shape[-1]
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



def inspect_model(model: nn.Module, x: Tensor, k: int = 28, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything `attention.figures.inspection_figure` draws, for `model` over inputs x (B, C, H, W): the
    `attention_stats` entries, "components" (k, C, p, p) and "variance" (k,) (`patch_filter_components`),
    "position_similarity" (gh, gw, gh, gw), "embed_dim", "patch_size", "images" (B); `stats` if already computed."""
    comps, ratio = patch_filter_components(model, k)
    return {**(attention_stats(model, x) if stats is None else stats), "components": comps, "variance": ratio,
            "position_similarity": position_similarity(model), "embed_dim": model.patch_embed.proj.out_channels,
            "patch_size": model.patch_size, "images": len(x)}

