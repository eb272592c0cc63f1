"""timm's ViT family behind the interface of `models.vit.VisionTransformer` (see models.any_vit).

    model = TimmViT(timm.create_model("vit_base_patch16_clip_224.openai"))   # or load_pretrained("timm/...")
    logits, attn = model(x, return_attn=True)   # attn: (B, heads, T, T) per layer, in the autograd graph

Covered: timm's `VisionTransformer` and `Eva` and their subclasses (vit_* with or without registers, no_embed_class,
class-token / GAP / fc_norm models, deit*, distilled DeiT, the CLIP image towers vit_*_clip_* incl. QuickGELU,
SigLIP / SigLIP 2's `map` head, eva02_* with RoPE and SwiGLU, DINOv3's vit_*_dinov3, ...). Their attention modules
(`timm.layers.Attention`, `AttentionRope`, `EvaAttention`, `ParallelScalingBlock`) run their own explicit path
(`fused_attn = False`, only while maps are asked for; the plain `Attention` through `_lean_attention`, the same
numbers with one T x T tensor fewer outside autograd) and the probabilities are taken where timm's
`timm.utils.AttentionExtract` takes them: the output of each block's `attn_drop` (a forward hook), so they are the
softmax after q/k norms, rotary embeddings and masks, in the autograd graph.

What the head reads decides the query of the maps (token 0):
    global_pool "token": the class token, as in this repo's ViT;
    "map" (SigLIP's attention pool, no class token): a pool-query pseudo token (models.any_vit: pad_pseudo,
        pool_layer, pool_through; built inside the forward, so gradients reach it; `pool_query` True), whose extra
        last layer is the pool's attention over the tokens it pools; timm's `AttentionPoolLatent` has
        no module around its softmax (AttentionExtract reaches it only by fx), so its explicit path is run here
        from the pool's own submodules, in the order of its forward (tests/test_timm_vit.py: equal to timm's);
    "avg": the same pseudo token with uniform weights over the averaged tokens (the mean the head reads, with
        those weights in the graph, so gradient rollout treats average pooling as uniform attention).
Other sizes than the model's own run through timm's dynamic_img_size path (position table resampled by timm's
rule, RoPE built for the new grid), switched on only for that call.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
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

# Attention modules whose explicit path ends in softmax -> attn_drop -> @ v (timm 1.0).
SUPPORTED_ATTENTION = ("Attention", "AttentionRope", "EvaAttention", "ParallelScalingBlock")
# Families of the ViT classes that cannot give one probability matrix per block, and why.
REFUSED_ATTENTION = {
    "DiffAttention": "differential attention (its map is the difference of two softmaxes, not one probability "
                     "matrix)",
    "DiffParallelScalingBlock": "differential attention (its map is the difference of two softmaxes, not one "
                                "probability matrix)",
    "ParallelThingsBlock": "parallel attention branches (several attention maps per block whose outputs are summed)",
}
POOLS = ("token", "avg", "map")
REFUSED_POOLS = {
    "prr": "its AttentionPoolPrr head has no single query whose attention the maps could be",
    "max": "max pooling has no query whose attention over the patches the maps could be",
    "avgmax": "max pooling has no query whose attention over the patches the maps could be",
    "": "no pooling: its head reads every token, not one vector per image",
}


def _attention_module(block: nn.Module, index: int) -> nn.Module:
    """The one module of `block` whose explicit attention path this wrapper switches on; UnsupportedModelError
    naming the family otherwise."""
    found = [m for m in block.modules() if hasattr(m, "fused_attn")]
    names = [type(m).__name__ for m in found]
    for name in [type(block).__name__, *names]:
        if name in REFUSED_ATTENTION:
            raise UnsupportedModelError(f"timm's {name} ({REFUSED_ATTENTION[name]}) is not supported by the map "
                                        f"wrapper.")
    if len(found) != 1 or names[0] not in SUPPORTED_ATTENTION or not isinstance(getattr(found[0], "attn_drop", None),
                                                                                 nn.Dropout):
        raise UnsupportedModelError(f"block {index} ({type(block).__name__}) has attention modules {names or 'none'}; "
                                    f"the map wrapper needs exactly one of timm's {', '.join(SUPPORTED_ATTENTION)}.")
    return found[0]


def _check_family(model: nn.Module) -> str:
    """The pool kind ("token", "avg", "map") of a timm ViT; UnsupportedModelError in one sentence otherwise."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    name = type(model).__name__
    if not isinstance(model, VisionTransformer | Eva):
        raise UnsupportedModelError(f"timm's {name} is not of the VisionTransformer / Eva family, the timm models "
                                    f"the map wrapper supports (vit_*, deit*, eva02_*, *_clip_*, *_siglip_*, ...).")
    pe = model.patch_embed
    if hasattr(pe, "backbone"):
        raise UnsupportedModelError(f"{name} is a hybrid ViT (a convolutional stem makes its tokens, not patches of "
                                    f"the image), which the map wrapper does not support.")
    patch = tuple(pe.patch_size)
    if patch[0] != patch[1]:
        raise UnsupportedModelError(f"{name} has {patch[0]}x{patch[1]}-pixel patches; the map wrapper needs square "
                                    f"patches.")
    pool = model.global_pool
    if pool in REFUSED_POOLS or pool not in POOLS:
        why = REFUSED_POOLS.get(pool, "an unknown pooling")
        raise UnsupportedModelError(f"{name} with global_pool={pool!r} is not supported by the map wrapper: {why}.")
    if pool == "map":
        attn_pool = model.attn_pool
        if type(attn_pool).__name__ != "AttentionPoolLatent" or attn_pool.pool not in ("token", "avg"):
            raise UnsupportedModelError(f"{name}'s attention pool {type(attn_pool).__name__} (pool "
                                        f"{getattr(attn_pool, 'pool', None)!r}) is not supported by the map wrapper; "
                                        f"it needs timm's AttentionPoolLatent pooling to one vector.")
    return pool


