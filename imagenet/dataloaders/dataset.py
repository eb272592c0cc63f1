"""Image-classification datasets (ImageFolder layouts, unreadable images skipped) and the training sampler.

Layouts (any class set; the class count comes from the folders):
- `ROOT/train/<class>/<image>` + `ROOT/val/<class>/<image>` (ImageFolder; ImageNet: class = WordNet id);
- the official ILSVRC2012 archives in ROOT are not extracted here (that takes hours, far past a cluster's
  collective timeouts): `python -m imagenet.dataloaders.imagenet-1k ROOT --prepare` does it once;
- for evaluation only, a flat folder of `<wnid>_<name>.JPEG` files (e.g. one photo per ImageNet class):
  labels from the WordNet id, classes = the 1000 ImageNet-1k classes.

Samples are (image (3, H, W) uint8, target, index, skipped): `skipped` is "" or the path of an unreadable
image that was replaced by the next readable one (so batches keep their size and DDP ranks stay in step).
Workers only decode, crop and augment (uint8: a quarter of float32's shared memory; `transforms`).
`TrainSampler` shards an epoch over ranks (with DeiT's repeated augmentation) and makes the augmentation of a
sample a function of (seed, epoch, index, copy) alone: the same on any number of workers, and after `--resume`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS

from imagenet.dataloaders import constants as IN1K
from imagenet.dataloaders.classes import WNIDS, index_from_filename
from utils.images import ImageError, load_image
from utils.seed import epoch_generator, epoch_seed

LAYOUT = ("ROOT/train/<class>/<image> and ROOT/val/<class>/<image> (ImageFolder), or the ILSVRC2012 archives "
          f"{IN1K.ARCHIVES['train']}, {IN1K.ARCHIVES['val']} and {IN1K.ARCHIVES['devkit']} in ROOT")


class DatasetError(ValueError):
    """A dataset root that cannot be used; the message says what was expected and what was found."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _found(directory: Path, limit: int = 6) -> str:
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in directory.iterdir())
    if not entries:
        return "it is empty"
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return "found " + ", ".join(entries[:limit]) + more


def extract_archives(root: str | Path, split: str) -> None:
    """Build ROOT/<split>/<wnid>/ from the official archives in ROOT (no-op when the folder exists).

    Only for `python -m imagenet.dataloaders.imagenet-1k ROOT --prepare`: training never extracts (hours of md5
    checks on one rank while the others time out)."""
    root = Path(root)
    if (root / split).is_dir():
        return
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist; expected {LAYOUT}.")
    missing = [IN1K.ARCHIVES[k] for k in ("devkit", split) if not (root / IN1K.ARCHIVES[k]).is_file()]
    if missing:
        raise DatasetError(f"cannot build {root / split}: {' and '.join(missing)} not found in {root} "
                           f"(download the ILSVRC2012 archives from image-net.org); {_found(root)}.")
    try:
        import scipy  # noqa: F401  (torchvision reads the devkit's meta.mat with scipy.io.loadmat)
    except ImportError:
        raise DatasetError("reading the ILSVRC2012 devkit needs scipy: pip install scipy, then run again.") from None
    import torchvision

    print(f"extracting {root / IN1K.ARCHIVES[split]} into {root / split}/<wnid>/ (verifies the md5 first; this "
          f"takes a while, once)")
    try:
        torchvision.datasets.ImageNet(str(root), split=split)
    except RuntimeError as e:  # a corrupt or partial archive fails its md5 check
        raise DatasetError(f"could not extract the {split} archive in {root}: {e}") from None


