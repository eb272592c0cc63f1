"""Any library's ViT behind the interface of `models.vit.VisionTransformer`, so every map, statistic and figure of
this repo works on it unchanged.

    model = wrap(timm.create_model("vit_base_patch16_clip_224.openai"))   # or load_pretrained("timm/...")
    logits, attn = model(x, return_attn=True)    # attn: num_layers tensors (B, heads, T, T), in the autograd graph

The interface (what utils.img2attn, attention.* and the scripts use):
    forward(x, return_attn=False | True | "cls") -> logits (B, K) [, per-layer attention (B, h, T, T) | (B, h, T)]
    forward_features(x, return_attn=False) -> (tokens (B, T, D), attention list); forward_head(tokens) -> (B, K)
    blocks                       the transformer blocks; a forward hook sees each one's output tokens (B, T', D)
    patch_size, patch_grid(H, W), num_prefix_tokens, config (embed_dim, num_heads, num_layers, patch_size,
    num_channels, num_classes [0: no head], grid_size, reg_tokens), data_config (timm's resolve_data_config keys:
    input_size, mean, std, interpolation, crop_pct), weights_note, pool_query (True when token 0 is the pool-query
    pseudo token below and the last layer the pool's: statistics over the blocks leave that layer out).
T = num_prefix_tokens + grid_h * grid_w. The attention is the softmax the model really used (after q/k norms,
rotary embeddings, masks), taken from the library's own explicit (non-fused) attention path.

A model that pools its patches with an attention-pool head and has no class token (SigLIP's "map" head) gets one
pseudo token in front: in every block it attends only to itself and nothing attends to it, and one extra last
"layer" holds the pool query's attention over the patches in its row. So the class-token row of the last layer is
the pool's attention, rollout / gradient rollout use the pool as the query, and num_prefix_tokens counts it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from utils.checkpoint import CheckpointError

PIP = {"timm": "timm", "transformers": "transformers", "open_clip": "open_clip_torch"}


class MissingLibraryError(ImportError, ValueError):
    """An optional library is not installed; the message names the `pip install` to run. Also a ValueError, so
    the scripts report it in one line as they report any bad input."""


class UnsupportedModelError(CheckpointError):
    """A model of a supported library that the wrapper cannot give the interface (one attention matrix per block,
    one query the head reads); the message names the family and why. A CheckpointError, so the scripts report it
    in one line as they report a bad checkpoint."""


def optional_import(name: str) -> Any:
    """import `name` (timm, transformers, open_clip) or raise MissingLibraryError naming the pip install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingLibraryError(f"this needs {name}, which is not installed: pip install "
                                  f"{PIP.get(name, name)}") from None


HUB_PROBE_TIMEOUT_S = 3.0  # one request to the Hub's endpoint before a download; huggingface_hub's own retries
# of a failed request (5, sleeping 1 + 2 + 4 + 8 + 8 s, a warning each) would take ~23 s to say the same


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face Hub cannot be used now, or None when it can: "HF_HUB_OFFLINE is set" (read from the
    environment at the call), or "the Hub at <endpoint> cannot be reached: <error>" when one HEAD request to
    huggingface_hub's endpoint ($HF_ENDPOINT), through huggingface_hub's own session (its proxies), fails or takes
    over `timeout` seconds. Any HTTP answer counts as reachable. The request is made once per endpoint and its answer
    kept for the process, so a load that asks several times (the model, then its tokenizer) waits at most once."""
    hub = optional_import("huggingface_hub")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE") or \
            getattr(hub.constants, "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE is set"
    return _probe(hub.constants.ENDPOINT, timeout)


@functools.cache
def _probe(endpoint: str, timeout: float) -> str | None:
    """hub_unreachable's one HEAD request to `endpoint`, its answer cached per (endpoint, timeout)."""
    try:
        optional_import("huggingface_hub").utils.get_session().head(endpoint, timeout=timeout)
    except Exception as e:  # noqa: BLE001 (httpx / requests connection errors, timeouts, proxy errors)
        return f"the Hub at {endpoint} cannot be reached: {type(e).__name__}"
    return None


