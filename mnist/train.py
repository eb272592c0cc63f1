"""Train a Vision Transformer on MNIST: `python -m mnist.train` (then `python -m mnist.vis_attn`).

The data set lives on the device (`mnist.data`); every epoch's randomness comes from a generator seeded with
(seed, epoch), so the same command run again continues bit for bit (on a CPU) where a run stopped (--fresh starts
over; a finished run says so and exits; --minutes 0 --epochs N continues it to N epochs). Each epoch writes
<output>/checkpoint.pth (atomically) and <output>/metrics.json (curves.png every 5 epochs and at the end). By default
the run fits a 10-minute budget (--minutes): after epoch 4 the epoch count is set from the measured speed, and
re-planned when epochs get faster or slower. The last epoch's test score is reported for the single view and with
shift test-time augmentation (--tta-shift).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # the --minutes clock of `python -m mnist.train`: before torch's import (~4 s)

import torch
from torch import Tensor, nn
from tqdm import tqdm

from attention.tracking import save_attention_over_training, track_attention
from mnist.data import IMAGE_SIZE, MEAN, NUM_CLASSES, STD, ShiftTTA, eval_batches, load_splits, train_batches
from models.vit import VisionTransformer
from utils import hardware
from utils.checkpoint import (
    CheckpointError,
    checkpoint_state,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    save_metrics,
)
from utils.config import RENAMED, UsageError, continue_config, flag, parse_config
from utils.ema import ModelEma, unwrap
from utils.optim import OPTIMIZERS, make_optimizer
from utils.plots import plot_attention_curves, plot_curves
from utils.schedule import budget_epochs, early_epochs, stretch_schedule, warmup_cosine
from utils.seed import epoch_generator, epoch_seed, seed_everything
from utils.training import NonFiniteLossError, compile_or_eager, evaluate, train_one_epoch

EXIT_S = 3.0  # what --minutes keeps for the interpreter's exit after the last line
DECIDE_AFTER = 4  # --minutes plans after this many epochs (the first runs slower: it compiles)

# ----------------------------------------------------------------------------------------------------------- config
# Every entry is a command-line flag (`embed_dim` -> --embed-dim); (default, help). Names follow timm's train.py
# where it has the setting (ALIASES keeps this repo's older spellings; utils.config.RENAMED reads old checkpoints).
MODEL = {  # VisionTransformer arguments; num_channels=1, num_patches=(28/patch_size)^2, num_classes=10 follow
    "embed_dim": (64, "token width D"),
    "hidden_dim": (128, "MLP hidden width"),
    "num_heads": (4, "attention heads (must divide embed_dim)"),
    "num_layers": (3, "transformer blocks"),
    "patch_size": (7, "patch side in pixels; divides 28: 2, 4, 7 or 14 (4 -> 49 tokens, 7 -> 16 tokens)"),
    "dropout": (0.0, "dropout after position embedding, attention projection and MLP"),
    "drop_path": (0.0, "stochastic depth of the last block (linear from 0)"),
}
TIMM_MODEL = {"mlp_ratio": (0.0, "MLP hidden width as a multiple of D, as imagenet.train and timm say it: sets "
                                  "--hidden-dim to mlp_ratio x D (0: unused)")}
VIT_ARGS = {"drop_path": "drop_path_rate"}  # config key -> VisionTransformer argument, where they differ
RECIPE = {
    "epochs": (64, "epochs to train; with --minutes, when given, the most the budget may set (else only the "
                   "schedule's plan until the budget decides); on a continued run with --minutes 0, the new length"),
    "minutes": (10.0, "time budget: after the fourth epoch (earlier when the budget cannot wait for it) the epoch "
                      "count becomes what ends the run (start to exit) within this many minutes on this machine, "
                      "re-planned when epochs get faster or slower; saved in the checkpoint (0 = off: exactly "
                      "--epochs)"),
    "batch_size": (256, "images per optimizer step"),
    "optimizer": ("muon", "muon: Muon on the transformer blocks' weight matrices, AdamW on the rest (utils/optim.py); "
                          "adamw: AdamW on all"),
    "lr": (3e-3, "peak learning rate (Muon's update is scaled to AdamW's RMS: the same lr for both)"),
    "weight_decay": (0.05, "decoupled weight decay (matrices only)"),
    "beta2": (0.999, "AdamW second-moment decay"),
    "warmup_epochs": (1.0, "linear warm-up, in epochs, before the cosine decay"),
    "min_lr": (3e-5, "learning rate at the end of the cosine: an absolute floor, at most --lr (timm's meaning)"),
    "clip_grad": (0.0, "clip the gradient norm to this before every step (0 = off)"),
    "smoothing": (0.1, "cross-entropy label smoothing"),
    "model_ema_decay": (0.0, "decay of an EMA of the weights, updated every step (0 = off); the EMA is the final "
                             "model"),
    "deskew": (True, "shear every image (train, test, yours) upright by its second moments, the classic MNIST "
                      "preprocessing (--no-deskew: off)"),
    "rotate": (15.0, "random rotation, +- degrees"),
    "elastic": (0.0, "elastic distortion strength in pixels (Simard et al. 2003, sigma 4 px; ~34 is theirs); 0 = off"),
    "scale": (0.15, "random zoom, +- fraction"),
    "shift": (3.0, "random translation, +- pixels"),
    "val_split": (0, "hold out this many training images for validation; the test set is then scored only at "
                     "the end (use it to choose settings)"),
    "limit_train": (0, "train on only the first N training images (0 = all; for quick checks)"),
    "amp": ("auto", hardware.AMP_HELP),
    "compile": (True, "torch.compile the model (~30 s, counted in the wall time; ~1.4x faster steps)"),
    "seed": (0, "seed of the initial weights, the shuffling and the augmentation"),
}
RUN = {
    "data_root": ("data", "MNIST folder; holds MNIST/raw/*-ubyte(.gz) or receives the download"),
    "output": ("runs/mnist", "output folder: checkpoint.pth, metrics.json, curves.png"),
    "device": ("auto", hardware.DEVICE_HELP),
    "tta_shift": (2, "the final evaluation also averages the softmax over each image and its copies shifted this many "
                     "pixels right, left, down and up: five placements of the patch grid (0 = off)"),
    "threads": (0, "CPU threads for torch (0 = torch's default, one per core)"),
    "fresh": (False, "start over even though <output> holds a checkpoint (it is replaced after the first epoch)"),
    "resume": (False, "continue <output>/checkpoint.pth (the default anyway: a run whose <output> holds a checkpoint "
                      "continues it with the settings it was trained with); without one yet, start a new run"),
    "stop_after": (0, "stop after this many epochs in this run (0 = never); the same command continues"),
    "download": (True, "download MNIST into --data-root when it is not there (--no-download: never)"),
    "progress": (True, "tqdm progress bars when stderr is a terminal (--no-progress: only the per-epoch lines)"),
    "track_attention": (True, "every epoch, one forward of 256 fixed test digits: per-layer attention distance and "
                               "entropy into metrics.json and attention_curves.png, the rollout of the first 8 into "
                               "attention_over_training.gif and .png at the end (--no-track-attention: off)"),
}
HIDDEN = {"nan_at_step": (-1, "tests: make the loss of this step NaN"),
          "min_lr_ratio": (0.0, "the floor as a fraction of --lr, as before --min-lr: converted to --min-lr")}
ALIASES = {"num_layers": ["--depth"], "drop_path": ["--drop-path-rate"], "smoothing": ["--label-smoothing"],
           "model_ema_decay": ["--ema-decay"], "clip_grad": ["--grad-clip"], "output": ["--out"]}
LENGTH = ("epochs", "minutes")  # the recipe settings a continued run may change: its length (`continue_length`)
PRESETS = {  # --preset NAME sets these; explicit flags still win
    "default": {},  # 10 minutes on the machine it runs on
    "long": dict(patch_size=4, embed_dim=256, hidden_dim=512, num_heads=8, num_layers=8, dropout=0.1,  # GPU-sized
                 drop_path=0.1, epochs=100, batch_size=128, lr=1e-3, min_lr=1e-5, warmup_epochs=5.0, rotate=15.0,
                 scale=0.15, shift=3.0, model_ema_decay=0.9998, minutes=0.0, output="runs/mnist_long"),
}
MNIST_TRAIN = 60000  # training images in MNIST: what --limit-train, --val-split and --batch-size are checked against
# -------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[dict[str, Any], set[str]]:
    """-> (config: every MODEL / RECIPE / RUN entry, names of the flags given explicitly). The old --min-lr-ratio R
    becomes --min-lr R x --lr (UsageError when both are given)."""
    cfg, given = parse_config("python -m mnist.train", __doc__, {"model": MODEL, "model, as timm says it": TIMM_MODEL,
                                                                 "recipe": RECIPE, "run": RUN, "hidden": HIDDEN},
                              argv, presets=PRESETS,
                              choices={"amp": hardware.AMP_CHOICES, "optimizer": OPTIMIZERS}, aliases=ALIASES)
    if "min_lr_ratio" in given:
        if "min_lr" in given:
            raise UsageError("--min-lr-ratio and --min-lr both set the floor of the cosine; pass only --min-lr "
                             "(an absolute learning rate).")
        cfg["min_lr"] = cfg["min_lr_ratio"] * cfg["lr"]
        given = given - {"min_lr_ratio"} | {"min_lr"}
        print(f"note: --min-lr-ratio {cfg['min_lr_ratio']:g} is now --min-lr {cfg['min_lr']:g} (an absolute floor)")
    if "mlp_ratio" in given:
        if "hidden_dim" in given or cfg["mlp_ratio"] <= 0:
            raise UsageError(f"--mlp-ratio {cfg['mlp_ratio']:g} must be positive and sets the MLP width that "
                             f"--hidden-dim also sets; pass only one of them.")
        cfg["hidden_dim"] = round(cfg["mlp_ratio"] * cfg["embed_dim"])
        given = given - {"mlp_ratio"} | {"hidden_dim"}
    return cfg, given


def check_config(cfg: dict[str, Any]) -> None:
    """UsageError naming the first out-of-range setting, before any data is read: every number's range, the model's
    shape (patch size, heads), the learning-rate floor against the peak, the batch against the training images."""
    n_train = min(cfg["limit_train"] or MNIST_TRAIN, MNIST_TRAIN) - cfg["val_split"]
    rules = [(cfg["embed_dim"] > 0, "embed_dim", "must be positive"),
             (cfg["hidden_dim"] > 0, "hidden_dim", "must be positive"),
             (cfg["num_heads"] > 0, "num_heads", "must be positive"),
             (cfg["embed_dim"] % max(cfg["num_heads"], 1) == 0, "num_heads",
              f"does not divide --embed-dim {cfg['embed_dim']}; use one of its divisors "
              f"({', '.join(str(h) for h in range(1, cfg['embed_dim'] + 1) if cfg['embed_dim'] % h == 0)})"),
             (cfg["num_layers"] > 0, "num_layers", "must be positive"),
             (cfg["patch_size"] > 0 and IMAGE_SIZE % cfg["patch_size"] == 0, "patch_size",
              f"does not divide {IMAGE_SIZE}; use 2, 4, 7 or 14"),
             (0 <= cfg["dropout"] < 1, "dropout", "must be in [0, 1)"),
             (0 <= cfg["drop_path"] < 1, "drop_path", "must be in [0, 1)"),
             (cfg["epochs"] > 0, "epochs", "must be positive"),
             (cfg["minutes"] >= 0, "minutes", "must be >= 0 (0 = off)"),
             (cfg["batch_size"] > 0, "batch_size", "must be positive"),
             (cfg["lr"] > 0, "lr", "must be positive"),
             (cfg["weight_decay"] >= 0, "weight_decay", "must be >= 0"),
             (0 <= cfg["beta2"] < 1, "beta2", "must be in [0, 1)"),
             (cfg["warmup_epochs"] >= 0, "warmup_epochs", "must be >= 0"),
             (cfg["min_lr"] >= 0, "min_lr", "must be >= 0"),
             (cfg["clip_grad"] >= 0, "clip_grad", "must be >= 0 (0 = off)"),
             (0 <= cfg["smoothing"] < 1, "smoothing", "must be in [0, 1)"),
             (0 <= cfg["model_ema_decay"] < 1, "model_ema_decay", "must be in [0, 1) (0 = no EMA)"),
             (0 <= cfg["rotate"] <= 180, "rotate", "must be in [0, 180] degrees"),
             (cfg["elastic"] >= 0, "elastic", "must be >= 0 pixels (0 = off)"),
             (0 <= cfg["scale"] < 1, "scale", "must be in [0, 1)"),
             (0 <= cfg["shift"] < IMAGE_SIZE // 2, "shift", f"must be in [0, {IMAGE_SIZE // 2}) pixels"),
             (cfg["limit_train"] >= 0, "limit_train", "must be >= 0 (0 = all images)"),
             (0 <= cfg["val_split"] < min(cfg["limit_train"] or MNIST_TRAIN, MNIST_TRAIN), "val_split",
              f"must be in [0, {min(cfg['limit_train'] or MNIST_TRAIN, MNIST_TRAIN)}): the training images"
              f"{' of --limit-train' if cfg['limit_train'] else ''}"),
             (cfg["batch_size"] <= n_train, "batch_size", f"exceeds the {n_train} training images"
              f"{' left' if cfg['limit_train'] or cfg['val_split'] else ''}"),
             (cfg["seed"] >= 0, "seed", "must be >= 0"),
             (cfg["threads"] >= 0, "threads", "must be >= 0 (0 = torch's default)"),
             (0 <= cfg["tta_shift"] < IMAGE_SIZE // 2, "tta_shift",
              f"must be in [0, {IMAGE_SIZE // 2}) pixels (0 = off)"),
             (cfg["stop_after"] >= 0, "stop_after", "must be >= 0 (0 = never)")]
    for ok, name, what in rules:
        if not ok:
            raise UsageError(f"{flag(name)} {cfg[name]} {what}.")
    if cfg["min_lr"] > cfg["lr"]:  # the cosine would rise to the floor and stay there: a flat schedule
        raise UsageError(f"peak lr {cfg['lr']:.3g} (--lr) is below --min-lr {cfg['min_lr']:g}; pass --min-lr "
                         f"{cfg['lr'] / 100:.2g} (or anything up to {cfg['lr']:.3g}) or a larger --lr.")
    try:  # what the rules above do not foresee: the model's own checks, on the meta device (no memory, no time)
        with torch.device("meta"):
            build_model(cfg)
    except ValueError as e:
        raise UsageError(f"the model flags do not make a ViT: {e}") from None


def floor_ratio(cfg: dict[str, Any]) -> float:
    """--min-lr as the fraction of --lr the schedule ends at (`utils.schedule.warmup_cosine`)."""
    return cfg["min_lr"] / cfg["lr"]


def saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's train_config in today's keys and meanings: renamed keys (utils.config.RENAMED); runs from
    before --optimizer trained with AdamW, from before --clip-grad without clipping; a min_lr_ratio becomes the
    absolute --min-lr it meant (ratio x lr)."""
    saved = {"optimizer": "adamw", "clip_grad": 0.0, **{RENAMED.get(k, k): v for k, v in saved.items()}}
    if "min_lr_ratio" in saved:
        saved["min_lr"] = saved.pop("min_lr_ratio") * saved["lr"]
    return saved


