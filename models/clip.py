"""CLIP / SigLIP image towers behind the VisionTransformer interface, and a zero-shot head from text prompts.

    model = load_open_clip("open_clip:ViT-B-16/openai")          # open_clip's image tower; .clip_model: both towers
    model = with_prompts(model, ["a red bicycle", "a dog"])      # head: logit_scale * cos(image, text_i) (+ bias)
    logits, attn = model(x, return_attn=True)                    # logits (B, 2); attn: (B, heads, T, T) per layer

open_clip's own `VisionTransformer` is wrapped by `OpenClipViT`: its blocks run as open_clip runs them, except
that the attention goes through an explicit path that keeps the softmax in the autograd graph: for
nn.MultiheadAttention the ops of torch's own need_weights branch written out (the weights torch returns are a view
made after the product with v, so no gradient reaches them); for open_clip's own `Attention` (custom blocks: q/k
norm, head scale, inner norm) its ops written out with matmul (open_clip 3.3's non-SDPA branch calls torch.bmm on
4-D tensors and raises). The tests check both against open_clip's fused forward and q / k hooks. Image towers that
are timm models inside open_clip (`TimmModel`: SigLIP, EVA...) go to `models.timm_vit.TimmViT`. The image tower alone
has no classification head (num_classes 0: forward gives the image embedding, open_clip's `encode_image`); the
prompts make one. open_clip, transformers and timm are optional: imported only when used.

Sources: open_clip 3.3 (open_clip/transformer.py VisionTransformer, ResidualAttentionBlock, Attention;
open_clip/model.py CLIP.get_logits), transformers CLIPModel / SiglipModel (get_text_features, logit_scale,
logit_bias).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.any_vit import MissingLibraryError, ViTAdapter, hub_offline, hub_unreachable, optional_import
from utils.checkpoint import CheckpointError

PREFIX = "open_clip:"


class PromptError(ValueError):
    """Bad prompts or a model without a text tower; one sentence."""


# ---------------------------------------------------------------------------------------------- open_clip image tower
def _mha_attention(mha: nn.MultiheadAttention, y: Tensor) -> tuple[Tensor, Tensor]:
    """nn.MultiheadAttention self-attention on y (B, T, D), written out as torch's explicit (need_weights) branch
    of F.multi_head_attention_forward computes it -> (output (B, T, D), softmax (B, h, T, T)). The softmax here is
    the tensor multiplied into v: the weights torch itself returns are a view taken after the product, which
    autograd cannot differentiate against."""
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise CheckpointError("an nn.MultiheadAttention with separate k / v sizes, bias_k or add_zero_attn is not "
                              "supported (open_clip's image towers use none of them).")
    b, t, c = y.shape
    q, k, v = (z.reshape(b, t, mha.num_heads, -1).transpose(1, 2)
               for z in F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1))
    attn = ((q * (c // mha.num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    if mha.training and mha.dropout > 0:
        attn = F.dropout(attn, p=mha.dropout)
    return F.linear((attn @ v).transpose(1, 2).reshape(b, t, c), mha.out_proj.weight, mha.out_proj.bias), attn


def _custom_attention(m: nn.Module, y: Tensor) -> tuple[Tensor, Tensor]:
    """open_clip.transformer.Attention.forward (no mask) with the softmax kept -> (output (B, T, D), (B, h, T, T))."""
    b, t, c = y.shape
    q, k, v = (z.reshape(b, t, m.num_heads, -1).transpose(1, 2)
               for z in F.linear(y, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1))
    if m.logit_scale is not None:  # scaled cosine attention (Swin V2)
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        logits = logits * torch.clamp(m.logit_scale, max=m.logit_scale_max).exp()
    else:
        logits = (m.ln_q(q) * m.scale) @ m.ln_k(k).transpose(-1, -2)
    attn = m.attn_drop(logits.softmax(dim=-1))
    x = attn @ v
    if m.head_scale is not None:
        x = x * m.head_scale
    x = m.out_drop(m.out_proj(m.ln_inner(x.transpose(1, 2).reshape(b, t, c))))
    return x, attn


def _block(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """One open_clip residual block (ResidualAttentionBlock or CustomResidualAttentionBlock) -> (x, attention)."""
    if isinstance(block.attn, nn.MultiheadAttention):
        out, attn = _mha_attention(block.attn, block.ln_1(x))
    else:
        out, attn = _custom_attention(block.attn, block.ln_1(x))
        out = block.ln_attn(out)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x))), attn


class ExplicitBlock(nn.Module):
    """One open_clip residual block as this repo's blocks are called: forward(x, want_attn) -> (x (B, T, D),
    attention (B, h, T, T) or None), so a forward hook on it sees (tokens, attention) as on models.vit's blocks.
    The open_clip block is held as a plain attribute (its parameters stay registered once, under the tower)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.__dict__["block"] = block

    def forward(self, x: Tensor, want_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        return _block(self.block, x) if want_attn else (self.block(x), None)


def resample_positions(table: Tensor, grid: tuple[int, int], new: tuple[int, int]) -> Tensor:
    """open_clip's position table (1 + gh*gw, D) -> (1 + new_h*new_w, D): the patch part bicubic, antialiased (timm's
    resample_abs_pos_embed, which the LeGrad authors use for open_clip at other sizes); the class row kept."""
    if tuple(new) == tuple(grid):
        return table
    cls, patches = table[:1], table[1:]
    p = patches.reshape(1, *grid, -1).permute(0, 3, 1, 2).float()
    p = F.interpolate(p, size=tuple(new), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls, p.to(table.dtype).flatten(2)[0].T], 0)


