"""What a training run writes: the checkpoint, one dict of tensors and plain values written atomically and read
with weights_only=True, and metrics.json.

    state = checkpoint_state(model, optimizer, scheduler, epoch=3, metrics=rows, train_config=cfg, ema=ema)
    save_checkpoint(state, "runs/x/checkpoint.pth")       # a temp file, fsync, os.replace: never a torn file
    epoch, rows = restore_checkpoint(read_checkpoint("runs/x/checkpoint.pth"), model, optimizer, scheduler)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.ema import ModelEma, unwrap
from utils.seed import rng_states, set_rng_states

SAFE_GLOBALS = [argparse.Namespace]  # DINO's full checkpoints pickle their argparse.Namespace: harmless, allowed


class CheckpointError(ValueError):
    """A file or dict that is not a usable checkpoint; the message says why in one sentence."""


_UMASK = os.umask(0)  # read once (setting it is the only way to read it), restored at once
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(f)` on a temp file beside `path`, fsync it, then os.replace it onto `path` (parent folders are
    created; the file gets the permissions open() would give). A kill at any moment leaves the old file or the new
    one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what open() gives a new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save `state` to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(state, f))


def save_metrics(metrics: list[dict[str, Any]], path: str | os.PathLike, **extra: Any) -> None:
    """Write {**extra, "epochs": metrics} as indented JSON to `path` (a run's metrics.json), atomically."""
    text = json.dumps({**extra, "epochs": list(metrics)}, indent=2)
    atomic_write(path, lambda f: f.write(text), mode="w")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(path, map_location="cpu", weights_only=True) -> the dict it holds.

    Raises CheckpointError (one sentence) for a missing, truncated or foreign file, a non-dict, or a file that
    pickles Python objects other than tensors and containers (a whole nn.Module, a custom class). Classes in
    SAFE_GLOBALS are allowed."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist and is not a registry name (python -m "
                              f"models.pretrained --list).")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises anything on garbage: KeyError, EOFError, RuntimeError...
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e) and refused:
            raise CheckpointError(f"'{path}' pickles Python objects (e.g. {refused[1]}) that weights_only loading "
                                  f"refuses: they could run arbitrary code; load it only if you trust it, then "
                                  f"re-save its state dict.") from None
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint: it is truncated or another kind "
                              f"of file.") from None
    return checkpoint_dict(obj, path)


def checkpoint_dict(obj: Any, path: str | os.PathLike) -> dict[str, Any]:
    """`obj`, loaded from `path`, when it is a dict; else CheckpointError."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dict of tensors.")
    return obj


def reported_weights(row: dict[str, Any], has_ema: bool) -> str:
    """Which weights a run reports, from its last metrics `row` -> "ema" or "model" (the checkpoint's
    "reported_weights", read by `models.pretrained.weights_choice`): the EMA when its validation top-1
    ("ema_val_top1") beats the model's ("val_top1"); with scores but no validation split, the EMA whenever there
    is one; the model when there is no EMA or no scores yet."""
    if not has_ema or not row:  # no scores yet: nothing was reported
        return "model"
    if "ema_val_top1" in row and "val_top1" in row:
        return "ema" if row["ema_val_top1"] > row["val_top1"] else "model"
    return "ema"


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *, epoch: int,
                     metrics: list[dict[str, Any]], train_config: dict[str, Any],
                     ema: ModelEma | None = None, scaler: torch.amp.GradScaler | None = None,
                     **extra: Any) -> dict[str, Any]:
    """The checkpoint dict: model_config, model, optimizer, scheduler, epoch (completed), rng, metrics,
    train_config, reported_weights, and when given ema_model (a state dict for the bare model class) +
    ema_updates, scaler, then `extra`. `model` may be wrapped (DDP / compiled); the bare one has a `.config` dict."""
    bare = unwrap(model)
    state = {"model_config": dict(bare.config), "model": bare.state_dict(), "epoch": epoch, "rng": rng_states(),
             "metrics": list(metrics), "train_config": dict(train_config),
             "reported_weights": reported_weights(metrics[-1] if metrics else {}, ema is not None)}
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            state[name] = obj.state_dict()
    if ema is not None:
        state["ema_model"], state["ema_updates"] = ema.module.state_dict(), ema.updates
    return state | extra


def restore_checkpoint(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
                       ema: ModelEma | None = None, scaler: torch.amp.GradScaler | None = None,
                       restore_rng: bool = True) -> tuple[int, list[dict[str, Any]]]:
    """Load what `checkpoint_state` saved into freshly built objects -> (epochs completed, metrics rows).

    An EMA the checkpoint lacks starts from its model weights. Raises CheckpointError when the checkpoint lacks a
    part asked for or its model config differs from `model`'s."""
    bare = unwrap(model)
    missing = [k for k in ("model_config", "model", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {', '.join(missing)}; it was not written by this repo's training.")
    if dict(ckpt["model_config"]) != dict(bare.config):
        diff = {k: (ckpt["model_config"].get(k), v) for k, v in bare.config.items() if ckpt["model_config"].get(k) != v}
        raise CheckpointError(f"the checkpoint's model differs from the one configured (checkpoint vs now: {diff}); "
                              f"resume with the settings it was trained with.")
    bare.load_state_dict(ckpt["model"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            if name not in ckpt:
                raise CheckpointError(f"the checkpoint has no {name} state, so training cannot resume from it.")
            obj.load_state_dict(ckpt[name])
    if ema is not None:
        ema.module.load_state_dict(ckpt.get("ema_model", ckpt["model"]))
        ema.updates = int(ckpt.get("ema_updates", ckpt.get("ema_n_averaged", 1))) if "ema_model" in ckpt else 0
    if restore_rng and "rng" in ckpt:
        set_rng_states(ckpt["rng"])
    return int(ckpt["epoch"]), list(ckpt.get("metrics", []))
