"""From datasets to device batches: DataLoaders (persistent workers, exact on resume), the log of what a loader
yielded, and uint8 batches turned into normalised (augmented, mixed) floats on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from utils.distributed import DistContext, ignore_stop_signals


class BatchLog:
    """Wraps a loader of (x, y, index, skipped) batches, yields (x, y) and keeps the indices and skipped paths."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.indices: list[int] = []
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y, index, skipped in self.loader:
            self.indices += index.tolist()
            self.skipped += [s for s in skipped if s]
            yield x, y


class DeviceBatches:
    """uint8 (x, y) batches moved to the device (NHWC if asked), turned into floats there by `transform`
    (normalisation, random erasing), then MixUp / CutMix."""

    def __init__(self, batches: BatchLog, device: torch.device, transform: Callable[[Tensor], Tensor],
                 channels_last: bool = False, mix: Callable | None = None):
        self.batches, self.device, self.transform = batches, device, transform
        self.channels_last, self.mix = channels_last, mix

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = self.transform(x)
            yield self.mix(x, y) if self.mix is not None else (x, y)


def make_loader(dataset: Dataset, batch_size: int, sampler: Iterable, *, workers: int, seed: int,
                device: torch.device, drop_last: bool) -> DataLoader:
    """A DataLoader with persistent workers whose own RNG seeds come from a generator of `seed`, never from the
    global RNG (which the training step's dropout and MixUp use): resuming is exact with any number of workers.
    The workers ignore SIGTERM / SIGUSR1: their main process handles them."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=drop_last,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator().manual_seed(seed))


def stop_workers(*loaders: DataLoader) -> None:
    """End the persistent workers of `loaders` now. They ignore SIGTERM (as the main process's handler), so an exit
    that left them to Python's exit-time terminate-and-join would wait for them forever."""
    for loader in loaders:
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()
            loader._iterator = None


def eval_loader(dataset: Dataset, batch_size: int, *, workers: int, seed: int, ctx: DistContext) -> DataLoader:
    """Each rank evaluates every world_size-th image (no padding, so every image counts exactly once)."""
    shard = list(range(ctx.rank, len(dataset), ctx.world_size))
    return make_loader(dataset, batch_size, shard, workers=workers, seed=seed, device=ctx.device, drop_last=False)