def split_dir(root: str | Path, split: str) -> Path:
    """ROOT/<split> as a folder of class folders (never extracts archives: the error says how to)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist; expected {LAYOUT}.")
    directory = root / split
    has_archives = (root / IN1K.ARCHIVES[split]).is_file()
    if not directory.is_dir():
        hint = (" (the ILSVRC2012 archives are there: run `python -m imagenet.dataloaders.imagenet-1k ROOT "
                "--prepare` once)" if has_archives else "")
        raise DatasetError(f"{root} has no {split}/ folder: expected {LAYOUT}; {_found(root)}{hint}.")
    if not any(e.is_dir() for e in directory.iterdir()):
        raise DatasetError(f"{directory} holds no class folders: expected {directory}/<class>/<image>; "
                           f"{_found(directory)}.")
    return directory


def list_class_folder(directory: Path) -> tuple[list[str], list[str]]:
    """Image files (recursively, sorted) and other files of one class folder."""
    images, others = [], []
    for dirpath, _, names in os.walk(directory, followlinks=True):
        for name in sorted(names):
            (images if is_image_file(name) else others).append(os.path.join(dirpath, name))
    return sorted(images), others


def load_rgb(path: str) -> Image.Image:
    """Decode an image file as 8-bit RGB the one way every script does (`utils.images.load_image`: any PIL mode,
    16-bit scans by their real range, EXIF orientation applied). ImageError (one sentence) when it cannot."""
    return load_image(path, "RGB")


def check_image(path: str) -> tuple[str, str | None]:
    """(path, None) when the file decodes as training will decode it (`load_rgb`), else (path, reason)."""
    try:
        load_rgb(path)
        return path, None
    except ImageError as e:
        return path, str(e)


def class_difference(found: list[str], stored: list[str], limit: int = 5) -> str:
    """How the class folders `found` differ from a stored class list, in words:
    "folders not among its classes: d; its classes without a folder here: c" (at most `limit` names each)."""
    def names(items: list[str]) -> str:
        return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
    extra = [c for c in found if c not in set(stored)]
    missing = [c for c in stored if c not in set(found)]
    parts = ([f"folders not among its classes: {names(extra)}"] if extra else []) + \
            ([f"its classes without a folder here: {names(missing)}"] if missing else [])
    return "; ".join(parts) or "the same names"


class ImageDataset(Dataset):
    """Labelled image files -> (image, target, index, skipped).

    Args:
        samples: (path, class index) pairs.
        classes: class names / WordNet ids by index.
        transform: PIL RGB image -> tensor (3, H, W) (uint8 with `train_transform` / `eval_transform`).

    An item key is an index, or (seed, index) from `TrainSampler`: the transform then draws its random numbers
    from torch's RNG seeded with `seed` (the caller's RNG state is left as it was).
    """

    max_skips = 32

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None = None):
        self.samples, self.classes, self.transform = samples, list(classes), transform
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def relabel(self, classes: list[str]) -> None:
        """Index the samples by `classes` (a stored class list, e.g. a checkpoint's), matching by name: every class
        of this dataset must be among them (ValueError otherwise); they may be in another order or be more."""
        index = {name: i for i, name in enumerate(classes)}
        unknown = [c for c in self.classes if c not in index]
        if unknown:
            raise ValueError(f"classes {unknown[:5]} are not among {len(classes)} stored classes.")
        new = [index[c] for c in self.classes]
        self.samples = [(path, new[t]) for path, t in self.samples]
        self.classes, self.targets = list(classes), [t for _, t in self.samples]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int, int, str]:
        seed, index = key if isinstance(key, tuple) else (None, key)
        skipped = ""
        for attempt in range(self.max_skips):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = load_rgb(path)
            except ImageError:
                skipped = skipped or path  # report this index's own file; substitutes report theirs when visited
                continue
            if self.transform is not None:
                if seed is None:
                    image = self.transform(image)
                else:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed)
                        image = self.transform(image)
            return image, target, index, skipped
        raise DatasetError(f"{self.max_skips} consecutive unreadable images from {self.samples[index][0]} on; "
                           f"check the dataset with `python -m imagenet.dataloaders.imagenet-1k ROOT`.")


class TrainSampler(Sampler):
    """Training keys (sample_seed, index) for `ImageDataset`: one rank's share of an epoch, with DeiT's repeated
    augmentation.

    Epoch e: a permutation of range(num_samples) seeded by epoch_seed(seed, e); each index is repeated `repeats`
    times in a row (DeiT's RASampler) and rank k takes positions k, k + W, k + 2W, ... (W = num_replicas), so the
    copies of an image land on different ranks (when repeats <= W). Each rank yields num_samples // W keys per
    epoch whatever `repeats` (DeiT's epoch length, without its rounding to 256): with repeats=1 the shards are
    disjoint and a few indices (num_samples % W, different ones every epoch) wait for another epoch.
    sample_seed depends on (seed, epoch, index, copy) alone, so every copy gets its own augmentation.
    Call `set_epoch(epoch, start)` before each epoch; `start` keys (batches done x per-rank batch) are skipped.
    """

    def __init__(self, num_samples: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, repeats: int = 1):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"TrainSampler rank {rank} must be in [0, num_replicas={num_replicas}).")
        if repeats < 1:
            raise ValueError(f"TrainSampler repeats {repeats} must be at least 1.")
        if num_samples < num_replicas:
            raise ValueError(f"TrainSampler needs at least one sample per rank: {num_samples} samples for "
                             f"{num_replicas} ranks.")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.repeats = seed, repeats
        self.per_rank = num_samples // num_replicas
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"TrainSampler start {start} must be in [0, {self.per_rank}] (keys per rank and epoch).")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = epoch_seed(self.seed, self.epoch)
        perm = torch.randperm(self.num_samples, generator=epoch_generator(self.seed, self.epoch)).tolist()
        # positions rank, rank + W, ...: per_rank * W <= num_samples * repeats, so no padding is ever reached
        first = self.rank + self.start * self.num_replicas
        for position in range(first, self.per_rank * self.num_replicas, self.num_replicas):
            index, copy = perm[position // self.repeats], position % self.repeats
            yield hash((base, index, copy)) & (2**63 - 1), index


def folder_samples(directory: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """Samples and classes of `directory/<class>/<image>` or of a flat folder of `<wnid>_<name>.JPEG`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"image folder {directory} does not exist; expected {directory}/<class>/<image> "
                           f"or {directory}/<wnid>_<name>.JPEG.")
    classes = sorted(e.name for e in directory.iterdir() if e.is_dir())
    if classes:
        samples = []
        for index, name in enumerate(classes):
            samples += [(path, index) for path in list_class_folder(directory / name)[0]]
        if not samples:
            raise DatasetError(f"the class folders of {directory} hold no images (extensions "
                               f"{', '.join(IMG_EXTENSIONS)}); {_found(directory)}.")
        return samples, classes
    files = sorted(e.name for e in directory.iterdir() if e.is_file() and is_image_file(e.name))
    if not files:
        raise DatasetError(f"{directory} holds neither class folders ({directory}/<class>/<image>) nor "
                           f"<wnid>_<name>.JPEG images; {_found(directory)}.")
    try:
        return [(str(directory / f), index_from_filename(f)) for f in files], list(WNIDS)
    except ValueError as e:
        raise DatasetError(f"{directory} holds no class folders, so its images must be named <wnid>_<name>.JPEG: "
                           f"{e}") from None


def build_datasets(root: str | Path, train_transform: Callable | None, eval_transform: Callable | None, *,
                   eval_only: bool = False) -> tuple[ImageDataset | None, ImageDataset]:
    """(train, val) datasets of ROOT; train is None when eval_only.

    eval_only also accepts ROOT itself as the evaluation folder when it has no val/ (class folders or a
    flat `<wnid>_<name>.JPEG` folder such as the ImageNet sample photos).
    """
    root = Path(root)
    if eval_only and root.is_dir() and not (root / "val").is_dir() and not (root / IN1K.ARCHIVES["val"]).is_file():
        samples, classes = folder_samples(root)
        return None, ImageDataset(samples, classes, eval_transform)
    val_dir = split_dir(root, "val")
    val_samples, val_classes = folder_samples(val_dir)
    if eval_only:
        return None, ImageDataset(val_samples, val_classes, eval_transform)
    train_samples, train_classes = folder_samples(split_dir(root, "train"))
    if train_classes != val_classes:
        missing = sorted(set(train_classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(train_classes))
        raise DatasetError(f"{root}/train and {root}/val must hold the same class folders; val lacks "
                           f"{missing[:5] or 'none'} and has extra {extra[:5] or 'none'}.")
    return (ImageDataset(train_samples, train_classes, train_transform),
            ImageDataset(val_samples, val_classes, eval_transform))
