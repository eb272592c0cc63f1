"""Build a `VisionTransformer` from a registry name, a checkpoint file or a state dict.

Checkpoints: this repo's, timm's, and the official releases of DeiT, DeiT III, DINO, DINOv2 (with or without
registers) and torchvision, whose key names are converted as timm's checkpoint filters do. The config is read
from the tensor shapes; only `num_heads` cannot be, and defaults to embed_dim // 64 (the timm / DeiT convention).
This repo's checkpoints give the weights their run reported ("reported_weights": its EMA or the trained model).
Registry names (`python -m models.pretrained --list`) are downloaded once into torch's hub cache
($TORCH_HOME/hub/checkpoints), hash-checked where the file name carries one, and read with weights_only=True.
DINO and DINOv2 have two names each: timm's (the model computes what timm's does) and their project's torch.hub
name (it computes what the project's model does: the position table is resampled by their rule, not timm's).
A file of an architecture the built-in model cannot build (SwiGLU, rotary positions, no class token, a CNN...)
is refused in one sentence that says what it holds.
Other libraries' ViTs get the same interface (models.any_vit), by name or as objects: "timm/<name>[.<tag>]"
(timm + the Hugging Face Hub cache, models.timm_vit), "hf:<repo id>" (transformers, models.hf_vit),
"open_clip:<arch>/<pretrained tag>" (open_clip, models.clip), or a model object of one of the three libraries.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

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
for _s in ("tiny", "small", "base"):  # facebookresearch/deit models.py
    _hash = dict(tiny="a1311bcf", small="cd65a155", base="b5f2ef4d")[_s]
    REGISTRY[f"deit_{_s}_patch16_224"] = Release(f"{_FB}/deit/deit_{_s}_patch16_224-{_hash}.pth", "DeiT",
                                                 _arch(16, *_SIZES[_s], 224, 1000), 224)
for _s in ("small", "base"):  # facebookresearch/deit models_v2.py
    REGISTRY[f"deit3_{_s}_patch16_224"] = Release(f"{_FB}/deit/deit_3_{_s}_224_1k.pth", "DeiT III", _arch(
        16, *_SIZES[_s], 224, 1000, init_values=1e-6, no_embed_class=True), 224)
# DINO and DINOv2 under timm's name (timm's resampling) and under their torch.hub name (their own resampling).
for _s, _p, _file in (("small", 16, "deitsmall16"), ("small", 8, "deitsmall8"), ("base", 16, "vitbase16"),
                      ("base", 8, "vitbase8")):  # facebookresearch/dino hubconf.py
    _dino = Release(f"{_FB}/dino/dino_{_file}_pretrain/dino_{_file}_pretrain.pth", "DINO",
                    _arch(_p, *_SIZES[_s], 224, 0), 224)
    REGISTRY[f"vit_{_s}_patch{_p}_224.dino"] = _dino
    REGISTRY[f"dino_vit{_s[0]}{_p}"] = _dino._replace(arch=dict(_dino.arch, pos_embed_interp="dino"))
for _s in ("small", "base", "large"):  # facebookresearch/dinov2 dinov2/hub/backbones.py + utils.py
    for _reg in (0, 4):
        _hub = f"dinov2_vit{_s[0]}14"
        _opts = dict(init_values=1e-5, reg_tokens=_reg, no_embed_class=True) if _reg else dict(init_values=1e-5)
        _dinov2 = Release(f"{_FB}/dinov2/{_hub}/{_hub}{f'_reg{_reg}' if _reg else ''}_pretrain.pth", "DINOv2",
                          _arch(14, *_SIZES[_s], 518, 0, **_opts), 518)
        REGISTRY[f"vit_{_s}_patch14_{f'reg{_reg}_' if _reg else ''}dinov2"] = _dinov2
        REGISTRY[_hub + ("_reg" if _reg else "")] = _dinov2._replace(arch=dict(_dinov2.arch, pos_embed_interp="dinov2"))
REGISTRY["vit_b_16"] = Release("https://download.pytorch.org/models/vit_b_16-c867db91.pth", "torchvision",
                               _arch(16, 768, 12, 224, 1000), 224)  # torchvision models/vision_transformer.py


def registry_name(name: str) -> str | None:
    """`name` when it is a registry name, else None."""
    return name if name in REGISTRY else None


def resolve(source: str | os.PathLike) -> str | None:
    """The registry name `source` is, or None when it is an existing path (read_checkpoint reads or refuses it) or
    a library name ("timm/...", "hf:...", "open_clip:...": load_library_model reads it).

    Neither: CheckpointError in one sentence, the one every script prints for a bad --model: the right spelling of
    a misspelt library name (`library_name_meant`), "did you mean" for a near-miss registry name (difflib), or that
    the file does not exist."""
    text = os.fspath(source)
    if os.path.isfile(text) or not isinstance(source, str):
        return None
    _check_spelling(text)
    if text in REGISTRY or os.path.isdir(text) or is_library_name(text):
        return text if text in REGISTRY else None
    close = difflib.get_close_matches(text.lower(), list(REGISTRY), n=1, cutoff=0.75)
    if close:
        raise CheckpointError(f"'{text}' is neither a file nor a registry name; did you mean '{close[0]}'? "
                              f"(python -m models.pretrained --list)")
    if os.sep in text or "/" in text or os.path.splitext(text)[1] in (".pth", ".pt", ".bin", ".safetensors"):
        raise CheckpointError(f"checkpoint '{text}' does not exist.")
    raise CheckpointError(f"checkpoint '{text}' does not exist and is not a registry name (python -m "
                          f"models.pretrained --list).")


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


_WRAPPERS = {"module", "_orig_mod", "backbone", "teacher", "student", "model", "model_ema", "ema", "encoder"}


def _backbone(sd: Mapping[str, Tensor]) -> StateDict:
    """The ViT's own keys: a wrapper prefix before patch_embed.* / conv_proj.* is stripped and the keys without it
    dropped (DDP's module., torch.compile's _orig_mod., DINO's backbone., a DINOv2 training dump's teacher.backbone.
    and its heads); the teacher's copy when both the teacher's and the student's are there."""
    prefixes = {k.removesuffix(anchor) for k in sd for anchor in ("patch_embed.proj.weight", "conv_proj.weight")
                if k.endswith(anchor)}
    prefixes = sorted(p for p in prefixes if set(p.split(".")[:-1]) <= _WRAPPERS)
    if not prefixes or "" in prefixes:
        return dict(sd)
    prefix = next((p for p in prefixes if "teacher" in p), prefixes[0])
    return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


