"""Explanation methods for ViT classifiers behind one signature, for benchmarks that compare them (bench.explain_eval).

    from attention.attribution import METHODS, explain_map
    heat = explain_map("CP-LRP", model, x, target)       # x: (B, C, H, W), target: (B,) long -> (B, grid_h, grid_w)

Every method is a `Method`: (model, x (B, C, H, W), target (B,) long) -> float maps (B, grid_h, grid_w) on
model.patch_grid(H, W), for any model `models.pretrained.load_pretrained` gives (this repo's VisionTransformer and
the timm / transformers / open_clip adapters, with registers or a pool query in place of a class token). Each runs
batched (one forward, at most one backward, LeGrad one backward per layer), in eval mode (restored), leaves the
parameters' .grad alone, and works inside torch.no_grad() / torch.inference_mode(). The class-specific methods raise
ValueError for a model without a head or a target out of range.

METHODS, in order (paper; rule):
    "attention rollout"     Abnar & Zuidema 2020; utils.img2attn.attention_rollout (mean over heads, no discard).
    "last-layer attention"  the class token's (or pool query's) row of the last layer, mean over heads
                            (utils.img2attn.cls_attention).
    "gradient rollout"      Chefer, Gur & Wolf, ICCV 2021 ("Generic Attention-model Explainability"),
                            utils.img2attn.gradient_rollout.
    "attention x gradient"  the same paper's per-layer term Ā = E_h[(∇A ⊙ A)⁺] for the last layer alone (no product
                            over layers): mean over heads of relu(A ⊙ ∂y_t/∂A), class-token row, A the last softmax.
    "LeGrad"                Bousselham et al. 2024, attention.legrad.legrad (normalize=False: the summed relevance).
    "CP-LRP"                Ali et al., ICML 2022 ("XAI for Transformers: Better Explanations through Conservative
                            Propagation"): gradient × input where the attention probabilities and LayerNorm's 1/std are
                            constants in the backward pass (the AH- and LN-rules) and GELU passes gelu(x)/x (LRP's
                            identity rule), as lxt's cp_LRP; taken at the tokens that enter the first block, summed
                            over the embedding channels; the patch tokens' sums are the map (ConservativeMode).
    "random"                uniform random in [0, 1), from a torch.Generator seeded once (random_map(seed)): the same
                            maps for the same sequence of calls.
    "centre"                a fixed Gaussian centred on the patch grid, sigma = CENTRE_SIGMA × the grid's side (per
                            axis, in patches): a centre-bias baseline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from attention.legrad import legrad
from utils.ema import eval_mode
from utils.img2attn import (
    _autograd_on,
    _relevance,
    attention_rollout,
    cls_attention,
    gradient_rollout,
    per_image_targets,
    prefix_count,
)

Method = Callable[[nn.Module, Tensor, Tensor], Tensor]
CENTRE_SIGMA = 0.25  # the centre baseline's standard deviation, as a fraction of the grid's height / width


def _targets(model: nn.Module, x: Tensor, target: int | Tensor | None) -> Tensor:
    """target (int or (B,)) -> (B,) long, checked against model.config["num_classes"]; ValueError naming the bad
    value, or the missing head."""
    classes = getattr(model, "config", {}).get("num_classes")
    if classes == 0:
        raise ValueError("this method explains a class: the model has no head (num_classes=0); add one, e.g. "
                         "prompts with models.clip.with_prompts.")
    if target is None:
        raise ValueError("target=None: this method explains a class; pass one class per image, e.g. "
                         "model(x).argmax(-1).")
    t = per_image_targets(target, len(x), x.device)
    if t.shape != (len(x),) or bool((t < 0).any()) or (classes is not None and bool((t >= classes).any())):
        raise ValueError(f"target {target!r} must be one class in [0, {classes}) or one per image ({len(x)}).")
    return t


def rollout_map(model: nn.Module, x: Tensor, target: Tensor | None = None) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of x (B, C, H, W) -> (B, grid_h, grid_w); target unused."""
    with eval_mode(model), torch.no_grad():
        _, attn = model(x, return_attn=True)
    return attention_rollout(attn, grid=model.patch_grid(*x.shape[-2:]))


