"""What a training run writes: the checkpoint, one dict of tensors and plain values written atomically and read
with weights_only=True, and metrics.json.

    state = checkpoint_state(model, optimizer, scheduler, epoch=3, metrics=rows, train_config=cfg, ema=ema)
    save_checkpoint(state, "runs/x/checkpoint.pth")       # a temp file, fsync, os.replace: never a torn file
    epoch, rows = restore_checkpoint(read_checkpoint("runs/x/checkpoint.pth"), model, optimizer, scheduler)
"""

from __future__ import annotations

import _compat_pickle
import argparse
import io
import json
import os
import pickle
import pickletools
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

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


def output_file(path: str | os.PathLike, label: str = "--output", example: str = "attention.png") -> Path:
    """Path(path), or ValueError (one sentence naming `label` and the value) when no file can be made there: a folder
    (suggests `example` inside it) or a path under an existing file. Checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{label} '{path}' is a folder; pass a file name such as '{path / example}'.")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{label} '{path}' lies under '{blocker}', which is a file, not a folder.")
    return path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save `state` to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(state, f))


def save_metrics(metrics: list[dict[str, Any]], path: str | os.PathLike, **extra: Any) -> None:
    """Write {**extra, "epochs": metrics} as indented JSON to `path` (a run's metrics.json), atomically."""
    text = json.dumps({**extra, "epochs": list(metrics)}, indent=2)
    atomic_write(path, lambda f: f.write(text), mode="w")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(path, map_location="cpu", weights_only=True) -> the dict it holds.

    Raises CheckpointError (one sentence) for a missing file, a folder, an empty, truncated, damaged or foreign
    file, a non-dict, or a file that pickles Python objects other than tensors and containers (a whole nn.Module,
    a custom class, a function call planted in the pickle): weights_only loading refuses those, nothing runs.
    Classes in SAFE_GLOBALS are allowed."""
    if os.path.isdir(path):
        inside = sorted(Path(path).glob("*.pt*")) + sorted(Path(path).glob("*.safetensors"))
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file" + (
            f"; pass a file in it, e.g. '{inside[0]}'." if inside else "."))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist.")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"'{path}' is empty (0 bytes), not a checkpoint.")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises anything on garbage: KeyError, EOFError, RuntimeError...
        refused = refused_globals(path) if isinstance(e, pickle.UnpicklingError) else []
        if refused:
            raise CheckpointError(f"'{path}' pickles Python objects (e.g. {refused[0]}) that weights_only loading "
                                  f"refuses: they could run arbitrary code; load it only if you trust it, then "
                                  f"re-save its state dict.") from None
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint: it is truncated, damaged or another "
                              f"kind of file.") from None
    return checkpoint_dict(obj, path)


def refused_globals(path: str | os.PathLike) -> list[str]:
    """The globals ("module.name") that the pickle of a checkpoint file calls or builds and weights_only loading
    does not allow; [] when the file is not an intact pickle (truncated, a CRC error, garbage, another format).

    This tells a refusal from damage without reading torch's message: torch.load raises pickle.UnpicklingError
    both for a refused global and for some garbage, but only an intact pickle names globals. The pickle is
    data.pkl of a torch.save zip (read with its CRC checked) or, for the legacy format and plain pickle files,
    the pickles at the start of the file. It is only parsed (pickletools), never run."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in [*SAFE_GLOBALS, *torch.serialization.get_safe_globals()]
               if hasattr(g, "__qualname__")}
    allowed |= set(getattr(torch._weights_only_unpickler, "_get_allowed_globals", dict)())
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                found = _pickle_globals(io.BytesIO(z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))))
        else:
            with open(path, "rb") as f:
                found = [g for _ in range(5) if f.peek(1) for g in _pickle_globals(f)]  # legacy: 5 pickles, data
    except Exception:  # BadZipFile (truncated, CRC), StopIteration (no data.pkl), ValueError (not a pickle)
        return []
    return [g for g in dict.fromkeys(found) if g not in allowed]


def _pickle_globals(f: BinaryIO) -> list[str]:
    """The globals named by the one pickle read from `f` (up to its STOP); ValueError when it is not one."""
    found, pushed, memo = [], [], {}
    for op, arg, _ in pickletools.genops(f):
        if op.name == "GLOBAL":  # protocols 0-3: "module name", Python 2's module names in protocols < 3
            module, name = arg.split(" ", 1)
            found.append(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
        elif op.name == "STACK_GLOBAL":  # protocol 4+: the module and name pushed just before (or from the memo)
            found.append(".".join(str(s) for s in pushed[-2:]))
        if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif op.name not in ("PROTO", "FRAME", "STOP"):
            pushed.append(arg if isinstance(arg, str) else None)
    return found


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