def _from_torchvision(sd: Mapping[str, Tensor]) -> StateDict:
    """torchvision `VisionTransformer` keys -> timm keys (in_proj is already q, k, v stacked like timm's qkv)."""
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
    """DeiT III (gamma_1, gamma_2), DINOv2 (mask_token, register_tokens, block chunks) and MAE pre-training
    (decoder_*, mask_token: the encoder is kept) key names -> timm's, as timm's checkpoint filters do. DINOv2 with
    registers becomes no_embed_class: the class token absorbs its position embedding (the registers have none), the
    table keeps the patches only. DINOv2's block_chunks (blocks.<chunk>.<i>.*) are flattened in order."""
    sd = {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in sd.items()
          if k != "mask_token" and not k.startswith("decoder")}
    if {"register_tokens", "cls_token", "pos_embed"} <= sd.keys():
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, 0]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    chunked = {k: re.match(r"blocks\.(\d+)\.(\d+)\.(.+)", k) for k in sd}
    order = {pair: n for n, pair in enumerate(sorted({(int(m[1]), int(m[2])) for m in chunked.values() if m}))}
    return {f"blocks.{order[int(m[1]), int(m[2])]}.{m[3]}" if m else k: v
            for (k, v), m in zip(sd.items(), chunked.values(), strict=True)}