@contextlib.contextmanager
def _switched(objects_attrs: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """Set obj.attr = value for every triple while the block runs, then restore the old values."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in objects_attrs]
    try:
        for obj, attr, value in objects_attrs:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def attention_pool(pool: nn.Module, x: Tensor, use: Callable[[Tensor], Tensor] = lambda a: a) -> Tensor:
    """timm's AttentionPoolLatent(x) on its explicit path: x (B, N, D) -> pooled (B, D) as pool(x) gives it.

    use: called with the probabilities (B, heads, latent_len, N), returns the tensor the pool goes on with (as a
    forward hook on a module may). The steps are those of AttentionPoolLatent.forward (timm 1.0) with fused_attn
    False and no mask."""
    B, N, C = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
    k, v = pool.kv(x).reshape(B, N, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    attn = use(((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
    out = (attn @ v).transpose(1, 2).reshape(B, pool.latent_len, C)
    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    return out[:, 0] if pool.pool == "token" else out.mean(1)


class TimmViT(ViTAdapter):
    """A timm ViT (`VisionTransformer`, `Eva` or a subclass) with this repo's ViT interface (models.any_vit).

    model: the timm model, used as is (its weights, its forward); UnsupportedModelError (one sentence naming the
    family and why) for what cannot give one attention matrix per block. num_prefix_tokens counts timm's prefix
    tokens (class, registers, distillation) plus the pool-query token of "avg" / "map" models (module docstring).
    """

    def __init__(self, model: nn.Module, weights_note: str = "the wrapped model's weights"):
        super().__init__()
        timm = optional_import("timm")
        self.pool = _check_family(model)
        self.model = model
        self._attn_modules = [_attention_module(b, i) for i, b in enumerate(model.blocks)]
        pe = model.patch_embed
        self.patch_size = int(pe.patch_size[0])
        self.grid_size = tuple(pe.grid_size) if getattr(pe, "grid_size", None) is not None else None
        self.pool_query = self.pool != "token"  # models.any_vit: token 0 and the last layer are the pool's
        self.num_prefix_tokens = model.num_prefix_tokens + self.pool_query
        self.config = dict(embed_dim=model.embed_dim, num_heads=self._attn_modules[0].num_heads,
                           num_layers=len(self._attn_modules), patch_size=self.patch_size,
                           num_channels=pe.proj.in_channels, num_classes=model.num_classes,
                           grid_size=list(self.grid_size) if self.grid_size else None,
                           reg_tokens=getattr(model, "num_reg_tokens", 0), global_pool=self.pool)
        # timm's preprocessing for its weights; the size is the model's own (a model built with img_size=...
        # keeps its pretrained_cfg's size there)
        self.data_config = dict(timm.data.resolve_data_config(model=model))
        if getattr(pe, "img_size", None) is not None:
            self.data_config["input_size"] = (self.config["num_channels"], *map(int, pe.img_size))
        self.weights_note = weights_note

    @property
    def blocks(self) -> nn.Module:
        """timm's blocks (nn.Sequential / nn.ModuleList); each returns its output tokens (B, T, D)."""
        return self.model.blocks

    def _running(self, grid: tuple[int, int], maps: list[Tensor] | None) -> contextlib.ExitStack:
        """While it is open: timm's explicit attention with every block's probabilities appended to `maps` (None:
        the model's own fused path; with a pool query, padded by pad_pseudo and the block computing through the
        padded copy), gradient checkpointing off (it would run the hooks twice), and timm's dynamic_img_size path
        when `grid` is not the model's own."""
        stack = contextlib.ExitStack()
        m, pe = self.model, self.model.patch_embed
        switches: list[tuple[Any, str, Any]] = [(m, "grad_checkpointing", False)]
        if maps is not None:
            switches += [(a, "fused_attn", False) for a in self._attn_modules]
            pseudo = self.pool != "token"

            def keep(module: nn.Module, inputs: object, out: Tensor) -> Tensor | None:
                full = pad_pseudo(out) if pseudo else out
                maps.append(full)
                return full[..., 1:, 1:] if pseudo else None  # the block goes on with the padded copy's values

            for a in self._attn_modules:  # timm.utils.AttentionExtract's default: the output of *attn_drop
                stack.callback(a.attn_drop.register_forward_hook(keep).remove)
                if type(a) is optional_import("timm").layers.Attention:  # the plain one: its lean twin
                    a.forward = functools.partial(_lean_attention, a)
                    stack.callback(delattr, a, "forward")
        if not m.dynamic_img_size and grid != self.grid_size:
            from timm.layers import Format
            switches += [(m, "dynamic_img_size", True), (pe, "strict_img_size", False), (pe, "flatten", False),
                         (pe, "output_fmt", Format.NHWC)]
            rope = getattr(m, "rope", None)
            if rope is not None and hasattr(rope, "_use_cached_embed"):
                switches.append((rope, "_use_cached_embed", False))  # built for the grid, as a dynamic model does
        stack.enter_context(_switched(switches))
        return stack

    def forward(self, x: Tensor, return_attn: bool | str = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """ViTAdapter.forward; with maps, a class-token model's last block updates only the class token (the one
        its head reads), as models.vit does: the same logits and maps, the last block ~T times cheaper."""
        if not return_attn or not self._cls_only:
            return super().forward(x, return_attn)
        if return_attn not in (True, "cls"):
            raise ValueError(f"return_attn={return_attn!r} must be False, True or 'cls'.")
        m, maps = self.model, []
        with self._running(self.check_input(x), maps):
            h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
            for block in m.blocks[:-1]:
                h = block(h)
            logits = m.forward_head(m.norm(_class_token_update(m.blocks[-1], h)))
        return logits, [a[:, :, 0] for a in maps] if return_attn == "cls" else maps

    @property
    def _cls_only(self) -> bool:
        """Whether the last block can update the class token alone: timm's VisionTransformer itself (a subclass
        may read more tokens, e.g. distilled DeiT), its plain Block and Attention (no gate), class-token pooling."""
        timm = optional_import("timm")
        last = self.model.blocks[-1]
        return (self.pool == "token" and type(self.model) is timm.models.vision_transformer.VisionTransformer
                and type(last) is timm.models.vision_transformer.Block
                and type(last.attn) is timm.layers.Attention and getattr(last.attn, "gate", None) is None)

    def _features(self, x: Tensor, want_attn: bool) -> tuple[Tensor, list[Tensor]]:
        grid = self.patch_grid(*x.shape[-2:])
        maps: list[Tensor] | None = [] if want_attn else None
        with self._running(grid, maps):
            tokens = self.model.forward_features(x)
        if self.pool != "token":  # the pool-query token first, as its map row
            tokens = torch.cat([self._pool(tokens, maps)[:, None], tokens], dim=1)
        return tokens, maps or []

    def _pool(self, tokens: Tensor, maps: list[Tensor] | None) -> Tensor:
        """tokens (B, T, D) -> what the head pools them to, (B, D). maps not None: the pool query's layer
        (pool_layer: its attention over all T tokens, 0 on the prefix tokens the pool skips) is appended and the
        pool computes through it."""
        m = self.model
        if maps is None:
            return m.pool(tokens)
        # VisionTransformer says whether its pool reads the prefix tokens; Eva's attention pool reads every token,
        # its average the patches only (timm's pool methods).
        include = m.pool_include_prefix if hasattr(m, "pool_include_prefix") else self.pool == "map"
        skip = 0 if include else m.num_prefix_tokens
        x = tokens[:, skip:]

        def use(p: Tensor) -> Tensor:  # p: (B, h', L, T - skip)
            p = torch.cat([p.new_zeros(*p.shape[:3], skip), p], dim=-1)
            full = pool_layer(p, self.config["num_heads"])
            if not full.requires_grad and torch.is_grad_enabled():
                full.requires_grad_()  # uniform weights: constant, yet gradient rollout asks for their gradient
            maps.append(full)
            return pool_through(full, p)[..., skip:]

        if self.pool == "map":
            return attention_pool(m.attn_pool, x, use)
        weights = use(x.new_full((x.shape[0], 1, 1, x.shape[1]), 1 / x.shape[1]))  # average = uniform attention
        return (weights[:, 0] @ x)[:, 0]

    @property
    def layer_logits(self) -> Callable[[Tensor], Tensor] | None:
        """LeGrad's read-out of one block's output tokens (B, T, D) -> logits, as if it were the last block: the
        final norm and timm's forward_head (class-token models); None for pool heads, whose read-out LeGrad's rule
        does not define here (attention.legrad)."""
        if self.pool != "token" or self.config["num_classes"] == 0:
            return None
        return lambda tokens: self.model.forward_head(self.model.norm(tokens))

    def forward_head(self, tokens: Tensor) -> Tensor:
        """tokens (B, T, D) of forward_features -> logits (B, num_classes), or features (B, D) without a head."""
        m = self.model
        if self.pool == "token":
            return m.forward_head(tokens)
        return m.head(m.head_drop(m.fc_norm(tokens[:, 0])))


def _class_token_update(block: nn.Module, x: Tensor) -> Tensor:
    """timm's Block.forward (explicit attention) for the class token only: x (B, T, D) -> (B, 1, D). The whole
    attention matrix is computed (attn_drop's hook keeps it); only its row 0 meets v, the projection and the MLP."""
    a = block.attn
    B, T, _ = x.shape
    q, k, v = a.qkv(block.norm1(x)).reshape(B, T, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    attn = a.attn_drop(probabilities(q, k, a.scale))
    out = (attn[:, :, :1] @ v).transpose(1, 2).reshape(B, 1, -1)
    x = x[:, :1] + block.drop_path1(block.ls1(a.proj_drop(a.proj(a.norm(out)))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def probabilities(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax(q·kᵀ·scale) over the keys: q (B, h, Tq, d), k (B, h, Tk, d) -> (B, h, Tq, Tk), the numbers of timm's
    explicit path ((q * scale) @ kᵀ, then softmax). Outside autograd it makes one new Tq x Tk tensor instead of
    two (and no scaled copy of q): the scale rides in the product (torch.baddbmm's alpha), the softmax is written
    in place (on the CPU). With gradients it is timm's expression itself."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    (B, h, Tq, d), Tk = q.shape, k.shape[2]
    s = torch.baddbmm(q.new_zeros(()).expand(B * h, Tq, Tk), q.reshape(B * h, Tq, d),
                      k.reshape(B * h, Tk, d).transpose(1, 2), beta=0, alpha=scale)
    if s.device.type != "cpu":  # the in-place softmax is checked on CPU kernels only
        return s.softmax(dim=-1).view(B, h, Tq, Tk)
    return torch.ops.aten._softmax.out(s, -1, False, out=s).view(B, h, Tq, Tk)


def _lean_attention(a: nn.Module, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """timm's Attention.forward on its explicit path (fused_attn False), the probabilities from `probabilities`;
    attn_drop still receives them (the wrapper's hook keeps them). A mask or a gate: timm's own forward."""
    if attn_mask is not None or is_causal or getattr(a, "gate", None) is not None:
        return type(a).forward(a, x, attn_mask, is_causal)
    B, N, _ = x.shape
    q, k, v = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    x = (a.attn_drop(probabilities(q, k, a.scale)) @ v).transpose(1, 2).reshape(B, N, -1)
    return a.proj_drop(a.proj(a.norm(x)))


def split_name(name: str) -> tuple[str, str | None]:
    """"vit_base_patch16_clip_224.openai" -> ("vit_base_patch16_clip_224", "openai"); no tag -> (name, None)."""
    arch, _, tag = name.partition(".")
    return arch, tag or None


def hub_repo(name: str) -> str:
    """The Hugging Face Hub repository of a timm model name with or without its tag (timm's pretrained config:
    "vit_base_patch16_224" -> "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"); CheckpointError for a name
    timm does not know ("did you mean") or weights timm does not publish on the Hub."""
    timm = optional_import("timm")
    arch, tag = split_name(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1, cutoff=0.8)
        hint = f"; did you mean 'timm/{close[0]}'?" if close else " (timm.list_models() lists them)."
        raise CheckpointError(f"'timm/{name}': timm has no model '{arch}'{hint}")
    try:
        cfg = timm.models.get_pretrained_cfg(name if tag else arch, allow_unregistered=False)
    except RuntimeError:  # "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise CheckpointError(f"'timm/{name}': timm has no weights tagged '{tag}' for {arch}"
                              + (f"; its tags: {', '.join(tags)}." if tags else "; it publishes none."))
    if not cfg.hf_hub_id:
        raise CheckpointError(f"'timm/{name}': timm's weights for it are not on the Hugging Face Hub "
                              f"({cfg.url or 'no url'}); build it with timm.create_model(..., pretrained=True) and "
                              f"pass the model.")
    return cfg.hf_hub_id


def hf_cache_dir() -> str:
    """Where huggingface_hub keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub (default ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def load_timm(name: str) -> TimmViT:
    """load_pretrained("timm/<name>[.<tag>]"): the model timm builds from the Hub repository's config.json with its
    model.safetensors, both through the Hugging Face cache (downloaded once). When the Hub cannot be used
    (HF_HUB_OFFLINE=1, or it does not answer one short request: models.any_vit.hub_unreachable) the cache alone is
    read, with no retries. CheckpointError in one line: an unknown name or tag, or files that are neither cached
    nor downloadable (naming the repository, the files and the cache folder to put them in)."""
    timm = optional_import("timm")
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = hub_repo(name)
    why = hub_unreachable()
    try:
        with hub_offline(why is not None):
            model = timm.create_model(f"hf-hub:{repo}", pretrained=True)
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        if not isinstance(e, LocalEntryNotFoundError):
            raise CheckpointError(f"'timm/{name}': the Hugging Face Hub has no {repo} or no weights in it "
                                  f"({type(e).__name__}).") from None
        raise CheckpointError(f"'timm/{name}': {repo} is not in the Hugging Face cache {hf_cache_dir()} and could "
                              f"not be downloaded ({why or 'the download failed'}); where there is a network run "
                              f"`hf download {repo} config.json model.safetensors` with the same HF_HOME, or copy "
                              f"its models--{repo.replace('/', '--')} folder there.") from None
    model.eval()
    return TimmViT(model, weights_note=f"released weights ({repo}, Hugging Face Hub)")


def is_timm_model(obj: object) -> bool:
    """Whether obj is an nn.Module defined in timm."""
    return isinstance(obj, nn.Module) and re.match(r"timm(\.|$)", type(obj).__module__) is not None
