"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne 2024, "LeGrad: An Explainability Method for Vision
Transformers via Feature Formation Sensitivity", arXiv 2404.03214): where a ViT looks for a class or a text prompt,
from the gradient of every layer's own read-out with respect to that layer's attention.

The rule, as the authors' code computes it for open_clip's ViTs (github.com/WalBouss/LeGrad, legrad/wrapper.py
`LeWrapper.compute_legrad_clip`, legrad-torch 1.1):
  for every layer l >= start_layer (the package's default is layer_index=-2, the last two layers; the paper
  aggregates over all layers, our default start_layer=0):
    s_l  = the target's logit read from layer l's output tokens z_l as if they were the last layer's
           (`model.layer_logits(z_l)`; for open_clip: ln_post(mean of all tokens of z_l) @ proj, then the
           zero-shot head; for models.vit.VisionTransformer: head(norm(z_l)) of the class token);
    G_l  = ReLU(∂s_l / ∂A_l), A_l (B, heads, T, T) the layer's softmax attention (the gradient itself, not
           gradient ⊙ attention as in Chefer et al.);
    E_l  = G_l averaged over heads and over all T query rows -> (B, T), its patch columns -> (B, N);
  E = Σ_l E_l, min-max scaled to [0, 1] per image (the authors scale after upsampling to pixels; here on the
  patch grid, as every map of utils.img2attn; `normalize=False` gives E itself).
The authors' SigLIP variant (gradients w.r.t. the attention-pool's own attention re-applied to every layer,
minus an "empty prompt" map) is not reproduced: on models without a class token this rule runs on the blocks'
attention, whose pool-query pseudo row (models.any_vit) carries no gradient.

Checked against legrad-torch 1.1 on a random-weight open_clip CLIP (tests/test_legrad.py) and against a loop
written from the rule above.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from utils.ema import eval_mode
from utils.img2attn import _autograd_on, _block_outputs, grid_shape, per_image_targets


def layer_reader(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The read-out of a layer's output tokens (B, T, D) -> logits (B, K): `model.layer_logits` where the model has
    one (the adapters of models.clip), else head(norm(tokens)) for a model with a final `norm` and `forward_head`
    (models.vit.VisionTransformer). ValueError naming what is missing otherwise."""
    read = getattr(model, "layer_logits", None)
    if read is not None:
        return read
    norm, head = getattr(model, "norm", None), getattr(model, "forward_head", None)
    if isinstance(norm, nn.Module) and head is not None:
        return lambda tokens: head(norm(tokens))
    raise ValueError(f"LeGrad needs {type(model).__name__}.layer_logits(tokens), the logits read from one layer's "
                     f"output tokens (or a final `norm` and `forward_head`).")


def legrad(model: nn.Module, x: Tensor, target: int | Tensor | None = None, start_layer: int = 0,
           normalize: bool = True) -> Tensor:
    """LeGrad map of x (B, C, H, W) for `target` (class / prompt index per image, int or (B,); default the
    predicted one) -> (B, grid_h, grid_w) on model.patch_grid(H, W), in [0, 1] per image when normalize.

    The rule and its source: the module docstring. Works on models.vit.VisionTransformer and on any adapter of
    models.any_vit with `layer_logits` (models.clip's). One forward, one backward per layer used (each layer has its
    own read-out); eval mode (restored); parameters' .grad untouched; also inside torch.no_grad().
    Raises ValueError for a model without a head, a start_layer out of range or a bad target."""
    if getattr(model, "config", {}).get("num_classes", 1) == 0:
        raise ValueError("LeGrad explains a class or a prompt: the model has no head (an image tower: add prompts "
                         "with models.clip.with_prompts).")
    read = layer_reader(model)
    with eval_mode(model), _block_outputs(model, detach=False) as outs, _autograd_on():
        tokens, attn = model.forward_features(x.clone().requires_grad_(), return_attn=True)
        layers = min(len(attn), len(outs))  # a pool-query model's extra last "layer" has no block of its own
        if not 0 <= start_layer < layers:
            raise ValueError(f"start_layer={start_layer} must be in [0, {layers - 1}] for {layers} layers.")
        logits = model.forward_head(tokens)
        t = logits.argmax(-1) if target is None else per_image_targets(target, len(x), x.device)
        if t.shape != (len(x),) or not bool(((t >= 0) & (t < logits.shape[-1])).all()):
            raise ValueError(f"target {target!r} must be one index in [0, {logits.shape[-1] - 1}] or one per "
                             f"image ({len(x)}).")
        relevance = 0
        for layer in range(start_layer, layers):
            score = read(outs[layer]).gather(1, t[:, None]).sum()
            grad = torch.autograd.grad(score, attn[layer], retain_graph=layer < layers - 1)[0]
            relevance = relevance + grad.clamp(min=0).mean(dim=(1, 2))  # heads, queries -> (B, T)
    prefix = getattr(model, "num_prefix_tokens", 1)
    grid = model.patch_grid(*x.shape[-2:])
    scores = relevance[:, prefix:].detach()
    heat = scores.reshape(len(x), *grid_shape(scores.shape[1], grid))
    if not normalize:
        return heat
    lo, hi = heat.amin((1, 2), keepdim=True), heat.amax((1, 2), keepdim=True)
    return (heat - lo) / (hi - lo).clamp(min=1e-12)