# Files of other architectures, by a key they hold: (key pattern, what the file holds, how to load it).
_OTHER_MODELS = [
    (r"^visual\.", "a CLIP model (image and text towers)", "load it with open_clip"),
    (r"(^|\.)(token_embedding|word_embeddings|wte|embed_tokens|tok_embeddings)\.weight$", "a text model", ""),
    (r"(^|\.)(embeddings\.patch_embeddings|encoder\.layer\.\d+\.attention)\.", "a Hugging Face transformers model",
     "load it with transformers"),
    (r"^(layers\.\d+\.blocks|features\.\d+)\.\d+\.attn\.", "a Swin Transformer", "load it with timm (swin_*)"),
    (r"(conv_dw|dwconv)\.weight$|^features\.\d+\.\d+\.block\.", "a ConvNeXt", "load it with timm (convnext_*)"),
    (r"^layer[1-4]\.\d+\.conv\d\.weight$", "a ResNet", "load it with timm or torchvision (resnet*)")]
# ViT parts the built-in model does not have: (key pattern, what it is, timm's models with it; "": none).
_VIT_PARTS = [
    (r"\.mlp\.(w12|w1|w2|w3)\.", "a SwiGLU MLP (DINOv2 ViT-g, DINOv3)", "vit_giant_patch14_dinov2, vit_*_dinov3"),
    (r"\.mlp\.fc1_[gx]\.", "a SwiGLU MLP (timm's SwiGLU, EVA-02)", "eva02_*"),
    (r"(^|\.)(rope\w*|freqs\w*|periods)(\.|$)", "rotary position embedding", "vit_*_dinov3, eva02_*"),
    (r"^storage_tokens$", "storage tokens (DINOv3's registers)", "vit_*_dinov3"),
    (r"\.attn\.[qk]_norm\.", "q/k normalisation", "qk_norm=True"),
    (r"\.attn\.([qv]_bias$|[qkv]_proj\.)", "separate q / k / v projections or biases", "beit_*, eva02_*"),
    (r"relative_position", "relative position bias (BEiT)", "beit_*"),
    (r"^attn_pool\.", "an attention-pool head (SigLIP)", "vit_*_siglip_*"),
    (r"^(dist_token$|head_dist\.)", "a distillation token (distilled DeiT)", "deit_*_distilled_patch16_224"),
    (r"^blocks_token_only\.", "class-attention blocks (CaiT)", "cait_*"),
    (r"^fc_norm\.", "a norm after average pooling (fc_norm)", "global_pool='avg'"),
    (r"^norm_pre\.", "a norm before the blocks (CLIP)", "vit_*_clip_*"),
    (r"^heads\.pre_logits\.", "a pre-logits layer (torchvision's representation_size)", ""),
    (r"^patch_embed\.backbone\.", "a convolutional stem (a hybrid ViT)", "vit_*_r50_*, vit_*_resnet*"),
    (r"\.attn\.(gating_param|pos_proj\.)", "gated positional self-attention (ConViT)", "convit_*"),
    (r"^blocks\.\d+\.(attns|ffns)\.", "parallel attention / MLP branches", "vit_*_18x2_224")]


def _names(keys: Iterable[str], n: int = 4) -> str:
    """A few keys, layer numbers as N, each once: "blocks.N.mlp.w12.weight, norm.weight"."""
    return ", ".join(list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".N", k) for k in keys))[:n])


# Architectures whose state dict has the keys and shapes of one the built-in model builds, but which compute
# something else through what they do not save: name pattern -> why.
_UNSAVED_PARTS = [
    (r"_rope", "its rotary position embedding (RoPE-ViT, Heo et al. 2024) is rebuilt by timm and never saved, so "
               "its weights have exactly the keys and shapes of DeiT III (vit_*_rope_ape_*) and would load as DeiT "
               "III without the rotary positions")]


