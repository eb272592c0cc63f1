"""Check (and prepare) an ImageNet-1k (ILSVRC2012) or ImageFolder dataset root; its settings are in `constants`.

It checks a root laid out as `ROOT/train/<wnid>/*.JPEG` + `ROOT/val/<wnid>/*.JPEG`:
missing or extra class folders, images per split, unreadable images (progress bar), and with
`--prepare` first builds that layout from the official archives in ROOT:

    python -m imagenet.dataloaders.imagenet-1k /data/imagenet --prepare   # once: extract the archives
    python -m imagenet.dataloaders.imagenet-1k /data/imagenet             # check (exit 1 on problems)
    python -m imagenet.dataloaders.imagenet-1k my_data --any-classes      # your own ImageFolder dataset
"""

from __future__ import annotations

import argparse
import sys
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from imagenet.dataloaders import classes
from imagenet.dataloaders.classes import WNIDS
from imagenet.dataloaders.constants import ARCHIVES, NAME, SPLIT_SIZES
from imagenet.dataloaders.dataset import DatasetError, check_image, extract_archives, list_class_folder, split_dir


def _format_names(names: list[str], limit: int = 8) -> str:
    shown = [f"{n} ({classes.NAMES[classes.wnid_to_index(n)]})" if n in classes.WNIDS else n for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def check(root, *, any_classes: bool = False, read_images: bool = True, workers: int = 4) -> list[str]:
    """Problems found in ROOT (empty list = fine); prints what it finds as it goes."""
    root = Path(root)
    problems: list[str] = []
    files: list[str] = []
    splits = {split: split_dir(root, split) for split in ("train", "val")}
    expected = None if any_classes else set(WNIDS)
    for split, directory in splits.items():
        classes = sorted(d.name for d in directory.iterdir() if d.is_dir())
        if expected is None:  # --any-classes: val must hold train's classes
            expected = set(classes)
        missing, extra = sorted(expected - set(classes)), sorted(set(classes) - expected)
        if missing:
            problems.append(f"{split}: {len(missing)} missing class folder(s): {_format_names(missing)}")
        if extra:
            hint = "" if any_classes else " (not ImageNet-1k WordNet ids; use --any-classes for your own classes)"
            problems.append(f"{split}: {len(extra)} unexpected folder(s): {_format_names(extra)}{hint}")
        count = 0
        for name in tqdm(classes, desc=f"listing {split}", unit="class", leave=False):
            images, others = list_class_folder(directory / name)
            if not images:
                problems.append(f"{split}: class folder {directory / name} holds no images")
            count += len(images)
            files += images
            if others:
                print(f"note: {split}/{name}: {len(others)} file(s) without an image extension are ignored, "
                      f"e.g. {others[0]}")
        print(f"{split}: {len(classes)} class folders, {count:,} images")
        if not any_classes and count != SPLIT_SIZES[split]:
            problems.append(f"{split}: {count:,} images, expected {SPLIT_SIZES[split]:,}")
    if read_images and files:
        with Pool(max(1, workers)) as pool:
            results = pool.imap_unordered(check_image, files, chunksize=64)
            for path, error in tqdm(results, total=len(files), desc="reading images", unit="img"):
                if error:
                    problems.append(f"unreadable image {path}: {error}")
    return problems


def prepare(root) -> None:
    """Extract the official ILSVRC2012 archives in ROOT into ROOT/train/<wnid>/ and ROOT/val/<wnid>/."""
    for split in ("train", "val"):
        extract_archives(root, split)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m imagenet.dataloaders.imagenet-1k", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="dataset root holding train/ and val/ (or the ILSVRC2012 archives with --prepare)")
    parser.add_argument("--prepare", action="store_true",
                        help=f"first extract {', '.join(ARCHIVES.values())} from ROOT into ROOT/train and ROOT/val "
                             f"(torchvision.datasets.ImageNet; needs scipy for the devkit)")
    parser.add_argument("--any-classes", action="store_true",
                        help="your own ImageFolder dataset: check that val has train's classes instead of "
                             "ImageNet's 1000, and skip the expected image counts")
    parser.add_argument("--no-images", dest="read_images", action="store_false",
                        help="only list folders and count files; do not decode every image")
    parser.add_argument("--workers", type=int, default=4, help="processes that decode images (default: 4)")
    args = parser.parse_args(argv)
    try:
        if args.prepare:
            prepare(args.root)
        problems = check(args.root, any_classes=args.any_classes, read_images=args.read_images,
                         workers=args.workers)
    except (DatasetError, OSError) as e:
        sys.exit(f"error: {e}")
    if problems:
        print("problems:")
        for p in problems:
            print(f"  {p}")
        sys.exit(f"error: {len(problems)} problem(s) in {args.root} (listed above).")
    what = "dataset" if args.any_classes else NAME
    print(f"OK: {args.root} is a complete {what} root" + ("" if args.read_images else " (images not decoded)"))


if __name__ == "__main__":
    main()
