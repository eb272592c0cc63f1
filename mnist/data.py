"""MNIST on the device: the data set as one uint8 tensor, deskewing, batched augmentation (one affine_grid +
grid_sample per batch), the model's input normalisation and shift test-time augmentation."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MEAN, STD = 0.1307, 0.3081  # pixel statistics of the MNIST training set (in [0, 1])
IMAGE_SIZE, NUM_CLASSES = 28, 10
FILES = {"train-images-idx3-ubyte": 0x803, "train-labels-idx1-ubyte": 0x801,  # name -> IDX magic (ubyte, 3 / 1 dims)
         "t10k-images-idx3-ubyte": 0x803, "t10k-labels-idx1-ubyte": 0x801}
KINDS = {0x803: "images", 0x801: "labels"}
VAL_SPLIT_SEED = 1234  # the validation images do not change with --seed


class DataError(ValueError):
    """MNIST is missing or unreadable."""


def idx_problem(path: Path, magic: int) -> str | None:
    """Why `path` is not a complete IDX file of the kind `magic` (0x801 labels, 0x803 images: unsigned bytes, 1 or
    3 dimensions), e.g. "0 bytes" or "12345 of 47040016 bytes"; None when its header and size agree."""
    dims, size = magic & 0xFF, path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4 + 4 * dims)
    if len(head) < 4 + 4 * dims or int.from_bytes(head[:4], "big") != magic:
        return f"{size} bytes, not an MNIST {KINDS[magic]} file" if size else "0 bytes"
    want = len(head) + math.prod(struct.unpack(f">{dims}I", head[4:]))
    return None if size == want else f"{size} of {want} bytes"


def extract(gz: Path, out: Path, magic: int) -> None:
    """Decompress `gz` to `out` through a temporary name in the same folder, renamed only once the whole file is
    written and is a complete IDX file (`idx_problem`); DataError naming `gz` when it is cut short or corrupt."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with gzip.open(gz, "rb") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        problem = idx_problem(tmp, magic)
        if problem:
            raise DataError(f"{gz} does not hold an MNIST {KINDS[magic]} file (it unpacks to {problem}); put the "
                            f"original {gz.name} there.")
        os.replace(tmp, out)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # cut short, not gzip, bad CRC or length
        raise DataError(f"{gz} is cut short or corrupt ({type(e).__name__}: {e}); delete it (the next run downloads "
                        f"it again, unless --no-download) or put a good copy there.") from None
    except OSError as e:  # the folder: read-only, full
        raise DataError(f"cannot extract {gz} into {out.parent}: {e.strerror or e}.") from None
    finally:
        tmp.unlink(missing_ok=True)


def prepare_raw(raw: Path) -> list[str]:
    """Make every extracted file in `raw` complete and current -> the names of FILES still missing.

    An extracted file that is not a complete IDX file (an interrupted extraction or download) counts as missing
    and is removed; one older than its .gz (the archive was replaced) is extracted again. Extraction replaces a
    file only once the new one is complete (`extract`)."""
    missing = []
    for name, magic in FILES.items():
        out, gz = raw / name, raw / f"{name}.gz"
        if out.is_file() and idx_problem(out, magic):
            out.unlink()
        if gz.is_file() and (not out.is_file() or gz.stat().st_mtime > out.stat().st_mtime):
            extract(gz, out, magic)
        if not out.is_file():
            missing.append(name)
    return missing


