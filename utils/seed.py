"""Seeding and RNG state: per-epoch randomness that does not depend on what ran before, and every global RNG
captured as plain values (loadable with `torch.load(weights_only=True)`)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from (seed, epoch) alone (numpy.random.SeedSequence), so epoch `epoch` draws the same
    numbers whatever ran before."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `epoch_seed(seed, epoch)`: an epoch's permutation and augmentation."""
    g = torch.Generator(device=device)
    g.manual_seed(epoch_seed(seed, epoch))
    return g


def rng_states() -> dict[str, Any]:
    """Every global RNG state (python, numpy, torch, this process's GPU) as tensors, lists and ints."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": [version, list(state), gauss],
              "numpy": [name, torch.from_numpy(keys.copy()), pos, has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this process's GPU: one per rank, whatever the node layout
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` captured (missing entries are left alone; a list of per-GPU "cuda" states, as
    older checkpoints hold, gives this process's GPU its own)."""
    if "python" in states:
        version, state, gauss = states["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda, device = states["cuda"], torch.cuda.current_device()
        if isinstance(cuda, list):
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
