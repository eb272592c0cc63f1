"""How strongly our DeiT RandAugment changes photos, next to timm's (the oracle) and torchvision's, in mean |Δpixel|,
on a folder of photos you pass: `python -m bench.randaugment --photos PHOTOS`.

    python -m bench.randaugment --photos PHOTOS               # the first 100 photos of a folder (ImageNet samples)
    python -m bench.randaugment --photos DIR --n 50 --seeds 20

What is measured: the first --n photos of --photos, shorter side resized to 224 (bicubic) and centre-cropped to
224 x 224, the same crops for every transform; strength = mean |output - input| over pixels, channels and photos,
in uint8 units (0-255). RandomResizedCrop and the flip are left out: they are the same either way and only add noise.
- per op: each of the 15 ops alone at magnitude 9, probability 1, no magnitude noise; signed ops once with each
  sign (timm's sign forced by patching its `random.random`). Columns: ours, timm's, the relative difference, and
  mean |ours - timm| pixel by pixel (0.00: identical images).
- whole transform, --seeds draws per photo: ours `DeiTRandAugment()` (2 ops, m9, mstd 0.5, p 0.5, ImageNet-mean
  fill, bicubic), timm's `rand-m9-mstd0.5-inc1` with the hparams timm's create_transform passes for DeiT
  (translate_const int(224 * 0.45), img_mean (124, 116, 104), interpolation bicubic = DeiT's train interpolation)
  and torchvision's `v2.RandAugment(magnitude=9)` (the pipeline before: bin 9 of 31, black fill). Their random
  draws differ, so ours and timm's agree only statistically: mean ± standard error over photos x seeds.
  timm's posterize to 0 bits (magnitude 10, reached through the noise) is made black as PIL < 13 made it (PIL 13
  raises instead).
Needs timm (skips without it).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from imagenet.dataloaders.dataset import is_image_file
from imagenet.dataloaders.randaugment import OPS, RESAMPLE, DeiTRandAugment
from utils.config import build_parser
from utils.images import load_image

PROG = "python -m bench.randaugment"
CONFIG = {  # name -> (default, help); every entry is a flag
    "photos": (None, "folder of photos (required; e.g. ImageNet sample photos)"),
    "n": (100, "photos used: the first n, sorted by name"),
    "seeds": (30, "draws per photo of the whole transforms"),
}
FILL = (124, 116, 104)
SIZE = 224


def load_crops(folder: Path, n: int) -> list[Image.Image]:
    """The first `n` photos of `folder` (sorted by name) as SIZE x SIZE RGB centre crops (shorter side resized).

    Raises ValueError (one sentence) when the folder is missing or holds no photos; ImageError (a ValueError) for a
    file that cannot be decoded."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"--photos '{folder}' {what}; pass a folder of photos (e.g. ImageNet sample photos).")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))[:n]
    if not files:
        raise ValueError(f"--photos '{folder}' holds no image files (.jpg, .jpeg, .png, ...); pass a folder of "
                         f"photos.")
    crop = v2.Compose([v2.Resize(SIZE, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(SIZE)])
    return [crop(load_image(f)) for f in files]


def delta(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def per_op_rows(crops: list[Image.Image], aa, hparams: dict) -> list[tuple[str, float, float, float]]:
    rows = []
    for name, (signed, geometric, op) in OPS.items():
        kw = dict(resample=RESAMPLE["bicubic"], fillcolor=FILL) if geometric else {}
        theirs_op = aa.AugmentOp(name, prob=1.0, magnitude=9, hparams=hparams)
        ours, theirs, between = [], [], []
        for img in crops:
            for sign in (1, -1) if signed else (1,):
                with mock.patch.object(aa.random, "random", lambda s=sign: 0.75 if s < 0 else 0.25):
                    t = theirs_op(img)
                o = op(img, sign * 0.9, kw)
                ours.append(delta(o, img))
                theirs.append(delta(t, img))
                between.append(delta(o, t))
        rows.append((name, float(np.mean(ours)), float(np.mean(theirs)), float(np.mean(between))))
    return rows


def strength(crops: list[Image.Image], transform, seeds: int, seed_fn) -> tuple[float, float]:
    """Mean and standard error of |transform(img) - img| over photos x seeds."""
    values = []
    for k in range(seeds):
        for i, img in enumerate(crops):
            seed_fn(k * len(crops) + i)
            values.append(delta(transform(img), img))
    return float(np.mean(values)), float(np.std(values) / np.sqrt(len(values)))


def seed_python(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(PROG, __doc__, {"options": CONFIG}, types={"photos": Path})
    parser.usage = "%(prog)s [-h] --photos PHOTOS [options]"  # required, but checked below (one line)
    cfg = vars(parser.parse_args(argv))
    try:
        if cfg["photos"] is None:
            raise ValueError("--photos is required: pass a folder of photos, e.g. --photos PHOTOS with ImageNet "
                             "sample photos.")
        for key in ("n", "seeds"):
            if cfg[key] < 1:
                raise ValueError(f"--{key} {cfg[key]} must be at least 1.")
        crops = load_crops(cfg["photos"], cfg["n"])
    except ValueError as e:  # a bad flag, folder or image file (utils.images.ImageError)
        sys.exit(f"error: {e}")
    try:
        from timm.data import auto_augment as aa
    except ImportError:
        print("skipped: timm is not installed (pip install timm); it is this bench's oracle.")
        return
    folder, seeds = cfg["photos"], cfg["seeds"]
    hparams = dict(translate_const=int(SIZE * 0.45), img_mean=FILL, interpolation=Image.Resampling.BICUBIC)

    print(f"{len(crops)} photos of {folder}, {SIZE}x{SIZE} centre crops; mean |Δpixel| (0-255)")
    print(f"\neach op alone at magnitude 9 (p 1, no noise; signed ops with both signs)\n"
          f"{'op':<22}{'ours':>8}{'timm':>8}{'ours/timm-1':>13}{'|ours-timm|':>13}")
    for name, ours, theirs, between in per_op_rows(crops, aa, hparams):
        rel = ours / theirs - 1 if theirs else 0.0
        print(f"{name:<22}{ours:>8.2f}{theirs:>8.2f}{rel:>+12.1%}{between:>13.2f}")

    # timm's PosterizeIncreasing keeps 0 bits at magnitude >= 10 (noise reaches it), which PIL 13 refuses; PIL < 13
    # (DeiT's time) gave a black image, as ours does
    black = {"PosterizeIncreasing": lambda im, bits, **_: aa.posterize(im, bits) if bits else Image.new("RGB", im.size)}
    with mock.patch.dict(aa.NAME_TO_OP, black):  # the ops keep the function they were built with
        timm_ra = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(hparams))
    old = v2.RandAugment(num_ops=2, magnitude=9, interpolation=InterpolationMode.BICUBIC)
    results = [("ours DeiTRandAugment()", *strength(crops, DeiTRandAugment(), seeds, torch.manual_seed)),
               ("timm rand-m9-mstd0.5-inc1", *strength(crops, timm_ra, seeds, seed_python)),
               ("torchvision RandAugment(m=9)", *strength(crops, old, seeds, torch.manual_seed))]
    timm_mean = results[1][1]
    print(f"\nwhole transform, {seeds} draws per photo ({seeds * len(crops)} in all): mean ± s.e.")
    for name, mean, se in results:
        versus = f"{mean / timm_mean - 1:>+6.1%} vs timm" if timm_mean else "(timm changed nothing)"
        print(f"{name:<30}{mean:>7.2f} ± {se:.2f}   {versus}")
    (_, ours, ours_se), (_, theirs, theirs_se) = results[:2]
    se = np.hypot(ours_se, theirs_se)
    print(f"ours - timm: {ours - theirs:+.2f} ± {se:.2f} "
          + (f"({abs(ours - theirs) / se:.1f} standard errors)" if se > 0 else "(one draw: no standard error)"))


if __name__ == "__main__":
    main()
