"""Rank MNIST training settings on a held-out part of the training set: `python -m bench.mnist_search`.

Each candidate runs `python -m mnist.train --val-split 5000 ...` as a subprocess (its own output folder under
--out) and is scored by its validation accuracy; the test set is scored once, at the end of each run, and only
reported. Prints one table row per candidate: val / test top-1, epochs, wall time (process start to exit, data
loading and evaluation included) and training throughput. Rows are appended to <out>/results.jsonl, so a rerun
with --skip-done only runs what is missing. The cosine of every BASE candidate ends at MIN_LR_RATIO x its --lr.

    python -m bench.mnist_search --epochs 4              # proxy ranking of all candidates
    python -m bench.mnist_search --only p7-d128,p7-d128-bs128 --epochs 12   # longer runs of a few
    python -m bench.mnist_search --only default --epochs 0 --val-split 0   # the 10-minute target: mnist.train as is
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from utils.config import UsageError, flag, parse_config

# Every candidate spells out the whole recipe (so it keeps its meaning when mnist.train's defaults change):
# BASE (the first default: patch 4, D=64, 6 layers) plus the flags of the candidate.
BASE = ["--embed-dim", "64", "--hidden-dim", "128", "--num-heads", "4", "--num-layers", "6", "--patch-size", "4",
        "--dropout", "0", "--drop-path", "0", "--batch-size", "256", "--lr", "2e-3", "--weight-decay", "0.05",
        "--optimizer", "adamw", "--beta2", "0.999", "--warmup-epochs", "1", "--smoothing", "0.1",
        "--model-ema-decay", "0", "--no-deskew", "--elastic", "0", "--rotate", "10", "--scale", "0.1", "--shift", "2",
        "--no-compile", "--amp", "none", "--tta-shift", "2", "--seed", "0", "--minutes", "0"]
MIN_LR_RATIO = 0.01  # BASE's cosine ends at this fraction of each candidate's --lr (mnist.train's --min-lr: absolute)
P7 = ["--patch-size", "7", "--embed-dim", "128", "--hidden-dim", "256"]  # 16 tokens instead of 49
L4 = ["--patch-size", "7", "--batch-size", "128", "--deskew", "--num-layers", "4"]  # D=64, 4 layers, deskewed
AFFINE15 = ["--rotate", "15", "--scale", "0.15", "--shift", "3"]
FAST = [*L4, *AFFINE15, "--compile", "--amp", "bf16", "--batch-size", "256", "--lr", "3e-3"]  # ~2x the img/s of L4
CANDIDATES = {  # name -> flags on top of BASE ("default*": mnist.train's own defaults, without BASE)
    "default": [],
    "default-seed1": ["--seed", "1"],
    "default-seed2": ["--seed", "2"],
    "default-l3": ["--num-layers", "3"],  # 3 blocks: ~1.4x the img/s, more epochs in the budget
    "default-adamw": ["--optimizer", "adamw"],  # the default before Muon
    "p4-d64": [],
    "p4-d64-shift-only": ["--rotate", "0", "--scale", "0"],
    "p4-d96-l4": ["--embed-dim", "96", "--hidden-dim", "192", "--num-layers", "4"],
    "p7-d128": P7,
    "p7-d128-bs128": [*P7, "--batch-size", "128"],
    "p7-d128-bs128-lr1e-3": [*P7, "--batch-size", "128", "--lr", "1e-3"],
    "p7-d128-lr4e-3": [*P7, "--lr", "4e-3"],
    "p7-d128-bs64": [*P7, "--batch-size", "64"],
    "p7-d128-bs64-lr1e-3": [*P7, "--batch-size", "64", "--lr", "1e-3"],
    "p7-d128-bs32-lr1e-3": [*P7, "--batch-size", "32", "--lr", "1e-3"],
    "p4-d64-l4-bs64": ["--num-layers", "4", "--batch-size", "64"],
    "p7-d96-bs64": ["--patch-size", "7", "--embed-dim", "96", "--hidden-dim", "192", "--batch-size", "64"],
    "p7-d128-l4-bs64": [*P7, "--num-layers", "4", "--batch-size", "64"],
    "p7-d192-bs64": ["--patch-size", "7", "--embed-dim", "192", "--hidden-dim", "384", "--num-heads", "6",
                     "--batch-size", "64"],
    "p7-d128-bs64-ema": [*P7, "--batch-size", "64", "--model-ema-decay", "0.999"],
    "p7-d128-bs64-lr3e-3": [*P7, "--batch-size", "64", "--lr", "3e-3"],
    "p7-d128-bs64-no-ls": [*P7, "--batch-size", "64", "--smoothing", "0"],
    "p7-d128-bs64-shift-only": [*P7, "--batch-size", "64", "--rotate", "0", "--scale", "0"],
    "p7-d128-bs64-beta2-0.99": [*P7, "--batch-size", "64", "--beta2", "0.99"],
    "p7-d128-bs64-warmup0.3": [*P7, "--batch-size", "64", "--warmup-epochs", "0.3"],
    "p7-d96-bs32-lr1.5e-3": ["--patch-size", "7", "--embed-dim", "96", "--hidden-dim", "192", "--batch-size", "32",
                             "--lr", "1.5e-3"],
    "p7-d64-bs64": ["--patch-size", "7", "--batch-size", "64"],
    "p7-d64-bs64-no-aug": ["--patch-size", "7", "--batch-size", "64", "--rotate", "0", "--scale", "0", "--shift", "0"],
    "p7-d64-bs64-deskew": ["--patch-size", "7", "--batch-size", "64", "--deskew"],
    "p7-d64-bs64-deskew-no-rot": ["--patch-size", "7", "--batch-size", "64", "--deskew", "--rotate", "0"],
    "p7-d64-bs64-deskew-elastic34": ["--patch-size", "7", "--batch-size", "64", "--deskew", "--elastic", "34"],
    "p7-d64-bs64-deskew-elastic16": ["--patch-size", "7", "--batch-size", "64", "--deskew", "--elastic", "16"],
    "p7-d64-bs128-deskew": ["--patch-size", "7", "--batch-size", "128", "--deskew"],
    "p7-d64-bs128-deskew-lr3e-3": ["--patch-size", "7", "--batch-size", "128", "--deskew", "--lr", "3e-3"],
    "p7-d64-bs128-deskew-dp0.1": ["--patch-size", "7", "--batch-size", "128", "--deskew", "--drop-path", "0.1"],
    "p7-d64-l4-bs128-deskew": L4,
    "p7-d96-l4-bs128-deskew": ["--patch-size", "7", "--embed-dim", "96", "--hidden-dim", "192", "--num-layers", "4",
                               "--batch-size", "128", "--deskew"],
    "p7-d64-l4-bs128-deskew-ema": [*L4, "--model-ema-decay", "0.999"],
    "p7-d64-l4-bs128-deskew-elastic8": [*L4, "--elastic", "8"],
    "p7-d64-l4-bs128-deskew-strong-affine": [*L4, *AFFINE15],  # = the default recipe
    "p7-d64-l4-bs128-deskew-strong-affine-seed1": [*L4, *AFFINE15, "--seed", "1"],
    "p7-d64-l4-bs128-deskew-strong-affine-seed2": [*L4, *AFFINE15, "--seed", "2"],
    "p7-d64-l4-bs128-deskew-stronger-affine": [*L4, "--rotate", "20", "--scale", "0.2", "--shift", "4"],
    "p7-d64-bs64-ema": ["--patch-size", "7", "--batch-size", "64", "--model-ema-decay", "0.999"],
    "p7-d128-bs32-lr1.5e-3": [*P7, "--batch-size", "32", "--lr", "1.5e-3"],
    "p7-d128-bs32-lr2e-3": [*P7, "--batch-size", "32", "--lr", "2e-3"],
    "p7-d128-shift-only": [*P7, "--rotate", "0", "--scale", "0"],
    "p7-d128-no-ls": [*P7, "--smoothing", "0"],
    "p7-d128-ema": [*P7, "--model-ema-decay", "0.998"],
    "p7-d128-l8": [*P7, "--num-layers", "8"],
    "p7-d192": ["--patch-size", "7", "--embed-dim", "192", "--hidden-dim", "384", "--num-heads", "6"],
    "p7-d96": ["--patch-size", "7", "--embed-dim", "96", "--hidden-dim", "192"],
    "fast-e64": [*FAST, "--epochs", "64"],
    "fast-d96-e42": [*FAST, "--embed-dim", "96", "--hidden-dim", "192", "--epochs", "42"],
    "fast-l6-e46": [*FAST, "--num-layers", "6", "--epochs", "46"],
    "fast-p4-e24": [*FAST, "--patch-size", "4", "--epochs", "24"],
}


def command(name: str, flags: list[str], args: SimpleNamespace) -> list[str]:
    """The mnist.train command line of candidate `name`: BASE (but for "default*") + its flags + the floor at
    MIN_LR_RATIO x its --lr (the last one given) + this search's --epochs, output folder, data, threads, split."""
    base = [] if name.startswith("default") else BASE
    cmd = [sys.executable, "-m", "mnist.train", "--output", str(Path(args.output) / name), "--data-root",
           args.data_root, "--no-progress", "--threads", str(args.threads), "--val-split", str(args.val_split),
           *base, *flags]
    if base:
        lr = float([v for k, v in zip(cmd, cmd[1:], strict=False) if k == "--lr"][-1])
        cmd += ["--min-lr", f"{MIN_LR_RATIO * lr:g}"]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    return cmd


