"""utils.training: the time budget and the schedule stretched to it, the schedule positioned at a step, gradient
accumulation and stopping after a step, the EMA on the device (by hand, with warm-up, across a resume)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from models.vit import VisionTransformer
from utils import checkpoint, optim, schedule, training
from utils.ema import ModelEma, unwrap

EXACT = dict(atol=1e-6, rtol=0)


def test_epochs_within_budget():
    # 600 s budget, 10 % kept free: 540 s; 60 s gone, 10 s for the end: 470 s left = 23 more epochs of 20 s
    assert schedule.epochs_within(600, 60, 20, 10, cap=100) == 24
    assert schedule.epochs_within(600, 60, 20, 10, cap=100, done=2) == 25
    assert schedule.epochs_within(600, 60, 20, 10, cap=100, margin=0.2) == 21
    assert schedule.epochs_within(600, 60, 20, 10, cap=12) == 12  # never more than asked for
    assert schedule.epochs_within(600, 700, 20, 10, cap=100, done=2) == 2  # over budget already: the epochs that ran


@pytest.mark.parametrize("done", [3, 10, 17])
def test_stretched_schedule_equals_one_built_at_that_length(done):
    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)

    short = schedule.warmup_cosine(optimizer(), 100, 20, 0.01)
    for _ in range(done):  # steps still in the warm-up, which does not depend on the length
        short.optimizer.step()
        short.step()
    stretched = schedule.stretch_schedule(short, 300, 20, 0.01)
    straight = schedule.warmup_cosine(optimizer(), 300, 20, 0.01)
    for _ in range(done):
        straight.optimizer.step()
        straight.step()
    for _ in range(150):
        assert stretched.get_last_lr() == pytest.approx(straight.get_last_lr(), rel=1e-12)
        assert stretched.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
        for s in (stretched, straight):
            s.optimizer.step()
            s.step()


@pytest.mark.parametrize("start", [0, 1, 7, 20, 55, 100, 130])
def test_schedule_started_at_a_step_equals_one_stepped_there(start):
    def optimizer():
        groups = [{"params": [nn.Parameter(torch.zeros(2))]}, {"params": [nn.Parameter(torch.zeros(2))], "lr": 5e-4}]
        return torch.optim.AdamW(groups, lr=1e-3)

    stepped = schedule.warmup_cosine(optimizer(), 100, 20, 0.05)
    for _ in range(start):
        stepped.optimizer.step()
        stepped.step()
    placed = schedule.warmup_cosine(optimizer(), 100, 20, 0.05, start_step=start)
    for _ in range(30):
        assert [g["lr"] for g in placed.optimizer.param_groups] == [g["lr"] for g in stepped.optimizer.param_groups]
        assert placed.get_last_lr() == stepped.get_last_lr() and placed.last_epoch == stepped.last_epoch
        for s in (placed, stepped):
            s.optimizer.step()
            s.step()
    resumed = optimizer()  # a loaded optimizer state keeps the base LR in "initial_lr", its "lr" is the scheduled one
    resumed.load_state_dict(stepped.optimizer.state_dict())
    again = schedule.warmup_cosine(resumed, 100, 20, 0.05, start_step=stepped.last_epoch)
    assert again.get_last_lr() == stepped.get_last_lr()
    with pytest.raises(ValueError, match="start_step=-1 must be"):
        schedule.warmup_cosine(optimizer(), 100, 20, start_step=-1)


# ------------------------------------------------------------------------------------------ gradient accumulation
def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(32, 64, 2, 2, 4, 3, 16, 5)  # 16x16 images, dropout 0


def run(model: nn.Module, batches: list, accum: int = 1, ema_decay: float = 0.9, **kw) -> tuple[dict, dict]:
    """train_one_epoch with AdamW + warmup_cosine + clipping + EMA -> (result, {name: tensor} of model and EMA).

    AdamW's eps is 1e-5, not 1e-8: its first step moves a weight by ~lr g / (|g| + eps), so with eps 1e-8 a gradient
    that cancels to ~1e-9 turns the 1e-9 rounding difference of two summation orders into an O(lr) difference."""
    optimizer = torch.optim.AdamW(optim.param_groups(model, 0.05), lr=1e-3, eps=1e-5)
    scheduler = schedule.warmup_cosine(optimizer, 10, 2)
    ema = ModelEma(model, ema_decay, warmup=True)
    out = training.train_one_epoch(model, batches, optimizer, scheduler, nn.functional.cross_entropy, device="cpu",
                                   epoch=0, ema=ema, grad_clip=1.0, accum_steps=accum, progress=False, **kw)
    return out, {**dict(model.named_parameters()), **{f"ema.{k}": v for k, v in ema.module.state_dict().items()}}


def test_accumulated_micro_batches_equal_one_big_batch():
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    big, big_weights = run(tiny_vit(), [(x[:8], y[:8]), (x[8:], y[8:])])
    extra = [(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,)))] * 3  # an unfinished 3rd step: dropped
    micro, micro_weights = run(tiny_vit(), [(x[i:i + 2], y[i:i + 2]) for i in range(0, 16, 2)] + extra, accum=4)
    assert big["steps"] == micro["steps"] == 2 and big["images"] == micro["images"] == 16
    assert not big["stopped"] and not micro["stopped"]
    assert micro["train_loss"] == pytest.approx(big["train_loss"], rel=1e-6)
    for name, value in big_weights.items():
        torch.testing.assert_close(micro_weights[name], value, **EXACT, msg=name)
    assert not torch.equal(big_weights["head.weight"], tiny_vit().head.weight)  # it trained


def test_no_sync_for_all_but_the_last_micro_batch():
    class Wrapped(nn.Linear):  # stands in for DDP: counts the micro-batches run without the gradient all-reduce
        unsynced = 0

        @contextlib.contextmanager
        def no_sync(self):
            Wrapped.unsynced += 1
            yield

    model = Wrapped(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(2, 4), torch.randint(0, 3, (2,)))] * 6
    out = training.train_one_epoch(model, batches, optimizer, None, nn.functional.cross_entropy, device="cpu",
                                   epoch=0, accum_steps=3, progress=False)
    assert out["steps"] == 2 and Wrapped.unsynced == 4


def test_should_stop_ends_the_epoch_after_the_asked_step():
    asked = []
    batches = [(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,)))] * 12
    out, _ = run(tiny_vit(), batches, accum=2, should_stop=lambda n: asked.append(n) or n == 3)
    assert asked == [1, 2, 3] and out["steps"] == 3 and out["stopped"] and out["images"] == 12
    with pytest.raises(ValueError, match="accum_steps=0 must be at least 1"):
        run(tiny_vit(), batches, accum=0)


# ---------------------------------------------------------------------------------------------------------- the EMA
@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_the_average_by_hand(warmup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))  # float buffers and an integer one
    ema = ModelEma(model, 0.8, warmup=warmup)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 4))  # moves the running statistics and num_batches_tracked
        d = min(0.8, 1 - (1 + step) ** -0.75) if warmup else 0.8
        assert ema.decay_at(step) == pytest.approx(d)
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
        ema.update_parameters(model)
        assert ema.updates == step + 1
        for k, v in ema.module.state_dict().items():
            torch.testing.assert_close(v, expected[k], msg=k)
    assert ema.module.state_dict()["1.num_batches_tracked"] == 5
    assert unwrap(ema) is ema.module
    fresh = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    fresh.load_state_dict(ema.module.state_dict())  # a plain model of the class
    with pytest.raises(ValueError, match="EMA decay 1.0 must be in"):
        ModelEma(model, 1.0)


DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_ema_stays_on_the_model_device(device):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).to(device)
    ema = ModelEma(model, 0.99, warmup=True)
    sync = torch.cuda.set_sync_debug_mode if device == "cuda" else lambda mode: None
    sync("error")  # CUDA: any host<->device sync in an update raises
    try:
        for _ in range(3):
            ema.update_parameters(model)
    finally:
        sync("default")
    assert ema.updates == 3
    assert all(t.device.type == device for t in ema.module.state_dict().values())


def test_ema_resumes_exactly(tmp_path):
    torch.manual_seed(2)
    epochs = [[(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))) for _ in range(3)] for _ in range(2)]

    def build():
        model = tiny_vit()
        optimizer = torch.optim.AdamW(optim.param_groups(model, 0.05), lr=1e-3)
        return model, optimizer, schedule.warmup_cosine(optimizer, 6, 2), ModelEma(model, 0.9, warmup=True)

    def epoch(parts, e):
        model, optimizer, scheduler, ema = parts
        training.train_one_epoch(model, epochs[e], optimizer, scheduler, nn.functional.cross_entropy, device="cpu",
                                 epoch=e, ema=ema, progress=False)

    straight = build()
    epoch(straight, 0)
    epoch(straight, 1)
    first = build()
    epoch(first, 0)
    state = checkpoint.checkpoint_state(*first[:3], epoch=1, metrics=[], train_config={}, ema=first[3])
    assert state["ema_updates"] == 3 and isinstance(state["ema_updates"], int)
    checkpoint.save_checkpoint(state, tmp_path / "c.pth")
    resumed = build()
    ckpt = checkpoint.read_checkpoint(tmp_path / "c.pth")
    assert checkpoint.restore_checkpoint(ckpt, *resumed[:3], ema=resumed[3])[0] == 1
    assert resumed[3].updates == 3
    epoch(resumed, 1)
    for a, b in ((straight[0], resumed[0]), (straight[3].module, resumed[3].module)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    old = {k: v for k, v in ckpt.items() if k != "ema_updates"} | {"ema_n_averaged": 7}  # before ModelEma
    ema = ModelEma(tiny_vit(), 0.9)
    checkpoint.restore_checkpoint(old, tiny_vit(), ema=ema)
    assert ema.updates == 7
    switched_on = ModelEma(tiny_vit(), 0.9)  # EMA switched on at resume: it starts from the weights
    checkpoint.restore_checkpoint({k: v for k, v in ckpt.items() if not k.startswith("ema_")}, tiny_vit(),
                                ema=switched_on)
    assert switched_on.updates == 0 and torch.equal(switched_on.module.head.weight, ckpt["model"]["head.weight"])


def test_budget_epochs_decides_after_epoch_4_and_replans_both_ways():
    walls = [20.0, 30.0, 40.0, 50.0]  # 10 s an epoch after the first
    assert schedule.budget_epochs(walls, 51, 64, 600, 10) == 4 + (540 - 51 - 10) // 10  # 10 % kept free
    assert schedule.budget_epochs(walls, 51, 30, 600, 10, cap=30) == 30  # never more than asked for
    on_track = walls + [60.0 + 10 * i for i in range(16)]  # 20 done at 210 s: 31 more end at 530 s
    assert schedule.budget_epochs(on_track, 211, 51, 600, 10) == 51
    slower = walls + [63.0 + 13 * i for i in range(16)]  # 13 s now: 31 more would end at 670 s
    assert schedule.budget_epochs(slower, 259, 51, 600, 10) == 20 + (540 - 259 - 10) // 13
    assert schedule.budget_epochs(slower, 700, 51, 600, 10) == 21  # past the budget: one more, the scored last
    faster = walls + [58.0 + 8 * i for i in range(16)]  # 8 s now: 31 more would end at 438 s, before 80 %
    assert schedule.budget_epochs(faster, 179, 51, 600, 10) == 20 + (540 - 179 - 10) // 8
    assert schedule.budget_epochs(faster, 179, 51, 600, 10, cap=55) == 55  # --epochs given: at most that


def test_early_epochs_decides_only_a_budget_too_short_to_wait():
    # 60 s budget, 54 s usable; 3 s for the end
    assert schedule.early_epochs(5, 20, 60, 3, done=1) is None  # 31 s left: 6 more epochs of 5 s, 7 > 4
    assert schedule.early_epochs(10, 30, 60, 3, done=1) == 3  # 21 s left: 2 more of 10 s
    assert schedule.early_epochs(10, 30, 60, 3, done=1, cap=2) == 2  # --epochs given: at most that
    assert schedule.early_epochs(15, 50, 60, 3, done=1) == 2  # not even one more fits: still one more
    assert schedule.early_epochs(1, 2, 60, 3, done=3, decide_after=4) is None  # plenty: budget_epochs decides
    assert schedule.early_epochs(10, 44, 60, 3, done=3, cap=100) == 4  # 7 s left: one more, the fourth