class OpenClipViT(ViTAdapter):
    """open_clip's `VisionTransformer` (the image tower of CLIP, OpenCLIP, MetaCLIP, DFN, ...) with the interface of
    models.vit.VisionTransformer. Token 0 is the class token; forward_head gives the image embedding (B, E) as
    open_clip's encode_image (unnormalised); config["num_classes"] is 0 (no classification head) until
    `with_prompts` adds one. Other input sizes than the tower's own: the position table is resampled
    (`resample_positions`). clip_model: the whole open_clip model (text tower for `with_prompts`), kept as a plain
    attribute, not a submodule."""

    def __init__(self, visual: nn.Module, clip_model: nn.Module | None = None, arch: str | None = None):
        super().__init__()
        name = type(visual).__name__
        if getattr(visual, "attn_pool", None) is not None:
            raise CheckpointError(f"open_clip's {name} with an attentional pooler (CoCa) is not supported: its "
                                  f"embedding comes from a pool over learned queries, not from the class token.")
        if getattr(visual, "pool_type", "tok") == "none":
            raise CheckpointError(f"open_clip's {name} with pool_type='none' gives tokens, not an image embedding.")
        ph, pw = visual.patch_size
        if not getattr(visual.transformer, "batch_first", True):
            raise CheckpointError(f"open_clip's {name} runs its blocks sequence-first (an open_clip before 2.24); "
                                  f"upgrade open_clip (pip install -U open_clip_torch).")
        if ph != pw:
            raise CheckpointError(f"open_clip's {name} has non-square {ph}x{pw} patches; only square ones work.")
        self.model = visual
        self.blocks = nn.ModuleList(ExplicitBlock(b) for b in visual.transformer.resblocks)
        self.patch_size, self.num_prefix_tokens = ph, 1
        self.__dict__["clip_model"] = clip_model  # not a submodule: its visual tower is self.model already
        self.arch = arch
        heads = visual.transformer.resblocks[0].attn.num_heads
        width = visual.transformer.width
        self.config = dict(embed_dim=width, num_heads=heads, num_layers=len(self.blocks), patch_size=ph,
                           num_channels=visual.conv1.in_channels, num_classes=0, grid_size=list(visual.grid_size),
                           reg_tokens=0, embed_out=visual.output_dim)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        mean = tuple(cfg.get("mean", getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)))
        std = tuple(cfg.get("std", getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)))
        self.data_config = dict(input_size=(3, *visual.image_size), mean=mean, std=std,
                                interpolation=cfg.get("interpolation", "bicubic"), crop_pct=1.0)
        self.weights_note = "the wrapped open_clip model's weights"

    def _embed(self, x: Tensor) -> Tensor:
        """open_clip's VisionTransformer._embeds (position table resampled for another grid) -> (B, 1 + N, D)."""
        v = self.model
        grid = self.patch_grid(*x.shape[-2:])
        x = v.conv1(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        pos = resample_positions(v.positional_embedding, tuple(v.grid_size), grid)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def _features(self, x: Tensor, want_attn: bool) -> tuple[Tensor, list[Tensor]]:
        x, attns = self._embed(x), []
        for block in self.blocks:
            x, a = block(x, want_attn)
            if a is not None:
                attns.append(a)
        return x, attns

    def _project(self, pooled: Tensor) -> Tensor:
        v = self.model
        return pooled if v.proj is None else pooled @ v.proj

    def forward_head(self, tokens: Tensor) -> Tensor:
        """tokens: block output (B, T, D) -> the image embedding (B, E), open_clip's VisionTransformer._pool + proj."""
        v = self.model
        if v.final_ln_after_pool:
            pooled = v.ln_post(tokens[:, 1:].mean(1) if v.pool_type == "avg" else tokens[:, 0])
        else:
            t = v.ln_post(tokens)
            pooled = t[:, 1:].mean(1) if v.pool_type == "avg" else t[:, 0]
        return self._project(pooled)

    def layer_logits(self, tokens: Tensor) -> Tensor:
        """LeGrad's read-out of a layer (attention.legrad): the block's output tokens (B, T, D) -> ln_post(mean over
        all T tokens) @ proj (B, E), as the authors' code does for open_clip (legrad/wrapper.py compute_legrad_clip:
        the mean of all tokens, class token included, not the class token)."""
        return self._project(self.model.ln_post(tokens.mean(1)))


# ------------------------------------------------------------------------------------------------- heads on adapters
class StackedHead(ViTAdapter):
    """An adapter whose head is `head(inner.forward_head(tokens))`: everything else is the inner adapter's.
    head: a module or callable (B, E) -> (B, K); num_classes: K."""

    def __init__(self, inner: ViTAdapter, head: Callable[[Tensor], Tensor], num_classes: int):
        super().__init__()
        self.inner = inner
        self.head = head
        self.__dict__.update(model=inner.model, blocks=inner.blocks)  # the inner adapter's, registered there once
        self.patch_size, self.num_prefix_tokens = inner.patch_size, inner.num_prefix_tokens
        self.pool_query = inner.pool_query
        self.config = {**inner.config, "num_classes": num_classes}
        self.data_config = getattr(inner, "data_config", {})
        self.weights_note = getattr(inner, "weights_note", "the wrapped model's weights")
        self.__dict__["clip_model"] = getattr(inner, "clip_model", None)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        return self.inner.patch_grid(height, width)

    def _features(self, x: Tensor, want_attn: bool) -> tuple[Tensor, list[Tensor]]:
        return self.inner._features(x, want_attn)

    def forward_head(self, tokens: Tensor) -> Tensor:
        return self.head(self.inner.forward_head(tokens))

    @property
    def layer_logits(self) -> Callable[[Tensor], Tensor] | None:
        """LeGrad's read-out of a layer (attention.legrad): the head on the inner adapter's read-out of the layer's
        output tokens (B, T, D), or None when the inner adapter has none (then LeGrad does not apply)."""
        read = getattr(self.inner, "layer_logits", None)
        return None if read is None else lambda tokens: self.head(read(tokens))


class ZeroShotHead(nn.Module):
    """image embedding (B, E) -> logits (B, K) = logit_scale * cos(image, text_k) + logit_bias, as open_clip's
    CLIP.get_logits and transformers' CLIPModel / SiglipModel logits_per_image.

    text: (K, E) prompt embeddings (normalised here); logit_scale: the model's exp(logit_scale); logit_bias: SigLIP's
    (None for CLIP). The image embedding is the tower's projected one (open_clip's encode_image, transformers'
    get_image_features)."""

    def __init__(self, text: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float | None = None):
        super().__init__()
        self.register_buffer("text", F.normalize(text.detach().float(), dim=-1))
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale).detach().float().reshape(()))
        bias = None if logit_bias is None else torch.as_tensor(logit_bias).detach().float().reshape(())
        self.register_buffer("logit_bias", bias)

    @property
    def probability(self) -> str:
        """How the logits become probabilities: "sigmoid" per prompt for SigLIP (trained with a sigmoid loss, Zhai
        et al. 2023: its logit_bias), "softmax" over the prompts for CLIP (contrastive softmax loss)."""
        return "softmax" if self.logit_bias is None else "sigmoid"

    def forward(self, image: Tensor) -> Tensor:
        logits = self.logit_scale * F.normalize(image, dim=-1) @ self.text.to(image.dtype).T
        return logits if self.logit_bias is None else logits + self.logit_bias