def saved_arch(obj: Mapping[str, Any], path: str | os.PathLike | None = None) -> str | None:
    """The architecture name a checkpoint states, if any: the "arch" of timm's train.py checkpoints, else
    "architecture" in the config.json beside the file or in the folder (timm's Hugging Face Hub layout,
    timm.models.save_for_hf)."""
    if isinstance(obj.get("arch"), str):
        return obj["arch"]
    if path is None or not os.path.exists(path):
        return None
    config = os.path.join(path if os.path.isdir(path) else os.path.dirname(os.fspath(path)), "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            arch = json.load(f).get("architecture")
    except (OSError, ValueError, AttributeError):
        return None
    return arch if isinstance(arch, str) else None


def refuse_unsupported(sd: Mapping[str, Tensor], arch: str | None = None) -> None:
    """CheckpointError naming what a timm-keyed state dict holds, by the keys found, when the built-in
    VisionTransformer cannot build it (another architecture, or a ViT with parts it lacks); else nothing.
    arch: the architecture the checkpoint states (`saved_arch`), refused when its name says it needs parts its
    weights do not hold (timm's vit_*_rope_*: rotary positions)."""
    for pattern, why in _UNSAVED_PARTS:
        if arch and re.search(pattern, arch):
            raise CheckpointError(f"the checkpoint is timm's {arch}: {why}; load it with timm "
                                  f"(load_pretrained('timm/{arch}'), or the timm model object).")
    keys = list(sd)
    for pattern, what, advice in _OTHER_MODELS:
        if found := [k for k in keys if re.search(pattern, k)]:
            raise CheckpointError(f"the checkpoint holds {what} (keys such as {_names(found, 2)}), which the "
                                  f"built-in VisionTransformer does not support{'; ' + advice if advice else ''}.")
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"not a ViT checkpoint: it has no patch_embed.proj.weight; its keys are such as "
                              f"{_names(keys)}.")
    parts = [(f"{what} ({_names(found, 1)})", timm) for pattern, what, timm in _VIT_PARTS
             if (found := [k for k in keys if re.search(pattern, k)])]
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.dim() == fc2.dim() == 2 and fc1.shape[0] == 2 * fc2.shape[1]:
        parts.append(("a gated MLP packed in mlp.fc1 (twice the width mlp.fc2 takes: SwiGLU)",
                      "vit_giant_patch14_dinov2"))
    if "pos_embed" not in sd:
        parts.append(("no position table (no pos_embed: rotary positions, as DINOv3)", "vit_*_dinov3"))
    if "cls_token" not in sd:
        parts.append(("no class token (no cls_token: average or attention pooling)", "class_token=False"))
    if "blocks.0.attn.qkv.weight" in sd and "blocks.0.attn.qkv.bias" not in sd:
        parts.append(("no qkv bias (attn.qkv.weight without attn.qkv.bias)", "qkv_bias=False"))
    if parts:
        timm = ", ".join(dict.fromkeys(t for _, t in parts if t))
        raise CheckpointError(f"the checkpoint holds a ViT with {'; '.join(p for p, _ in parts)}, which the built-in "
                              f"VisionTransformer does not support{f'; load it with timm ({timm})' if timm else ''}.")


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


def to_timm_state_dict(obj: Mapping[str, Any], prefer_ema: bool | None = None, arch: str | None = None
                       ) -> tuple[StateDict, dict[str, Any] | None]:
    """Any supported checkpoint dict -> (state dict with timm / this repo's keys, saved model config or None).
    Of this repo's checkpoints, the EMA or the trained weights as `weights_choice` decides. A file the built-in
    model cannot build raises CheckpointError saying what it holds (`refuse_unsupported`; arch: the architecture
    the checkpoint states, default its "arch")."""
    config = obj.get("model_config")
    arch = arch or saved_arch(obj)
    if weights_choice(obj, prefer_ema)[0]:
        sd = obj["ema_model"]  # a bare state dict (older checkpoints: AveragedModel's module.* + n_averaged)
        sd = {k.removeprefix("module."): v for k, v in sd.items() if k != "n_averaged"}
        return sd, config
    for key in ("model", "state_dict", "model_state_dict", "teacher", "student", "model_ema"):  # DINO: the teacher
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(f"the checkpoint holds no tensors (keys: {sorted(obj)[:8]}); expected a ViT state dict.")
    sd = _backbone(sd)
    if "class_token" in sd:
        sd = _from_torchvision(sd)
    sd = _from_official(sd)
    if config is None:
        refuse_unsupported(sd, arch)
    return sd, config