def run(name: str, flags: list[str], args: SimpleNamespace) -> dict:
    out = Path(args.output) / name
    cmd = command(name, flags, args)
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, text=True, capture_output=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
        return {"name": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = metrics["epochs"]
    last = epochs[-1]
    pick = "ema_" if "ema_test_top1" in last else ""
    train_s = sum(e["seconds"] for e in epochs)
    return {"name": name, "flags": " ".join(flags), "epochs": last["epoch"], "val_top1": last.get(f"{pick}val_top1"),
            "test_top1": last[f"{pick}test_top1"], "raw_test_top1": last["test_top1"],
            "tta_val_top1": last.get(f"{pick}tta_val_top1"), "tta_test_top1": last.get(f"{pick}tta_test_top1"),
            "wall_s": round(wall, 1),
            "train_img_per_s": round(sum(e["images"] for e in epochs) / train_s), "threads": args.threads,
            "hardware": metrics.get("ran_as", {}).get("hardware"),
            "date": time.strftime("%Y-%m-%d %H:%M")}


OPTIONS = {
    "only": ("", "comma-separated candidates (empty: all): " + ", ".join(CANDIDATES)),
    "epochs": (4, "epochs per run (0 = each recipe's own)"),
    "val_split": (5000, "training images held out to rank by"),
    "threads": (2, "torch threads per run"),
    "data_root": ("data", "MNIST root (see mnist.train --data-root)"),
    "output": ("runs/mnist_search", "folder for the runs and results.jsonl"),
    "skip_done": (False, "skip candidates already in results.jsonl with these epochs and val split"),
}


def parse_args(argv: list[str] | None = None) -> SimpleNamespace:
    """The search's settings (--out is --output's older spelling); UsageError naming a bad one."""
    cfg, _ = parse_config("python -m bench.mnist_search", __doc__, {"options": OPTIONS}, argv,
                          aliases={"output": ["--out"]})
    args = SimpleNamespace(**cfg)
    names = [n for n in args.only.split(",") if n] or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise UsageError(f"--only: unknown candidate {unknown[0]!r}; choose among {', '.join(CANDIDATES)}.")
    for ok, name, what in ((args.epochs >= 0, "epochs", "must be >= 0 (0 = each recipe's own)"),
                           (args.val_split >= 0, "val_split", "must be >= 0"),
                           (args.threads > 0, "threads", "must be positive")):
        if not ok:
            raise UsageError(f"{flag(name)} {cfg[name]} {what}.")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
    except UsageError as e:
        sys.exit(f"error: {e}")
    names = args.names
    results_path = Path(args.output) / "results.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.skip_done and results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["name"], r.get("epochs_arg"), r.get("val_split")))
    rows = []
    for name in names:
        if (name, args.epochs, args.val_split) in done:
            continue
        row = run(name, CANDIDATES[name], args) | {"epochs_arg": args.epochs, "val_split": args.val_split}
        rows.append(row)
        with results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("\n| setting | flags | epochs | val top-1 | test top-1 | val / test, shift TTA | wall (s) | train img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error']} ||||||")
            continue
        val, tta_val, tta_test = (f"{v:.2f}" if v is not None else "-"
                                  for v in (r["val_top1"], r["tta_val_top1"], r["tta_test_top1"]))
        print(f"| {r['name']} | `{r['flags']}` | {r['epochs']} | {val} | {r['test_top1']:.2f} | {tta_val} / "
              f"{tta_test} | {r['wall_s']:.0f} | {r['train_img_per_s']} |")


if __name__ == "__main__":
    main()
