"""How faithful is each attention map? Deletion / insertion AUC (attention.faithfulness.deletion_score) of gradient
rollout, attention rollout, last-layer class-token attention and a random map, on ImageNet photos with pretrained
weights.

    python -m bench.faithfulness --images PHOTOS --limit 100            # PHOTOS: <wnid>_<name>.JPEG files
    python -m bench.faithfulness --weights my_vit.pth --images PHOTOS

Each map explains the model's predicted class. Deletion: patches replaced by the image's per-channel mean, most
important first (lower AUC = better); insertion: patches put back into the all-mean image (higher = better).
images/s counts computing the maps only (model forwards and backwards included), not the scoring.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from tqdm import tqdm

from attention.faithfulness import deletion_score
from models.pretrained import load_pretrained
from utils.img2attn import attention_rollout, cls_attention, gradient_rollout

# --- config (CLI flags override) ---
weights = "deit_tiny_patch16_224"  # a registry name (downloaded once) or a checkpoint file
limit = 100  # images, evenly spread over the sorted folder (0 = all)
batch_size = 25  # images per batch of maps
steps = 10  # deletion / insertion steps (10% of the patches each for 10)
chunk = 100  # images per forward while scoring
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"

METHODS = {
    "gradient rollout": lambda model, x, grid: gradient_rollout(model, x),
    "attention rollout": lambda model, x, grid: attention_rollout(model(x, return_attn=True)[1], grid=grid),
    "last-layer cls attention": lambda model, x, grid: cls_attention(model(x, return_attn="cls")[1], grid=grid),
    "random": lambda model, x, grid: torch.rand(len(x), *grid, device=x.device),
}


def load_images(folder: Path, limit: int) -> tuple[list[Path], torch.Tensor]:
    """`<wnid>_<name>.JPEG` files, `limit` of them evenly spread, and their labels (wnid's rank among all wnids)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' does not exist; pass --images <folder of .JPEG files>.")
    files = sorted(folder.glob("*.JPEG"))
    if not files:
        raise FileNotFoundError(f"no *.JPEG files in '{folder}'; expected ImageNet samples named <wnid>_<name>.JPEG.")
    wnids = sorted({f.name.split("_")[0] for f in files})
    if 0 < limit < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return files, torch.tensor([wnids.index(f.name.split("_")[0]) for f in files])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.faithfulness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=weights, help="registry name or checkpoint (models.pretrained)")
    parser.add_argument("--images", required=True, help="folder of <wnid>_<name>.JPEG ImageNet photos")
    parser.add_argument("--limit", type=int, default=limit, help="images to use, evenly spread (0 = all)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--steps", type=int, default=steps, help="deletion / insertion steps")
    parser.add_argument("--chunk", type=int, default=chunk, help="images per forward while scoring")
    parser.add_argument("--seed", type=int, default=seed, help="seed of the random maps")
    parser.add_argument("--device", default=device)
    args = parser.parse_args(argv)
    try:
        if args.steps < 1 or args.batch_size < 1 or args.chunk < 1:
            raise ValueError(f"--steps, --batch-size and --chunk must be positive, got {args.steps}, "
                             f"{args.batch_size}, {args.chunk}.")
        model = load_pretrained(args.weights).to(args.device).eval()
        files, labels = load_images(Path(args.images), args.limit)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

    side = model.patch_size * model.grid_size[0]
    preprocess = v2.Compose([v2.ToImage(), v2.Resize(side * 8 // 7, interpolation=v2.InterpolationMode.BICUBIC,
                                                     antialias=True), v2.CenterCrop(side),
                             v2.ToDtype(torch.float32, scale=True),
                             v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    torch.manual_seed(args.seed)
    seconds = dict.fromkeys(METHODS, 0.0)
    scores = {(m, mode): [] for m in METHODS for mode in ("deletion", "insertion")}
    correct = 0
    for start in tqdm(range(0, len(files), args.batch_size), desc="batches", unit="batch"):
        batch = files[start:start + args.batch_size]
        x = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in batch]).to(args.device)
        grid = model.patch_grid(*x.shape[-2:])
        with torch.no_grad():
            predicted = model(x).argmax(-1)
        correct += int((predicted.cpu() == labels[start:start + len(batch)]).sum())
        for name, method in METHODS.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                heatmap = method(model, x, grid)
            if x.is_cuda:
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - t0
            for mode in ("deletion", "insertion"):
                auc = deletion_score(model, x, heatmap, predicted, args.steps, mode, args.chunk)
                scores[name, mode].append(auc.cpu())

    n = len(files)
    print(f"\n{n} images from {args.images}, {args.steps} steps, top-1 {correct / n:.1%}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print("| method | deletion AUC (lower = better) | insertion AUC (higher = better) | maps images/s |")
    print("|---|---|---|---|")
    for name in METHODS:
        cells = []
        for mode in ("deletion", "insertion"):
            auc = torch.cat(scores[name, mode]).double()
            cells.append(f"{auc.mean():.4f} ± {auc.std() / n**0.5:.4f}")
        print(f"| {name} | {cells[0]} | {cells[1]} | {n / seconds[name]:.1f} |")
    print("(± = standard error of the mean over images)")


if __name__ == "__main__":
    main()
