"""Training pieces shared by the dataset scripts (`mnist/train.py`, `imagenet/train.py`).

One process on a CPU or GPU, or one process per GPU under DDP: the functions take the (possibly DDP-wrapped or
`torch.compile`d) model, reduce evaluation counts across ranks when `torch.distributed` is initialised, and let the
caller silence the progress bar on ranks other than 0 (`progress=False`). AMP is optional (`amp_dtype`).

    seed_everything, epoch_seed, epoch_generator  -- seeding; per-epoch randomness that does not depend on history
    rng_states, set_rng_states                    -- capture / restore every RNG (plain values: weights_only-safe)
    warmup_cosine                                 -- the LR schedule (optimizers: utils/optim.py)
    stretch_schedule, epochs_within               -- a time budget: the epoch count that fits, the schedule to match
    ModelEma, make_ema, unwrap                    -- EMA of the weights on the device (optional warm-up); the bare model
    compile_or_eager                              -- torch.compile, or a one-line warning where it cannot work
    train_one_epoch, evaluate, accuracy_counts    -- the epoch loop with NaN guard; top-1/top-5 evaluation
    checkpoint_state, restore_checkpoint          -- the repo's checkpoint dict, and resuming from it
    save_checkpoint, load_checkpoint              -- atomic write; torch.load(weights_only=True) with clear errors
    save_metrics, plot_curves                     -- metrics.json and a loss/accuracy curve PNG
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from models.pretrained import CheckpointError, read_checkpoint
from utils.hardware import autocast


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; `step` is the global optimizer step (0-based) where it happened."""

    def __init__(self, step: int, epoch: int, value: float):
        self.step, self.epoch, self.value = step, epoch, value
        super().__init__(f"the loss became {value} at step {step} (epoch {epoch}); training stopped. "
                         f"Lower the learning rate or check the data.")


# ----------------------------------------------------------------------------------------------------------- seeding
def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from (seed, epoch) alone, so epoch `epoch` draws the same numbers whatever ran before."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded from (seed, epoch): for the epoch's permutation and augmentation."""
    g = torch.Generator(device=device)
    g.manual_seed(epoch_seed(seed, epoch))
    return g