def _tensor(sd: Mapping[str, Tensor], key: str, dims: int) -> Tensor:
    """sd[key], a `dims`-dimensional tensor; else CheckpointError naming what is there."""
    if key not in sd:
        parts = key.split(".")  # the keys nearest to the missing one: blocks.0.* for blocks.0.mlp.fc1.weight
        near = next((found for n in range(len(parts) - 1, -1, -1)
                     if (found := [k for k in sd if k.startswith(".".join(parts[:n]))])), [])
        raise CheckpointError(f"the checkpoint has no {key}, which the built-in ViT needs; it has {_names(near)}.")
    if sd[key].dim() != dims:
        raise CheckpointError(f"the checkpoint's {key} has shape {tuple(sd[key].shape)}; a ViT's has {dims} "
                              f"dimensions.")
    return sd[key]


def infer_config(sd: Mapping[str, Tensor], num_heads: int | None = None,
                 no_embed_class: bool | None = None) -> dict[str, Any]:
    """VisionTransformer kwargs from the shapes of a timm-keyed state dict; CheckpointError when a part is missing
    or has the wrong number of dimensions (any dict of tensors gives one or the other). no_embed_class: whether the
    position table skips the class / register tokens; None: inferred (ambiguous only for a table of square length
    without LayerScale or registers, read as 1 + a non-square grid)."""
    embed_dim, num_channels, patch_size, patch_w = _tensor(sd, "patch_embed.proj.weight", 4).shape
    if patch_w != patch_size:
        raise CheckpointError(f"the checkpoint's patches are {patch_size}x{patch_w} pixels; the built-in "
                              f"VisionTransformer has square patches.")
    reg_tokens = _tensor(sd, "reg_token", 3).shape[1] if "reg_token" in sd else 0
    length = _tensor(sd, "pos_embed", 3).shape[1]  # 1 + R + N, or N when the table skips the class / register tokens
    layer_scale = "blocks.0.ls1.gamma" in sd
    # A table of the patches only (DeiT III, DINOv2 with registers): a square length, in a LayerScale or register
    # model (a plain ViT's 1 + N may be square for a non-square grid, e.g. 1 + 6·8).
    if no_embed_class is None:
        no_embed_class = math.isqrt(length) ** 2 == length and (layer_scale or reg_tokens > 0)
    num_patches = length if no_embed_class else length - 1 - reg_tokens
    if num_patches < 1:
        raise CheckpointError(f"the checkpoint's pos_embed has {length} rows, no more than its {1 + reg_tokens} "
                              f"class and register tokens.")
    side = math.isqrt(num_patches)
    options = dict(init_values=1e-5 if layer_scale else None, reg_tokens=reg_tokens,
                   no_embed_class=no_embed_class)
    blocks = {int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError(f"the checkpoint has no transformer blocks (blocks.N.*); its keys are such as "
                              f"{_names(sd)}.")
    return dict(embed_dim=embed_dim, hidden_dim=_tensor(sd, "blocks.0.mlp.fc1.weight", 2).shape[0],
                num_heads=num_heads or max(1, embed_dim // 64), num_layers=1 + max(blocks), patch_size=patch_size,
                num_channels=num_channels, num_patches=num_patches,
                num_classes=_tensor(sd, "head.weight", 2).shape[0] if "head.weight" in sd else 0,
                grid_size=[side, side] if side * side == num_patches else None,
                **{k: v for k, v in options.items() if v not in (None, 0, False)})


LIBRARY_PREFIXES = ("timm/", "hf:", "open_clip:")
SPELLINGS = {"timm/": "timm/<name>[.<tag>], e.g. timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
             "hf:": "hf:<organisation>/<name>, e.g. hf:google/vit-base-patch16-224",
             "open_clip:": "open_clip:<architecture>/<pretrained tag>, e.g. open_clip:ViT-B-16/openai"}
# near-misses of the schemes, lower-cased without "-", "_", " " -> the scheme meant
_SCHEMES = {"timm": "timm/", "hf": "hf:", "huggingface": "hf:", "hfhub": "hf:", "openclip": "open_clip:",
            "clip": "open_clip:"}


def library_name_meant(text: str) -> str | None:
    """The library name a near-miss spelling means, else None: "timm:vit_small_patch16_224" and "TIMM/..." ->
    "timm/vit_small_patch16_224", "openclip:ViT-B-16/openai" -> "open_clip:ViT-B-16/openai", "hf/google/vit-base"
    and "huggingface:google/vit-base" -> "hf:google/vit-base", timm's own "hf-hub:timm/<name>" and
    "hf:timm/<name>" (a timm repository, which transformers cannot build) -> "timm/<name>", a Hub address
    "hf:https://huggingface.co/google/vit-base" -> "hf:google/vit-base", "timm/timm/<name>" -> "timm/<name>"."""
    m = re.fullmatch(r"([A-Za-z][A-Za-z_ -]*?)\s*([:/]+)\s*(.+)", text.strip())
    if m is None:
        return None
    scheme, rest = _SCHEMES.get(re.sub(r"[-_ ]", "", m[1].lower())), m[3]
    if scheme is None:
        return None
    if text.startswith(scheme):  # the scheme spelled right: only the rewrites below
        rest = text.removeprefix(scheme)
    if scheme == "hf:":
        address = re.match(r"(https?://)?(www\.)?(huggingface\.co|hf\.co)/(models/)?", rest)
        rest = rest[address.end():].strip("/") if address else rest
        if rest.startswith("timm/") and rest != "timm/":
            scheme, rest = "timm/", rest.removeprefix("timm/")
    elif scheme == "timm/":
        rest = rest.removeprefix("timm/")  # the Hub repo id pasted after the scheme
    meant = scheme + rest if rest else None
    return meant if meant != text else None


def _check_spelling(text: str) -> None:
    """CheckpointError saying the right spelling when `text` misspells a library name (`library_name_meant`)."""
    meant = library_name_meant(text)
    if meant is not None:
        raise CheckpointError(f"'{text}' is not a model name this repo reads; did you mean '{meant}'?")


def load_library_model(source: str | nn.Module) -> nn.Module:
    """A model of timm, transformers or open_clip with this repo's ViT interface (models.any_vit.ViTAdapter):
    "timm/<name>[.<tag>]" -> models.timm_vit.load_timm, "hf:<repo id>" -> models.hf_vit.load_hf, "open_clip:<arch>/
    <pretrained tag>" -> models.clip.load_open_clip, a model object -> models.any_vit.wrap. The library is imported
    only here (a missing one: one line naming the pip install). A name that misspells the scheme
    (`library_name_meant`) or names nothing after it: CheckpointError saying the right spelling."""
    if isinstance(source, nn.Module):
        from models.any_vit import wrap
        return wrap(source)
    _check_spelling(source)
    scheme = next((p for p in LIBRARY_PREFIXES if source.startswith(p)), None)
    if scheme is None:
        raise CheckpointError(f"'{source}' does not start with one of {', '.join(LIBRARY_PREFIXES)}.")
    body = source.removeprefix(scheme)
    if not body.strip(" /"):
        raise CheckpointError(f"'{source}' names no model; write {SPELLINGS[scheme]}.")
    if scheme == "timm/":
        from models.timm_vit import load_timm
        return load_timm(body)
    if scheme == "hf:":
        from models.hf_vit import load_hf
        return load_hf(body)
    from models.clip import load_open_clip
    return load_open_clip(body)


def is_library_name(source: object) -> bool:
    """Whether `source` names another library's model ("timm/...", "hf:...", "open_clip:...") and is not a path."""
    return isinstance(source, str) and source.startswith(LIBRARY_PREFIXES) and not os.path.exists(source)


def load_pretrained(source: str | os.PathLike | Mapping[str, Any] | nn.Module, *, num_heads: int | None = None,
                    prefer_ema: bool | None = None, **overrides: Any) -> nn.Module:
    """A VisionTransformer with the weights of `source`, loaded strictly; `model.weights_note` says which weights
    those are (e.g. "EMA weights (the run's reported model)", "released weights").
    Another library's model ("timm/<name>[.<tag>]", "hf:<repo id>", "open_clip:<arch>/<tag>", or a model object
    of timm, transformers or open_clip) comes back wrapped with the same interface (`load_library_model`); the
    options below are for this repo's ViT only.

    source: a registry name (e.g. "deit3_small_patch16_224", "dinov2_vits14_reg"; downloaded once), a checkpoint
        path or an already loaded dict. A name is used as given: DINO / DINOv2 under their project's name resample
        the position table by their rule, under timm's name by timm's (`pos_embed_interp`).
    num_heads: for foreign checkpoints (default embed_dim // 64); this repo's checkpoints know theirs.
    prefer_ema: of this repo's checkpoints, None: the weights the run reported (its "reported_weights"; without
        it the trained weights), True / False: the EMA (when present) / the trained weights.
    overrides: other constructor options, e.g. dropout=0.1, drop_path_rate=0.1, grid_size=(12, 20),
        pos_embed_interp="dinov2".
    Raises CheckpointError (one sentence) for a missing file or unknown name ("did you mean"), an unreadable or
    refused file, or weights of an architecture the built-in model cannot build (saying what they are).
    """
    name = resolve(source) if isinstance(source, str | os.PathLike) else None
    if isinstance(source, nn.Module) or is_library_name(source):
        given = {k: v for k, v in dict(num_heads=num_heads, prefer_ema=prefer_ema, **overrides).items()
                 if v is not None}
        if given:
            raise CheckpointError(f"{', '.join(given)} apply to this repo's ViT, not to another library's model "
                                  f"({source if isinstance(source, str) else type(source).__name__}).")
        return load_library_model(source)
    obj = (download(name) if name else read_checkpoint(source)) if isinstance(source, str | os.PathLike) else source
    arch = saved_arch(obj, source if isinstance(source, str | os.PathLike) and not name else None)
    sd, config = to_timm_state_dict(obj, prefer_ema, arch)
    note = weights_choice(obj, prefer_ema)[1]
    if config is None:
        config = infer_config(sd, num_heads, overrides.get("no_embed_class"))
        if name:
            config.update(REGISTRY[name].arch)
        else:  # a file or dict of unknown origin: its shapes cannot say the head count
            note = "the checkpoint's weights"
            if num_heads is None and "num_heads" not in overrides:
                heads = config["num_heads"]
                note += (f"; {heads} attention head{'s' * (heads != 1)} assumed (embed_dim {config['embed_dim']} "
                         f"// 64, the timm / DeiT rule): pass num_heads / --num-heads if it had another count")
        if config["grid_size"] is None and "grid_size" not in overrides:
            rows = sd["pos_embed"].shape[1]
            either = (f" or {rows} patches without a row for the class token (pass no_embed_class=True)"
                      if math.isqrt(rows) ** 2 == rows else "")
            raise CheckpointError(f"the position embedding holds {config['num_patches']} patches, not a square "
                                  f"grid (pass grid_size=(grid_h, grid_w)){either}.")
    try:
        model = VisionTransformer(**{**config, **overrides})
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's config does not build a ViT: {e}") from None
    missing, unexpected = model.state_dict().keys() - sd.keys(), sd.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise CheckpointError("the weights do not fit the built-in ViT of their shapes: " + "; ".join(
            [f"they lack {_names(sorted(missing), 3)}"] * bool(missing)
            + [f"they hold {_names(sorted(unexpected), 3)}, which it does not have"] * bool(unexpected)) + ".")
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
    print(f"{'name':30} {'family':11} {'resampling':10} {'patch':>5} {'px':>4} {'D':>5} {'depth':>5} {'heads':>5} "
          f"{'reg':>3} {'head':>4}  url")
    for name, r in REGISTRY.items():
        a = r.arch
        print(f"{name:30} {r.family:11} {a.get('pos_embed_interp', 'timm'):10} {a['patch_size']:>5} {r.img_size:>4} "
              f"{a['embed_dim']:>5} {a['num_layers']:>5} {a['num_heads']:>5} {a.get('reg_tokens', 0):>3} "
              f"{'yes' if a['num_classes'] else 'no':>4}  {r.url}")
    print("resampling: how the position table is resampled for another input size (timm's rule, or the project's "
          "own for its torch.hub name).")
    print(f"cache: {os.path.join(torch.hub.get_dir(), 'checkpoints')} (TORCH_HOME)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
