"""Build a `VisionTransformer` from a checkpoint: this repo's, timm / DeiT, DINO or torchvision's.

The config is read from the tensor shapes; only `num_heads` cannot be, and defaults to embed_dim // 64
(the timm / DeiT convention: ViT-Ti 3, ViT-S 6, ViT-B 12 heads).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from models.vit import VisionTransformer

StateDict = dict[str, Tensor]


class CheckpointError(ValueError):
    """A file or dict that is not a usable ViT checkpoint; the message says why in one sentence."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(path, weights_only=True) with one clear error for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist.")
    try:  # DINO's full checkpoints pickle their argparse.Namespace: harmless, so allow it.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # the unpickler raises anything on garbage: KeyError, EOFError, RuntimeError...
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint: it is truncated or another kind "
                              f"of file.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dict of tensors.")
    return obj


def _strip(sd: Mapping[str, Tensor], prefix: str) -> StateDict:
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def _from_torchvision(sd: Mapping[str, Tensor]) -> StateDict:
    """torchvision `VisionTransformer` keys -> timm keys (in_proj is already q, k, v stacked like timm's qkv)."""
    if any(k.startswith("heads.pre_logits") for k in sd):
        raise CheckpointError("torchvision ViT with a pre-logits layer (representation_size) is not supported.")
    rules = [(r"^class_token$", "cls_token"), (r"^conv_proj\.", "patch_embed.proj."),
             (r"^encoder\.pos_embedding$", "pos_embed"), (r"^encoder\.ln\.", "norm."), (r"^heads\.head\.", "head."),
             (r"^encoder\.layers\.encoder_layer_(\d+)\.", r"blocks.\1."), (r"\.ln_(\d)\.", r".norm\1."),
             (r"\.self_attention\.in_proj_(weight|bias)$", r".attn.qkv.\1"),
             (r"\.self_attention\.out_proj\.", ".attn.proj."),
             (r"\.mlp\.(0|linear_1)\.", ".mlp.fc1."), (r"\.mlp\.(3|linear_2)\.", ".mlp.fc2.")]
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def to_timm_state_dict(obj: Mapping[str, Any], prefer_ema: bool = True) -> tuple[StateDict, dict[str, Any] | None]:
    """Any supported checkpoint dict -> (state dict with timm / this repo's keys, saved model config or None)."""
    config = obj.get("model_config")
    if config is not None and prefer_ema and isinstance(obj.get("ema_model"), Mapping):
        sd = obj["ema_model"]  # torch.optim.swa_utils.AveragedModel state: module.* + n_averaged
        sd = {k: v for k, v in _strip(sd, "module.").items() if k != "n_averaged"}
        return sd, config
    for key in ("model", "state_dict", "teacher", "student", "model_ema"):  # DINO: the teacher is the released one
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(f"the checkpoint holds no tensors (keys: {sorted(obj)[:8]}); expected a ViT state dict.")
    for prefix in ("module.", "_orig_mod.", "backbone."):  # DDP, torch.compile, DINO (drops its projection head)
        if any(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    if "class_token" in sd:
        sd = _from_torchvision(sd)
    if "dist_token" in sd:
        raise CheckpointError("distilled DeiT checkpoints (dist_token, head_dist) are not supported; "
                              "use the non-distilled DeiT weights.")
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"not a ViT checkpoint: no cls_token / patch_embed.proj.weight among keys such as "
                              f"{sorted(sd)[:5]}.")
    return sd, config


def infer_config(sd: Mapping[str, Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """VisionTransformer kwargs from the shapes of a timm-keyed state dict."""
    embed_dim, num_channels, patch_size, _ = sd["patch_embed.proj.weight"].shape
    num_patches = sd["pos_embed"].shape[1] - 1
    side = math.isqrt(num_patches)
    num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return dict(embed_dim=embed_dim, hidden_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
                num_heads=num_heads or max(1, embed_dim // 64), num_layers=num_layers, patch_size=patch_size,
                num_channels=num_channels, num_patches=num_patches,
                num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                grid_size=[side, side] if side * side == num_patches else None)


def load_pretrained(source: str | os.PathLike | Mapping[str, Any], *, num_heads: int | None = None,
                    prefer_ema: bool = True, **overrides: Any) -> VisionTransformer:
    """A VisionTransformer with the weights of `source` (a path or an already loaded dict), loaded strictly.

    num_heads: for foreign checkpoints (default embed_dim // 64); this repo's checkpoints know theirs.
    prefer_ema: use the EMA weights of this repo's checkpoints when present.
    overrides: other constructor options, e.g. dropout=0.1, drop_path_rate=0.1, grid_size=(12, 20).
    """
    obj = read_checkpoint(source) if isinstance(source, str | os.PathLike) else source
    sd, config = to_timm_state_dict(obj, prefer_ema)
    if config is None:
        config = infer_config(sd, num_heads)
        if config["grid_size"] is None and "grid_size" not in overrides:
            raise CheckpointError(f"the position embedding holds {config['num_patches']} patches, not a square "
                                  f"grid; pass grid_size=(grid_h, grid_w).")
    model = VisionTransformer(**{**config, **overrides})
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit the inferred ViT config {config}: "
                              f"{str(e).splitlines()[1].strip()[:300]}") from None
    return model
