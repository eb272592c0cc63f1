"""Hugging Face `transformers` ViTs behind the interface of `models.vit.VisionTransformer` (see models.any_vit).

    model = load_hf("facebook/dinov2-with-registers-small")   # or wrap_hf(a transformers model in memory)
    logits, attn = model(x, return_attn=True)    # attn: one (B, heads, T, T) per layer, in the autograd graph

Supported (transformers 5; the class or any subclass of it):
    ViTModel, ViTForImageClassification                       class token; head: the classifier
    Dinov2Model, Dinov2WithRegistersModel (+ ForImageClassification)  class token (+ registers); head: the
                                                              classifier on [class token, mean of the patches]
    CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel (its vision tower)   class token; no head: the
                                                              features are the image embedding (projected when the
                                                              model has visual_projection)
    SiglipVisionModel, SiglipModel (its vision tower)         no class token: the attention-pool head's query is
                                                              the pseudo token 0 (models.any_vit.with_pool_query)
The wrapper runs the model's own modules (embeddings, encoder layers, final norms, pooling head) in the model's
order. With return_attn the attention modules run transformers' eager attention (config._attn_implementation =
"eager" for that call only), whose softmax is returned and used for the output, so the maps are the attention the
model computed, in the graph; without it the model's own implementation (SDPA by default) runs. Inputs of any size
that is a multiple of the patch size work, square or not: the position table is resampled by the model's own
`interpolate_pos_encoding` (bicubic; DINOv2 with registers antialiased).

SigLIP's maps are built inside the forward, so gradient rollout reaches them: each layer's eager probabilities w
(B, h, N, N) go through models.any_vit.pad_pseudo (the output is computed from the padded matrix's patch block), and
the pool's per-head probabilities through pool_layer / pool_through (the pool's output recomputed from them).

`blocks` are parameter-free views of the encoder layers (the parameters stay registered once, under `model`): a
forward hook on blocks[i] sees the layer's output tokens (B, T', D) (SigLIP: the N patches; the pool-query token is
not in the blocks' output), as utils.img2attn.token_norms reads them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.any_vit import (
    UnsupportedModelError,
    ViTAdapter,
    hub_offline,
    hub_unreachable,
    optional_import,
    pad_pseudo,
    pool_layer,
    pool_through,
)
from utils.checkpoint import CheckpointError

# Top-level classes -> (the attribute holding the vision encoder, one of FAMILIES' classes; the head's attribute or
# None). An encoder class given directly has no head.
OUTER = {
    "ViTForImageClassification": ("vit", "classifier"),
    "Dinov2ForImageClassification": ("dinov2", "classifier"),
    "Dinov2WithRegistersForImageClassification": ("dinov2_with_registers", "classifier"),
    "CLIPModel": ("vision_model", "visual_projection"),
    "CLIPVisionModelWithProjection": ("vision_model", "visual_projection"),
    "SiglipModel": ("vision_model", None),
}
# Encoder classes -> family.
FAMILIES = {"ViTModel": "vit", "Dinov2Model": "dinov2", "Dinov2WithRegistersModel": "dinov2",
            "CLIPVisionModel": "clip", "SiglipVisionModel": "siglip"}
# Refused, with the reason.
REFUSED = {
    "SiglipForImageClassification": "it classifies the mean of the patch tokens (no class token, no attention "
                                    "pool to take the maps from); wrap its .vision_model (a SiglipVisionModel)",
    "Siglip2VisionModel": "SigLIP 2's NaFlex patches need pixel_attention_mask and spatial_shapes, which this "
                          "interface does not carry; use timm's vit_*_siglip2_* models instead",
    "Siglip2Model": "SigLIP 2's NaFlex patches need pixel_attention_mask and spatial_shapes, which this interface "
                    "does not carry; use timm's vit_*_siglip2_* models instead",
}
SUPPORTED = sorted({*OUTER, *FAMILIES})

# transformers' image-processor defaults per family (ViTImageProcessor: IMAGENET_STANDARD, bilinear, resize to the
# size; BitImageProcessor as the DINOv2 checkpoints configure it: IMAGENET_DEFAULT, bicubic, 256 -> 224 crop;
# CLIPImageProcessor: OPENAI_CLIP, bicubic; SiglipImageProcessor: IMAGENET_STANDARD, bicubic, resize).
DEFAULTS = {
    "vit": dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0),
    "dinov2": dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic", crop_pct=0.875),
    "clip": dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                 interpolation="bicubic", crop_pct=1.0),
    "siglip": dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=1.0),
}
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _class_names(obj: object) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def _first(names: list[str], table: Mapping[str, Any]) -> str | None:
    return next((n for n in names if n in table), None)


@dataclass
class _Parts:
    """The pieces of a transformers model the wrapper calls (held outside nn.Module registration, so the wrapper's
    state_dict is the model's, once)."""

    family: str
    encoder: nn.Module  # one of FAMILIES' classes
    head: nn.Module | None  # classifier / visual_projection
    classifier: bool  # the head gives logits (not an embedding for an image-text space)
    layers: nn.ModuleList  # the encoder layers
    attn: list[nn.Module]  # each encoder layer's self-attention module


class _Block(nn.Module):
    """A view of one encoder layer, hidden (B, T', D) -> (B, T', D); the layer's parameters stay registered under the
    wrapped model only."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self._layer = [layer]  # a list: not registered as a submodule

    @property
    def layer(self) -> nn.Module:
        return self._layer[0]

    def forward(self, hidden: Tensor) -> Tensor:
        return self.layer(hidden, None)  # no attention mask: every token sees every token


PSEUDO_ATTENTION = "models.hf_vit.eager_pseudo"  # its name in transformers' AttentionInterface


def eager_pseudo(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 **kwargs: Any) -> tuple[Tensor, Tensor]:
    """transformers' eager attention (the module's own model file's eager_attention_forward) for a model whose
    maps carry the pool-query pseudo token: its probabilities w (B, h, N, N) -> full = pad_pseudo(w)
    (B, h, 1 + N, 1 + N), returned as the weights, and the output full[..., 1:, 1:] @ value (eager's own product,
    the same values), so the maps with the pseudo token are in the graph the output comes from."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    _, w = eager(module, query, key, value, attention_mask, **kwargs)
    full = pad_pseudo(w)
    return torch.matmul(full[..., 1:, 1:], value).transpose(1, 2).contiguous(), full


def _pool_output(mha: nn.MultiheadAttention, tokens: Tensor, p: Tensor) -> Tensor:
    """nn.MultiheadAttention's output (batch_first) for the probabilities p (B, h, L, N) over tokens (B, N, D):
    out_proj of the heads' p @ v, as torch computes it."""
    d = mha.embed_dim
    w_v = mha.in_proj_weight[2 * d:] if mha.in_proj_weight is not None else mha.v_proj_weight
    b_v = mha.in_proj_bias[2 * d:] if mha.in_proj_bias is not None else None
    v = F.linear(tokens, w_v, b_v).unflatten(-1, (mha.num_heads, -1)).transpose(1, 2)  # (B, h, N, d / h)
    return mha.out_proj(torch.matmul(p, v).transpose(1, 2).flatten(2))


def _parts(model: nn.Module) -> _Parts:
    """Find the vision encoder, the head and the attention modules of `model`; ValueError naming the class when it
    is not supported (and why, where known)."""
    names = _class_names(model)
    refused = _first(names, REFUSED)
    if refused:
        raise UnsupportedModelError(f"{type(model).__name__} is not supported: {REFUSED[refused]}.")
    encoder, head, head_attr = model, None, None
    outer = _first(names, OUTER)
    if outer:
        encoder_attr, head_attr = OUTER[outer]
        encoder = getattr(model, encoder_attr)
        head = getattr(model, head_attr) if head_attr else None
    family = FAMILIES.get(_first(_class_names(encoder), FAMILIES) or "")
    if family is None:
        raise UnsupportedModelError(f"{type(model).__name__} is not a supported transformers vision model; supported: "
                         f"{', '.join(SUPPORTED)} (and subclasses).")
    if family == "siglip" and not getattr(encoder, "use_head", False):
        raise UnsupportedModelError(f"{type(model).__name__} has no attention-pool head (vision_use_head=False) and "
                                    f"no class token, so no token whose attention the maps could show.")
    if isinstance(head, nn.Identity):  # a classifier built with num_labels=0
        head = None
    layers = encoder.layers if family == "vit" else encoder.encoder.layer if family == "dinov2" else \
        encoder.encoder.layers
    attn = [layer.attention if family in ("vit", "dinov2") else layer.self_attn for layer in layers]
    return _Parts(family, encoder, head, head is not None and head_attr == "classifier", layers, attn)


def _pair(value: Any) -> tuple[int, int]:
    """An int, (h, w) or {"height", "width"} / {"shortest_edge"} -> (h, w)."""
    if isinstance(value, Mapping):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        side = value.get("shortest_edge") or value.get("longest_edge")
        return int(side), int(side)
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def data_config(family: str, config: Any, processor: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """timm's data-config keys (input_size (C, H, W), mean, std, interpolation, crop_pct) from an image processor's
    settings (preprocessor_config.json's keys: image_mean, image_std, size, crop_size, do_center_crop, resample)
    where given, else transformers' defaults for the family and the model config's image_size."""
    out = dict(DEFAULTS[family], input_size=(config.num_channels, *_pair(config.image_size)))
    if not processor:
        return out
    for key, ours in (("image_mean", "mean"), ("image_std", "std")):
        if processor.get(key) is not None:
            value = processor[key]
            out[ours] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
    if processor.get("resample") in PIL_RESAMPLE:
        out["interpolation"] = PIL_RESAMPLE[processor["resample"]]
    size = processor.get("size")
    crop = processor.get("crop_size") if processor.get("do_center_crop", "crop_size" in processor) else None
    if crop is not None:
        out["input_size"] = (config.num_channels, *_pair(crop))
        if isinstance(size, Mapping) and size.get("shortest_edge"):
            out["crop_pct"] = _pair(crop)[0] / int(size["shortest_edge"])
        elif isinstance(size, int):
            out["crop_pct"] = _pair(crop)[0] / size
        else:
            out["crop_pct"] = 1.0
    elif size is not None:
        out["input_size"], out["crop_pct"] = (config.num_channels, *_pair(size)), 1.0
    return out


class HFViT(ViTAdapter):
    """A transformers vision model (see the module docstring for the classes) as a VisionTransformer.

    Args:
        model: the transformers model; kept as `self.model` (a CLIPModel / SiglipModel keeps its text tower there).
        image_processor: the model's image-processor settings (a dict of preprocessor_config.json, or an image
            processor object) for `data_config`; None: transformers' defaults for the family.
        weights_note: what the weights are, for the scripts' messages.
    Raises ValueError (one sentence) for an unsupported class or non-square patches.
    """

    def __init__(self, model: nn.Module, image_processor: Mapping[str, Any] | Any = None,
                 weights_note: str | None = None):
        super().__init__()
        parts = _parts(model)
        self.model, self._parts = model, parts
        cfg = parts.encoder.config
        patch = _pair(cfg.patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"{type(model).__name__} has non-square patches {patch[0]}x{patch[1]}; only square "
                             f"patches are supported.")
        self.blocks = nn.ModuleList(_Block(layer) for layer in parts.layers)
        self.patch_size = patch[0]
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.pool_query = parts.family == "siglip"  # token 0 is the pool-query pseudo token (models.any_vit)
        self.config = dict(embed_dim=cfg.hidden_size, num_heads=cfg.num_attention_heads,
                           num_layers=len(self.blocks), patch_size=self.patch_size, num_channels=cfg.num_channels,
                           num_classes=parts.head.out_features if parts.classifier else 0,
                           grid_size=[s // self.patch_size for s in _pair(cfg.image_size)],
                           reg_tokens=self.num_prefix_tokens - 1)
        if image_processor is not None and not isinstance(image_processor, Mapping):
            image_processor = image_processor.to_dict()
        self.data_config = data_config(parts.family, cfg, image_processor)
        name = getattr(model.config, "name_or_path", "") or ""
        self.weights_note = weights_note or (f"transformers {type(model).__name__}" + (f" ({name})" if name else ""))
        self.train(model.training)  # the wrapper's mode is the model's

    @property
    def clip_model(self) -> nn.Module | None:
        """The two-tower model (CLIPModel, SiglipModel: `get_text_features`) whose text tower models.clip.with_prompts
        reads, else None. forward_head already gives the image embedding those prompts are compared with."""
        return self.model if hasattr(self.model, "get_text_features") else None

    @property
    def layer_logits(self) -> Callable[[Tensor], Tensor] | None:
        """LeGrad's read-out (attention.legrad) of one block's output tokens (B, T, D) as if it were the last block:
        ViT / DINOv2: the final layernorm, then forward_head; CLIP: visual_projection(post_layernorm(mean of all
        T tokens)), the rule of the authors' code for open_clip's CLIP (models.clip.OpenClipViT.layer_logits);
        None for SigLIP (an attention-pool head: the rule is not defined there, see attention.legrad)."""
        enc, family, head = self._parts.encoder, self._parts.family, self._parts.head
        if family in ("vit", "dinov2"):
            return lambda tokens: self.forward_head(enc.layernorm(tokens))
        if family == "clip":
            return lambda tokens: (head or nn.Identity())(enc.post_layernorm(tokens.mean(1)))
        return None

    def _embed(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> the tokens the first layer reads, (B, T_model, D), as the model's forward makes them."""
        enc, family = self._parts.encoder, self._parts.family
        if family == "dinov2":  # always resamples the position table to the input's grid
            return enc.embeddings(x)
        hidden = enc.embeddings(x, interpolate_pos_encoding=True)  # the table as is at the native size
        return enc.pre_layrnorm(hidden) if family == "clip" else hidden

    def _features(self, x: Tensor, want_attn: bool) -> tuple[Tensor, list[Tensor]]:
        enc, family = self._parts.encoder, self._parts.family
        x = x.to(next(enc.embeddings.parameters()).dtype)  # as the models' forward / embeddings do
        with self._record(want_attn) as attn:
            hidden = self._embed(x)
            for block in self.blocks:
                hidden = block(hidden)
            if family in ("vit", "dinov2"):
                tokens = enc.layernorm(hidden)
            elif family == "clip":  # CLIP's last_hidden_state is not normed; post_layernorm acts on the pooled token
                tokens = hidden
            else:  # SigLIP: the pooled vector takes the pseudo token's place, then the normed patches
                hidden = enc.post_layernorm(hidden)
                tokens = torch.cat([enc.head(hidden)[:, None], hidden], 1)
        return tokens, list(attn)

    def forward_head(self, tokens: Tensor) -> Tensor:
        """tokens (B, T, D) from forward_features -> logits (B, K), or the features (B, D') without a classifier:
        the normed class token (ViT, DINOv2), CLIP's image embedding (post_layernorm of the class token, then
        visual_projection where the model has it), SigLIP's attention-pool output."""
        family, head = self._parts.family, self._parts.head
        if family == "clip":
            z = self._parts.encoder.post_layernorm(tokens[:, 0])
            return head(z) if head is not None else z
        if head is None:
            return tokens[:, 0]
        if family == "dinov2":  # Dinov2(WithRegisters)ForImageClassification: [class token, mean of the patches]
            return head(torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(1)], 1))
        return head(tokens[:, 0])

    @contextlib.contextmanager
    def _record(self, want_attn: bool) -> Iterator[list[Tensor]]:
        """While active (want_attn): eager attention in every layer, each layer's softmax (B, h, T, T) appended to
        the yielded list; SigLIP: eager_pseudo's padded maps, then the pool's layer (B, h, 1 + N, 1 + N) made by
        pool_layer, its output recomputed through pool_through (see the module docstring). Restores everything
        on exit."""
        attn: list[Tensor] = []
        if not want_attn:
            yield attn
            return
        configs = {id(m.config): m.config for m in self._parts.attn if hasattr(m, "config")}
        saved = {k: c._attn_implementation for k, c in configs.items()}
        siglip = self._parts.family == "siglip"
        if siglip:
            interface = optional_import("transformers").AttentionInterface
            if PSEUDO_ATTENTION not in interface._global_mapping:
                interface.register(PSEUDO_ATTENTION, eager_pseudo)

        def keep(module: nn.Module, args: Any, out: tuple[Tensor, Tensor | None]) -> None:
            if out[1] is None:
                raise RuntimeError(f"{type(module).__name__} returned no attention weights under the eager "
                                   f"implementation; this transformers version is not supported.")
            attn.append(out[1])

        def through_pool(mha: nn.MultiheadAttention, args: tuple, kwargs: dict, out: tuple) -> tuple:
            full = pool_layer(out[1], self.config["num_heads"])  # out[1]: the pool's softmax (B, h', 1, N)
            attn.append(full)
            key = kwargs.get("key", args[1] if len(args) > 1 else None)
            return _pool_output(mha, key, pool_through(full, out[1])), out[1]

        hooks = [m.register_forward_hook(keep) for m in self._parts.attn]
        if siglip:
            pool = self._parts.encoder.head.attention  # nn.MultiheadAttention: ask for the per-head weights
            if not pool.batch_first:
                raise UnsupportedModelError("SigLIP's attention pool is not batch_first; this transformers version "
                                            "is not supported.")
            hooks.append(pool.register_forward_pre_hook(
                lambda m, args, kwargs: (args, {**kwargs, "need_weights": True, "average_attn_weights": False}),
                with_kwargs=True))
            hooks.append(pool.register_forward_hook(through_pool, with_kwargs=True))
        try:
            for c in configs.values():
                c._attn_implementation = PSEUDO_ATTENTION if siglip else "eager"
            yield attn
        finally:
            for h in hooks:
                h.remove()
            for k, c in configs.items():
                c._attn_implementation = saved[k]


def wrap_hf(model: nn.Module, image_processor: Mapping[str, Any] | Any = None) -> HFViT:
    """A transformers model in memory -> HFViT (the same module objects, not a copy)."""
    return HFViT(model, image_processor)


def hub_cache() -> str:
    """The Hugging Face Hub cache folder, read from the environment now: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (default ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _processor_config(repo_id: str, cache: str, offline: bool) -> dict[str, Any] | None:
    """The repo's preprocessor_config.json as a dict, or None when it has none (or it cannot be fetched)."""
    hub = optional_import("huggingface_hub")
    try:
        path = os.path.join(repo_id, "preprocessor_config.json") if os.path.isdir(repo_id) else \
            hub.hf_hub_download(repo_id, "preprocessor_config.json", cache_dir=cache, local_files_only=offline)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, hub.errors.EntryNotFoundError, hub.errors.HfHubHTTPError):
        return None


def load_hf(repo_id: str, *, dtype: torch.dtype = torch.float32) -> HFViT:
    """`hf:<repo id>`: the transformers model of a Hugging Face Hub repo, from the Hub cache (downloaded into it the
    first time; HF_HUB_OFFLINE=1, or a Hub that does not answer one short request (models.any_vit.hub_unreachable):
    the cache only, with no retries) -> HFViT in eval mode, in `dtype`.

    The class is the one config.json's `architectures` names when it is supported (so ViTForImageClassification
    keeps its classifier), else AutoModel's. data_config comes from the repo's preprocessor_config.json when there
    is one. The cache folder and HF_HUB_OFFLINE are read from the environment at the call (see hub_cache).
    Raises CheckpointError (one line naming the repo id and the cache folder) for an invalid repo id, files neither
    cached nor downloadable, or a config transformers cannot build; MissingLibraryError when transformers is not
    installed; ValueError for a model class this wrapper does not support.
    """
    transformers = optional_import("transformers")
    hub = optional_import("huggingface_hub")
    local = os.path.isdir(repo_id)
    cache, why = hub_cache(), None if local else hub_unreachable()
    offline = why is not None
    try:
        if not local:  # a folder written by save_pretrained loads as well
            hub.utils.validate_repo_id(repo_id)
    except hub.errors.HFValidationError:
        raise CheckpointError(f"hf:{repo_id} is not a Hugging Face repo id; write hf:<organisation>/<name> "
                              f"(letters, digits, '-', '_', '.'), e.g. hf:google/vit-base-patch16-224.") from None
    try:
        with hub_offline(offline):
            config = transformers.AutoConfig.from_pretrained(repo_id, cache_dir=cache, local_files_only=offline)
            arch = next((a for a in (getattr(config, "architectures", None) or []) if a in SUPPORTED
                         and hasattr(transformers, a)), None)
            cls = getattr(transformers, arch) if arch else transformers.AutoModel
            model = cls.from_pretrained(repo_id, config=config, cache_dir=cache, local_files_only=offline,
                                        dtype=dtype)
            processor = _processor_config(repo_id, cache, offline)
    except OSError as e:
        folder = f"models--{repo_id.replace('/', '--')}"
        if offline:
            raise CheckpointError(f"hf:{repo_id} is not in the Hugging Face cache {cache} and cannot be downloaded "
                                  f"({why}); download it once online (hf download {repo_id}) or set HF_HOME to the "
                                  f"folder whose hub/ holds {folder}.") from None
        reason = " ".join(str(e).split()).split(". ")[0][:200]  # transformers' first sentence
        raise CheckpointError(f"could not download hf:{repo_id} into the Hugging Face cache {cache} ({reason}); "
                              f"download it where there is a connection (hf download {repo_id}) and set HF_HOME "
                              f"to the folder whose hub/ holds {folder}.") from None
    except ValueError as e:  # e.g. a config.json without a model_type transformers knows
        reason = " ".join(str(e).split("\n")[0].split())[:200]
        raise CheckpointError(f"hf:{repo_id} cannot be built by transformers {transformers.__version__} "
                              f"({reason}).") from None
    model.eval()
    return HFViT(model, processor,
                 f"hf:{repo_id} (transformers {type(model).__name__})")
