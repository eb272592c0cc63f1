"""How faithful is each attention map? Deletion / insertion AUC of four maps on a folder of photos you pass:
`python -m bench.faithfulness --images PHOTOS`.

    python -m bench.faithfulness --images PHOTOS --limit 100              # DeiT-tiny by name (downloaded once)
    python -m bench.faithfulness --images PHOTOS --weights runs/imagenet/checkpoint.pth

Maps: gradient rollout, attention rollout, last-layer class-token attention and a random map
(attention.faithfulness.deletion_score), each explaining the model's predicted class. Deletion: patches replaced by
the image's per-channel mean, most important first (lower AUC = better); insertion: patches put back into the
all-mean image (higher = better). PHOTOS: any folder of images (utils.images.load_image reads every mode); files
named `<wnid>_<name>.JPEG` (ImageNet sample photos) also give the model's top-1. images/s counts computing the maps
only (model forwards and backwards included), not the scoring.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2
from tqdm import tqdm

from attention.faithfulness import deletion_score
from imagenet.dataloaders.classes import NUM_CLASSES, index_from_filename
from imagenet.dataloaders.dataset import is_image_file
from models.pretrained import load_pretrained
from utils import hardware
from utils.config import build_parser
from utils.images import ImageError, load_image
from utils.img2attn import attention_rollout, cls_attention, gradient_rollout

PROG = "python -m bench.faithfulness"
CONFIG = {  # name -> (default, help); every entry is a flag (batch_size -> --batch-size)
    "images": (None, "folder of photos, or one photo (required; ImageNet sample photos named <wnid>_<name>.JPEG "
                     "also give the top-1)"),
    "weights": ("deit_tiny_patch16_224", "a registry name (python -m models.pretrained --list; downloaded once) or "
                                         "a checkpoint file with a classification head"),
    "limit": (100, "photos used, evenly spread over the sorted folder (0 = all)"),
    "batch_size": (25, "photos per batch of maps"),
    "steps": (10, "deletion / insertion steps (each changes 1/steps of the patches)"),
    "chunk": (100, "images per forward while scoring"),
    "seed": (0, "seed of the random map"),
    "device": ("auto", hardware.DEVICE_HELP),
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

METHODS = {
    "gradient rollout": lambda model, x, grid: gradient_rollout(model, x),
    "attention rollout": lambda model, x, grid: attention_rollout(model(x, return_attn=True)[1], grid=grid),
    "last-layer cls attention": lambda model, x, grid: cls_attention(model(x, return_attn="cls")[1], grid=grid),
    "random": lambda model, x, grid: torch.rand(len(x), *grid, device=x.device),
}


def list_images(folder: Path, limit: int) -> list[Path]:
    """The image files of `folder` (sorted by name), `limit` of them evenly spread (0 = all); a photo: itself.

    Raises ValueError (one sentence) when the path is missing, neither a folder nor a photo, or holds no photos."""
    if folder.is_file() and is_image_file(folder.name):
        return [folder]
    if not folder.is_dir():
        what = "is not an image file or a folder" if folder.exists() else "does not exist"
        raise ValueError(f"--images '{folder}' {what}; pass a folder of photos (e.g. ImageNet sample photos named "
                         f"<wnid>_<name>.JPEG).")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))
    if not files:
        raise ValueError(f"--images '{folder}' holds no image files (.jpg, .jpeg, .png, ...); pass a folder of "
                         f"photos.")
    if 0 < limit < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return files


def labels_of(files: list[Path], num_classes: int) -> torch.Tensor | None:
    """ImageNet class index per file from `<wnid>_<name>` file names; None when a name has no WordNet id or the
    model does not have ImageNet-1k's 1000 classes (then no top-1 is reported)."""
    if num_classes != NUM_CLASSES:
        return None
    try:
        return torch.tensor([index_from_filename(f) for f in files])
    except ValueError:
        return None


def check_config(cfg: dict) -> None:
    if cfg["images"] is None:
        raise ValueError("--images is required: pass a folder of photos, e.g. --images PHOTOS with ImageNet sample "
                         "photos named <wnid>_<name>.JPEG.")
    for key in ("batch_size", "steps", "chunk"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} {cfg[key]} must be at least 1.")
    if cfg["limit"] < 0:
        raise ValueError(f"--limit {cfg['limit']} must be 0 (all photos) or a positive count.")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(PROG, __doc__, {"options": CONFIG}, types={"images": Path})
    parser.usage = "%(prog)s [-h] --images IMAGES [options]"  # required, but checked in check_config (one line)
    cfg = vars(parser.parse_args(argv))
    try:
        check_config(cfg)
        files = list_images(cfg["images"], cfg["limit"])
        device = hardware.resolve_device(cfg["device"])
        model = load_pretrained(cfg["weights"]).to(device).eval()
        if model.config["num_classes"] == 0:
            raise ValueError(f"--weights {cfg['weights']} has no classification head: the maps explain a predicted "
                             f"class; pass weights with a head (e.g. deit_tiny_patch16_224).")
        (gh, gw), p = model.grid_size, model.patch_size
    except (ValueError, OSError) as e:  # CheckpointError, a failed download, a bad flag: one sentence each
        sys.exit(f"error: {e}")
    preprocess = v2.Compose([v2.ToImage(), v2.Resize(gh * p * 8 // 7, interpolation=v2.InterpolationMode.BICUBIC,
                                                     antialias=True), v2.CenterCrop((gh * p, gw * p)),
                             v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    labels = labels_of(files, model.config["num_classes"])

    torch.manual_seed(cfg["seed"])
    seconds = dict.fromkeys(METHODS, 0.0)
    scores = {(m, mode): [] for m in METHODS for mode in ("deletion", "insertion")}
    correct = 0
    for start in tqdm(range(0, len(files), cfg["batch_size"]), desc="batches", unit="batch"):
        try:
            x = torch.stack([preprocess(load_image(f)) for f in files[start:start + cfg["batch_size"]]]).to(device)
        except ImageError as e:
            sys.exit(f"error: {e}")
        grid = model.patch_grid(*x.shape[-2:])
        with torch.no_grad():
            predicted = model(x).argmax(-1)
        if labels is not None:
            correct += int((predicted.cpu() == labels[start:start + len(x)]).sum())
        for name, method in METHODS.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                heatmap = method(model, x, grid)
            if x.is_cuda:
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - t0
            for mode in ("deletion", "insertion"):
                auc = deletion_score(model, x, heatmap, predicted, cfg["steps"], mode, cfg["chunk"])
                scores[name, mode].append(auc.cpu())

    n = len(files)
    top1 = f"top-1 {correct / n:.1%}" if labels is not None else "top-1 unknown (no <wnid>_ file names)"
    print(f"\n{n} images from {cfg['images']}, {cfg['weights']} ({model.weights_note}), {cfg['steps']} steps, "
          f"{top1}, device {device}, torch threads {torch.get_num_threads()}")
    print("| method | deletion AUC (lower = better) | insertion AUC (higher = better) | maps images/s |")
    print("|---|---|---|---|")
    for name in METHODS:
        cells = []
        for mode in ("deletion", "insertion"):
            auc = torch.cat(scores[name, mode]).double()
            se = auc.std() / n**0.5 if n > 1 else float("nan")
            cells.append(f"{auc.mean():.4f} ± {se:.4f}")
        print(f"| {name} | {cells[0]} | {cells[1]} | {n / max(seconds[name], 1e-9):.1f} |")
    print("(± = standard error of the mean over images)")


if __name__ == "__main__":
    main()
