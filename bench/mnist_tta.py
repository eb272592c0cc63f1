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
from utils.checkpoint import CheckpointError, read_checkpoint
from utils.config import UsageError
from utils.training import evaluate


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[int]]:
    """-> (the arguments, the shifts); UsageError naming a bad one."""
    p = argparse.ArgumentParser(prog="python -m bench.mnist_tta", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="mnist.train checkpoint.pth files")
    p.add_argument("--shifts", default="0,1,2,3", help="comma-separated shifts in pixels (0 = single view)")
    p.add_argument("--data-root", default="data", help="MNIST root (see mnist.train --data-root)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    try:
        shifts = [int(s) for s in args.shifts.split(",")]
    except ValueError:
        shifts = [-1]
    if min(shifts) < 0 or max(shifts) >= M.IMAGE_SIZE // 2:
        raise UsageError(f"--shifts {args.shifts} must be comma-separated whole pixels in [0, {M.IMAGE_SIZE // 2}) "
                         f"(0 = single view), e.g. 0,1,2,3.")
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads} must be positive.")
    return args, shifts


def score(path: str, data: dict[str, torch.Tensor], shifts: list[int], cache: dict) -> list[str]:
    """One table row's cells for the checkpoint at `path`: "val / test" top-1 at each shift."""
    ckpt = read_checkpoint(path)
    cfg = ckpt.get("train_config")
    if not isinstance(cfg, dict) or cfg.get("dataset") != "mnist":
        raise CheckpointError(f"{path} is not a checkpoint of python -m mnist.train (no MNIST train_config).")
    skew = cfg.get("deskew", False)
    if skew not in cache:
        cache[skew] = {k: M.deskew(v) if skew and k.endswith("_x") else v for k, v in data.items()}
    d = cache[skew]
    sets = {"test": (M.model_input(d["test_x"]), d["test_y"])}
    if cfg.get("val_split"):
        val_idx, _ = M.split_indices(cfg.get("limit_train") or len(d["train_x"]), cfg["val_split"])
        sets = {"val": (M.model_input(d["train_x"][val_idx]), d["train_y"][val_idx])} | sets
    model = build_model(cfg)  # old key names too
    model.load_state_dict(ckpt["ema_model"] if "ema_model" in ckpt else ckpt["model"])
    cells = []
    for s in shifts:
        viewer = M.ShiftTTA(model, s) if s else model
        top1 = {name: evaluate(viewer, M.eval_batches(x, y), device="cpu")["top1"] for name, (x, y) in sets.items()}
        cells.append(" / ".join(f"{top1[k]:.2f}" if k in top1 else "-" for k in ("val", "test")))
    return cells


def main(argv: list[str] | None = None) -> None:
    try:
        args, shifts = parse_args(argv)
        torch.set_num_threads(args.threads)
        data = M.load_mnist(args.data_root, download=False)
        cache: dict[bool, dict[str, torch.Tensor]] = {}
        print("| checkpoint | " + " | ".join(f"val / test, shift {s}" for s in shifts) + " |")
        print("|---|" + "---|" * len(shifts))
        for path in args.checkpoints:
            print(f"| {path} | " + " | ".join(score(path, data, shifts, cache)) + " |", flush=True)
    except ValueError as e:  # UsageError, DataError, CheckpointError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
