"""Shift test-time augmentation on trained MNIST checkpoints: `python -m bench.mnist_tta runs/.../checkpoint.pth`.

For each checkpoint, top-1 (in fp32) on its held-out validation images (the --val-split it was trained with, if any)
and on the test set, single view and averaged over the image and its copies shifted by 1, 2, 3 pixels right, left,
down and up (`mnist.train.ShiftTTA`, what `--tta-shift` does in the final evaluation). Pick the shift on val.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mnist import data as M
from mnist.train import build_model
from utils.checkpoint import read_checkpoint
from utils.training import evaluate


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mnist_tta", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="mnist.train checkpoint.pth files")
    p.add_argument("--shifts", default="0,1,2,3", help="comma-separated shifts in pixels (0 = single view)")
    p.add_argument("--data-root", default="data", help="MNIST root (see mnist.train --data-root)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shifts = [int(s) for s in args.shifts.split(",")]
    if min(shifts) < 0:
        sys.exit(f"error: --shifts {args.shifts} must be >= 0 pixels (0 = single view).")
    data = M.load_mnist(args.data_root, download=False)
    cache: dict[bool, dict[str, torch.Tensor]] = {}
    print("| checkpoint | " + " | ".join(f"val / test, shift {s}" for s in shifts) + " |")
    print("|---|" + "---|" * len(shifts))
    for path in args.checkpoints:
        ckpt = read_checkpoint(path)
        cfg = ckpt["train_config"]
        skew = cfg.get("deskew", False)
        if skew not in cache:
            cache[skew] = {k: M.deskew(v) if skew and k.endswith("_x") else v for k, v in data.items()}
        d = cache[skew]
        sets = {"test": (M.model_input(d["test_x"]), d["test_y"])}
        if cfg["val_split"]:
            val_idx, _ = M.split_indices(cfg.get("limit_train") or len(d["train_x"]), cfg["val_split"])
            sets = {"val": (M.model_input(d["train_x"][val_idx]), d["train_y"][val_idx])} | sets
        model = build_model(cfg)
        model.load_state_dict(ckpt["ema_model"] if "ema_model" in ckpt else ckpt["model"])
        cells = []
        for s in shifts:
            viewer = M.ShiftTTA(model, s) if s else model
            top1 = {name: evaluate(viewer, M.eval_batches(x, y), device="cpu")["top1"]
                    for name, (x, y) in sets.items()}
            cells.append(" / ".join(f"{top1[k]:.2f}" if k in top1 else "-" for k in ("val", "test")))
        print(f"| {path} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
