"""Click a patch, see where it looks: one self-contained HTML page (no server, no network) for any model here.

    from attention.explorer import explorer_html
    page = explorer_html(model, x, path="explore.html", pictures=photos, class_names=names)  # page shows in Jupyter

What the page gets, per image (see docs/explorer.md): every layer's and head's attention A (B, heads, T, T) of
`model(x, return_attn=True)` as a factorisation log A = Q K^T (rank head_dim + 1: softmax(s) = exp(s - lse), s of
rank head_dim), Q and K in int8 with a scale per (layer, head, token), and the log-normaliser lse of the stored
factors, so the page computes any row exp(Q_i K^T - lse_i) or column exp(Q K_j^T - lse) in plain JavaScript; the
gradient rollout of each of the top-5 classes (Chefer et al. 2021, `utils.img2attn.gradient_rollout`), every block's
token norms (`utils.img2attn.token_norms`), and per head the mean attention distance and entropy
(`attention.inspection`).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from attention.inspection import attention_entropy, mean_attention_distance
from models.any_vit import output_probability, prefix_names, probabilities
from utils.checkpoint import atomic_write, output_file
from utils.ema import eval_mode
from utils.img2attn import gradient_rollout, prefix_count, to_rgb, token_norms

TEMPLATE = Path(__file__).with_name("explorer.html")
SLOT = "__EXPLORER_DATA__"  # where the template takes the JSON data
TOP = 5  # classes with a gradient rollout


class ExplorerError(ValueError):
    """A model, image or path the explorer cannot use; one sentence."""


@dataclass
class Explorer:
    """The written page: `html` (the whole file), its `path` (None when not written), `max_error` (the largest
    |stored - exact| attention probability over all images, layers, heads and entries). Shows inline in Jupyter."""

    html: str
    path: Path | None
    max_error: float

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:820px;border:0">'
                f'</iframe>')


def factorize(attn: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """attn: (heads, T, T) softmax rows -> (q, k), each (heads, T, rank) float64, with q k^T = log attn.

    log softmax(s) = s - lse has rank <= head_dim + 1 when s = q k^T of head_dim, so rank = head_dim + 1 is exact up
    to float error (probabilities that underflowed to 0 are clamped to 1e-30). Randomised range finder + SVD
    (Halko et al. 2011, as torch.svd_lowrank), split evenly (U sqrt(S), V sqrt(S)), then a fixed random rotation
    that spreads every token's values over the `rank` dimensions (kinder to int8)."""
    logits = attn.double().clamp_min(1e-30).log()
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(logits.shape[-1], min(rank + 8, logits.shape[-1]), generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(logits @ omega).Q  # (heads, T, rank + 8): the column space
    u, s, vh = torch.linalg.svd(basis.mT @ logits, full_matrices=False)
    root = s[:, :rank].sqrt()[:, None]
    rotation = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64)).Q
    return (basis @ u[..., :rank]) * root @ rotation, vh[:, :rank].mT * root @ rotation


def quantize(v: Tensor) -> tuple[Tensor, Tensor]:
    """v: (..., r) -> (int8 values (..., r), float32 scale (...)): v ≈ values · scale, symmetric, per vector."""
    scale = (v.abs().amax(-1) / 127).clamp_min(1e-30).float()
    return (v / scale[..., None].double()).round().clamp(-127, 127).to(torch.int8), scale


def stored_attention(q8: Tensor, qs: Tensor, k8: Tensor, ks: Tensor) -> tuple[Tensor, Tensor]:
    """The attention the page shows, from its stored factors (..., T, r) int8 and scales (..., T)
    -> (attention (..., T, T) float64, lse (..., T) float32: row i is exp(q_i k^T - lse_i))."""
    s = (q8.double() * qs.double()[..., None]) @ (k8.double() * ks.double()[..., None]).mT
    lse = s.logsumexp(-1).float()
    return (s - lse.double()[..., None]).exp(), lse


