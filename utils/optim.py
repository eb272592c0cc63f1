"""The train scripts' optimizers: AdamW, and Muon on the transformer blocks' matrices with AdamW on the rest.

    param_groups    -- weight decay on matrices only (none on biases, norms, position embedding, class token)
    adamw           -- torch's AdamW over those groups, with the fused kernel on CUDA and CPU
    Muon            -- torch.optim.Muon at AdamW's lr and weight decay, Newton-Schulz in the precision asked for
    MuonAdamW       -- a Muon and an AdamW stepped as one optimizer (schedulers, GradScaler, checkpoints)
    make_optimizer  -- one of OPTIMIZERS by name
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from utils.ema import unwrap

OPTIMIZERS = ("adamw", "muon")
FUSED_DEVICES = ("cuda", "cpu")  # fused AdamW (MPS has one too: not tested here, so left out)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices only, none on biases, norms, position embedding, class token."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, lr: float, weight_decay: float, device: torch.device | str,
          skip: Iterable[Tensor] = (), **kwargs: Any) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)` without the parameters in `skip`; fused (one kernel a step)
    on FUSED_DEVICES. `kwargs`: AdamW's other arguments (betas, eps)."""
    skipped = {id(p) for p in skip}
    groups = [g | {"params": [p for p in g["params"] if id(p) not in skipped]}
              for g in param_groups(model, weight_decay)]
    fused = torch.device(device).type in FUSED_DEVICES
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None, **kwargs)


class Muon(torch.optim.Muon):
    """torch.optim.Muon (Nesterov momentum, the update orthogonalised by a quintic Newton-Schulz iteration, decoupled
    weight decay) with two choices fixed:
    - the update is scaled to AdamW's RMS (Moonshot's `match_rms_adamw`: lr x 0.2 sqrt(max(rows, cols))), so Muon
      takes the lr and weight decay tuned for AdamW;
    - the Newton-Schulz iteration runs in `ns_dtype` (torch's always runs it in bfloat16, which a CPU without native
      bf16 emulates, slowly).
    Matrices of one shape are orthogonalised together (batched matmuls); the momentum and weight decay use foreach
    ops. With ns_dtype=torch.bfloat16 the steps equal torch's bit for bit; the state dict is torch's.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, weight_decay: float,
                 ns_dtype: torch.dtype = torch.float32, **kwargs: Any):
        super().__init__(params, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw", **kwargs)
        self.ns_dtype = ns_dtype

    def orthogonalize(self, updates: Tensor, group: dict[str, Any]) -> Tensor:
        """updates: (n, rows, cols) -> about U V^T of each one's SVD (singular values in ~[0.7, 1.2]), in `ns_dtype`."""
        a, b, c = group["ns_coefficients"]
        x = updates.to(self.ns_dtype)
        tall = x.size(-2) > x.size(-1)
        x = x.mT if tall else x  # (small, large): the Gram matrix x x^T is the small one
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=group["eps"])  # spectral norm <= 1
        for _ in range(group["ns_steps"]):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.mT if tall else x

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad)) for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            by_shape: dict[torch.Size, list[int]] = {}
            for i, p in enumerate(params):  # one batched iteration per shape: qkv of every block at once, ...
                by_shape.setdefault(p.shape, []).append(i)
            for shape, index in by_shape.items():
                ortho = self.orthogonalize(torch.stack([updates[i] for i in index]), group)
                for i, o in zip(index, ortho, strict=True):
                    params[i].add_(o, alpha=-group["lr"] * (0.2 * math.sqrt(max(shape))))
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """`muon` and `adamw` stepped as one optimizer. `param_groups` are theirs (Muon's first), the same dicts, so an
    LR scheduler or GradScaler acting on this one acts on both; `state_dict()` is {"muon": ..., "adamw": ...}."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        super().__init__([p for opt in (muon, adamw) for g in opt.param_groups for p in g["params"]], {})
        self.muon, self.adamw = muon, adamw
        self.param_groups = muon.param_groups + adamw.param_groups

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self.muon.step(closure)  # the closure, if any, runs once
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("the optimizer state is not a Muon + AdamW one (was the run trained with --optimizer "
                             "adamw?).")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups  # loading made new group dicts


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, device: torch.device | str, *,
                   betas: tuple[float, float] = (0.9, 0.999), amp_dtype: torch.dtype | None = None,
                   ) -> torch.optim.Optimizer:
    """"adamw": `adamw` on every parameter. "muon": `Muon` (momentum 0.95; Newton-Schulz in bf16 when the run's
    `amp_dtype` is bf16, i.e. native, else in fp32) on the 2-D weights of the transformer blocks (qkv, proj, fc1, fc2:
    the hidden layers, which Muon is for) and AdamW on the rest (patch embedding, head, biases, norms, position
    embedding, class token), both at `lr` and `weight_decay`."""
    if name == "adamw":
        return adamw(model, lr, weight_decay, device, betas=betas)
    if name != "muon":
        raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}.")
    hidden = [p for n, p in unwrap(model).named_parameters()
              if p.requires_grad and p.ndim == 2 and n.startswith("blocks.")]
    ns_dtype = torch.bfloat16 if amp_dtype == torch.bfloat16 else torch.float32
    return MuonAdamW(Muon(hidden, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype),
                     adamw(model, lr, weight_decay, device, skip=hidden, betas=betas))
