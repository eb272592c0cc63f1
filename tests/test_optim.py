"""utils/optim.py: our Muon against torch's, Muon + AdamW as one optimizer, and which parameters each one gets."""

from __future__ import annotations

import io

import pytest
import torch

from models.vit import VisionTransformer
from utils import optim, schedule

SHAPES = [(48, 16), (16, 48), (16, 16), (48, 16)]  # tall, wide, square, and two of a shape (batched together)


def matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]


def run_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(embed_dim=16, hidden_dim=32, num_heads=2, num_layers=2, patch_size=7, num_channels=1,
                             num_patches=16, num_classes=10, dropout=0.0)


def test_muon_in_bf16_equals_torchs_bit_for_bit():
    ours, theirs = matrices(), matrices()
    run_steps(optim.Muon(ours, lr=3e-3, weight_decay=0.05, ns_dtype=torch.bfloat16), ours, 4)
    run_steps(torch.optim.Muon(theirs, lr=3e-3, weight_decay=0.05, adjust_lr_fn="match_rms_adamw"), theirs, 4)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_muon_in_fp32_orthogonalizes_and_stays_near_torchs():
    opt = optim.Muon(matrices(), lr=3e-3, weight_decay=0.05)
    for shape in SHAPES:  # singular values 0.1 to 1 (5 iterations lift only those above ~1 % of the largest)
        u, _, vt = torch.linalg.svd(torch.randn(shape), full_matrices=False)
        spread = u @ torch.diag(torch.logspace(-1, 0, min(shape))) @ vt
        update = opt.orthogonalize(spread[None], opt.param_groups[0])[0]
        assert update.dtype == torch.float32 and update.shape == shape
        singular = torch.linalg.svdvals(update)  # the quintic's band, not exactly 1: about [0.7, 1.2]
        assert singular.min() > 0.6 and singular.max() < 1.25, singular
    ours, theirs = matrices(), matrices()
    run_steps(optim.Muon(ours, lr=3e-3, weight_decay=0.05), ours, 4)
    run_steps(torch.optim.Muon(theirs, lr=3e-3, weight_decay=0.05, adjust_lr_fn="match_rms_adamw"), theirs, 4)
    for a, b, start in zip(ours, theirs, matrices(), strict=True):
        moved = (b - start).abs().max()
        assert (a - b).abs().max() < 0.05 * moved  # bf16 vs fp32 rounding of the same step, not another step


def test_make_optimizer_splits_the_parameters():
    model = tiny_vit()
    opt = optim.make_optimizer("muon", model, 1e-3, 0.05, "cpu")
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i].split(".", 2)[-1] for i in muon) == sorted(
        ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"] * 2)
    assert not muon & adamw and muon | adamw == set(names)
    assert {names[id(p)] for p in opt.adamw.param_groups[0]["params"]} == {"patch_embed.proj.weight", "head.weight"}
    assert opt.adamw.defaults["fused"] and all(g["weight_decay"] == 0.05 for g in opt.muon.param_groups)
    assert opt.muon.ns_dtype == torch.float32
    assert optim.make_optimizer("muon", model, 1e-3, 0.05, "cpu", amp_dtype=torch.bfloat16).muon.ns_dtype == \
        torch.bfloat16
    assert isinstance(optim.make_optimizer("adamw", model, 1e-3, 0.05, "cpu"), torch.optim.AdamW)
    with pytest.raises(ValueError, match="'sgd' is not one of adamw, muon"):
        optim.make_optimizer("sgd", model, 1e-3, 0.05, "cpu")


def test_muon_adamw_schedule_reaches_both_and_resume_is_exact():
    def build():
        model = tiny_vit()
        opt = optim.make_optimizer("muon", model, 1e-2, 0.05, "cpu")
        return model, opt, schedule.warmup_cosine(opt, 8, 2)

    def train(model, opt, scheduler, steps):
        for _ in range(steps):
            g = torch.Generator().manual_seed(scheduler.last_epoch)  # the batch of this step, however it resumed
            x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            scheduler.step()

    straight = build()
    train(*straight, 6)
    first = build()
    train(*first, 3)
    lrs = [g["lr"] for o in (first[1].muon, first[1].adamw) for g in o.param_groups]
    assert len(set(lrs)) == 1 and 0 < lrs[0] < 1e-2  # one schedule for every group of both
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "sched": first[2].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = build()
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])  # new group dicts inside: the schedule must still reach them
    resumed[2].load_state_dict(saved["sched"])
    train(*resumed, 3)
    for name, tensor in straight[0].state_dict().items():
        assert torch.equal(tensor, resumed[0].state_dict()[name]), name
    with pytest.raises(ValueError, match="not a Muon"):
        resumed[1].load_state_dict(torch.optim.AdamW(tiny_vit().parameters()).state_dict())