def load_mnist(root: str | Path, download: bool = True,
               splits: tuple[str, ...] = ("train", "test")) -> dict[str, Tensor]:
    """MNIST from `root`/MNIST/raw via torchvision -> {"train_x": (60000, 28, 28) uint8, "train_y": (60000,) int64,
    "test_x": (10000, 28, 28) uint8, "test_y": (10000,) int64} (the `splits` asked for).

    Gzipped files already in raw/ are extracted here (`prepare_raw`: atomically; an incomplete or stale extracted
    file counts as missing); what is still missing torchvision downloads when `download` is set. Raises DataError
    (one sentence naming the file) for missing, cut-short or inconsistent files.
    """
    from torchvision.datasets import MNIST

    raw = Path(root) / "MNIST" / "raw"
    missing = prepare_raw(raw) if raw.is_dir() else list(FILES)  # torchvision wants all four, whatever the split
    put = f"put {', '.join(f'{n}.gz' for n in FILES)} there"
    if missing and not download:
        raise DataError(f"MNIST is not in {raw} (no {missing[0]}); {put}, or drop --no-download to fetch it.")
    try:
        sets = {split: MNIST(str(root), train=split == "train", download=download) for split in splits}
    except Exception as e:  # no network (URLError / RuntimeError), a bad file (AssertionError, ValueError)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[-1][:120] if lines else type(e).__name__
        what = "downloading it failed" if missing else "reading it failed"
        raise DataError(f"MNIST is not usable in {raw}: {what} ({reason}); {put}.") from None
    out = {}
    for split, ds in sets.items():
        x, y = ds.data, ds.targets
        if x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(x) != len(y):
            prefix = "train" if split == "train" else "t10k"
            raise DataError(f"{raw / f'{prefix}-images-idx3-ubyte'} holds {len(x)} images of "
                            f"{'x'.join(map(str, x.shape[1:]))} pixels and its labels file {len(y)} labels; MNIST "
                            f"has one label per 28x28 image: {put}.")
        out |= {f"{split}_x": x, f"{split}_y": y}
    return out


def deskew(images: Tensor, chunk: int = 10000) -> Tensor:
    """images: (N, H, W) uint8 -> the same, each sheared so its principal axis is vertical (slope from the image's
    second moments, mu11 / mu02) with its centre of mass moved to the centre; one batched affine_grid per chunk."""
    out = torch.empty_like(images)
    H, W = images.shape[-2:]
    rows = torch.arange(H, dtype=torch.float32, device=images.device)[:, None]
    cols = torch.arange(W, dtype=torch.float32, device=images.device)[None, :]
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].float() / 255  # (B, H, W)
        mass = x.sum((1, 2)).clamp_min(1e-6)
        cy, cx = (x * rows).sum((1, 2)) / mass, (x * cols).sum((1, 2)) / mass
        dy, dx = rows - cy[:, None, None], cols - cx[:, None, None]
        slope = (x * dy * dx).sum((1, 2)) / (x * dy * dy).sum((1, 2)).clamp_min(1e-6)
        one, zero = torch.ones_like(slope), torch.zeros_like(slope)
        theta = torch.stack([torch.stack([one, slope, (2 * cx + 1) / W - 1], 1),  # output -> input, in [-1, 1]
                             torch.stack([zero, one, (2 * cy + 1) / H - 1], 1)], 1)
        grid = F.affine_grid(theta, [len(x), 1, H, W], align_corners=False)
        y = F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
        out[i:i + chunk] = (y * 255).round().clamp(0, 255).to(torch.uint8)
    return out


def split_indices(n: int, val_split: int) -> tuple[Tensor, Tensor]:
    """(validation, training) indices of `n` training images: `val_split` held out, the same ones for every --seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    return perm[:val_split], perm[val_split:]


def normalize(x: Tensor) -> Tensor:
    """x: (B, 1, H, W) in [0, 1] -> the model's input (zero mean, unit variance over MNIST)."""
    return (x - MEAN) / STD


def model_input(images: Tensor) -> Tensor:
    """images: (N, H, W) uint8 -> (N, 1, H, W) the model's input, unaugmented (evaluation)."""
    return normalize(images.unsqueeze(1).float() / 255)


