"""The DeiT pipelines (torchvision `transforms.v2`): uint8 train / eval transforms in the data workers, then
normalisation, random erasing and MixUp / CutMix on the device, a batch at a time."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from imagenet.dataloaders import constants as IN1K
from imagenet.dataloaders.dataset import DatasetError
from imagenet.dataloaders.randaugment import DeiTRandAugment


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise DatasetError(f"interpolation {name!r} is unknown; use bicubic, bilinear or nearest.") from None


def train_transform(img_size: int = IN1K.IMAGE_SIZE, *, scale: tuple[float, float] = (0.08, 1.0),
                    hflip: float = 0.5, randaug_ops: int = 2, randaug_magnitude: float = 9,
                    randaug_std: float = 0.5, interpolation: str = IN1K.INTERPOLATION, mean=IN1K.MEAN) -> v2.Compose:
    """DeiT training augmentation: PIL image -> uint8 tensor (3, img_size, img_size).

    RandomResizedCrop (bicubic) -> flip -> DeiT's RandAugment (timm's rand-m9-mstd0.5-inc1: magnitude out of 10,
    noise std `randaug_std` (0.5), each op with probability 0.5, geometric ops with `interpolation` and the `mean`
    colour as fill). randaug_magnitude=0 or randaug_ops=0 turn RandAugment off. Normalisation and random erasing
    happen on the device (`device_transform`).
    """
    mode = _interpolation(interpolation)
    steps = [v2.RandomResizedCrop(img_size, scale=scale, interpolation=mode, antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if randaug_magnitude > 0 and randaug_ops > 0:
        fill = tuple(min(255, round(255 * m)) for m in mean)
        steps.append(DeiTRandAugment(randaug_ops, randaug_magnitude, randaug_std, fill=fill, interpolation=mode.value))
    steps.append(v2.PILToTensor())
    return v2.Compose(steps)


def eval_transform(img_size: int = IN1K.IMAGE_SIZE, *, resize_size: int | None = None,
                   interpolation: str = IN1K.INTERPOLATION) -> v2.Compose:
    """PIL image -> uint8 tensor (3, img_size, img_size): resize the shorter side to resize_size (default
    img_size / 0.875: 256 for 224), center-crop img_size. Normalise with `device_transform`."""
    resize_size = resize_size or round(img_size / 0.875)
    return v2.Compose([v2.Resize(resize_size, interpolation=_interpolation(interpolation), antialias=True),
                       v2.CenterCrop(img_size), v2.PILToTensor()])


def random_erasing(x: Tensor, prob: float, area: tuple[float, float] = (0.02, 1 / 3),
                   aspect: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> Tensor:
    """timm's RandomErasing(mode="pixel", max_count=1) over a batch x (B, C, H, W), vectorised; returns a new tensor.

    Each sample, with probability `prob`: the first of `attempts` boxes (area fraction ~ U(area), aspect ratio
    log-uniform in `aspect`, rounded sides) that fits strictly inside the image gets N(0, 1) noise per pixel.
    Draws from torch's RNG of x's device.
    """
    b, _, h, w = x.shape
    dev = x.device
    log_aspect = torch.empty(b, attempts, device=dev).uniform_(math.log(aspect[0]), math.log(aspect[1])).exp()
    target = torch.empty(b, attempts, device=dev).uniform_(*area) * (h * w)
    bh, bw = (target * log_aspect).sqrt().round(), (target / log_aspect).sqrt().round()
    fits = (bh < h) & (bw < w)
    first = fits.int().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    bh, bw = bh.gather(1, first), bw.gather(1, first)  # (B, 1)
    erase = (torch.rand(b, 1, device=dev) < prob) & fits.any(1, keepdim=True)
    top = (torch.rand(b, 1, device=dev) * (h - bh + 1)).floor()  # randint(0, h - bh)
    left = (torch.rand(b, 1, device=dev) * (w - bw + 1)).floor()
    rows = torch.arange(h, device=dev).view(1, h)
    cols = torch.arange(w, device=dev).view(1, w)
    in_rows = (rows >= top) & (rows < top + bh)  # (B, H)
    in_cols = (cols >= left) & (cols < left + bw)  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, :, None])[:, None]  # (B, 1, H, W)
    return torch.where(mask, torch.randn_like(x), x)


def device_transform(mean=IN1K.MEAN, std=IN1K.STD, reprob: float = 0.0) -> Callable[[Tensor], Tensor]:
    """Batch transform on the device: x uint8 (B, 3, H, W) -> float32 (B, 3, H, W), normalised with mean / std
    (given for [0, 1] pixels), then random erasing (timm's mode "pixel") of each sample with probability reprob.
    Keeps x's memory format (channels_last stays channels_last)."""
    if not 0 <= reprob <= 1:
        raise ValueError(f"random erasing probability {reprob} must be in [0, 1].")

    stats: dict[torch.device, tuple[Tensor, Tensor]] = {}  # (mean, std) x 255 (1, C, 1, 1) per device

    def transform(x: Tensor) -> Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"device_transform expects a uint8 batch (B, C, H, W), got {x.dtype} {tuple(x.shape)}.")
        if x.device not in stats:
            stats[x.device] = tuple(torch.tensor(v, device=x.device).view(1, -1, 1, 1) * 255 for v in (mean, std))
        m, s = stats[x.device]
        y = x.float().sub_(m).div_(s)
        if reprob > 0:
            y = random_erasing(y, reprob)
        if x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        return y

    return transform


def mixup_cutmix(num_classes: int, mixup: float = 0.8, cutmix: float = 1.0) -> Callable | None:
    """Batch transform (x (B,C,H,W), y (B,)) -> (mixed x, soft targets (B, num_classes)); None when both are 0.

    As DeiT: every batch is mixed, with MixUp or CutMix chosen with equal probability.
    """
    ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
          ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