def rng_states() -> dict[str, Any]:
    """Every global RNG state as plain values (tensors, lists, ints), loadable with weights_only=True."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": [version, list(state), gauss], "numpy": [name, torch.from_numpy(keys.copy()), pos,
                                                                 has_gauss, cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this process's GPU: one per rank, whatever the node layout
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` captured (missing entries are left alone)."""
    if "python" in states:
        version, state, gauss = states["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda, device = states["cuda"], torch.cuda.current_device()
        if isinstance(cuda, list):  # older checkpoints: every visible GPU's
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


# ------------------------------------------------------------------------------------------- optimizer and schedule
def unwrap(model: nn.Module | ModelEma) -> nn.Module:
    """The bare model under DDP (`.module`), `torch.compile` (`._orig_mod`) and ModelEma (`.module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, ModelEma)):
            model = model.module
        else:
            return model


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr_ratio: float = 0.0, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR schedule: linear warm-up from ~0 to the base LR over `warmup_steps`, then cosine to
    `min_lr_ratio` x base LR at `total_steps`. Call `scheduler.step()` after every optimizer step.

    The base LR of a group is its "initial_lr" (what a previous schedule of this optimizer, or a loaded optimizer
    state, left there), else its "lr", which is then stored as "initial_lr". `start_step` positions the schedule
    after that many completed optimizer steps (the groups' LRs are set for step `start_step`), as if a fresh one
    had been stepped `start_step` times: for resuming with a changed length or warm-up. To change the base LR on
    resume, set each group's "initial_lr" first."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total_steps > 0.")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be a non-negative step count.")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def stretch_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int, warmup_steps: int,
                     min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The `warmup_cosine` schedule of `scheduler`'s optimizer with a new length, continued from the step that
    `scheduler` has reached (the optimizer's learning rates are set for it)."""
    return warmup_cosine(scheduler.optimizer, total_steps, warmup_steps, min_lr_ratio, start_step=scheduler.last_epoch)


def epochs_within(budget_s: float, elapsed_s: float, epoch_s: float, final_s: float, max_epochs: int, done: int = 1,
                  margin: float = 0.1) -> int:
    """How many epochs in all (>= done, <= max_epochs) end a run within `budget_s` seconds when `done` epochs took
    `elapsed_s` since the start, each further one takes `epoch_s` (its evaluation and checkpoint included) and the
    end adds `final_s` (e.g. the final evaluation). `margin` of the budget is kept free for epochs that run slower
    than the one measured (on our shared 2-core VM epochs of one run varied by +-25 %)."""
    left = budget_s * (1 - margin) - elapsed_s - final_s
    return max(done, min(max_epochs, done + int(left // max(epoch_s, 1e-9))))


class ModelEma:
    """Exponential moving average of a model's weights, kept on the model's device.

    `module` is a deep copy of the bare model (`unwrap(model)`) in eval mode without gradients; its state dict loads
    into a fresh model of the class. `update_parameters(model)` moves every float parameter and buffer towards the
    model's by one `torch._foreach_lerp_` (ema += (1 - d) (model - ema), d = `decay_at(updates)`) and copies the
    other buffers: no host sync. `updates` counts the updates done.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay {decay} must be in [0, 1).")
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def decay_at(self, updates: int) -> float:
        """The decay of the update that follows `updates` updates: `decay`, or with warm-up timm ModelEmaV3's
        1 - (1 + updates)^(-3/4) capped at `decay` (0 for the first update, which copies the model; 0.9 after 20,
        0.999 after ~10^4, 0.9999 after ~2 x 10^5)."""
        return min(self.decay, 1 - (1 + updates) ** -0.75) if self.warmup else self.decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """One EMA step towards `model` (wrapped or bare, of the same class as `module`)."""
        bare = unwrap(model)
        pairs = zip([*self.module.parameters(), *self.module.buffers()], [*bare.parameters(), *bare.buffers()],
                    strict=True)
        ema_f, model_f = [], []
        for e, m in pairs:
            if e.is_floating_point():
                ema_f.append(e)
                model_f.append(m)
            else:
                e.copy_(m)
        if ema_f:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - self.decay_at(self.updates))
        self.updates += 1


def make_ema(model: nn.Module, decay: float, warmup: bool = False) -> ModelEma:
    """A `ModelEma` of the bare model with `decay` (and timm's warm-up of the decay when `warmup`);
    `ema.update_parameters(model)` after each optimizer step, `ema.module` is the averaged model."""
    return ModelEma(model, decay, warmup)


# ------------------------------------------------------------------------------------------------- train / evaluate
def compile_or_eager(model: nn.Module, example: Tensor, amp_dtype: torch.dtype | None = None) -> nn.Module:
    """torch.compile(model), compiled here by one forward/backward of `example` (a batch of the training shape, under
    the training autocast, so training reuses these graphs); where that fails (no C++ compiler on a CPU, no Triton
    on a GPU) a one-line warning on stderr and `model` itself. Leaves the gradients empty."""
    compiled = torch.compile(model)
    try:
        with autocast(example.device, amp_dtype):
            out = compiled(example)
        out.float().sum().backward()
    except Exception as e:  # the backend's own error type differs between torch versions and devices
        e = getattr(e, "inner_exception", None) or e  # older torch: BackendCompilerFailed("backend=... raised:")
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        print(f"warning: torch.compile failed here ({reason[:150]}); training without it (slower).", file=sys.stderr)
        return model
    finally:
        model.zero_grad(set_to_none=True)
    return compiled


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, loss_fn: Callable[[Tensor, Tensor], Tensor],
                    *, device: torch.device | str, epoch: int, step: int = 0, total: int | None = None,
                    ema: ModelEma | None = None, amp_dtype: torch.dtype | None = None,
                    scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None,
                    accum_steps: int = 1, should_stop: Callable[[int], bool] | None = None,
                    check_every: int = 10, progress: bool = True, desc: str | None = None) -> dict[str, Any]:
    """One pass over `batches`, an iterable of micro-batches (x (B, C, H, W), target (B,) or soft targets (B, K)).

    Every `accum_steps` micro-batches make one optimizer step: each is forwarded under optional autocast and
    backpropagated as loss_fn(logits, target) / accum_steps (through `scaler` if given; under DDP inside
    `model.no_sync()` but for the step's last one), then once per step: optional grad-norm clipping, optimizer
    step, `scheduler.step()`, `ema.update_parameters`. Micro-batches left over after the last full step are dropped
    without a step (pass a multiple of `accum_steps`). After each step `should_stop(steps done in this call)` may
    end the epoch there (preemption). Tensors are moved to `device` (non_blocking) if they are not there already.
    `step` is the global optimizer step at the start of the epoch (only for messages); `total` is the number of
    micro-batches (for the progress bar). The loss is checked for NaN/inf every `check_every` steps (one sync; summed
    over the ranks under torch.distributed, so that every rank stops at the same step) and at the end; on a bad
    loss it raises NonFiniteLossError naming the first bad step, so the caller keeps its last good checkpoint.
    Returns {"train_loss": mean micro-batch loss, "images": count, "seconds": wall, "img_per_s":
    throughput, "steps": optimizer steps done, "stopped": whether should_stop ended the epoch}, over the
    micro-batches of the steps done.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps} must be at least 1.")
    device = torch.device(device)
    model.train()
    bar = tqdm(batches, total=total, desc=desc or f"epoch {epoch}", disable=not progress, dynamic_ncols=True,
               leave=True)
    pending: list[Tensor] = []  # micro-batch losses since the last check, still on the device
    loss_sum, images, n_steps, n_micro, stopped, start = 0.0, 0, 0, 0, False, time.perf_counter()
    held, held_images = 0, 0  # micro-batches and images of the step being accumulated

    def check() -> float:
        losses = torch.stack(pending).float()
        summed = losses.clone()  # over ranks: a NaN on any rank is seen by all at the same step, and all stop
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(summed)
        losses, summed = losses.cpu(), summed.cpu()
        bad = (~torch.isfinite(summed)).nonzero()
        if len(bad):
            i = n_micro - len(pending) + int(bad[0])
            raise NonFiniteLossError(step + i // accum_steps, epoch, float(summed[int(bad[0])]))
        pending.clear()
        return float(losses.sum())

    for i, (x, y) in enumerate(bar):
        last = i % accum_steps == accum_steps - 1
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if i % accum_steps == 0:
            optimizer.zero_grad(set_to_none=True)
        sync = last or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(device, amp_dtype):
                loss = loss_fn(model(x), y)
            scaled = loss / accum_steps if accum_steps > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        pending.append(loss.detach())
        held, held_images = held + 1, held_images + x.shape[0]
        if not last:
            continue
        if scaler is not None:
            scaler.unscale_(optimizer)
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        n_steps, n_micro, images, held, held_images = n_steps + 1, n_micro + held, images + held_images, 0, 0
        if n_steps % check_every == 0:
            shown = float(pending[-1])
            loss_sum += check()
            bar.set_postfix(loss=f"{shown:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{images / (time.perf_counter() - start):.0f}", refresh=False)
        if should_stop is not None and should_stop(n_steps):
            stopped = True
            break
    if held:  # an unfinished accumulation: dropped, its gradients too
        del pending[-held:]
        optimizer.zero_grad(set_to_none=True)
    if pending:
        loss_sum += check()
    bar.close()
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / max(1, n_micro), "images": images, "seconds": seconds,
            "img_per_s": images / max(seconds, 1e-9), "steps": n_steps, "stopped": stopped}


def accuracy_counts(logits: Tensor, target: Tensor, topk: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """logits: (B, K), target: (B,) class indices -> number of rows whose target is among the top-k, per k."""
    maxk = min(max(topk), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = top == target[:, None]
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in topk]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, device: torch.device | str,
             amp_dtype: torch.dtype | None = None, progress: bool = False, desc: str = "eval") -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (in %) of `model` over (x (B, C, H, W), target (B,)) batches.

    Counts are summed over ranks with all_reduce when torch.distributed is initialised (each rank passes its own
    shard). Returns {"loss", "top1", "top5", "n"}.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count
    for x, y in tqdm(batches, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        top1, top5 = accuracy_counts(logits, y)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        sums += torch.stack([loss.double(), top1.double(), top5.double(), torch.tensor(len(y), device=device,
                                                                                       dtype=torch.float64)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "n": int(n)}


# ------------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *, epoch: int,
                     metrics: list[dict[str, Any]], train_config: dict[str, Any],
                     ema: ModelEma | None = None, scaler: torch.amp.GradScaler | None = None,
                     **extra: Any) -> dict[str, Any]:
    """The repo's checkpoint dict: model_config, model, optimizer, scheduler, epoch (completed), rng, metrics,
    train_config, and when given ema_model (a state dict for the bare model class) + ema_updates (int), scaler.
    `model` may be wrapped (DDP / compiled); the bare model must have a `.config` dict."""
    bare = unwrap(model)
    state = {"model_config": dict(bare.config), "model": bare.state_dict(), "epoch": epoch, "rng": rng_states(),
             "metrics": list(metrics), "train_config": dict(train_config)}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if ema is not None:
        state["ema_model"] = ema.module.state_dict()
        state["ema_updates"] = ema.updates
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    state.update(extra)
    return state


def restore_checkpoint(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
                       ema: ModelEma | None = None, scaler: torch.amp.GradScaler | None = None,
                       restore_rng: bool = True) -> tuple[int, list[dict[str, Any]]]:
    """Load what `checkpoint_state` saved into freshly built objects; returns (epochs completed, metrics).

    Raises CheckpointError when the checkpoint lacks a part or its model config differs from `model`'s.
    """
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
        if "ema_model" in ckpt:
            ema.module.load_state_dict(ckpt["ema_model"])
            ema.updates = int(ckpt.get("ema_updates", ckpt.get("ema_n_averaged", 1)))  # older checkpoints: n_averaged
        else:  # EMA switched on at resume: start it from the current weights
            ema.module.load_state_dict(ckpt["model"])
            ema.updates = 0
    if restore_rng and "rng" in ckpt:
        set_rng_states(ckpt["rng"])
    return int(ckpt["epoch"]), list(ckpt.get("metrics", []))


_UMASK = os.umask(0)  # read once (setting it is the only way to read it), restored at once
os.umask(_UMASK)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
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
    """torch.save `state` to `path` atomically: a temp file in the same folder, fsync, os.replace. A kill at any
    moment leaves either the previous checkpoint or the new one, never a torn file."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(path, weights_only=True) on the CPU (`models.pretrained.read_checkpoint`); CheckpointError
    (one sentence) for a missing, truncated, foreign or non-dict file."""
    return read_checkpoint(path)


# ---------------------------------------------------------------------------------------------------------- metrics
def save_metrics(metrics: list[dict[str, Any]], path: str | os.PathLike, **extra: Any) -> None:
    """Write {"epochs": metrics, **extra} as JSON to `path`, atomically."""
    text = json.dumps({**extra, "epochs": metrics}, indent=2)
    _atomic_write(Path(path), lambda f: f.write(text), mode="w")


def plot_curves(metrics: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Loss (left) and accuracy (right) against epoch, from per-epoch dicts with "epoch" and any of
    train_loss / val_loss / test_loss and val_top1 / test_top1 (other keys are ignored). Saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    for key in ("train_loss", "val_loss", "test_loss"):
        if any(key in m for m in metrics):
            ax_loss.plot(epochs, [m.get(key, float("nan")) for m in metrics], marker=".", label=key)
    for key in ("val_top1", "test_top1", "ema_val_top1", "ema_test_top1"):
        if any(key in m for m in metrics):
            ax_acc.plot(epochs, [m.get(key, float("nan")) for m in metrics], marker=".", label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="top-1 accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    _atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
