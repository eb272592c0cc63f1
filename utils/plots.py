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

from utils.checkpoint import atomic_write


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


def plot_curves(metrics: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Loss (left, log scale) and top-1 accuracy (right) against epoch, from rows with "epoch" and any of
    train_loss / val_loss / test_loss and val_top1 / test_top1 / ema_val_top1 / ema_test_top1."""
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
        if ax.lines:
            ax.legend(fontsize=8)
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="top-1 accuracy")
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=100)


def plot_attention_curves(metrics: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Mean attention distance (left, px) and entropy (right, nats) of every layer against epoch, from the rows
    that `attention.tracking.track_attention` filled ("attn_distance", "attn_entropy"); no such rows: no file."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rows = [m for m in metrics if "attn_distance" in m]
    if not rows:
        return
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
        ax.set(xlabel="epoch", ylabel=label, title=label.split(" (")[0] + " per layer (mean over heads)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=1 + layers // 7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=100)

