"""The learning-rate schedule (linear warm-up, then cosine, per optimizer step) and the time budget that sets how
many epochs a run has (mnist.train --minutes)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr_ratio: float = 0.0, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR schedule: linear warm-up from ~0 to the base LR over `warmup_steps`, then cosine to
    `min_lr_ratio` x base LR at `total_steps` (timm's CosineLRScheduler with t_in_epochs=False). Call
    `scheduler.step()` after every optimizer step.

    The base LR of a group is its "initial_lr" if set (a previous schedule, a loaded optimizer state, or the caller
    changing the base LR on resume), else its "lr", then stored as "initial_lr". `start_step` places the schedule
    after that many optimizer steps, as if a fresh one had been stepped that often. Raises ValueError unless
    0 <= warmup_steps <= total_steps, total_steps > 0 and start_step >= 0."""
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
    """The `warmup_cosine` schedule of `scheduler`'s optimizer with a new length, at the step `scheduler` has
    reached (the optimizer's learning rates are set for it)."""
    return warmup_cosine(scheduler.optimizer, total_steps, warmup_steps, min_lr_ratio, start_step=scheduler.last_epoch)


def epochs_within(budget_s: float, elapsed_s: float, epoch_s: float, final_s: float, done: int = 1,
                  cap: int | None = None, margin: float = 0.1) -> int:
    """How many epochs in all (>= done, <= cap) end a run within `budget_s` seconds, when `done` epochs took
    `elapsed_s` since the start, each further one takes `epoch_s` seconds (its evaluation and checkpoint included)
    and the end adds `final_s` (e.g. the final evaluation). `margin` of the budget is kept free for epochs that
    run slower than measured."""
    left = budget_s * (1 - margin) - elapsed_s - final_s
    fit = done + int(left // max(epoch_s, 1e-9))
    return max(done, fit if cap is None else min(cap, fit))


def early_epochs(epoch_s: float, now: float, budget_s: float, final_s: float, done: int, cap: int | None = None,
                 decide_after: int = 4) -> int | None:
    """Before `budget_epochs` can decide (fewer than `decide_after` epochs done): the epoch count of a budget too
    short to wait for it, or None when it is long enough.

    epoch_s: the last epoch's time (seconds; a further one is taken to last as long); now: seconds since the start;
    final_s: what the end adds. When fewer than decide_after + 1 epochs end within 90 % of `budget_s`
    (`epochs_within`), the count is set now: what fits, never fewer than one more epoch, at most `cap`."""
    fit = epochs_within(budget_s, now, epoch_s, final_s, done)
    if fit > decide_after:
        return None
    fit = max(done + 1, fit)
    return fit if cap is None else max(done + 1, min(cap, fit))


def budget_epochs(wall_s: list[float], now: float, epochs: int, budget_s: float, final_s: float,
                  cap: int | None = None, decide_after: int = 4, band: tuple[float, float] = (0.8, 0.95)) -> int:
    """The epoch count of a run on a time budget, re-planned after every epoch from the `decide_after`-th on.

    wall_s: when each epoch done ended (seconds since the start; at least `decide_after` of them); now: seconds
    since the start; epochs: the count planned so far; final_s: what the end adds. Each further epoch is taken to
    last the mean of the last three. At the `decide_after`-th epoch, and whenever the plan would end outside `band`
    (fractions of `budget_s`: faster or slower epochs than planned for), the count becomes what ends within 90 %
    of the budget (`epochs_within`), at most `cap`; else it stays `epochs`. Never fewer than one more epoch."""
    done = len(wall_s)
    if done < max(decide_after, 4):
        raise ValueError(f"the budget needs {max(decide_after, 4)} finished epochs, not {done}.")
    period = (wall_s[-1] - wall_s[-4]) / 3
    end = now + (epochs - done) * period + final_s
    if done > decide_after and band[0] * budget_s <= end <= band[1] * budget_s:
        return epochs
    return max(done + 1, epochs_within(budget_s, now, period, final_s, done, cap))
