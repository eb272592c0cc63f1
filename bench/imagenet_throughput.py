"""Training throughput of the ImageNet recipe: the model step and the data pipeline, each in img/s:
`python -m bench.imagenet_throughput` (the data part with --data PHOTOS).

    python -m bench.imagenet_throughput --device cpu                      # vit_ti, 224 px, batch 32
    python -m bench.imagenet_throughput --model vit_s --batch-size 256 --device cuda --compile
    python -m bench.imagenet_throughput --data PHOTOS --workers 2       # PHOTOS: any folder of images

model step: what `imagenet.train` does per batch (normalisation and random erasing of the uint8 batch, MixUp/CutMix,
forward under autocast, label-smoothed cross-entropy, backward, AdamW step) on random images already on the device,
with imagenet.train's default recipe. data: decoding + the DeiT training augmentation of real photos through a
DataLoader (any folder of images, searched recursively; skipped without --data), and the shared memory its in-flight
uint8 batches take. A run trains at about the smaller of the two (the loader works in parallel with the model).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from imagenet.dataloaders.dataset import ImageDataset, is_image_file
from imagenet.dataloaders.transforms import device_transform, mixup_cutmix, train_transform
from imagenet.train import MODEL, PRESETS, RECIPE, model_from_config
from utils import hardware
from utils.config import RENAMED, build_parser
from utils.optim import adamw

PROG = "python -m bench.imagenet_throughput"
CONFIG = {  # name -> (default, help); every entry is a flag (img_size -> --img-size)
    "model": ("vit_ti", "imagenet.train's --model preset"),
    "img_size": (224, "image side in pixels (a multiple of 16)"),
    "batch_size": (32, "images per step"),
    "steps": (5, "timed steps (after --warmup)"),
    "warmup": (2, "untimed steps first"),
    "device": ("auto", hardware.DEVICE_HELP),
    "amp": ("auto", hardware.AMP_HELP),
    "compile": (False, "torch.compile the model (as imagenet.train --compile)"),
    "threads": (0, "torch CPU threads (0: torch's default)"),
    "data": (None, "folder of photos for the data-pipeline part (without it: that part is skipped)"),
    "images": (256, "photos the data part decodes"),
    "workers": (2, "DataLoader workers of the data part"),
}
MINIMUM = {"img_size": 16, "batch_size": 1, "steps": 1, "warmup": 0, "threads": 0, "images": 1, "workers": 0}
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recipe() -> dict[str, Any]:
    """imagenet.train's default model and recipe settings, under today's config names (utils.config.RENAMED)."""
    return {RENAMED.get(k, k): v for k, (v, _) in {**MODEL, **RECIPE}.items()}


def bench_model(cfg: dict[str, Any], hw: hardware.Hardware) -> list[float]:
    """img/s of each timed training step on random uint8 images of the device."""
    train_cfg = recipe() | {"model": cfg["model"], "img_size": cfg["img_size"]}
    torch.manual_seed(0)
    device, batch = hw.device, cfg["batch_size"]
    model = model_from_config(train_cfg, 1000).to(device).train()
    optimizer = adamw(model, 1e-3, train_cfg["weight_decay"], device)
    step_model = torch.compile(model) if cfg["compile"] else model
    loss_fn = nn.CrossEntropyLoss(label_smoothing=train_cfg["smoothing"])
    mix = mixup_cutmix(1000, train_cfg["mixup"], train_cfg["cutmix"])
    augment = device_transform(reprob=train_cfg["reprob"])
    x = torch.randint(0, 256, (batch, 3, cfg["img_size"], cfg["img_size"]), dtype=torch.uint8, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    rates = []
    for i in range(cfg["warmup"] + cfg["steps"]):
        sync(device)
        start = time.perf_counter()
        xm, ym = mix(augment(x), y)
        with hw.autocast():
            loss = loss_fn(step_model(xm), ym)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= cfg["warmup"]:
            rates.append(batch / (time.perf_counter() - start))
    return rates


def photo_files(folder: Path | None, limit: int) -> list[str]:
    """The first `limit` image files under `folder` (recursively, sorted); [] without a folder.

    Raises ValueError (one sentence) when `folder` is given but missing, not a folder, or holds no images."""
    if folder is None:
        return []
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"--data '{folder}' {what}; pass a folder of photos (or leave --data out to skip the data "
                         f"part).")
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and is_image_file(p.name))[:limit]
    if not files:
        raise ValueError(f"--data '{folder}' holds no image files (.jpg, .jpeg, .png, ...); pass a folder of photos.")
    return files


def bench_data(cfg: dict[str, Any], files: list[str]) -> float:
    """img/s of decoding + the DeiT training augmentation of `files` through a DataLoader."""
    dataset = ImageDataset([(f, 0) for f in files], ["x"], train_transform(cfg["img_size"]))
    loader = DataLoader(dataset, batch_size=cfg["batch_size"], num_workers=cfg["workers"],
                        persistent_workers=False, drop_last=False)
    start = time.perf_counter()
    n = sum(len(batch[0]) for batch in loader)
    return n / (time.perf_counter() - start)


def check_config(cfg: dict[str, Any]) -> None:
    """ValueError (one sentence) for a count below its minimum or an image side that is not a multiple of 16."""
    for key, low in MINIMUM.items():
        if cfg[key] < low:
            raise ValueError(f"--{key.replace('_', '-')} {cfg[key]} must be at least {low}.")
    patch = MODEL["patch_size"][0]
    if cfg["img_size"] % patch:
        raise ValueError(f"--img-size {cfg['img_size']} must be a multiple of the patch size {patch} (e.g. 224).")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(PROG, __doc__, {"options": CONFIG}, types={"data": Path},
                          choices={"model": sorted(PRESETS), "amp": hardware.AMP_CHOICES})
    cfg = vars(parser.parse_args(argv))
    try:
        check_config(cfg)
        files = photo_files(cfg["data"], cfg["images"])
        if cfg["threads"] > 0:
            torch.set_num_threads(cfg["threads"])
        hw = hardware.resolve(cfg["device"], cfg["amp"])
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"{cfg['model']} {cfg['img_size']}px, batch {cfg['batch_size']}, {hw.summary}, compile={cfg['compile']}, "
          f"torch {torch.__version__}")
    rates = bench_model(cfg, hw)
    print(f"model step: {statistics.median(rates):.1f} img/s (median of {len(rates)} steps; min "
          f"{min(rates):.1f}, max {max(rates):.1f})")
    if not files:
        print("data: skipped (pass --data FOLDER of photos to measure decoding + augmentation)")
    else:
        data_rate = bench_data(cfg, files)
        print(f"data: {data_rate:.1f} img/s (decode + DeiT augmentation, {cfg['workers']} workers, "
              f"{len(files)} photos of {cfg['data']})")
        print(f"training throughput ~ {min(data_rate, statistics.median(rates)):.1f} img/s (the slower of the two)")
    if cfg["workers"] == 0:
        print("shared memory of in-flight batches: none (--workers 0 loads in the main process)")
        return
    mib = cfg["batch_size"] * 3 * cfg["img_size"] ** 2 / 2**20
    in_flight = 4 * cfg["workers"]  # prefetch_factor 4 per worker (imagenet.train)
    print(f"shared memory of in-flight batches (batch {cfg['batch_size']}, {cfg['workers']} workers x prefetch 4): "
          f"uint8 {mib:.0f} MiB each, {in_flight * mib / 1024:.2f} GiB per rank (float32 would be "
          f"{4 * in_flight * mib / 1024:.2f} GiB)")


if __name__ == "__main__":
    main()