def _b64(a: Tensor | np.ndarray) -> str:
    a = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _png(picture: np.ndarray) -> str:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(np.round(255 * to_rgb(picture)).astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def check_path(path: str | os.PathLike) -> Path:
    """ExplorerError (one sentence) unless an HTML file can be written at `path`; missing folders are made."""
    try:
        path = output_file(path, "path", "explore.html")
    except ValueError as e:
        raise ExplorerError(str(e)) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExplorerError(f"path '{path}': its folder cannot be made ({e.strerror}).") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ExplorerError(f"path '{path}' cannot be written (no write permission); pass another file.")
    return path


def _attention(model: nn.Module, x: Tensor) -> list[Tensor]:
    """model(x, return_attn=True)'s maps, or ExplorerError for a model that gives none."""
    name = type(model).__name__
    try:
        out = model(x, return_attn=True)
    except TypeError:
        raise ExplorerError(f"{name} does not take return_attn=True, so no attention maps to show; pass a ViT of "
                            f"this repo or one loaded with models.pretrained.load_pretrained.") from None
    attn = out[1] if isinstance(out, tuple) and len(out) == 2 else None
    if not attn or any(not isinstance(a, Tensor) or a.dim() != 4 or a.shape[-1] != a.shape[-2] for a in attn):
        raise ExplorerError(f"{name}(x, return_attn=True) gives no (B, heads, T, T) attention maps to show.")
    return [a.detach() for a in attn]


def _factors(stack: Tensor, rank: int) -> tuple[dict, float]:
    """Attention (L, heads, T, T) -> (the page's "rank" and base64 "q", "qs", "k", "ks", "lse"; the largest
    |stored - exact| probability)."""
    parts: dict[str, list[Tensor]] = {name: [] for name in ("q", "qs", "k", "ks", "lse")}
    err = 0.0
    for a in stack:
        q, k = factorize(a, rank)
        (q8, qs), (k8, ks) = quantize(q), quantize(k)
        shown, lse = stored_attention(q8, qs, k8, ks)
        err = max(err, float((shown - a.double()).abs().max()))
        for name, value in zip(parts, (q8, qs, k8, ks, lse), strict=True):
            parts[name].append(value)
    return {"rank": rank, **{name: _b64(torch.stack(v)) for name, v in parts.items()}}, err


def _top_classes(model: nn.Module, x: Tensor, class_names: Sequence[str] | None, target: int | None = None
                 ) -> list[dict]:
    """The top-5 classes of x (1, C, H, W), then `target` when not among them, with their probabilities (softmax; a
    sigmoid per prompt for a head that says so: SigLIP's zero-shot head, models.clip.ZeroShotHead.probability) and
    gradient rollouts; [] without a head."""
    if getattr(model, "config", {}).get("num_classes", 1) == 0:
        return []
    probs = probabilities(model(x)[0], output_probability(model))
    classes = probs.topk(min(TOP, len(probs))).indices.tolist()
    classes += [target] if target is not None and target not in classes else []
    maps = gradient_rollout(model, x.expand(len(classes), -1, -1, -1), torch.tensor(classes, device=x.device))
    return [{"name": class_names[c] if class_names else f"class {c}", "index": c, "p": probs[c].item(),
             "map": _b64(m.float().flatten())} for c, m in zip(classes, maps, strict=True)]


@torch.no_grad()
def _image_data(model: nn.Module, x: Tensor, picture: np.ndarray, title: str, class_names: Sequence[str] | None,
                rank: int | None, target: int | None = None) -> tuple[dict, float]:
    """One image x (1, C, H, W) -> (its entry in the page's data, max |stored - exact| attention)."""
    if not callable(getattr(model, "patch_grid", None)):
        raise ExplorerError(f"{type(model).__name__} has no patch_grid(H, W), so no attention maps to show; pass a "
                            f"ViT of this repo or one loaded with models.pretrained.load_pretrained.")
    try:
        grid = model.patch_grid(*x.shape[-2:])
        attn = _attention(model, x)
    except ExplorerError:
        raise
    except (ValueError, RuntimeError) as e:
        raise ExplorerError(f"{title}: the model cannot take this image ({str(e).splitlines()[0]})") from None
    layers, heads, tokens = len(attn), attn[0].shape[1], attn[0].shape[-1]
    prefix = prefix_count(tokens, grid)
    head_dim = model.config["embed_dim"] // heads if "embed_dim" in getattr(model, "config", {}) else tokens
    stack = torch.cat(attn).float().cpu()  # (L, heads, T, T)
    factors, err = _factors(stack, min(rank or head_dim + 1, tokens))
    norms = token_norms(model, x)[0]  # (L, gh, gw)
    ps = model.patch_size if isinstance(getattr(model, "patch_size", None), int) else 1
    entry = {
        "title": title, "picture": _png(picture), "grid": list(grid), "tokens": tokens, "prefix": prefix,
        "prefix_names": prefix_names(model, prefix), "layers": layers, "heads": heads, **factors,
        "norms": _b64(norms.float().flatten()), "norm_layers": len(norms),
        "distance": mean_attention_distance(stack[:, None].unbind(0), grid, ps, prefix_tokens=prefix).tolist(),
        "entropy": attention_entropy(stack[:, None].unbind(0)).tolist(), "max_error": err,
        "top": _top_classes(model, x, class_names, target),
    }
    entry["open"] = next((f"grad:{i}" for i, t in enumerate(entry["top"]) if t["index"] == target), None)
    return entry, err


def explorer_html(model: nn.Module, x: Tensor, path: str | os.PathLike | None = "runs/explore.html", *,
                  pictures: Sequence[np.ndarray] | np.ndarray | Tensor | None = None,
                  titles: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
                  rank: int | None = None, targets: Sequence[int | None] | None = None) -> Explorer:
    """The attention explorer of `model` on images x (B, C, H, W) (the model's input), written atomically to
    `path` (a temporary file renamed into place; None: not written) -> Explorer (shows inline in Jupyter).

    pictures: what the page shows for each image, (H, W), (H, W, 3) or (C, H, W), uint8 or float in [0, 1]
    (default: x min-max scaled per image). titles: one per image. class_names: the head's classes, for the top-5.
    rank: of the stored factorisation (default head_dim + 1, exact). targets: one class index (or None) per image
    whose gradient rollout the page holds, after the top-5 when not among them, and opens on. ExplorerError (one
    sentence) for a model with no attention maps, an image it cannot take or a path that cannot be written, before
    anything is written."""
    target = check_path(path) if path is not None else None
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ExplorerError(f"images of shape {tuple(getattr(x, 'shape', ()))} are not a batch (B, C, H, W).")
    if pictures is None:
        lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
        pictures = ((x - lo) / (hi - lo).clamp_min(1e-12)).cpu()
    if len(pictures) != len(x):
        raise ExplorerError(f"{len(pictures)} pictures for {len(x)} images; pass one per image.")
    titles = list(titles) if titles is not None else [f"image {i}" for i in range(len(x))]
    targets = list(targets) if targets is not None else [None] * len(x)
    if len(targets) != len(x):
        raise ExplorerError(f"{len(targets)} targets for {len(x)} images; pass one per image (None: the top-5 only).")
    images, err = [], 0.0
    with eval_mode(model):
        for i in range(len(x)):
            entry, e = _image_data(model, x[i:i + 1], _as_array(pictures[i]), titles[i], class_names, rank,
                                   targets[i])
            images.append(entry)
            err = max(err, e)
    data = json.dumps({"version": 1, "images": images}, separators=(",", ":")).replace("</", "<\\/")
    page = TEMPLATE.read_text(encoding="utf-8").replace(SLOT, data, 1)
    if target is not None:
        atomic_write(target, lambda f: f.write(page.encode("utf-8")))  # renamed into place: never half a page
    return Explorer(page, target, err)


def _as_array(picture: np.ndarray | Tensor) -> np.ndarray:
    return picture.detach().cpu().numpy() if isinstance(picture, Tensor) else np.asarray(picture)
