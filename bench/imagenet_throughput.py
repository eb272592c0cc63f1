"""Training throughput of the ImageNet recipe: the model step and the data pipeline, each in img/s.

    python -m bench.imagenet_throughput --device cpu                      # vit_ti, 224 px, batch 32
    python -m bench.imagenet_throughput --model vit_s --batch-size 256 --device cuda --compile
    python -m bench.imagenet_throughput --data PHOTOS --workers 2       # PHOTOS: any folder of images

model step: what `imagenet.train` does per batch (normalisation and random erasing of the uint8 batch, MixUp/CutMix,
forward under autocast, label-smoothed cross-entropy, backward, AdamW step) on random images already on the device.
data: decoding + the DeiT training augmentation of real photos through a DataLoader (any folder of images; skipped
when absent), and the shared memory its in-flight uint8 batches take. A run trains at about the smaller of the two
(the loader works in parallel with the model).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from imagenet.dataloaders.dataset import ImageDataset, is_image_file
from imagenet.dataloaders.transforms import device_transform, mixup_cutmix, train_transform
from imagenet.train import MODEL, PRESETS, RECIPE, model_from_config
from utils import hardware
from utils.optim import adamw


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(args: argparse.Namespace, hw: hardware.Hardware) -> list[float]:
    cfg = {k: v for k, (v, _) in {**MODEL, **RECIPE}.items()} | {"model": args.model, "img_size": args.img_size}
    torch.manual_seed(0)
    device = hw.device
    model = model_from_config(cfg, 1000).to(device).train()
    optimizer = adamw(model, 1e-3, cfg["weight_decay"], device)
    step_model = torch.compile(model) if args.compile else model
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    mix = mixup_cutmix(1000, cfg["mixup"], cfg["cutmix"])
    augment = device_transform(reprob=cfg["reprob"])
    x = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    rates = []
    for i in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        xm, ym = mix(augment(x), y)
        with hw.autocast():
            loss = loss_fn(step_model(xm), ym)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= args.warmup:
            rates.append(args.batch_size / (time.perf_counter() - start))
    return rates


def bench_data(args: argparse.Namespace) -> float | None:
    folder = Path(args.data or "")
    if not args.data or not folder.is_dir():
        return None
    files = sorted(str(p) for p in folder.rglob("*") if is_image_file(p.name))[:args.images]
    dataset = ImageDataset([(f, 0) for f in files], ["x"], train_transform(args.img_size))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        persistent_workers=False, drop_last=False)
    start = time.perf_counter()
    n = sum(len(batch[0]) for batch in loader)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.imagenet_throughput", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="vit_ti", choices=sorted(PRESETS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", help=hardware.DEVICE_HELP)
    parser.add_argument("--amp", default="auto", choices=hardware.AMP_CHOICES, help=hardware.AMP_HELP)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data", default=None, help="folder of photos for the data-pipeline part (none: skipped)")
    parser.add_argument("--images", type=int, default=256, help="photos the data part decodes")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the data part")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        hw = hardware.resolve(args.device, args.amp)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"{args.model} {args.img_size}px, batch {args.batch_size}, {hw.summary}, compile={args.compile}, "
          f"torch {torch.__version__}")
    rates = bench_model(args, hw)
    print(f"model step: {statistics.median(rates):.1f} img/s (median of {len(rates)} steps; min "
          f"{min(rates):.1f}, max {max(rates):.1f})")
    data_rate = bench_data(args)
    if data_rate is None:
        print(f"data: skipped ({args.data or 'no --data'}: pass --data FOLDER of photos)")
    else:
        print(f"data: {data_rate:.1f} img/s (decode + DeiT augmentation, {args.workers} workers, "
              f"{min(args.images, len(list(Path(args.data).iterdir())))} photos of {args.data})")
        print(f"training throughput ~ {min(data_rate, statistics.median(rates)):.1f} img/s (the slower of the two)")
    mib = args.batch_size * 3 * args.img_size ** 2 / 2**20
    in_flight = 4 * args.workers  # prefetch_factor 4 per worker (imagenet.train)
    print(f"shared memory of in-flight batches (batch {args.batch_size}, {args.workers} workers x prefetch 4): "
          f"uint8 {mib:.0f} MiB each, {in_flight * mib / 1024:.2f} GiB per rank (float32 would be "
          f"{4 * in_flight * mib / 1024:.2f} GiB)")


if __name__ == "__main__":
    main()
