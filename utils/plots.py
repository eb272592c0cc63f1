"""Training curves as PNG: loss / accuracy and attention statistics against epoch, from metrics rows.

matplotlib is imported when a figure is drawn, not with this module: the trainers (and every DDP rank) load
without it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.checkpoint import atomic_write, output_file


def figure_path(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Check, before any work, that a figure can be written at `path` -> Path(path).

    Raises ValueError (one sentence naming `flag` and the value) for a folder, a path under an existing file, or a
    suffix matplotlib cannot write (none, .txt, ...); the missing parent folders are made by `save_figure`."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = output_file(path, flag)
    kinds = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in kinds:
        raise ValueError(f"{flag} '{path}' needs a file type matplotlib writes: .png, or one of "
                         f"{', '.join('.' + k for k in sorted(kinds) if k != 'png')}.")
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 150) -> None:
    """Save a matplotlib Figure as PNG (or the suffix's format) at `dpi`, atomically (parent folders are
    created); a pyplot figure is closed afterwards."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:].lower() or "png", dpi=dpi,
                                                 bbox_inches="tight", facecolor="white"))
    finally:
        if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot: let it go
            import matplotlib.pyplot as plt

            plt.close(fig)


def _epoch_axis(ax) -> None:
    """Label the x axis "epoch" with whole-number ticks only (two epochs: ticks 1 and 2, not 1.0, 1.2, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def curves_figure(metrics: Sequence[dict[str, Any]], title: str = ""):
    """Loss (left, log scale) and top-1 accuracy (right) against epoch -> matplotlib Figure, from rows with
    "epoch" and any of train_loss / val_loss / test_loss and val_top1 / test_top1 / ema_val_top1 / ema_test_top1."""
    from matplotlib.figure import Figure

    epochs = [m["epoch"] for m in metrics]
    fig = Figure(figsize=(9, 3.4), facecolor="white", layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, keys in ((ax_loss, ("train_loss", "val_loss", "test_loss")),
                     (ax_acc, ("val_top1", "test_top1", "ema_val_top1", "ema_test_top1"))):
        for key in keys:
            if any(key in m for m in metrics):
                ax.plot(epochs, [m.get(key, float("nan")) for m in metrics], marker=".", label=key)
        ax.grid(alpha=0.3)
        _epoch_axis(ax)
        if ax.lines:
            ax.legend(fontsize=8)
    ax_loss.set(ylabel="loss", yscale="log", title="loss")
    ax_acc.set(ylabel="accuracy (%)", title="top-1 accuracy")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_curves(metrics: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """`curves_figure` saved as PNG at `path`."""
    save_figure(curves_figure(metrics, title), path, dpi=100)


def attention_curves_figure(metrics: Sequence[dict[str, Any]], title: str = ""):
    """Mean attention distance (left, px) and entropy (right, nats) of every layer against epoch -> matplotlib
    Figure, from the rows that `attention.tracking.track_attention` filled ("attn_distance", "attn_entropy");
    None when no row has them."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rows = [m for m in metrics if "attn_distance" in m]
    if not rows:
        return None
    epochs = [m["epoch"] for m in rows]
    layers = len(rows[-1]["attn_distance"])
    colours = colormaps["viridis"](np.linspace(0, 0.9, layers))
    fig = Figure(figsize=(9, 3.4), facecolor="white", layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "attn_distance", "mean attention distance (pixels)"),
                           (axes[1], "attn_entropy", "attention entropy (nats)")):
        for i in range(layers):
            ax.plot(epochs, [m[key][i] if len(m[key]) > i else np.nan for m in rows], marker=".", color=colours[i],
                    label=f"layer {i + 1}")
        ax.set(ylabel=label, title=label.split(" (")[0] + " per layer (mean over heads)")
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=1 + layers // 7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_attention_curves(metrics: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """`attention_curves_figure` saved as PNG at `path`; no tracked rows: no file."""
    fig = attention_curves_figure(metrics, title)
    if fig is not None:
        save_figure(fig, path, dpi=100)
