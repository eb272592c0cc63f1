"""utils.training's time budget: the epoch count that fits, and the schedule stretched to it."""

from __future__ import annotations

import pytest
import torch

from utils import training


def test_epochs_within_budget():
    # 600 s budget, 10 % kept free: 540 s; 60 s gone, 10 s for the end: 470 s left = 23 more epochs of 20 s
    assert training.epochs_within(600, 60, 20, 10, 100) == 24
    assert training.epochs_within(600, 60, 20, 10, 100, done=2) == 25
    assert training.epochs_within(600, 60, 20, 10, 100, margin=0.2) == 21
    assert training.epochs_within(600, 60, 20, 10, 12) == 12  # never more than asked for
    assert training.epochs_within(600, 700, 20, 10, 100, done=2) == 2  # over budget already: the epochs that ran


@pytest.mark.parametrize("done", [3, 10, 17])
def test_stretched_schedule_equals_one_built_at_that_length(done):
    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)

    short = training.warmup_cosine(optimizer(), 100, 20, 0.01)
    for _ in range(done):  # steps still in the warm-up, which does not depend on the length
        short.optimizer.step()
        short.step()
    stretched = training.stretch_schedule(short, 300, 20, 0.01)
    straight = training.warmup_cosine(optimizer(), 300, 20, 0.01)
    for _ in range(done):
        straight.optimizer.step()
        straight.step()
    for _ in range(150):
        assert stretched.get_last_lr() == pytest.approx(straight.get_last_lr(), rel=1e-12)
        assert stretched.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
        for s in (stretched, straight):
            s.optimizer.step()
            s.step()