@contextlib.contextmanager
def hub_offline(on: bool = True) -> Iterator[None]:
    """While active (when `on`), huggingface_hub's offline mode (constants.HF_HUB_OFFLINE, which hf_hub_download
    reads at each call): files come from the cache only, with no request and no retries; restored on exit."""
    if not on:
        yield
        return
    constants = optional_import("huggingface_hub").constants
    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def prefix_names(model: nn.Module, prefix: int) -> list[str]:
    """The names of `model`'s first `prefix` tokens, in token order -> `prefix` strings: first, for a model whose
    head pools the tokens, the pool's query (models.any_vit's pseudo token: "pool query" for an attention pool,
    "average pool" for GAP), then "class token", "distillation token" (timm's `dist_token` of distilled DeiT,
    Touvron et al. 2021) and "register 1" .. "register R" (config["reg_tokens"], Darcet et al. 2024); "prefix token
    1" .. when the model's attributes do not account for `prefix` tokens."""
    config = getattr(model, "config", None) or {}
    names = []
    if getattr(model, "pool_query", False):
        names.append("average pool" if config.get("global_pool") == "avg" else "pool query")
    net = getattr(model, "model", model)  # the wrapped library model (timm's has dist_token / cls_token)
    distilled = isinstance(getattr(net, "dist_token", None), Tensor)
    registers = int(config.get("reg_tokens") or 0)
    classes = prefix - len(names) - distilled - registers  # timm: cls_token None (GAP) -> 0
    if classes not in (0, 1) or (classes and getattr(net, "cls_token", 0) is None):
        return [f"prefix token {i}" for i in range(1, prefix + 1)]
    return names + ["class token"] * classes + ["distillation token"] * distilled + \
        [f"register {i}" for i in range(1, registers + 1)]


def output_probability(model: nn.Module) -> str:
    """How the model's logits become probabilities: "sigmoid", one per output, for a head that says so (SigLIP's
    zero-shot head, models.clip.ZeroShotHead.probability: a sigmoid loss), else "softmax" over the outputs."""
    return getattr(getattr(model, "head", None), "probability", "softmax")


def probabilities(logits: Tensor, probability: str = "softmax") -> Tensor:
    """logits (..., K) -> probabilities (..., K), float32: a softmax over K, or a sigmoid for each ("sigmoid")."""
    return logits.float().sigmoid() if probability == "sigmoid" else logits.float().softmax(-1)


def pad_pseudo(a: Tensor) -> Tensor:
    """A block's attention over T tokens (B, h, T, T) -> (B, h, 1 + T, 1 + T) with the pool-query pseudo token 0,
    which attends only to itself and which nothing attends to."""
    out = a.new_zeros(*a.shape[:2], a.shape[-1] + 1, a.shape[-1] + 1)
    out[..., 0, 0] = 1
    out[..., 1:, 1:] = a
    return out


def pool_layer(pool: Tensor, heads: int) -> Tensor:
    """The pool query's attention (B, h', L, T) over the T tokens (L queries: their mean) -> the extra last layer
    (B, heads, 1 + T, 1 + T): row 0 is the query's row over the tokens (column 0: 0), the other rows the identity.
    h' != heads: every head holds the mean over the pool's heads."""
    p = pool.mean(2, keepdim=True)
    p = p if p.shape[1] == heads else p.mean(1, keepdim=True).expand(-1, heads, -1, -1)
    eye = torch.eye(p.shape[-1] + 1, dtype=p.dtype, device=p.device).expand(p.shape[0], heads, -1, -1)
    return torch.cat([torch.cat([p.new_zeros(*p.shape[:2], 1, 1), p], -1), eye[..., 1:, :]], -2)


def pool_through(full: Tensor, pool: Tensor) -> Tensor:
    """What the pool must use in place of its probabilities `pool` (B, h', L, T) so that its output is computed
    through `full` = pool_layer(pool, heads): the same values, and the gradient w.r.t. full's row 0 is the sum
    over the L queries (and, when h' != heads, the mean over the pool's heads) of the gradient w.r.t. pool."""
    row = full[:, :, :1, 1:]
    row = row if row.shape[1] == pool.shape[1] else row.mean(1, keepdim=True)
    return pool + (row - row.detach())