def last_layer_attention(model: nn.Module, x: Tensor, target: Tensor | None = None) -> Tensor:
    """The last layer's class-token (or pool-query) row, mean over heads -> (B, grid_h, grid_w); target unused."""
    with eval_mode(model), torch.no_grad():
        _, attn = model(x, return_attn="cls")
    return cls_attention(attn, grid=model.patch_grid(*x.shape[-2:]))


def gradient_rollout_map(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Chefer et al. 2021b gradient rollout for `target` -> (B, grid_h, grid_w) (utils.img2attn.gradient_rollout)."""
    return gradient_rollout(model, x, _targets(model, x, target))


def attention_x_gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Last layer's mean over heads of relu(A ⊙ ∂y_t/∂A), row of the class token (pool query) over the patches
    -> (B, grid_h, grid_w): Chefer et al. 2021b's per-layer term for the last layer alone. One backward."""
    with eval_mode(model), _autograd_on():
        t = _targets(model, x, target)
        logits, attn = model(x.clone().requires_grad_(), return_attn=True)
        grad = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), attn[-1])[0]
    grid = model.patch_grid(*x.shape[-2:])
    return _relevance(attn[-1:], [grad], getattr(model, "num_prefix_tokens", None), grid)


def legrad_map(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """LeGrad (Bousselham et al. 2024) for `target`, unscaled -> (B, grid_h, grid_w) (attention.legrad.legrad)."""
    return legrad(model, x, _targets(model, x, target), normalize=False)


class ConservativeMode(TorchFunctionMode):
    """While active, every value of the forward stays the same, but its backward is CP-LRP's (Ali et al. 2022, as
    lxt's `cp_LRP` patch map for torchvision's ViT): the attention probabilities (every torch.softmax, F.softmax,
    Tensor.softmax) are constants (AH-rule), so is LayerNorm's 1/sqrt(var + eps) (LN-rule: F.layer_norm is
    differentiated as (x - mean) / std.detach() · weight + bias; F.normalize, the cosine of a zero-shot head, likewise
    as x / ||x||.detach()), and F.gelu passes the gradient gelu(x) / x (LRP's identity rule for an element-wise
    activation). Fused attention (F.scaled_dot_product_attention, F.multi_head_attention_forward, whose softmax is
    out of reach) runs on a detached query and key, as lxt does: the same constant probabilities. Activations not
    written as F.gelu (open_clip's QuickGELU, SwiGLU) keep their plain gradient."""

    SOFTMAX = {torch.softmax, F.softmax, Tensor.softmax}
    FUSED_ATTENTION = {F.scaled_dot_product_attention, F.multi_head_attention_forward}
    LAYER_NORM = {F.layer_norm, torch.layer_norm}
    GELU = {F.gelu}
    NORMALIZE = {F.normalize}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FUSED_ATTENTION:  # query, key: the first two arguments of both
            args = tuple(a.detach() if i < 2 else a for i, a in enumerate(args))
            kwargs = {k: v.detach() if k in ("query", "key") else v for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        if func in self.SOFTMAX:
            return out.detach()
        if func in self.LAYER_NORM:
            return _with_gradient_of(out, _layer_norm_detached(*args, **kwargs))
        if func in self.NORMALIZE:
            return _with_gradient_of(out, _normalize_detached(*args, **kwargs))
        if func in self.GELU:
            x = args[0] if args else kwargs["input"]
            ratio = torch.where(x == 0, 0.5, out / torch.where(x == 0, 1.0, x))  # gelu(x) / x; its limit at 0
            return _with_gradient_of(out, x * ratio.detach())
        return out


def _with_gradient_of(value: Tensor, surrogate: Tensor) -> Tensor:
    """`value` exactly in the forward, the gradient of `surrogate` (equal to it up to rounding) in the backward."""
    return value.detach() + (surrogate - surrogate.detach())


def _layer_norm_detached(x: Tensor, normalized_shape: list[int] | tuple[int, ...], weight: Tensor | None = None,
                         bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """F.layer_norm with the scale 1/sqrt(var + eps) detached (Ali et al. 2022's LN-rule)."""
    dims = tuple(range(-len(normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    y = centred / (centred.pow(2).mean(dims, keepdim=True) + eps).sqrt().detach()
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


def _normalize_detached(x: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: None = None) -> Tensor:
    """F.normalize with the norm detached (the LN-rule for L2 normalisation)."""
    return x / x.norm(p, dim, keepdim=True).clamp_min(eps).detach()


def token_relevance(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """CP-LRP relevance of every token that enters the first block -> (B, T): gradient × input (summed over the
    D channels) of the target logits, backpropagated by CP-LRP's rules (ConservativeMode). Conservation: for a
    model without biases whose activations are all F.gelu, the T values sum to each image's target logit (the
    modified backward is that of a function linear in the tokens; tests/test_attribution.py)."""
    kept: list[Tensor] = []

    def keep(module: nn.Module, args: tuple) -> None:
        kept.append(args[0])

    hook = model.blocks[0].register_forward_pre_hook(keep)
    try:
        with eval_mode(model), _autograd_on(), ConservativeMode():
            t = _targets(model, x, target)
            logits, _ = model(x.clone().requires_grad_(), return_attn=True)  # the explicit softmax path
    finally:
        hook.remove()
    with _autograd_on():
        grad = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), kept[0])[0]
    return (grad * kept[0]).sum(-1).detach()


def cp_lrp(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """CP-LRP (Ali et al. 2022) map of `target` -> (B, grid_h, grid_w): token_relevance of the patch tokens (the
    last grid_h·grid_w tokens entering the first block; class / register tokens left out). One backward."""
    grid = model.patch_grid(*x.shape[-2:])
    rel = token_relevance(model, x, target)
    return rel[:, prefix_count(rel.shape[1], grid):].reshape(len(x), *grid)


def random_map(seed: int = 0) -> Method:
    """A Method giving uniform random maps in [0, 1) on the patch grid, from its own torch.Generator seeded with
    `seed`: a new random_map(seed) repeats the same maps in the same order of calls."""
    generator = torch.Generator().manual_seed(seed)

    def random(model: nn.Module, x: Tensor, target: Tensor | None = None) -> Tensor:
        grid = model.patch_grid(*x.shape[-2:])
        return torch.rand(len(x), *grid, generator=generator).to(x.device)

    return random


def centre_map(model: nn.Module, x: Tensor, target: Tensor | None = None) -> Tensor:
    """A Gaussian centred on the patch grid, exp(-(di² / 2sh² + dj² / 2sw²)) with sh, sw = CENTRE_SIGMA × grid
    height, width (in patches), di, dj the distances to the grid's centre -> (B, grid_h, grid_w), max 1 (odd
    sides) at the centre, symmetric under flips; target unused."""
    gh, gw = model.patch_grid(*x.shape[-2:])
    i = torch.arange(gh, dtype=torch.float32) - (gh - 1) / 2
    j = torch.arange(gw, dtype=torch.float32) - (gw - 1) / 2
    g = torch.exp(-(i[:, None] / (CENTRE_SIGMA * gh)) ** 2 / 2 - (j[None] / (CENTRE_SIGMA * gw)) ** 2 / 2)
    return g.expand(len(x), gh, gw).to(x.device)


METHODS: dict[str, Method] = {
    "attention rollout": rollout_map,
    "last-layer attention": last_layer_attention,
    "gradient rollout": gradient_rollout_map,
    "attention x gradient": attention_x_gradient,
    "LeGrad": legrad_map,
    "CP-LRP": cp_lrp,
    "random": random_map(0),
    "centre": centre_map,
}


def explain_map(method: str, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """METHODS[method](model, x, target): x (B, C, H, W), target (B,) long -> float (B, grid_h, grid_w).
    ValueError naming the known methods for an unknown name."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; pick one of: {', '.join(METHODS)}.")
    return METHODS[method](model, x, target).float()

