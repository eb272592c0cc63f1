"""Exponential moving average of a model's weights (timm's ModelEmaV3); the bare model under its wrappers; eval mode
for a while."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn


class ModelEma:
    """EMA of a model's weights, kept on the model's device.

    `module` is a deep copy of the bare model (`unwrap(model)`) in eval mode without gradients; its state dict loads
    into a fresh model of the class. `update_parameters(model)` moves every float parameter and buffer towards the
    model's with one `torch._foreach_lerp_` (ema += (1 - d) (model - ema), d = `decay_at(updates)`) and copies the
    other buffers: no host sync. `updates` counts the updates done.

    Raises ValueError for a decay outside [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay {decay} must be in [0, 1).")
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def decay_at(self, updates: int) -> float:
        """The decay of the update that follows `updates` updates: `decay`, or with warm-up timm ModelEmaV3's
        1 - (1 + updates)^(-3/4) capped at `decay` (0 for the first update, which copies the model; 0.9 after 20,
        0.999 after ~10^4, 0.9999 after ~2 x 10^5)."""
        return min(self.decay, 1 - (1 + updates) ** -0.75) if self.warmup else self.decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """One EMA step towards `model` (wrapped or bare, of the same class as `module`)."""
        bare = unwrap(model)
        pairs = zip([*self.module.parameters(), *self.module.buffers()], [*bare.parameters(), *bare.buffers()],
                    strict=True)
        ema_f, model_f = [], []
        for e, m in pairs:
            if e.is_floating_point():
                ema_f.append(e)
                model_f.append(m)
            else:
                e.copy_(m)
        if ema_f:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - self.decay_at(self.updates))
        self.updates += 1


def unwrap(model: nn.Module | ModelEma) -> nn.Module:
    """The bare model under DDP (`.module`), `torch.compile` (`._orig_mod`) and ModelEma (`.module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel | ModelEma):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block; its training mode is put back afterwards, also on an exception."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