def _prompt_list(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [str(p) for p in prompts]
    if not prompts or any(not p.strip() for p in prompts):
        raise PromptError(f"prompts {prompts!r} must be one or more non-empty texts, e.g. ['a photo of a cat'].")
    if len(set(prompts)) != len(prompts):
        raise PromptError(f"prompts {prompts!r} repeat a text; give each once.")
    return prompts


def _open_clip_text(clip: nn.Module, prompts: list[str], tokenizer: Callable | None,
                    arch: str | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """open_clip two-tower model -> (text embeddings (K, E), exp(logit_scale), logit_bias or None)."""
    open_clip = optional_import("open_clip")
    if tokenizer is None:
        if arch is not None:
            try:
                tokenizer = open_clip.get_tokenizer(arch)
            except Exception as e:  # the Hub tokenizers (SigLIP...) when offline and not cached
                raise PromptError(f"the tokenizer of open_clip:{arch} cannot be loaded ({type(e).__name__}); SigLIP's "
                                  f"come from the Hugging Face Hub: run once online, or pass tokenizer=.") from None
        elif hasattr(clip, "text"):  # CustomTextCLIP: its tokenizer is not open_clip's BPE in general
            raise PromptError("this open_clip model has a custom text tower; pass its tokenizer "
                              "(open_clip.get_tokenizer(<arch>)).")
        else:
            tokenizer = open_clip.SimpleTokenizer(context_length=getattr(clip, "context_length", 77))
    device = next(clip.parameters()).device
    with torch.no_grad():
        text = clip.encode_text(tokenizer(prompts).to(device))
    return text, clip.logit_scale.exp(), getattr(clip, "logit_bias", None)


def _hf_tokenizer(pair: nn.Module) -> Callable:
    """transformers' AutoTokenizer of the model's name_or_path: a folder, or a Hub repo read from the cache
    (models.hf_vit.hub_cache; the cache only when the Hub cannot be used: models.any_vit.hub_unreachable), as
    models.hf_vit.load_hf reads the model."""
    from models.hf_vit import hub_cache  # noqa: PLC0415 (transformers stays optional)

    transformers = optional_import("transformers")
    name = getattr(pair, "name_or_path", "") or getattr(pair.config, "_name_or_path", "")
    if not name:
        raise PromptError(f"this {type(pair).__name__} was built in memory, so its tokenizer is unknown; pass "
                          f"tokenizer= (e.g. transformers.AutoTokenizer.from_pretrained(<repo id>)).")
    offline = not os.path.isdir(name) and hub_unreachable() is not None
    try:
        with hub_offline(offline):
            return transformers.AutoTokenizer.from_pretrained(name, cache_dir=hub_cache(), local_files_only=offline)
    except ImportError as e:  # SigLIP's SentencePiece tokenizer without the sentencepiece package
        library = "sentencepiece" if "sentencepiece" in str(e).lower() else "the library it names"
        raise PromptError(f"the tokenizer of {name} needs {library} (pip install {library}), which is not "
                          f"installed.") from None
    except Exception as e:  # noqa: BLE001 (OSError offline, ValueError for an unknown tokenizer class...)
        reason = " ".join(str(e).split()).split(". ")[0][:200]  # the library's first sentence
        raise PromptError(f"the tokenizer of {name} cannot be loaded ({type(e).__name__}: {reason}); run once "
                          f"online to cache it, or pass tokenizer=.") from None


def _hf_text(pair: nn.Module, prompts: list[str], tokenizer: Callable | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """transformers CLIPModel / SiglipModel -> (text embeddings (K, E), exp(logit_scale), logit_bias or None).
    tokenizer None: AutoTokenizer of the model's name_or_path (_hf_tokenizer). SigLIP's texts are padded to the
    text tower's max_position_embeddings (64), as its processor pads them (the tower pools the last position)."""
    siglip = "siglip" in type(pair).__name__.lower()
    tokenizer = tokenizer or _hf_tokenizer(pair)
    length = pair.config.text_config.max_position_embeddings
    batch = tokenizer(prompts, padding="max_length" if siglip else True, return_tensors="pt",
                      **({"max_length": length, "truncation": True} if siglip else {}))
    device = next(pair.parameters()).device
    with torch.no_grad():
        out = pair.get_text_features(**{k: v.to(device) for k, v in batch.items()})
    text = out if isinstance(out, Tensor) else out.pooler_output
    return text, pair.logit_scale.exp(), getattr(pair, "logit_bias", None)


def with_prompts(model: ViTAdapter, prompts: Sequence[str], *, tokenizer: Callable | None = None) -> StackedHead:
    """model (an image tower wrapped here or by models.hf_vit, with its two-tower model as `model.clip_model`) ->
    the same tower with a zero-shot head: logits (B, K) = logit_scale * cos(image, text_k) (+ SigLIP's logit_bias),
    K = len(prompts), class_names = the prompts. So the top-k lists the prompts and gradient rollout / LeGrad
    explain a prompt. A model that already has prompts gets the new ones instead.

    tokenizer: open_clip's for the tower's arch (its BPE vocabulary ships in the package; SigLIP's comes from the
    Hub), or transformers' AutoTokenizer of the checkpoint, unless given. Raises PromptError (one sentence)."""
    prompts = _prompt_list(prompts)
    if isinstance(model, StackedHead) and isinstance(model.head, ZeroShotHead):
        model = model.inner
    pair = getattr(model, "clip_model", None)
    if pair is None:
        raise PromptError(f"{type(model).__name__} has no text tower: prompts need a CLIP / SigLIP model loaded "
                          f"with both towers (open_clip:<arch>/<tag>, or an hf: CLIP / SigLIP checkpoint).")
    if hasattr(pair, "encode_text"):  # open_clip CLIP / CustomTextCLIP
        text, scale, bias = _open_clip_text(pair, prompts, tokenizer, getattr(model, "arch", None))
    elif hasattr(pair, "get_text_features"):  # transformers CLIPModel / SiglipModel
        text, scale, bias = _hf_text(pair, prompts, tokenizer)
    else:
        raise PromptError(f"{type(pair).__name__} is not an open_clip or transformers two-tower model.")
    out = StackedHead(model, ZeroShotHead(text, scale, bias), len(prompts))
    out.class_names = prompts
    return out.to(text.device)


# ---------------------------------------------------------------------------------------------------------- loading
def wrap_open_clip(model: nn.Module, arch: str | None = None) -> ViTAdapter:
    """An open_clip model (CLIP, CustomTextCLIP) or its image tower -> the adapter of its image tower (OpenClipViT,
    or models.timm_vit.TimmViT for a timm tower, with open_clip's projection on top); the whole model is kept as
    `clip_model` for prompts. Raises CheckpointError naming an image tower that has no attention (ResNet)."""
    visual = getattr(model, "visual", model)
    pair = model if visual is not model else None
    kind = type(visual).__name__
    if kind == "VisionTransformer":
        return OpenClipViT(visual, pair, arch)
    if kind == "TimmModel":
        try:
            from models.timm_vit import TimmViT  # noqa: PLC0415 (W1's timm wrapper; optional)
        except ImportError as e:
            raise CheckpointError(f"open_clip's timm image tower needs models.timm_vit ({e}).") from None
        inner = TimmViT(visual.trunk)
        out = StackedHead(inner, visual.head, inner.config.get("num_classes", 0)) if len(visual.head) else inner
        out.config = {**out.config, "num_classes": 0}
        out.__dict__["clip_model"], out.arch = pair, arch
        cfg = getattr(visual, "preprocess_cfg", None)
        if cfg:
            out.data_config = {**getattr(out, "data_config", {}), "mean": tuple(cfg["mean"]),
                               "std": tuple(cfg["std"]), "input_size": (3, *visual.image_size), "crop_pct": 1.0}
        return out
    raise CheckpointError(f"open_clip's {kind} image tower is not a ViT (a ResNet or ConvNeXt tower has no "
                          f"attention maps); pick a ViT-* architecture.")


def parse_spec(spec: str) -> tuple[str, str]:
    """"open_clip:ViT-B-16/openai" -> ("ViT-B-16", "openai"); the tag may also be a weights file path."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    arch, _, tag = body.partition("/")
    if not arch or not tag:
        raise CheckpointError(f"{spec!r} must read open_clip:<architecture>/<pretrained tag>, e.g. "
                              f"open_clip:ViT-B-16/openai (open_clip.list_pretrained() lists the pairs).")
    return arch, tag


def load_open_clip(spec: str, device: str | torch.device = "cpu") -> ViTAdapter:
    """"open_clip:<arch>/<pretrained tag or weights file>" -> the image tower's adapter, both towers kept for
    `with_prompts`, data_config from open_clip's preprocessing (mean, std, size, interpolation).

    Weights come through open_clip (the Hugging Face Hub cache, HF_HOME); offline and not cached, or an unknown
    architecture / tag: CheckpointError in one sentence saying which and what to do."""
    open_clip = optional_import("open_clip")
    spec = PREFIX + spec.removeprefix(PREFIX)  # as the user wrote it (load_pretrained passes it without the prefix)
    arch, _, tag = spec.removeprefix(PREFIX).partition("/")
    tags = open_clip.list_pretrained_tags_by_model(arch) if arch else []
    if not tag.strip() and tags:
        raise CheckpointError(f"'{spec}' names no weights; write {PREFIX}{arch}/<pretrained tag>, e.g. "
                              f"'{PREFIX}{arch}/{'openai' if 'openai' in tags else tags[0]}' (its tags: "
                              f"{', '.join(tags[:6])}{f', ... {len(tags)} in all' if len(tags) > 6 else ''}).")
    arch, tag = parse_spec(spec)
    if arch not in open_clip.list_models():
        import difflib  # noqa: PLC0415

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=1)
        raise CheckpointError(f"{spec}: {arch!r} is not an open_clip architecture"
                              + (f" (did you mean {close[0]!r}?)" if close else "") + "; open_clip.list_models() "
                              "lists them.")
    is_file = os.path.isfile(tag)
    if not is_file and tag not in tags:
        raise CheckpointError(f"{spec}: {tag!r} is neither a pretrained tag of {arch} ({', '.join(tags) or 'none'}) "
                              f"nor a weights file.")
    why = None if is_file else hub_unreachable()
    quiet, logging.root.manager.disable = logging.root.manager.disable, logging.CRITICAL  # open_clip logs failures
    try:
        with hub_offline(why is not None):  # the cache only, no retries
            if not is_file:  # fetch (or find in the cache) before building the model: an offline miss fails at once
                open_clip.download_pretrained(open_clip.get_pretrained_cfg(arch, tag))
            clip = open_clip.create_model_and_transforms(arch, pretrained=tag, device=device)[0]
    except (RuntimeError, OSError) as e:
        if is_file:
            raise CheckpointError(f"{spec}: the file does not load into {arch}: {str(e).splitlines()[0][:200]}") \
                from None
        hub = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "").rstrip("/")
        raise CheckpointError(f"{spec}: the weights are not in the Hugging Face cache and could not be downloaded "
                              f"({why or str(e).splitlines()[0][:120]}); run once online to fetch {hub or 'them'} into "
                              f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}.") from None
    finally:
        logging.disable(quiet)
    clip.eval()
    model = wrap_open_clip(clip, arch)
    model.weights_note = f"open_clip {arch} weights '{os.path.basename(tag) if is_file else tag}'"
    return model


__all__ = ["OpenClipViT", "StackedHead", "ZeroShotHead", "PromptError", "MissingLibraryError", "with_prompts",
           "wrap_open_clip", "load_open_clip", "parse_spec", "resample_positions"]