def with_pool_query(attn: list[Tensor], pool: Tensor) -> list[Tensor]:
    """Block attention over the tokens (B, h, N, N) per layer + the pool query's attention pool (B, h', L, N)
    -> L + 1 matrices (B, h, 1 + N, 1 + N) with a pseudo token 0 (see the module docstring).

    Made after the forward, these maps are not in the graph the logits came from (no gradient rollout through
    them). For that, make them during the forward: a block uses pad_pseudo(a)[..., 1:, 1:] in place of its
    probabilities a (a forward hook can return it), the pool uses pool_through(pool_layer(p, heads), p) in place
    of p (models.timm_vit does so)."""
    heads = attn[0].shape[1] if attn else pool.shape[1]
    return [pad_pseudo(a) for a in attn] + [pool_layer(pool, heads)]


class ViTAdapter(nn.Module):
    """The VisionTransformer interface around another library's model (subclasses: one per library).

    Subclasses set `model`, `blocks`, `patch_size`, `num_prefix_tokens`, `config`, `data_config` and implement
    `_features(x, want_attn) -> (tokens (B, T, D), attention list)` and `forward_head(tokens)`."""

    model: nn.Module
    blocks: nn.ModuleList
    patch_size: int
    num_prefix_tokens: int
    config: dict[str, Any]
    data_config: dict[str, Any]
    weights_note: str = "the wrapped model's weights"
    pool_query: bool = False  # True: token 0 is the pool-query pseudo token and the last layer is the pool's

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(grid_h, grid_w) of an image of height x width pixels; ValueError when not multiples of patch_size."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch_size={p}; resize or crop it "
                             f"to {height // p * p}x{width // p * p}.")
        return height // p, width // p

    def _features(self, x: Tensor, want_attn: bool) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    def forward_head(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_features(self, x: Tensor, return_attn: bool | str = False) -> tuple[Tensor, list[Tensor]]:
        """x: (B, C, H, W) -> (tokens (B, T, D) as the head reads them, every layer's attention (B, h, T, T) when
        return_attn, else [])."""
        self.check_input(x)
        return self._features(x, bool(return_attn))

    def check_input(self, x: Tensor) -> tuple[int, int]:
        """ValueError in one sentence unless x is (B, num_channels, H, W) with H, W multiples of patch_size;
        -> patch_grid(H, W)."""
        c = self.config["num_channels"]
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"input of shape {tuple(x.shape)} is not a batch (B, {c}, H, W) of {c}-channel images.")
        return self.patch_grid(*x.shape[-2:])

    def forward(self, x: Tensor, return_attn: bool | str = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """As VisionTransformer.forward: logits (B, K) (features when there is no head); return_attn=True adds
        every layer's attention (B, h, T, T), "cls" its row 0 (B, h, T)."""
        if return_attn not in (False, True, "cls"):
            raise ValueError(f"return_attn={return_attn!r} must be False, True or 'cls'.")
        tokens, attn = self.forward_features(x, return_attn)
        logits = self.forward_head(tokens)
        if return_attn == "cls":
            attn = [a[:, :, 0] for a in attn]
        return (logits, attn) if return_attn else logits


def wrap(model: nn.Module) -> nn.Module:
    """The interface for a model object: this repo's ViTs and adapters as they are; timm's ViT family ->
    models.timm_vit.TimmViT; open_clip models -> models.clip.wrap_open_clip; transformers models ->
    models.hf_vit.wrap_hf. UnsupportedModelError naming the class for anything else."""
    from models.vit import VisionTransformer

    if isinstance(model, ViTAdapter | VisionTransformer):
        return model
    library = type(model).__module__.split(".")[0]
    if library == "timm":
        from models.timm_vit import TimmViT
        return TimmViT(model)
    if library == "open_clip":
        from models.clip import wrap_open_clip
        return wrap_open_clip(model)
    if library == "transformers":
        from models.hf_vit import wrap_hf
        return wrap_hf(model)
    raise UnsupportedModelError(f"{type(model).__module__}.{type(model).__name__} is not a model of timm, "
                                f"transformers or open_clip, the libraries whose ViTs get the map interface.")
