"""Build a `VisionTransformer` from a registry name, a checkpoint file or a state dict.

Checkpoints: this repo's, timm's, and the official releases of DeiT, DeiT III, DINO, DINOv2 (with or without
registers) and torchvision, whose key names are converted as timm's checkpoint filters do. The config is read
from the tensor shapes; only `num_heads` cannot be, and defaults to embed_dim // 64 (the timm / DeiT convention).
This repo's checkpoints give the weights their run reported ("reported_weights": its EMA or the trained model).
Registry names (`python -m models.pretrained --list`) are downloaded once into torch's hub cache
($TORCH_HOME/hub/checkpoints), hash-checked where the file name carries one, and read with weights_only=True.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from models.vit import VisionTransformer
from utils.checkpoint import SAFE_GLOBALS, CheckpointError, checkpoint_dict, read_checkpoint

StateDict = dict[str, Tensor]


class Release(NamedTuple):
    """An official release: where its project publishes it and the VisionTransformer kwargs it needs."""
    url: str
    family: str
    arch: dict[str, Any]
    img_size: int  # the resolution it was trained at (its position-embedding grid x patch size)


def _arch(patch: int, dim: int, depth: int, img: int, classes: int, **options: Any) -> dict[str, Any]:
    grid = img // patch
    return dict(embed_dim=dim, hidden_dim=4 * dim, num_heads=dim // 64, num_layers=depth, patch_size=patch,
                num_channels=3, num_patches=grid * grid, num_classes=classes, grid_size=[grid, grid], **options)


_FB = "https://dl.fbaipublicfiles.com"
_SIZES = dict(tiny=(192, 12), small=(384, 12), base=(768, 12), large=(1024, 24))
REGISTRY: dict[str, Release] = {}
ALIASES: dict[str, str] = {}  # the names the projects' own torch.hub entries use
for _s in ("tiny", "small", "base"):  # facebookresearch/deit models.py
    _hash = dict(tiny="a1311bcf", small="cd65a155", base="b5f2ef4d")[_s]
    REGISTRY[f"deit_{_s}_patch16_224"] = Release(f"{_FB}/deit/deit_{_s}_patch16_224-{_hash}.pth", "DeiT",
                                                 _arch(16, *_SIZES[_s], 224, 1000), 224)
for _s in ("small", "base"):  # facebookresearch/deit models_v2.py
    REGISTRY[f"deit3_{_s}_patch16_224"] = Release(f"{_FB}/deit/deit_3_{_s}_224_1k.pth", "DeiT III", _arch(
        16, *_SIZES[_s], 224, 1000, init_values=1e-6, no_embed_class=True), 224)
for _s, _p, _file in (("small", 16, "deitsmall16"), ("small", 8, "deitsmall8"), ("base", 16, "vitbase16"),
                      ("base", 8, "vitbase8")):  # facebookresearch/dino hubconf.py
    REGISTRY[f"vit_{_s}_patch{_p}_224.dino"] = Release(f"{_FB}/dino/dino_{_file}_pretrain/dino_{_file}_pretrain.pth",
                                                       "DINO", _arch(_p, *_SIZES[_s], 224, 0), 224)
    ALIASES[f"dino_vit{_s[0]}{_p}"] = f"vit_{_s}_patch{_p}_224.dino"
for _s in ("small", "base", "large"):  # facebookresearch/dinov2 dinov2/hub/backbones.py + utils.py
    for _reg in (0, 4):
        _hub = f"dinov2_vit{_s[0]}14"
        _name = f"vit_{_s}_patch14_{f'reg{_reg}_' if _reg else ''}dinov2"
        _opts = dict(init_values=1e-5, reg_tokens=_reg, no_embed_class=True) if _reg else dict(init_values=1e-5)
        REGISTRY[_name] = Release(f"{_FB}/dinov2/{_hub}/{_hub}{f'_reg{_reg}' if _reg else ''}_pretrain.pth",
                                  "DINOv2", _arch(14, *_SIZES[_s], 518, 0, **_opts), 518)
        ALIASES[_hub + ("_reg" if _reg else "")] = _name
REGISTRY["vit_b_16"] = Release("https://download.pytorch.org/models/vit_b_16-c867db91.pth", "torchvision",
                               _arch(16, 768, 12, 224, 1000), 224)  # torchvision models/vision_transformer.py


def registry_name(name: str) -> str | None:
    """The registry's name for `name` (a registry name or an alias), or None."""
    return name if name in REGISTRY else ALIASES.get(name)