def planned_epochs(train_config: dict[str, Any]) -> int:
    """The epoch count a run's train_config plans: what --minutes decided, else --epochs."""
    return train_config.get("epochs_fit", train_config["epochs"])


def decide_config(cfg: dict[str, Any], given: set[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The run's config, decided once and checked (`check_config`) before any work -> (config, the checkpoint it
    continues or None; its "train_config" as this run will save it).

    A run whose <output> holds a checkpoint continues it (--fresh starts over) with the model and recipe it was
    trained with: a continued run equals an uninterrupted one, so other model or recipe flags are refused; only
    its length may change (`continue_length`)."""
    path = Path(cfg["output"]) / "checkpoint.pth"
    ckpt = None
    if cfg["fresh"] and path.is_file():
        print(f"note: --fresh: starting over; {path} is replaced after the first epoch")
    elif cfg["resume"] and not path.is_file():
        print(f"note: --resume: {path} does not exist yet, so this starts a new run")
    elif path.is_file():
        ckpt = read_checkpoint(path)
        saved = ckpt.get("train_config")
        if not isinstance(saved, dict) or saved.get("dataset") != "mnist":
            raise CheckpointError(f"{path} is not an MNIST training checkpoint of this repo; cannot continue it "
                                  f"(use another --output, or --fresh to replace it).")
        saved = saved_config(saved)
        cfg, _ = continue_config(saved, cfg, given, path=path, kept=LENGTH,
                                 fixed=[k for k in (*MODEL, *RECIPE) if k not in LENGTH])
    check_config(cfg)
    if ckpt is not None:
        ckpt["train_config"] = continue_length(cfg, given, saved, int(ckpt["epoch"]), path)
    check_output(path.parent)
    return cfg, ckpt


def check_output(out: Path) -> None:
    """UsageError unless `out` (--output) is a folder this process can write; it is created if missing."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, a read-only parent
        raise UsageError(f"--output {out} cannot be a folder here ({e.strerror or e}); pass a folder you can "
                         f"write.") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--output {out} is not writable here; pass a folder you can write.")


def continue_length(cfg: dict[str, Any], given: set[str], saved: dict[str, Any], done: int, path: Path) -> dict:
    """The train_config of a continued run that ran `done` epochs, with the length asked for; `cfg` is set to it.

    Without --epochs / --minutes (or with the saved values) the run keeps its plan. `--minutes 0 --epochs N` (or
    --epochs N on a run without a budget) continues it to N epochs in all, N >= done: the cosine is stretched to
    the new end from the step reached, and train_config["changes"] records it. A budget cannot change, nor can
    --epochs while the budget runs (UsageError with the true numbers, saying what to pass)."""
    planned = planned_epochs(saved)
    asked = [k for k in LENGTH if k in given and cfg[k] != saved[k]]
    if not asked:
        return saved
    flags = " ".join(f"{flag(k)} {cfg[k]:g}" for k in asked)
    if cfg["minutes"]:
        state = (f"{done} of the {planned} epochs its budget set ran" if "epochs_fit" in saved else
                 f"{done} epochs ran; its budget sets the count after epoch {DECIDE_AFTER}, at most {planned}")
        raise UsageError(f"{flags} would change the length of {path}, planned by --minutes {saved['minutes']:g} "
                         f"({state}); pass --minutes 0 --epochs N to continue it to N epochs in all, or --fresh "
                         f"to start over.")
    epochs = cfg["epochs"] if "epochs" in given else planned
    if epochs < done:
        raise UsageError(f"--epochs {epochs}: {path} has already trained {done} epochs (of the {planned} it "
                         f"planned); pass --epochs {done + 1} or more to continue it, or --fresh to start over.")
    cfg["epochs"], cfg["minutes"] = epochs, 0.0
    change = {"epoch": done, "epochs": [planned, epochs]} | ({"minutes": [saved["minutes"], 0.0]}
                                                             if saved["minutes"] else {})
    new = {k: v for k, v in saved.items() if k != "epochs_fit"} | {"epochs": epochs, "minutes": 0.0}
    new["changes"] = [*saved.get("changes", []), change]
    if epochs > done:
        print(f"note: continuing {path} to {epochs} epochs in all ({done} ran of the {planned} it planned); the "
              f"cosine is stretched to the new end")
    return new


def build_model(cfg: dict[str, Any]) -> VisionTransformer:
    """The VisionTransformer of the MODEL entries of `cfg` (a config or a checkpoint's train_config, old key names
    too)."""
    cfg = {RENAMED.get(k, k): v for k, v in cfg.items()}
    return VisionTransformer(**{VIT_ARGS.get(k, k): cfg[k] for k in MODEL}, num_channels=1,
                             num_patches=(IMAGE_SIZE // cfg["patch_size"]) ** 2, num_classes=NUM_CLASSES)


@dataclass
class Run:
    """What changes while a run trains: the model and its optimizer, the metrics rows, the planned epoch count."""

    model: VisionTransformer
    net: nn.Module  # the model as trained: compiled, or the model itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: ModelEma | None
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    epochs: int  # planned; --minutes re-plans it
    cap: int | None  # --minutes: the most epochs it may plan (--epochs given), None: what fits
    train_config: dict[str, Any]  # as saved: the recipe, and "epochs_fit" once --minutes has decided
    start: int = 0  # epochs done before this session
    metrics: list[dict[str, Any]] = field(default_factory=list)
    frames: dict[str, Any] = field(default_factory=lambda: {"epochs": [], "maps": torch.zeros(0)})


def build_run(cfg: dict[str, Any], given: set[str], ckpt: dict[str, Any] | None, hw: hardware.Hardware,
              train_x: Tensor) -> Run:
    """Model, optimizer, schedule, EMA as configured, restored from `ckpt` when continuing, compiled if asked."""
    steps = len(train_x) // cfg["batch_size"]
    if steps == 0:  # MNIST files smaller than MNIST's (check_config knows the real counts)
        left = f" left after --val-split {cfg['val_split']}" if cfg["val_split"] else ""
        raise UsageError(f"--batch-size {cfg['batch_size']} exceeds the {len(train_x)} training images in "
                         f"{cfg['data_root']}{left}; pass a smaller --batch-size.")
    train_config = {k: cfg[k] for k in (*MODEL, *RECIPE)} | {"dataset": "mnist", "normalize": [MEAN, STD]}
    if ckpt is not None:  # what --minutes decided, and the changes of length
        train_config |= {k: ckpt["train_config"][k] for k in ("epochs_fit", "changes") if k in ckpt["train_config"]}
    epochs = planned_epochs(train_config)
    seed_everything(cfg["seed"])
    model = build_model(cfg).to(hw.device)
    for block in model.blocks:  # 17 tokens: the explicit softmax beats the CPU SDPA kernel (bench.vit_speed)
        block.attn.fused_attn = hw.device.type != "cpu"
    optimizer = make_optimizer(cfg["optimizer"], model, cfg["lr"], cfg["weight_decay"], hw.device,
                               betas=(0.9, cfg["beta2"]), amp_dtype=hw.amp_dtype)
    scheduler = warmup_cosine(optimizer, epochs * steps, min(warmup_steps(cfg, steps), epochs * steps),
                              floor_ratio(cfg))
    ema = ModelEma(model, cfg["model_ema_decay"], warmup=True) if cfg["model_ema_decay"] else None
    run = Run(model, model, optimizer, scheduler, ema, hw.grad_scaler(), steps, epochs,
              cfg["epochs"] if "epochs" in given else None, train_config)
    if ckpt is not None:
        run.start, run.metrics = restore_checkpoint(ckpt, model, optimizer, scheduler, ema=ema, scaler=run.scaler)
        run.frames = ckpt.get("attention_frames", run.frames)
        changes = train_config.get("changes", [])
        if changes and changes[-1]["epoch"] == run.start:  # a new length from here: the lr at this step follows it
            run.scheduler = stretch_schedule(scheduler, epochs * steps, min(warmup_steps(cfg, steps), epochs * steps),
                                             floor_ratio(cfg))
    if cfg["compile"]:  # compiled for the shape (and autocast) of every training step
        run.net = compile_or_eager(model, train_x[:cfg["batch_size"]].unsqueeze(1).float() / 255, hw.amp_dtype)
    return run


def warmup_steps(cfg: dict[str, Any], steps_per_epoch: int) -> int:
    return round(cfg["warmup_epochs"] * steps_per_epoch)


def replan(run: Run, cfg: dict[str, Any], epoch: int, elapsed_s: float) -> None:
    """--minutes: from epoch DECIDE_AFTER on, in the session that started the run, set the epoch count that ends
    within the budget (`utils.schedule.budget_epochs`) and stretch the schedule to it; a continued run keeps the
    saved count. A budget too short to wait for that many epochs (`utils.schedule.early_epochs`) is decided
    earlier, from the last epoch's time; one that cannot be kept even so gets a warning with the numbers."""
    if not cfg["minutes"] or run.start >= DECIDE_AFTER or not run.metrics:
        return
    budget_s, last = 60 * cfg["minutes"], run.metrics[-1]
    final_s = last["eval_s"] * (5 if cfg["tta_shift"] else 0) + EXIT_S
    if epoch < DECIDE_AFTER:
        if "epochs_fit" in run.train_config:  # decided early already
            return
        walls = [r["wall_s"] for r in run.metrics]  # the last epoch, its evaluation and the save before it
        period = walls[-1] - walls[-2] if len(walls) > 1 else last.get("epoch_s", walls[-1])
        fit = early_epochs(period, elapsed_s, budget_s, final_s, epoch, cap=run.cap, decide_after=DECIDE_AFTER)
        if fit is None:
            return
        why = f" (decided after epoch {epoch}: the budget is too short to measure {DECIDE_AFTER} epochs first)"
    else:
        walls = [r["wall_s"] for r in run.metrics]
        period = (walls[-1] - walls[-4]) / 3
        fit = budget_epochs(walls, elapsed_s, run.epochs, budget_s, final_s, cap=run.cap, decide_after=DECIDE_AFTER)
        if fit == run.epochs and epoch > DECIDE_AFTER:
            return
        why = "" if epoch == DECIDE_AFTER else " (more: the epochs got faster)" if fit > run.epochs else \
            " (fewer: the epochs got slower)"
    run.epochs = run.train_config["epochs_fit"] = fit
    total = fit * run.steps_per_epoch
    run.scheduler = stretch_schedule(run.scheduler, total, min(warmup_steps(cfg, run.steps_per_epoch), total),
                                     floor_ratio(cfg))
    tqdm.write(f"--minutes {cfg['minutes']:g}: {fit} epochs fit on this machine{why}")
    end_s = elapsed_s + (fit - epoch) * period + final_s
    if end_s > budget_s:
        tqdm.write(f"warning: --minutes {cfg['minutes']:g} ({budget_s:.0f} s) cannot be kept on this machine: "
                   f"{elapsed_s:.1f} s have passed since the start ({epoch} epoch(s), the last {period:.1f} s), and "
                   f"the run needs at least one more epoch and its final evaluation (~{final_s:.1f} s): it ends near "
                   f"{end_s:.0f} s. For a shorter run pass --minutes 0 --epochs N.")


def make_loss(cfg: dict[str, Any], first_step: int):
    """Label-smoothed cross-entropy on fp32 logits; --nan-at-step (tests) makes that step's loss NaN."""
    ce, step = nn.CrossEntropyLoss(label_smoothing=cfg["smoothing"]), first_step

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        nonlocal step
        loss, step = ce(logits.float(), y), step + 1
        return loss * float("nan") if step - 1 == cfg["nan_at_step"] else loss

    return loss_fn


def train_epoch(run: Run, cfg: dict[str, Any], hw: hardware.Hardware, data: dict[str, Tensor], epoch: int,
                loss_fn) -> dict[str, Any]:
    """Epoch `epoch` (0-based): its randomness from (seed, epoch) alone, then one pass -> train_one_epoch's stats.
    A NaN loss names the last good checkpoint."""
    seed_everything(epoch_seed(cfg["seed"], epoch))  # dropout etc.: independent of what ran before
    gen = epoch_generator(cfg["seed"], epoch, hw.device)
    batches = train_batches(data["train_x"], data["train_y"], cfg["batch_size"], gen, rotate=cfg["rotate"],
                            scale=cfg["scale"], shift=cfg["shift"], elastic=cfg["elastic"])
    try:
        return train_one_epoch(run.net, batches, run.optimizer, run.scheduler, loss_fn, device=hw.device,
                               epoch=epoch + 1, step=epoch * run.steps_per_epoch, total=run.steps_per_epoch,
                               ema=run.ema, amp_dtype=hw.amp_dtype, scaler=run.scaler,
                               grad_clip=cfg["clip_grad"] or None, progress=cfg["progress"] and sys.stderr.isatty(),
                               desc=f"epoch {epoch + 1}/{run.epochs}")
    except NonFiniteLossError as e:
        path = Path(cfg["output"]) / "checkpoint.pth"
        kept = f"The last good checkpoint (epoch {epoch}) is kept at {path}" if epoch else "No checkpoint was written"
        e.args = (f"{e} {kept}.",)
        raise


def score(run: Run, cfg: dict[str, Any], hw: hardware.Hardware, data: dict[str, Tensor], last: bool) -> dict:
    """Top-1 and loss of the model (and of the EMA, prefix "ema_") on the validation split, and on the test set
    when there is none or at the last epoch (then also with shift TTA, prefix "tta_"); "eval_s": one evaluation."""
    row: dict[str, Any] = {}
    sets = {"val": (data["val_x"], data["val_y"])} if "val_x" in data else {}
    if not sets or last:
        sets["test"] = (data["test_x"], data["test_y"])
    for prefix, m in (("", run.model), ("ema_", run.ema.module if run.ema is not None else None)):  # eager
        if m is None:
            continue
        views = [("", m)] + ([("tta_", ShiftTTA(unwrap(m), cfg["tta_shift"]))] if last and cfg["tta_shift"] else [])
        for (tta, viewer), (name, (x, y)) in itertools.product(views, sets.items()):
            start = time.perf_counter()
            r = evaluate(viewer, eval_batches(x, y), device=hw.device, amp_dtype=hw.amp_dtype)
            row[f"{prefix}{tta}{name}_top1"], row[f"{prefix}{tta}{name}_loss"] = r["top1"], r["loss"]
            if not (prefix or tta):
                row["eval_s"] = time.perf_counter() - start
    return row


def track(run: Run, tracked: Tensor, epoch: int) -> dict[str, Any]:
    """Attention statistics of the fixed digits (the bare model, eval mode, no RNG drawn: training is unchanged);
    the rollout of the first 8 is kept as a frame of the GIF."""
    row, maps = track_attention(run.model, tracked, rollout=min(8, len(tracked)), batch_size=len(tracked))
    old = run.frames
    run.frames = {"epochs": [*old["epochs"], epoch + 1],
                  "maps": torch.cat([old["maps"], maps[None]]) if old["epochs"] else maps[None]}
    return row


def save_epoch(run: Run, cfg: dict[str, Any], ran_as: dict[str, Any], plot: bool) -> None:
    """checkpoint.pth and metrics.json after every epoch; the curves when `plot`."""
    out = Path(cfg["output"])
    state = checkpoint_state(run.model, run.optimizer, run.scheduler, epoch=len(run.metrics), metrics=run.metrics,
                             train_config=run.train_config, ema=run.ema, scaler=run.scaler,
                             attention_frames=run.frames)
    save_checkpoint(state, out / "checkpoint.pth")
    save_metrics(run.metrics, out / "metrics.json", train_config=run.train_config, ran_as=ran_as)
    if plot:  # ~0.5 s a plot
        title = f"MNIST ViT {cfg['embed_dim']}d x {cfg['num_layers']}, patch {cfg['patch_size']}"
        plot_curves(run.metrics, out / "curves.png", title=title)
        plot_attention_curves(run.metrics, out / "attention_curves.png", title=title)  # when rows were tracked


def result(final: dict[str, Any], ema: bool) -> str:
    """The reported test accuracy of a run's last metrics row, e.g. "99.54% (EMA weights; shift TTA; single view
    99.47%)": the EMA's when one is kept, with shift TTA when it ran."""
    which = "ema_" if ema else ""
    notes = ["EMA weights"] if ema else []
    if f"{which}tta_test_top1" in final:
        notes.append(f"shift TTA; single view {final[f'{which}test_top1']:.2f}%")
    acc = final.get(f"{which}tta_test_top1", final[f"{which}test_top1"])
    return f"{acc:.2f}%" + (f" ({'; '.join(notes)})" if notes else "")


def report(run: Run, cfg: dict[str, Any], data: dict[str, Tensor], wall_s: float) -> dict[str, Any]:
    """The end of a run: the GIF of where the model looked, epoch by epoch; the final line."""
    out = Path(cfg["output"])
    if cfg["track_attention"] and run.frames["epochs"]:
        save_attention_over_training(data["test_images"][:len(run.frames["maps"][0])], run.frames["maps"],
                                     run.frames["epochs"], out / "attention_over_training.gif",
                                     out / "attention_over_training.png")
    final = run.metrics[-1]
    total = f", {final['wall_s']:.0f} s over all sessions" if run.start else ""
    print(f"final: test accuracy {result(final, run.ema is not None)} after {final['epoch']} epochs, wall time "
          f"{wall_s:.0f} s ({wall_s / 60:.1f} min{total}); checkpoint {out / 'checkpoint.pth'}")
    return final


def finished(cfg: dict[str, Any], ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """A continued run that has trained all its planned epochs: says so, where its results are and how to go on
    -> its last metrics row; None when epochs are left."""
    done, planned = int(ckpt["epoch"]), planned_epochs(ckpt["train_config"])
    if done < planned or not ckpt.get("metrics"):
        return None
    out, final = Path(cfg["output"]), ckpt["metrics"][-1]
    print(f"{out / 'checkpoint.pth'} is a finished run: {done} of {planned} epochs, test accuracy "
          f"{result(final, cfg['model_ema_decay'] > 0)}; results in {out / 'metrics.json'} and {out / 'curves.png'}. "
          f"Nothing to train: --minutes 0 --epochs N continues it to N epochs, --fresh starts over.")
    return final


def train(cfg: dict[str, Any], given: set[str], started: float | None = None) -> dict[str, Any]:
    """Run (or continue) training as configured -> the last metrics row. `started`: the perf_counter time the
    process started at (the wall clock and the --minutes budget count from it; default: now). A finished run
    returns at once (`finished`)."""
    t0 = started if started is not None else time.perf_counter()
    cfg, ckpt = decide_config(cfg, given)
    if ckpt is not None and (final := finished(cfg, ckpt)) is not None:
        return final
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    hw = hardware.resolve(cfg["device"], cfg["amp"])
    print(f"{hw.summary}, {'compiled' if cfg['compile'] else 'eager'}", flush=True)  # the first line of every run
    data = load_splits(cfg["data_root"], hw.device, download=cfg["download"], upright=cfg["deskew"],
                       limit_train=cfg["limit_train"], val_split=cfg["val_split"])
    run = build_run(cfg, given, ckpt, hw, data["train_x"])
    ran_as = hw.record() | {"compiled": run.net is not run.model}
    if ckpt is not None:
        print(f"continuing {Path(cfg['output']) / 'checkpoint.pth'} after epoch {run.start}/{run.epochs} "
              f"(--fresh starts over)")
    del ckpt
    tracked = data["test_x"][:256] if cfg["track_attention"] else None  # fixed held-out digits; 8 in the GIF
    loss_fn = make_loss(cfg, run.start * run.steps_per_epoch)
    wall_before = run.metrics[-1]["wall_s"] if run.metrics else 0.0
    epoch = run.start
    while epoch < run.epochs:
        replan(run, cfg, epoch, wall_before + time.perf_counter() - t0)
        epoch_start = time.perf_counter()
        stats = train_epoch(run, cfg, hw, data, epoch, loss_fn)
        last = epoch + 1 == run.epochs
        row = {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"], **stats,
               **score(run, cfg, hw, data, last), **(track(run, tracked, epoch) if tracked is not None else {})}
        row |= {"wall_s": wall_before + time.perf_counter() - t0, "epoch_s": time.perf_counter() - epoch_start}
        run.metrics.append(row)
        epoch += 1
        stop = cfg["stop_after"] and epoch - run.start >= cfg["stop_after"] and not last
        save_epoch(run, cfg, ran_as, plot=last or stop or epoch % 5 == 0)
        scores = "  ".join(f"{k} {v:.2f}%" for k, v in row.items() if k.endswith("_top1"))
        tqdm.write(f"epoch {epoch}/{run.epochs}  train loss {stats['train_loss']:.4f}  {scores}  "
                   f"{stats['img_per_s']:.0f} img/s  {row['wall_s']:.0f} s")
        if stop:
            print(f"stopped after epoch {epoch} (--stop-after {cfg['stop_after']}); the same command continues")
            return row
    return report(run, cfg, data, time.perf_counter() - t0)


def main(argv: list[str] | None = None, started: float | None = None) -> None:
    cfg: dict[str, Any] = {"output": RUN["output"][0]}
    try:
        cfg, given = parse_args(argv)
        train(cfg, given, started)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as e:  # DataError, CheckpointError are ValueErrors
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted; the last finished epoch is in {Path(cfg['output']) / 'checkpoint.pth'}: the same "
                 f"command continues")


if __name__ == "__main__":
    main(started=STARTED)