def augment(x: Tensor, gen: torch.Generator, rotate: float, scale: float, shift: float,
            elastic: float = 0.0, sigma: float = 4.0) -> Tensor:
    """x: (B, 1, H, W) in [0, 1] -> each image rotated by U(+-rotate) degrees, zoomed by U(1 +- scale), shifted by
    U(+-shift) pixels and, if elastic > 0, elastically distorted (Simard et al. 2003: a U(-1, 1) displacement field
    per pixel, Gaussian-smoothed with `sigma` pixels, times `elastic` pixels), all in one batched grid_sample
    (bilinear, zero fill)."""
    if not (rotate or scale or shift or elastic):
        return x
    B, _, H, W = x.shape
    u = torch.rand(B, 4, generator=gen, device=x.device) * 2 - 1
    angle, zoom = u[:, 0] * math.radians(rotate), 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # theta maps output to input coordinates
    tx, ty = u[:, 2] * shift * 2 / W, u[:, 3] * shift * 2 / H
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2): (x, y) in [-1, 1]
    if elastic:
        field = torch.rand(B, 2, H, W, generator=gen, device=x.device) * 2 - 1
        r = int(2 * sigma)
        k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma**2))
        k = (k / k.sum()).expand(2, 1, 1, -1)  # (2, 1, 1, 2r+1): the same separable Gaussian for dx and dy
        field = F.conv2d(F.conv2d(field, k, padding=(0, r), groups=2), k.transpose(2, 3), padding=(r, 0), groups=2)
        grid = grid + field.permute(0, 2, 3, 1) * elastic * torch.tensor([2 / W, 2 / H], device=x.device)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_batches(images: Tensor, labels: Tensor, batch_size: int, gen: torch.Generator, **augmentation: float):
    """Shuffled, augmented (`augment(**augmentation)`), normalised batches (x (B, 1, 28, 28), y (B,)) of uint8
    `images` (N, 28, 28) already on the device, drawn from `gen`; the last incomplete batch is dropped."""
    perm = torch.randperm(len(images), generator=gen, device=images.device)
    for i in range(len(images) // batch_size):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        x = images[idx].unsqueeze(1).float().div_(255)
        yield normalize(augment(x, gen, **augmentation)), labels[idx]


def eval_batches(x: Tensor, y: Tensor, batch_size: int = 1000):
    """(x (B, 1, 28, 28), y (B,)) batches of a normalised set, in order."""
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


class ShiftTTA(nn.Module):
    """Test-time augmentation around `model`: x (B, 1, H, W) normalised -> (B, classes) log of the softmax averaged
    over x and x shifted `pixels` right, left, down and up (blank fill), i.e. over five offsets of the patch grid."""

    def __init__(self, model: nn.Module, pixels: int):
        super().__init__()
        self.model, self.pixels = model, pixels
        self.train(model.training)

    def forward(self, x: Tensor) -> Tensor:
        p, (H, W) = self.pixels, x.shape[-2:]
        padded = F.pad(x, (p, p, p, p), value=-MEAN / STD)  # the normalised value of a blank pixel
        shifts = ((0, -p), (0, p), (-p, 0), (p, 0))  # (dy, dx) of the window: the digit moves right, left, down, up
        views = [x] + [padded[..., p + dy:p + dy + H, p + dx:p + dx + W] for dy, dx in shifts]
        log_probs = self.model(torch.cat(views)).float().log_softmax(-1).unflatten(0, (len(views), len(x)))
        return log_probs.logsumexp(0) - math.log(len(views))  # log of the mean probability, without underflow


def load_splits(root: str | Path, device: torch.device, *, download: bool = True, upright: bool = True,
                limit_train: int = 0, val_split: int = 0) -> dict[str, Tensor]:
    """MNIST as the trainer uses it, on `device`: {"train_x" (N, 28, 28) uint8, "train_y" (N,), "test_x" (10000,
    1, 28, 28) the model's input, "test_y", and with val_split > 0 "val_x", "val_y" likewise (held out of train),
    "test_images" (10000, 28, 28) uint8 on the CPU}; `upright` deskews every image, `limit_train` > 0 keeps the
    first that many training images."""
    data = load_mnist(root, download)
    if upright:
        data = {k: deskew(v) if k.endswith("_x") else v for k, v in data.items()}
    train_x, train_y = data["train_x"], data["train_y"]
    if limit_train:
        train_x, train_y = train_x[:limit_train], train_y[:limit_train]
    out = {"test_x": model_input(data["test_x"]).to(device), "test_y": data["test_y"].to(device),
           "test_images": data["test_x"]}
    if val_split:
        val_idx, train_idx = split_indices(len(train_x), val_split)
        out |= {"val_x": model_input(train_x[val_idx]).to(device), "val_y": train_y[val_idx].to(device)}
        train_x, train_y = train_x[train_idx], train_y[train_idx]
    return out | {"train_x": train_x.to(device), "train_y": train_y.to(device)}