def cache_path(name: str) -> str:
    """Where torch's hub cache keeps the file of a registry name: $TORCH_HOME/hub/checkpoints/<file name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", REGISTRY[name].url.rsplit("/", 1)[-1])


def download(name: str, progress: bool = True) -> dict[str, Any]:
    """The checkpoint dict of a registry name: read from torch's cache, downloaded into it the first time.

    A file name with a hash (name-<hex>.pth) is checked against it; a mismatching download is refused, not kept.
    """
    url, path = REGISTRY[name].url, cache_path(name)
    cached = os.path.isfile(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.hub.load_state_dict_from_url(
                url, model_dir=os.path.dirname(path), map_location="cpu", progress=progress,
                check_hash=re.search(r"-[0-9a-f]{6,}\.", url.rsplit("/", 1)[-1]) is not None, weights_only=True)
    except Exception as e:  # URLError / HTTPError / timeout, the hash check's RuntimeError, an unpickling error
        reason = " ".join(str(getattr(e, "reason", e)).split())[:200]
        if cached:
            raise CheckpointError(f"'{path}' (the cached {name}) is not a readable checkpoint ({reason}); delete it "
                                  f"to download it again from {url}.") from None
        raise CheckpointError(f"could not download {name} from {url} ({reason}); download it by hand and put "
                              f"it at {path}.") from None
    return checkpoint_dict(obj, path)


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


def _from_official(sd: Mapping[str, Tensor]) -> StateDict:
    """DeiT III (gamma_1, gamma_2) and DINOv2 (mask_token, register_tokens) key names -> timm's, as timm's
    checkpoint_filter_fn and _convert_dinov2 do. DINOv2 with registers becomes no_embed_class: the class token
    absorbs its position embedding (the registers have none), the table keeps the patches only."""
    sd = {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in sd.items() if k != "mask_token"}
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, 0]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    return sd


def weights_choice(obj: Mapping[str, Any], prefer_ema: bool | None = None) -> tuple[bool, str]:
    """(whether to load the EMA weights, a note saying which weights those are) for a checkpoint dict.

    This repo's checkpoints (with model_config) say in "reported_weights" ("ema" or "model") which weights the run
    reported as its result: the EMA (ema_model) is used only when that is "ema", so an EMA that has barely moved is
    never taken by accident; checkpoints without the key (older runs) give the trained weights. `prefer_ema`
    True / False overrides that. Other checkpoints give their released weights."""
    if obj.get("model_config") is None:
        return False, "released weights"
    reported, has_ema = obj.get("reported_weights"), isinstance(obj.get("ema_model"), Mapping)
    if reported not in (None, "ema", "model"):
        raise CheckpointError(f"the checkpoint's reported_weights {reported!r} is neither 'ema' nor 'model'.")
    if reported == "ema" and not has_ema:
        raise CheckpointError("the checkpoint reports its EMA weights (reported_weights 'ema') but holds no "
                              "ema_model.")
    if not has_ema:
        return False, "trained weights"
    why = {"ema": "the run reported the EMA", "model": "the run reported the model",
           None: "the checkpoint does not say which weights the run reported"}[reported]
    use_ema = reported == "ema" if prefer_ema is None else prefer_ema
    if use_ema and reported == "ema":
        return True, "EMA weights (the run's reported model)"
    if not use_ema and reported != "ema":
        return False, f"trained weights (not the EMA: {why})"
    return use_ema, f"{'EMA' if use_ema else 'trained'} weights (prefer_ema={use_ema}; {why})"


def to_timm_state_dict(obj: Mapping[str, Any], prefer_ema: bool | None = None
                       ) -> tuple[StateDict, dict[str, Any] | None]:
    """Any supported checkpoint dict -> (state dict with timm / this repo's keys, saved model config or None).
    Of this repo's checkpoints, the EMA or the trained weights as `weights_choice` decides."""
    config = obj.get("model_config")
    if weights_choice(obj, prefer_ema)[0]:
        sd = obj["ema_model"]  # a bare state dict (older checkpoints: AveragedModel's module.* + n_averaged)
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
    sd = _from_official(sd)
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
    reg_tokens = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    length = sd["pos_embed"].shape[1]  # 1 + R + N, or N when the table skips the class / register tokens
    layer_scale = "blocks.0.ls1.gamma" in sd
    # A table of the patches only (DeiT III, DINOv2 with registers): a square length, in a LayerScale or register
    # model (a plain ViT's 1 + N may be square for a non-square grid, e.g. 1 + 6·8).
    no_embed_class = math.isqrt(length) ** 2 == length and (layer_scale or reg_tokens > 0)
    num_patches = length if no_embed_class else length - 1 - reg_tokens
    side = math.isqrt(num_patches)
    options = dict(init_values=1e-5 if layer_scale else None, reg_tokens=reg_tokens,
                   no_embed_class=no_embed_class)
    num_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return dict(embed_dim=embed_dim, hidden_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
                num_heads=num_heads or max(1, embed_dim // 64), num_layers=num_layers, patch_size=patch_size,
                num_channels=num_channels, num_patches=num_patches,
                num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                grid_size=[side, side] if side * side == num_patches else None,
                **{k: v for k, v in options.items() if v not in (None, 0, False)})


def load_pretrained(source: str | os.PathLike | Mapping[str, Any], *, num_heads: int | None = None,
                    prefer_ema: bool | None = None, **overrides: Any) -> VisionTransformer:
    """A VisionTransformer with the weights of `source`, loaded strictly; `model.weights_note` says which weights
    those are (e.g. "EMA weights (the run's reported model)", "released weights").

    source: a registry name or alias (e.g. "deit3_small_patch16_224", "dinov2_vits14_reg"; downloaded once),
        a checkpoint path or an already loaded dict.
    num_heads: for foreign checkpoints (default embed_dim // 64); this repo's checkpoints know theirs.
    prefer_ema: of this repo's checkpoints, None: the weights the run reported (its "reported_weights"; without
        it the trained weights), True / False: the EMA (when present) / the trained weights.
    overrides: other constructor options, e.g. dropout=0.1, drop_path_rate=0.1, grid_size=(12, 20).
    """
    name = registry_name(source) if isinstance(source, str) and not os.path.isfile(source) else None
    obj = (download(name) if name else read_checkpoint(source)) if isinstance(source, str | os.PathLike) else source
    sd, config = to_timm_state_dict(obj, prefer_ema)
    note = weights_choice(obj, prefer_ema)[1]
    if config is None:
        config = infer_config(sd, num_heads)
        if name:
            config.update(REGISTRY[name].arch)
        if config["grid_size"] is None and "grid_size" not in overrides:
            raise CheckpointError(f"the position embedding holds {config['num_patches']} patches, not a square "
                                  f"grid; pass grid_size=(grid_h, grid_w).")
    model = VisionTransformer(**{**config, **overrides})
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit the inferred ViT config {config}: "
                              f"{str(e).splitlines()[1].strip()[:300]}") from None
    model.weights_note = note
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.pretrained", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the registry of official releases")
    args = parser.parse_args(argv)
    if not args.list:
        parser.print_help()
        return 0
    aliases = {v: k for k, v in ALIASES.items()}
    print(f"{'name':32} {'alias':18} {'family':11} {'patch':>5} {'px':>4} {'D':>5} {'depth':>5} {'heads':>5} "
          f"{'reg':>3} {'head':>4}  url")
    for name, r in REGISTRY.items():
        a = r.arch
        print(f"{name:32} {aliases.get(name, ''):18} {r.family:11} {a['patch_size']:>5} {r.img_size:>4} "
              f"{a['embed_dim']:>5} {a['num_layers']:>5} {a['num_heads']:>5} {a.get('reg_tokens', 0):>3} "
              f"{'yes' if a['num_classes'] else 'no':>4}  {r.url}")
    print(f"cache: {os.path.join(torch.hub.get_dir(), 'checkpoints')} (TORCH_HOME)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
