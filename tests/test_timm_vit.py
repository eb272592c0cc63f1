"""models.timm_vit: timm's ViT family through the VisionTransformer interface (issue #22).

Per family a small random-weight instance from timm itself (depth 2, width 64): the logits equal timm's own fused
forward; every layer's attention equals a recomputation from the q and k that hooks on timm's q_norm / k_norm
modules see (RoPE applied with timm's own function); the maps have the grid's shape at the native and a
non-square size; load_pretrained("timm/...") reads a pre-filled Hugging Face cache without a request.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from attention.faithfulness import deletion_score  # noqa: E402
from attention.inspection import attention_stats  # noqa: E402
from models.any_vit import UnsupportedModelError, wrap  # noqa: E402
from models.timm_vit import TimmViT  # noqa: E402
from utils.img2attn import attention_rollout, cls_attention, explain, gradient_rollout, token_norms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(pretrained=False, depth=2, embed_dim=64, num_heads=2, num_classes=10)
# family: (timm name, extra kwargs, what it exercises)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=64), "class token"),
    "registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=56), "4 registers, no_embed_class, LayerScale"),
    "gap_fc_norm": ("vit_tiny_patch16_224", dict(img_size=64, global_pool="avg"), "class token unused, fc_norm"),
    "gap_no_class": ("vit_medium_patch16_gap_256", dict(img_size=64), "no class token, average pooling"),
    "deit": ("deit_tiny_patch16_224", dict(img_size=64), "DeiT"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64), "class + distillation token"),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56), "RoPE, SwiGLU, average pooling"),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", dict(img_size=64), "CLIP tower: norm_pre, QuickGELU"),
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=64), "no class token, map attention-pool head"),
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", dict(img_size=64), "SigLIP, average pooling"),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64), "Eva: DINOv3 RoPE, storage tokens"),
    "parallel_scaling": ("vit_pwee_patch16_reg1_gap_256", dict(img_size=64), "ParallelScalingBlock, RmsNorm q/k"),
}


def build(family: str, **extra) -> torch.nn.Module:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL, **kwargs, **extra).eval()
    with torch.no_grad():  # timm zero-inits some parts (heads, latents' biases): make every weight matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def qk_hooks(model: torch.nn.Module) -> tuple[list, list]:
    """Hooks on every attention's q_norm / k_norm (the attn pool's last): lists of (module, q) and (module, k)."""
    qs, ks = [], []
    for m in model.modules():
        if hasattr(m, "fused_attn") and hasattr(m, "q_norm"):
            m.q_norm.register_forward_hook(lambda mod, i, o, m=m: qs.append((m, o)))
            m.k_norm.register_forward_hook(lambda mod, i, o, m=m: ks.append((m, o)))
    return qs, ks


def recompute(model: torch.nn.Module, qs: list, ks: list, grid: tuple[int, int]) -> list[torch.Tensor]:
    """softmax(q·scale @ kᵀ) per hooked attention, RoPE applied as timm's Eva does (patches only; `model`'s RoPE
    table, which for a grid other than its own must be a model built with dynamic_img_size=True)."""
    from timm.layers import apply_rot_embed_cat

    rope = model.rope.get_embed(shape=list(grid)) if getattr(model, "rope", None) is not None else None
    out = []
    for (m, q), (_, k) in zip(qs, ks, strict=True):
        if type(m).__name__ == "ParallelScalingBlock":  # its q_norm / k_norm see (B, N, heads, head_dim)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rope is not None and hasattr(m, "num_prefix_tokens"):
            n, half = m.num_prefix_tokens, getattr(m, "rotate_half", False)
            q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=half)], dim=2)
            k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=half)], dim=2)
        out.append(((q * m.scale) @ k.transpose(-2, -1)).softmax(-1))
    return out


def check_attention(wrapped: TimmViT, attn: list, ref: list, grid: tuple[int, int]) -> None:
    """Every block's map equals the recomputation; a pool query's token and last layer are as documented."""
    model, (gh, gw) = wrapped.model, grid
    pseudo = wrapped.pool != "token"
    assert wrapped.pool_query == pseudo and len(attn) == len(model.blocks) + pseudo
    assert wrapped.num_prefix_tokens + gh * gw == attn[0].shape[-1]
    for a, r in zip(attn[:len(model.blocks)], ref, strict=False):
        torch.testing.assert_close(a[:, :, 1:, 1:] if pseudo else a, r, rtol=0, atol=1e-5)
        if pseudo:  # the pool-query token attends only to itself and nothing attends to it
            assert torch.all(a[:, :, 0, 0] == 1) and torch.all(a[:, :, 1:, 0] == 0)
    if wrapped.pool == "map":  # the last layer's row 0 is the attention pool's query over the patches
        torch.testing.assert_close(attn[-1][:, :, 0, 1:], ref[-1][:, :, 0], rtol=0, atol=1e-5)
    if wrapped.pool == "avg":  # uniform over what the pool averages: the patches (prefix tokens get 0)
        row, skip = attn[-1][:, :, 0, 1:], model.num_prefix_tokens
        assert torch.all(row[..., :skip] == 0)
        torch.testing.assert_close(row[..., skip:], torch.full_like(row[..., skip:], 1 / (gh * gw)))
    rows = torch.stack([a.sum(-1) for a in attn])
    torch.testing.assert_close(rows, torch.ones_like(rows))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_attention_equal_timm(family):
    model = build(family)
    wrapped = TimmViT(model)
    gh, gw = wrapped.grid_size
    x = torch.randn(2, 3, gh * wrapped.patch_size, gw * wrapped.patch_size)
    with torch.no_grad():
        want = model(x)  # timm's own forward, its fused path
        qs, ks = qk_hooks(model)
        logits, attn = wrapped(x, return_attn=True)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(wrapped(x), want, rtol=0, atol=1e-5)
    check_attention(wrapped, attn, recompute(model, qs, ks, (gh, gw)), (gh, gw))


@pytest.mark.parametrize("family", ["registers", "eva02", "siglip", "dinov3", "gap_no_class"])
def test_non_square_size_equals_timm_dynamic(family):
    """Another size runs timm's dynamic_img_size path: equal to timm's model built with dynamic_img_size=True."""
    model = build(family)
    dynamic = build(family, dynamic_img_size=True)
    dynamic.load_state_dict(model.state_dict())
    wrapped = TimmViT(model)
    p, flags = wrapped.patch_size, (model.dynamic_img_size, model.patch_embed.strict_img_size)
    x = torch.randn(2, 3, 3 * p, 5 * p)
    with torch.no_grad():
        qs, ks = qk_hooks(model)
        logits, attn = wrapped(x, return_attn=True)
        torch.testing.assert_close(logits, dynamic(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(wrapped(x), logits, rtol=0, atol=1e-5)
    assert (model.dynamic_img_size, model.patch_embed.strict_img_size) == flags  # switched back after the call
    check_attention(wrapped, attn, recompute(dynamic, qs, ks, (3, 5)), (3, 5))


@pytest.mark.parametrize("family", ["vit", "registers", "gap_fc_norm", "eva02", "siglip", "deit_distilled"])
def test_maps_have_the_grid_shape(family):
    wrapped = TimmViT(build(family))
    p = wrapped.patch_size
    for gh, gw in (tuple(wrapped.grid_size), (3, 5)):
        x = torch.randn(2, 3, gh * p, gw * p)
        grad = gradient_rollout(wrapped, x, target=3)
        ex = explain(wrapped, x, target=3)
        assert grad.shape == ex.rollout.shape == (2, gh, gw) and ex.token_norms.shape == (2, 2, gh, gw)
        torch.testing.assert_close(ex.gradient_rollout, grad, rtol=1e-5, atol=1e-7)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        with torch.no_grad():
            _, attn = wrapped(x, return_attn=True)
            _, rows = wrapped(x, return_attn="cls")
        roll = attention_rollout(attn, grid=(gh, gw))  # no prefix_tokens: the grid says it
        torch.testing.assert_close(roll, ex.rollout)
        torch.testing.assert_close(cls_attention(rows, grid=(gh, gw)), cls_attention(attn, grid=(gh, gw)))
        assert token_norms(wrapped, x).shape == (2, 2, gh, gw)
    stats = attention_stats(wrapped, x)
    assert stats["distance"].shape == (len(attn) - wrapped.pool_query, 2) and stats["grid"] == (3, 5)  # blocks only
    score = deletion_score(wrapped, x, grad, steps=2)
    assert score.shape == (2,) and torch.all((score >= 0) & (score <= 1))


def test_gradient_rollout_uses_the_attention_the_model_used():
    """The maps are in the graph of the logits: the gradient w.r.t. each layer is not zero (SigLIP's pool too)."""
    wrapped = TimmViT(build("siglip"))
    x = torch.randn(1, 3, 64, 64)
    logits, attn = wrapped(x, return_attn=True)
    grads = torch.autograd.grad(logits[0, 3], attn)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(g[:, :, 0, 0].abs().sum() == 0 for g in grads[:-1])  # the pseudo token's own entry changes nothing


def test_wrapped_model_is_left_as_it_was():
    model = build("eva02")
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    wrapped = TimmViT(model)
    explain(wrapped, torch.randn(1, 3, 42, 70))
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == flags
    assert not any(m._forward_hooks for m in model.modules())
    assert wrap(model).model is model and wrap(wrapped) is wrapped


def test_data_config_and_config():
    wrapped = TimmViT(build("clip_quickgelu"))
    assert wrapped.data_config["input_size"] == (3, 64, 64)
    assert wrapped.data_config["mean"] == timm.data.OPENAI_CLIP_MEAN
    assert wrapped.config["num_classes"] == 10 and wrapped.config["num_layers"] == 2
    assert wrapped.patch_grid(64, 48) == (4, 3)
    with pytest.raises(ValueError, match="multiple of patch_size=16"):
        wrapped(torch.randn(1, 3, 64, 50))


@pytest.mark.parametrize("name, kwargs, words", [
    ("beit_base_patch16_224", {}, "not of the VisionTransformer / Eva family"),
    ("vit_small_patch16_18x2_224", {}, "parallel attention branches"),
    ("vit_tiny_patch16_224", dict(global_pool="max", class_token=False), "max pooling"),
    ("vit_tiny_r_s16_p8_224", {}, "hybrid ViT"),
    ("vit_dwee_patch16_reg1_gap_256", {}, "differential attention"),
    ("vit_dpwee_patch16_reg1_gap_256", {}, "differential attention"),
    ("vit_tiny_patch16_224", dict(global_pool="prr"), "AttentionPoolPrr"),
])
def test_unsupported_families_are_named(name, kwargs, words):
    model = timm.create_model(name, pretrained=False, depth=1, **kwargs) if "r_s16" not in name else \
        timm.create_model(name, pretrained=False)
    with pytest.raises(UnsupportedModelError, match=words) as info:
        TimmViT(model)
    assert "\n" not in str(info.value)


# --- load_pretrained("timm/...") through the Hugging Face cache ------------------------------------------------

LOAD = textwrap.dedent("""
    import socket, sys
    def refuse(*args, **kwargs):
        raise AssertionError("a network request was made")
    socket.socket.connect = refuse
    socket.create_connection = refuse
    import torch
    from models.pretrained import load_pretrained
    from utils.checkpoint import CheckpointError
    try:
        model = load_pretrained(sys.argv[1])
    except CheckpointError as e:
        print("ERROR", e)
        sys.exit(3)
    torch.save({"logits": model(torch.load(sys.argv[2]))}, sys.argv[3])
    print(type(model).__name__, model.weights_note)
""")


def run_load(tmp_path: Path, hf_home: Path, name: str, x: torch.Tensor, **env_vars: str) -> subprocess.CompletedProcess:
    """load_pretrained(name) in a fresh process (huggingface_hub reads its environment at import); env_vars: the
    environment to change (default HF_HUB_OFFLINE=1; "" removes a variable)."""
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, HF_HOME=str(hf_home), PYTHONPATH=str(REPO), **{"HF_HUB_OFFLINE": "1", **env_vars})
    env.pop("HF_HUB_CACHE", None)
    env = {k: v for k, v in env.items() if v != ""}
    return subprocess.run([sys.executable, "-c", LOAD, name, str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_timm_name_loads_from_a_prefilled_cache_without_a_request(tmp_path):
    from timm.models import save_for_hf

    name = "vit_tiny_patch16_224.augreg_in21k"
    model = build("vit")
    folder = tmp_path / "save"
    save_for_hf(model, str(folder), model_args=dict(depth=2, embed_dim=64, num_heads=2, num_classes=10, img_size=64),
                safe_serialization=True)
    repo = tmp_path / "hf" / "hub" / f"models--timm--{name}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snapshot = repo / "snapshots" / rev
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snapshot / f).write_bytes((folder / f).read_bytes())
    assert json.loads((snapshot / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
    x = torch.randn(2, 3, 64, 64)
    done = run_load(tmp_path, tmp_path / "hf", f"timm/{name}", x)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("TimmViT released weights (timm/vit_tiny_patch16_224.augreg_in21k")
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt")["logits"], model(x), rtol=0, atol=1e-5)


def test_timm_name_missing_from_an_empty_cache_says_what_to_download(tmp_path):
    done = run_load(tmp_path, tmp_path / "empty", "timm/vit_base_patch16_siglip_224.webli", torch.randn(1, 3, 8, 8))
    assert done.returncode == 3, done.stdout + done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and "Traceback" not in done.stderr
    assert "timm/vit_base_patch16_siglip_224.webli" in line and "hf download" in line
    assert str(tmp_path / "empty" / "hub") in line and "HF_HUB_OFFLINE" in line


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_timm_name_with_an_unreachable_hub_fails_at_once_in_one_line(tmp_path):
    """No HF_HUB_OFFLINE, the Hub at a closed port: one short request, then the cache only; no retries (which
    would print 5 warnings over ~23 s), the one line says why."""
    done = run_load(tmp_path, tmp_path / "empty", "timm/vit_base_patch16_siglip_224.webli", torch.randn(1, 3, 8, 8),
                    HF_HUB_OFFLINE="", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert done.returncode == 3, done.stdout + done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and "Retrying" not in done.stderr and "Traceback" not in done.stderr
    assert "cannot be reached" in line and "hf download timm/vit_base_patch16_siglip_224.webli" in line


@pytest.mark.parametrize("name, words", [("timm/vit_tiny_patch16_2244", "did you mean 'timm/vit_tiny_patch16_224'"),
                                         ("timm/vit_tiny_patch16_224.nope", "its tags: augreg_in21k")])
def test_bad_timm_names_are_one_line(name, words):
    from models.pretrained import load_pretrained
    from utils.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=words) as info:
        load_pretrained(name)
    assert "\n" not in str(info.value)


def test_load_pretrained_wraps_a_timm_object():
    from models.pretrained import load_pretrained

    model = build("siglip")
    wrapped = load_pretrained(model)
    assert isinstance(wrapped, TimmViT) and wrapped.model is model


def test_maps_equal_timms_attention_extract():
    """The maps equal those of timm's own AttentionExtract (fx, on the explicit path) on the same model."""
    from timm.utils import AttentionExtract

    model = build("registers")
    wrapped = TimmViT(model)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        _, attn = wrapped(x, return_attn=True)
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        theirs = list(AttentionExtract(model)(x).values())
    assert len(theirs) == len(attn)
    for a, b in zip(attn, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_without_timm_one_line_names_the_pip_install(monkeypatch):
    from models.any_vit import MissingLibraryError
    from models.pretrained import load_pretrained

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails as if it were not installed
    with pytest.raises(MissingLibraryError, match="pip install timm$"):
        load_pretrained("timm/vit_tiny_patch16_224")


def test_legrad_through_the_wrapper_equals_legrad_on_our_vit():
    from attention.legrad import legrad
    from models.pretrained import load_pretrained

    timm_model = build("vit")
    ours = load_pretrained(timm_model.state_dict(), num_heads=2).eval()
    x = torch.randn(2, 3, 64, 64)
    np.testing.assert_allclose(legrad(wrap(timm_model), x, target=3).numpy(), legrad(ours, x, target=3).numpy(),
                               atol=1e-5)
    assert wrap(build("siglip")).layer_logits is None  # LeGrad's read-out is not defined for pool heads


def test_statistics_of_a_pool_query_model_leave_the_pool_layer_out():
    wrapped, x = wrap(build("siglip")), torch.randn(2, 3, 64, 64)
    stats = attention_stats(wrapped, x, rollout=2)
    assert stats["distance"].shape == (2, 2) and stats["rollout"].shape == (2, 4, 4)
    assert bool((stats["entropy"] > 0).all())  # the pool's extra layer (identity rows: entropy 0) is not counted


@pytest.mark.parametrize("family", ["vit", "clip_quickgelu", "registers"])
def test_last_block_updating_the_class_token_alone_changes_nothing(family):
    wrapped = TimmViT(build(family))
    x = torch.randn(2, 3, *(g * wrapped.patch_size for g in wrapped.grid_size))
    assert wrapped._cls_only and not TimmViT(build("gap_fc_norm"))._cls_only  # a pool reads every token
    with torch.no_grad():
        tokens, full = wrapped.forward_features(x, return_attn=True)  # every token through every block
        logits, attn = wrapped(x, return_attn=True)
        _, rows = wrapped(x, return_attn="cls")
    torch.testing.assert_close(logits, wrapped.forward_head(tokens), rtol=1e-5, atol=1e-6)
    for a, b, r in zip(attn, full, rows, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(r, b[:, :, 0])
