"""The epoch loop and evaluation, for one process or one per GPU under DDP.

The functions take the (possibly DDP-wrapped or `torch.compile`d) model, sum evaluation counts over ranks when
`torch.distributed` is initialised, and let the caller silence progress bars on ranks other than 0
(`progress=False`). AMP is optional (`amp_dtype`). The pieces around them: `utils.schedule`, `utils.ema`,
`utils.checkpoint`, `utils.seed`, `utils.optim`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from utils.ema import ModelEma, eval_mode
from utils.hardware import autocast


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; `step` is the global optimizer step (0-based) where it happened."""

    def __init__(self, step: int, epoch: int, value: float):
        self.step, self.epoch, self.value = step, epoch, value
        super().__init__(f"the loss became {value} at step {step} (epoch {epoch}); training stopped. "
                         f"Lower the learning rate or check the data.")


def compile_or_eager(model: nn.Module, example: Tensor, amp_dtype: torch.dtype | None = None) -> nn.Module:
    """torch.compile(model), compiled here by one forward / backward of `example` (a batch of the training shape,
    under the training autocast, so training reuses these graphs); where that fails (no C++ compiler on a CPU, no
    Triton on a GPU) a one-line warning on stderr and `model` itself. Leaves the gradients empty."""
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


class LossCheck:
    """Micro-batch losses kept on the device and checked for NaN / inf in one sync, summed over ranks under
    torch.distributed so that every rank stops at the same step. `check()` -> their sum; NonFiniteLossError names
    the first bad micro-batch's optimizer step."""

    def __init__(self, first_step: int, epoch: int, accum_steps: int):
        self.first_step, self.epoch, self.accum_steps = first_step, epoch, accum_steps
        self.pending: list[Tensor] = []
        self.checked = 0  # micro-batches checked so far

    def check(self) -> float:
        if not self.pending:
            return 0.0
        losses = torch.stack(self.pending).float()
        summed = losses.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(summed)
        losses, summed = losses.cpu(), summed.cpu()
        bad = (~torch.isfinite(summed)).nonzero()
        if len(bad):
            i = self.checked + int(bad[0])
            raise NonFiniteLossError(self.first_step + i // self.accum_steps, self.epoch, float(summed[int(bad[0])]))
        self.checked += len(self.pending)
        self.pending.clear()
        return float(losses.sum())


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler | None, *, ema: ModelEma | None = None,
                   scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None) -> None:
    """After the backward passes of one step: optional grad-norm clipping (on unscaled gradients), the optimizer
    step (through `scaler` if given), `scheduler.step()`, `ema.update_parameters(model)`."""
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


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, loss_fn: Callable[[Tensor, Tensor], Tensor],
                    *, device: torch.device | str, epoch: int, step: int = 0, total: int | None = None,
                    ema: ModelEma | None = None, amp_dtype: torch.dtype | None = None,
                    scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None,
                    accum_steps: int = 1, should_stop: Callable[[int], bool] | None = None,
                    check_every: int = 10, progress: bool = True, desc: str | None = None) -> dict[str, Any]:
    """One pass over micro-batches (x (B, C, H, W), target (B,) or soft targets (B, K)); `accum_steps` of them
    make one `optimizer_step`.

    Each micro-batch is forwarded under optional autocast and backpropagated as loss / accum_steps (under DDP in
    `no_sync()` but for a step's last); a step left unfinished at the end is dropped. `should_stop(steps done)`
    may end the epoch after any step (preemption). The loss is checked every `check_every` steps and at the end
    (`LossCheck`). `step`: the global step at the start (for messages); `total`: micro-batches (progress bar).
    Returns {"train_loss" (mean micro-batch loss), "images", "seconds", "img_per_s", "steps", "stopped"}.
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps} must be at least 1.")
    device = torch.device(device)
    model.train()
    bar = tqdm(batches, total=total, desc=desc or f"epoch {epoch}", disable=not progress, dynamic_ncols=True)
    losses = LossCheck(step, epoch, accum_steps)
    loss_sum, images, n_steps, held_images, stopped, start = 0.0, 0, 0, 0, False, time.perf_counter()
    for i, (x, y) in enumerate(bar):
        last = i % accum_steps == accum_steps - 1
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if i % accum_steps == 0:
            optimizer.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(device, amp_dtype):
                loss = loss_fn(model(x), y)
            scaled = loss / accum_steps if accum_steps > 1 else loss
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        losses.pending.append(loss.detach())
        held_images += x.shape[0]
        if not last:
            continue
        optimizer_step(model, optimizer, scheduler, ema=ema, scaler=scaler, grad_clip=grad_clip)
        n_steps, images, held_images = n_steps + 1, images + held_images, 0
        if n_steps % check_every == 0:
            shown = float(losses.pending[-1])
            loss_sum += losses.check()
            bar.set_postfix(loss=f"{shown:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{images / (time.perf_counter() - start):.0f}", refresh=False)
        if should_stop is not None and should_stop(n_steps):
            stopped = True
            break
    if held_images:  # an unfinished accumulation: dropped, its gradients too
        del losses.pending[len(losses.pending) - (i % accum_steps + 1):]
        optimizer.zero_grad(set_to_none=True)
    loss_sum += losses.check()
    bar.close()
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / max(1, n_steps * accum_steps), "images": images, "seconds": seconds,
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
    """Cross-entropy loss, top-1 and top-5 accuracy (%) of `model` over (x (B, C, H, W), target (B,)) batches, in
    eval mode (restored) -> {"loss", "top1", "top5", "n"}. Counts are summed over ranks when torch.distributed is
    initialised (each rank passes its own shard)."""
    device = torch.device(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count
    with eval_mode(model):
        for x, y in tqdm(batches, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = model(x).float()
            top1, top5 = accuracy_counts(logits, y)
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            sums += torch.stack([loss.double(), top1.double(), top5.double(), sums.new_tensor(len(y))])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "n": int(n)}
