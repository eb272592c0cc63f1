"""The figures of where a ViT looks (`attention_figure`) and how it learned to look (`inspection_figure`, the ViT
paper's Fig. 7), drawn from what `utils.img2attn.explain` and `attention.inspection.inspect_model` computed.
Save them with `utils.plots.save_figure`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure, SubFigure
from matplotlib.text import Text
from torch import Tensor

from attention.inspection import patch_distances
from models.any_vit import probabilities
from utils.img2attn import Explanation, cls_attention, overlay, to_rgb
from utils.img_to_patch import mosaic
from utils.text_fit import TextFitter

OVERLAY_CMAP = "jet"  # the map overlays (utils.img2attn.overlay's default)
HEAD_CMAP = "inferno"  # the layer x head grid
TOPK_WIDTH = 1.5  # the top-k panel's width, in map panels: room for class names beside the percentages
PANEL_WIDTH = 2.0  # inches a map of the top row gets at least: room for its title and colour-bar label


def first_synonym(name: str) -> str:
    """A WordNet-style class name "Pembroke, Pembroke Welsh corgi" -> "Pembroke" (its first synonym); a name
    without a comma as it is."""
    return name.split(",", 1)[0].strip() or name


def attention_figure(ex: Explanation, image: Tensor | np.ndarray, class_names: Sequence[str] | None = None,
                     topk: int = 5, index: int = 0, label: int | None = None, *,
                     extra: Mapping[str, tuple[Tensor, str]] | None = None, query: str = "class token",
                     kind: str = "classes", probability: str = "softmax") -> Figure:
    """One picture of where the model looks at image `index` of `ex` -> matplotlib Figure.

    image: what to show, (H, W) / (H, W, 3) uint8 or float in [0, 1] (or channels first). label: the image's true
    class (an index into class_names), when known: named in the title and in bold among the top-k. Top row: the
    image, the top-k classes, attention rollout, gradient rollout (for ex.target) and the last layer's token norms,
    each map with a colour bar of its own values; a model without a head (DINO, DINOv2) gets no top-k and no
    gradient panel. Below: the class token's attention in every layer (columns) x head (rows), each panel scaled
    to its own range (one colour bar: panel minimum to maximum). Register tokens are left out.
    extra: more maps for the top row, {title: (maps (B, grid_h, grid_w), colour-bar label)}, e.g. LeGrad's.
    query: the token whose row the maps show: "class token", or for models without one models.any_vit's pseudo
    token, named by models.any_vit.prefix_names ("pool query" for SigLIP's attention pool, "average pool" for GAP),
    which the figure then says. kind: what the head's outputs are ("classes", or "prompts" for a zero-shot head).
    probability: how logits become the percentages, "softmax" over the outputs or "sigmoid" per output (SigLIP's
    zero-shot head). Long names are fitted at every draw, whatever the figure's size (TextFitter): a class name or
    prompt as it is, else a class's first synonym ("Pembroke, Pembroke Welsh corgi" -> "Pembroke"), else cut with
    "…"; the percentages are never cut."""
    if probability not in ("softmax", "sigmoid"):
        raise ValueError(f"probability={probability!r} must be 'softmax' or 'sigmoid'.")
    n_layers, n_heads = len(ex.attn), ex.attn[0].shape[1]
    cell = min(max(1.25, 10 / n_layers), 2.0)  # inches a layer x head panel: 14 x 14 patches at 150 dpi, 13 px each
    has_head = ex.logits is not None
    panels = 3 + len(extra or {}) + (TOPK_WIDTH + 1) * has_head  # the top row, in map panels (_summary_row)
    width = max(n_layers * cell, 10, PANEL_WIDTH * panels) + 1.0
    top_h, low_h = width / 4 + 1.1, n_heads * cell + 0.6  # room under the maps for their colour bars
    fig = Figure(figsize=(width, top_h + low_h), facecolor="white", layout="constrained")
    upper, lower = fig.subfigures(2, 1, height_ratios=[top_h, low_h])
    fitter = fig.add_artist(TextFitter())
    _summary_row(upper, fitter, ex, image, class_names, topk, index, label, extra or {}, query, kind, probability)
    note = "" if query == "class token" else f"(no class token: every map is the {query}'s row)"
    head = f"{_adjective(query)} attention in every layer × head (each panel scaled to its own range)"
    fitter.add(lower.suptitle(head, fontsize=12), _width(lower), [f"{head} {note}".strip(), f"{head}\n{note}".strip()])
    grid_w = n_layers * cell + 1.5  # the panels, the head labels and the colour bar
    if grid_w < width:  # few layers: centre the grid rather than spread its columns over the page
        lower = lower.subfigures(1, 3, width_ratios=[(width - grid_w) / 2, grid_w, (width - grid_w) / 2])[1]
    _head_grid(lower, ex, index, query)
    return fig


def _adjective(query: str) -> str:
    """"class token" -> "class-token" (as in "class-token attention"); other query names as they are."""
    return "class-token" if query == "class token" else query


def _title(ex: Explanation, index: int, name: Callable[[int], str], label: int | None, probability: str) -> str:
    """"predicted: X (p %)", and "true: Y" when the label is known."""
    truth = f"   true: {name(label)}" if label is not None else ""
    if ex.logits is None:
        return f"no classification head: attention maps only{truth}"
    probs = probabilities(ex.logits[index], probability)
    c = int(probs.argmax())
    return f"predicted: {name(c)}  ({float(probs[c]):.1%}){truth}"


def _width(artist: Artist | Axes | SubFigure) -> Callable[[RendererBase], float]:
    """The display width of `artist` (an Axes, a subfigure, a text) as drawn by a renderer."""
    return lambda renderer: artist.get_window_extent(renderer).width


def _colour_bar(fig: SubFigure, ax: Axes, values: Tensor, cmap: str, label: str) -> None:
    """A horizontal colour bar under `ax` from the smallest to the largest of `values` (what the overlay's
    colours span: `overlay` scales each map to its own range)."""
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1e-12  # a constant map: one colour, a degenerate but valid bar
    cax = ax.inset_axes([0.0, -0.09, 1.0, 0.05])  # inside the panel's slot: the panels stay aligned with the input
    bar = fig.colorbar(ScalarMappable(Normalize(lo, hi), matplotlib.colormaps[cmap]), cax=cax,
                       orientation="horizontal")
    bar.set_ticks([lo, (lo + hi) / 2, hi], labels=[f"{v:.3g}" for v in (lo, (lo + hi) / 2, hi)])
    bar.ax.tick_params(labelsize=8)
    bar.set_label(label, fontsize=9)


def _summary_row(upper: SubFigure, fitter: TextFitter, ex: Explanation, image: Tensor | np.ndarray,
                 class_names: Sequence[str] | None, topk: int, index: int, label: int | None,
                 extra: Mapping[str, tuple[Tensor, str]], query: str, kind: str, probability: str) -> None:
    """The image, the top-k bars and the map overlays (each with its colour bar), under the prediction. Long class
    names and prompts are fitted at every draw (TextFitter): as they are, else a class's first synonym, else cut
    with an ellipsis; the title to the figure's width, the map titles to their panel, the top-k to its bars."""
    has_head = ex.logits is not None

    def name(c: int) -> str:
        return class_names[c] if class_names is not None else f"class {c}"

    def short(c: int) -> str:
        return first_synonym(name(c)) if kind == "classes" else name(c)

    maps = {"attention rollout": (ex.rollout[index], f"share of the {query}'s attention")}
    grad = ""
    if has_head:
        grad = f"gradient rollout: {name(int(ex.target[index]))}"
        maps[grad] = (ex.gradient_rollout[index], "relevance (arbitrary units)")
    maps.update({title: (m[index], what) for title, (m, what) in extra.items()})
    maps[f"token norm, layer {len(ex.attn)}"] = (ex.token_norms[index, -1], "L2 norm of the patch token")
    img = to_rgb(image)
    k = max(1, -(-224 // max(img.shape[:2])))  # upscale small images (MNIST) so overlays are smooth
    img = img.repeat(k, 0).repeat(k, 1)
    fitter.add(upper.suptitle("", fontsize=15, fontweight="bold"), _width(upper),
               [_title(ex, index, name, label, probability), _title(ex, index, short, label, probability)])
    ratios = [1.0] + [TOPK_WIDTH] * has_head + [1.0] * len(maps)
    ax = upper.subplots(1, len(ratios), width_ratios=ratios)
    ax[0].imshow(img, interpolation="nearest")
    ax[0].set_title("input", fontsize=12)
    if has_head:
        _top_k(ax[1], fitter, probabilities(ex.logits[index], probability), int(ex.target[index]), topk, label,
               name, short, kind, probability)
    panels = ax[1 + has_head:]
    for a, (title, (m, what)) in zip(panels, maps.items(), strict=True):
        a.imshow(overlay(img, m, cmap=OVERLAY_CMAP), interpolation="bilinear")
        a.set_title(title, fontsize=12)
        if title == grad:  # a class name or prompt: on a line of its own when it does not fit after the words
            c = int(ex.target[index])
            fitter.add(a.title, _width(a), [title, f"gradient rollout: {short(c)}", f"gradient rollout\n{name(c)}",
                                            f"gradient rollout\n{short(c)}"])
        elif title in extra:
            fitter.add(a.title, _width(a), [title])
        _colour_bar(upper, a, m, OVERLAY_CMAP, what)
    for a in [ax[0], *panels]:  # a thin frame keeps white images apart from the page
        a.set_xticks([])
        a.set_yticks([])
        a.spines[:].set_color("#bbbbbb")


def _top_k(ax: Axes, fitter: TextFitter, probs: Tensor, target: int, topk: int, label: int | None,
           name: Callable[[int], str], short: Callable[[int], str], kind: str, probability: str) -> None:
    """The top-k bars of probs (K,), each under its name (left, fitted to the room the percentage leaves, bold
    with " (true)" for the label) and its percentage (right); the target's bar red."""
    top = probs.topk(min(topk, probs.numel()))
    gap = 0.5 * 11  # points between a name and its percentage
    for i, (p, c) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
        ax.barh(i, p, height=0.3, color="#d62728" if c == target else "#8c96a3")
        ax.barh(i, 1, height=0.3, color="#8c96a3", alpha=0.15)
        pct = ax.text(1, i - 0.28, f"{p:.1%}", fontsize=11, va="bottom", ha="right")
        text = ax.text(0, i - 0.28, name(c), fontsize=11, va="bottom", fontweight="bold" if c == label else "normal")
        text.set_in_layout(False)  # fitted inside the panel after the layout (TextFitter)

        def room(renderer: RendererBase, pct: Text = pct) -> float:
            return _width(ax)(renderer) - _width(pct)(renderer) - renderer.points_to_pixels(gap)

        fitter.add(text, room, list(dict.fromkeys([name(c), short(c)])), " (true)" if c == label else "")
    ax.set_xlim(0, 1)
    ax.set_ylim(max(len(top.values), 5) - 0.5, -0.9)  # rows of one height for any k, from the top
    each = " (sigmoid, each on its own)" if probability == "sigmoid" else ""
    ax.set_title(f"top-{len(top.values)} {kind}{each}", fontsize=12)
    ax.set_axis_off()


def _head_grid(lower: SubFigure, ex: Explanation, index: int, query: str = "class token") -> None:
    """The query token's attention in every layer (columns) x head (rows), each panel min-max scaled."""
    n_layers, n_heads = len(ex.attn), ex.attn[0].shape[1]
    axes = lower.subplots(n_heads, n_layers, squeeze=False)
    for h in range(n_heads):
        for layer in range(n_layers):
            a = axes[h, layer]
            a.set_xticks([])
            a.set_yticks([])
            panel = cls_attention([ex.attn[layer][index:index + 1]], 0, h, ex.grid, prefix_tokens=ex.prefix_tokens)
            a.imshow(panel[0].cpu().numpy(), cmap=HEAD_CMAP, interpolation="nearest")
            if h == 0:
                a.set_title(f"layer {layer + 1}", fontsize=10)
            if layer == 0:
                a.set_ylabel(f"head {h + 1}", fontsize=10)
    bar = lower.colorbar(ScalarMappable(Normalize(0, 1), matplotlib.colormaps[HEAD_CMAP]), ax=axes, shrink=0.6,
                         aspect=30, pad=0.01)
    bar.set_ticks([0, 1], labels=["panel\nminimum", "panel\nmaximum"])
    bar.ax.tick_params(labelsize=9)
    bar.set_label(f"{_adjective(query)} attention", fontsize=10)


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


def inspection_figure(inspection: dict[str, Any], name: str = "ViT") -> Figure:
    """The ViT paper's Fig. 7 plus attention entropy, from `attention.inspection.inspect_model` -> matplotlib Figure.

    Panels: the principal components of the patch-embedding filters (each scaled to its own range; RGB for 3
    channels, gray otherwise), the position-embedding cosine similarity of every patch with all (the grid of
    grids), the mean attention distance of every head against depth (dashed: uniform attention over the grid)
    and the attention entropy (dashed: log T, uniform rows).
    """
    stats, comps, ratio = inspection, inspection["components"], inspection["variance"]
    sim = inspection["position_similarity"].numpy()
    (gh, gw), p, n = stats["grid"], inspection["patch_size"], inspection["images"]
    layers, heads = stats["distance"].shape

    fig = Figure(figsize=(12, 10.5), facecolor="white", layout="constrained")
    fig.suptitle(f"{name}: D={inspection['embed_dim']}, {layers} layers x {heads} heads, {p} px patches\n"
                 f"attention over {n} image{'s' * (n != 1)} of {gh} rows x {gw} columns of patches", fontsize=13,
                 fontweight="bold")
    ax = fig.subplots(2, 2)

    c = comps.numpy()
    c = (c - c.min((1, 2, 3), keepdims=True)) / np.maximum(np.ptp(c, (1, 2, 3), keepdims=True), 1e-12)
    tiles = c.transpose(0, 2, 3, 1) if c.shape[1] == 3 else np.repeat(c.mean(1)[..., None], 3, -1)  # (k, p, p, 3)
    ax[0, 0].imshow(mosaic(tiles, cols=min(7, len(tiles)), fill=1.0), interpolation="nearest")
    ax[0, 0].set_title(f"patch-embedding filters: first {len(c)} principal components\n"
                       f"({float(ratio.sum()):.0%} of the variance; row by row, largest first)", fontsize=11)
    ax[0, 0].set_axis_off()

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    sh, sw = sim.shape[:2]  # the position table's own grid (the input's may differ)
    im = ax[0, 1].imshow(mosaic(sim.reshape(sh * sw, sh, sw), cols=sw), cmap=cmap, vmin=-1, vmax=1,
                         interpolation="nearest")
    step = max(1, round(max(sh, sw) / 8))  # tick every step-th tile, at its centre
    cols, rows = range(0, sw, step), range(0, sh, step)
    ax[0, 1].set_xticks([j * (sw + 1) + (sw - 1) / 2 for j in cols], [str(j + 1) for j in cols])
    ax[0, 1].set_yticks([i * (sh + 1) + (sh - 1) / 2 for i in rows], [str(i + 1) for i in rows])
    ax[0, 1].set(xlabel="input patch column", ylabel="input patch row")
    ax[0, 1].set_title("position embedding similarity\n(tile at row i, column j: that patch against every patch)",
                       fontsize=11)
    fig.colorbar(im, ax=ax[0, 1], shrink=0.85, label="cosine similarity")

    uniform = float(patch_distances((gh, gw), p).mean())
    _per_layer(ax[1, 0], stats["distance"], uniform, f"uniform attention ({uniform:.1f} px)",
               "mean attention distance (pixels)", "mean attention distance per head")
    tokens = stats["tokens"]
    _per_layer(ax[1, 1], stats["entropy"], math.log(tokens), f"uniform rows (log {tokens} = {math.log(tokens):.2f})",
               "attention entropy (nats)", "attention entropy per head")
    return fig
