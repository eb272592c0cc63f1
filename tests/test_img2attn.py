"""utils/img2attn.py: maps against brute-force references, a model that provably looks at one patch, rendering."""

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from attention.faithfulness import deletion_score
from attention.figures import attention_figure
from models.vit import VisionTransformer
from utils.img2attn import attention_rollout, cls_attention, explain, gradient_rollout, overlay, upsample
from utils.plots import save_figure

FUSIONS = ["mean", "max", "min"]


def random_attn(B=2, heads=3, layers=3, N=6, seed=0):
    """Random row-stochastic maps: list of (B, heads, 1+N, 1+N) float64."""
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(B, heads, 1 + N, 1 + N, generator=g, dtype=torch.float64)).softmax(-1)
            for _ in range(layers)]


def rollout_reference(attn, fusion, ratio, start_layer, grid):
    """attention_rollout with explicit loops, one image, row and entry at a time: (B, gh, gw)."""
    B, H, T, _ = attn[0].shape
    N = T - 1
    fuse = {"mean": lambda v: sum(v) / len(v), "max": max, "min": min}[fusion]
    maps = []
    for b in range(B):
        R = [[float(i == j) for j in range(T)] for i in range(T)]
        for a in attn[start_layer:]:
            A = [[fuse([float(a[b, h, i, j]) for h in range(H)]) for j in range(T)] for i in range(T)]
            for i in range(T):
                smallest = sorted(range(1, T), key=lambda j, i=i: A[i][j])[:math.floor(ratio * N + 1e-9)]
                for j in smallest:  # the class-token column 0 is never discarded
                    A[i][j] = 0.0
                A[i][i] += 1.0
                total = sum(A[i])
                A[i] = [v / total for v in A[i]]
                assert abs(sum(A[i]) - 1) < 1e-12
            R = [[sum(A[i][k] * R[k][j] for k in range(T)) for j in range(T)] for i in range(T)]  # R <- Â R
        maps.append(torch.tensor(R[0][1:], dtype=torch.float64).reshape(grid))
    return torch.stack(maps)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_rollout_matches_brute_force(fusion, ratio):
    attn = random_attn()
    for start in (0, 1):
        got = attention_rollout(attn, fusion, ratio, start_layer=start, grid=(2, 3))
        assert got.shape == (2, 2, 3)
        torch.testing.assert_close(got, rollout_reference(attn, fusion, ratio, start, (2, 3)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_rollout_of_identity_and_one_hot_attention(fusion, ratio):
    T, target = 1 + 6, 4  # patch 4 sits at row 1, column 1 of a 2 x 3 grid
    identity = [torch.eye(T, dtype=torch.float64).expand(2, 3, T, T)] * 3
    assert torch.all(attention_rollout(identity, fusion, ratio, grid=(2, 3)) == 0)  # uniform: nothing flows
    one_hot = torch.zeros(2, 3, T, T, dtype=torch.float64)
    one_hot[..., 1 + target] = 1  # every token attends to one patch only
    got = attention_rollout([one_hot] * 3, fusion, ratio, grid=(2, 3))
    want = torch.zeros(2, 2, 3, dtype=torch.float64)
    want[:, 1, 1] = 1 - 0.5**3  # three rounds of (A + I) / 2 move 1 - 1/8 of the class token's mass there
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_cls_attention_full_and_cls_rows_agree():
    attn = random_attn(N=12)
    rows = [a[:, :, 0] for a in attn]
    for layer, head in [(-1, None), (0, 2), (1, 0)]:
        want = attn[layer][:, :, 0, 1:] if head is None else attn[layer][:, head:head + 1, 0, 1:]
        want = want.mean(1).reshape(2, 3, 4)  # row-major: patch i*4 + j at [i, j]
        torch.testing.assert_close(cls_attention(attn, layer, head, grid=(3, 4)), want, rtol=0, atol=0)
        torch.testing.assert_close(cls_attention(rows, layer, head, grid=(3, 4)), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="square"):
        cls_attention(attn)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(attn, "median", grid=(3, 4))


def random_vit(dropout=0.1, seed=0):
    """Tiny float64 ViT on 8 x 12 RGB images (grid 2 x 3), weights large enough for peaked attention."""
    torch.manual_seed(seed)
    model = VisionTransformer(16, 32, 2, 3, 4, 3, 6, 5, dropout=dropout, grid_size=(2, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def gradient_rollout_reference(model, x, target, start_layer):
    """Chefer et al.'s rule, one image at a time with its own autograd.grad: (B, gh, gw)."""
    model.eval()
    maps = []
    for b in range(len(x)):
        logits, attn = model(x[b:b + 1], return_attn=True)
        grads = torch.autograd.grad(logits[0, target[b]], attn)
        R = torch.eye(attn[0].shape[-1], dtype=x.dtype)
        for g, a in list(zip(grads, attn, strict=True))[start_layer:]:
            cam = sum((g[0, h] * a[0, h]).clamp(min=0) for h in range(a.shape[1])) / a.shape[1]
            R = R + cam @ R
        maps.append(R[0, 1:].detach().reshape(2, 3))
    return torch.stack(maps)


def test_gradient_rollout_matches_per_image_autograd():
    model = random_vit()
    x = torch.randn(3, 3, 8, 12, dtype=torch.float64)
    model.train()
    model.head.weight.grad = marker = torch.full_like(model.head.weight, 7.0)
    with torch.no_grad():
        predicted = model.eval()(x).argmax(-1)
    model.train()
    for target, start in [(None, 0), (torch.tensor([4, 0, 2]), 1), (3, 2)]:
        got = gradient_rollout(model, x, target, start_layer=start)
        assert model.training
        assert model.head.weight.grad is marker and torch.all(marker == 7)
        assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
        t = predicted if target is None else torch.as_tensor(target).expand(3)
        want = gradient_rollout_reference(model, x, t, start)
        model.train()
        assert got.shape == (3, 2, 3) and want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        for b in range(3):  # the batch gives each image its own map
            single = gradient_rollout(model, x[b:b + 1], t[b:b + 1], start_layer=start)
            torch.testing.assert_close(got[b:b + 1], single, rtol=0, atol=1e-12)


def forced_vit(grid=(2, 3), patch=16, channels=3):
    """One-layer ViT that attends (every token, every head) to the brightest patch and answers class 0 iff it is
    there. Images are 0 with one patch of 1s; the mean-filled image (1/N everywhere) embeds to all-zero tokens.
    """
    N = grid[0] * grid[1]
    model = VisionTransformer(8, 8, 2, 1, patch, channels, N, 2, grid_size=grid)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.blocks[0].norm1, model.blocks[0].norm2, model.norm):
            norm.weight.fill_(1)
        model.patch_embed.proj.weight[0] = 1 / (channels * patch * patch)  # token dim 0: patch mean - 1/N
        model.patch_embed.proj.bias[0] = -1 / N
        model.cls_token[0, 0, 1] = 1
        qkv = model.blocks[0].attn.qkv.weight
        model.blocks[0].attn.qkv.bias[[0, 4]] = 1  # every query (both heads) asks for a large dim 0
        qkv[[8, 12], 0] = 20  # keys: the bright patch's is large, dark patches' negative
        qkv[[16, 20], 0] = 1  # values: the bright patch's moves the class token towards class 0
        model.blocks[0].attn.proj.weight.copy_(torch.eye(8))
        model.head.weight[0, 0] = model.head.weight[1, 1] = 5
    return model


def bright_patch_image(row, col, size=(32, 48), patch=16):
    x = torch.zeros(1, 3, *size)
    x[..., row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] = 1
    return x


def test_every_method_finds_the_patch_a_forced_model_uses():
    model = forced_vit()
    x = bright_patch_image(0, 2)  # 1 x 3 x 32 x 48, grid 2 x 3: the top-right patch
    grid = model.patch_grid(32, 48)
    assert grid == (2, 3)
    logits, attn = model(x, return_attn=True)
    assert logits.softmax(-1)[0, 0] > 0.99
    maps = [cls_attention(attn, grid=grid), gradient_rollout(model, x)]
    maps += [attention_rollout(attn, f, r, grid=grid) for f in FUSIONS for r in (0.0, 0.5)]
    for m in maps:
        assert m.shape == (1, 2, 3)
        assert m[0, 0, 2] > m[0].flatten().sort().values[-2] + 0.4  # first by far, not transposed

    best, worst = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    best[0, 0, 2] = 1
    worst[0, 0, 2] = 0
    deletion = [deletion_score(model, x, m, steps=6) for m in (best, worst)]
    insertion = [deletion_score(model, x, m, steps=6, mode="insertion") for m in (best, worst)]
    assert deletion[0] < 0.1 < 0.9 < deletion[1]
    assert insertion[0] > 0.9 > 0.1 > insertion[1]


def test_deletion_score_is_per_image_and_chunk_independent():
    model = random_vit(dropout=0.0).float()
    x = torch.randn(3, 3, 8, 12)
    heat = torch.rand(3, 2, 3)
    batch = deletion_score(model, x, heat, target=1, steps=3, batch_size=5)
    single = torch.cat([deletion_score(model, x[b:b + 1], heat[b:b + 1], 1, 3, batch_size=1) for b in range(3)])
    torch.testing.assert_close(batch, single)
    assert batch.shape == (3,) and torch.all((batch >= 0) & (batch <= 1))
    with pytest.raises(ValueError, match="heatmap"):
        deletion_score(model, x, torch.rand(3, 3, 5))


def test_upsample_and_overlay():
    heat = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]])
    up = upsample(heat, (32, 48))
    assert up.shape == (2, 32, 48) and up[0].min() == 0 and up[0].max() == 1 and torch.all(up[1] == 0)
    assert up[0, 0, 47] == 1 and up[0, 31, 0] == 0  # top-right stays top-right

    gray = np.zeros((32, 48), np.uint8)
    out = overlay(gray, heat[0], alpha=1.0)  # jet: 1 -> dark red (0.5, 0, 0), 0 -> dark blue (0, 0, 0.5)
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert out[0, 47].tolist() == [128, 0, 0] and out[31, 0].tolist() == [0, 0, 128]
    for image, h in [(torch.zeros(1, 32, 48), heat[0]), (np.zeros((32, 48, 3), np.uint8), heat[0:1]),
                     (torch.zeros(3, 32, 48), up[0])]:  # grayscale CHW, RGB HWC uint8, RGB CHW float, full-size map
        np.testing.assert_array_equal(overlay(image, h, alpha=1.0), out)
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 1] = 200  # a green image stays green where the heatmap is cold, under alpha = 0.5
    assert overlay(rgb, heat[0])[31, 0].tolist() == [0, 100, 64]


def test_attention_figure_png(tmp_path):
    model = forced_vit()
    x = bright_patch_image(1, 0)
    image = x[0].permute(1, 2, 0).numpy()
    fig = attention_figure(explain(model, x), image, class_names=["bright patch", "dark"], topk=2)
    assert isinstance(fig, Figure)
    save_figure(fig, tmp_path / "figs" / "attn.png")
    with Image.open(tmp_path / "figs" / "attn.png") as png:
        assert png.size[0] > 1000 and png.size[1] > 500


def test_attention_figure_colour_bars_span_each_map_and_title_names_the_true_class():
    model = forced_vit()
    x = bright_patch_image(1, 0)
    ex = explain(model, x)
    names = ["bright patch", "dark"]
    fig = attention_figure(ex, x[0], class_names=names, topk=2, label=1)
    upper = fig.subfigs[0]
    assert "true: dark" in upper._suptitle.get_text() and upper._suptitle.get_text().startswith("predicted: ")
    bars = {a.get_title(): c for a in upper.axes for c in a.child_axes}  # one colour bar under every map
    maps = {"attention rollout": ex.rollout[0], f"gradient rollout: {names[int(ex.target[0])]}":
            ex.gradient_rollout[0], f"token norm, layer {len(ex.attn)}": ex.token_norms[0, -1]}
    assert set(bars) == set(maps)
    for title, m in maps.items():
        ticks = bars[title].get_xticks()
        assert ticks[0] == pytest.approx(float(m.min())) and ticks[-1] == pytest.approx(float(m.max())), title
        assert bars[title].get_xlabel()  # says what the values are
    grid_bar = [a for a in fig.axes if a.get_ylabel() == "class-token attention"]
    assert len(grid_bar) == 1 and [t.get_text() for t in grid_bar[0].get_yticklabels()] == ["panel\nminimum",
                                                                                            "panel\nmaximum"]
    top5 = [t.get_text() for a in upper.axes for t in a.texts]
    assert "dark (true)" in top5  # the true class is marked among the top-k
    unknown = attention_figure(ex, x[0], class_names=names, topk=2)
    assert "true" not in unknown.subfigs[0]._suptitle.get_text()


def test_attention_figure_without_a_head_names_the_true_class_too():
    torch.manual_seed(0)
    model = VisionTransformer(16, 32, 2, 2, 4, 3, 6, 0, grid_size=(2, 3)).eval()
    ex = explain(model, torch.rand(1, 3, 8, 12))
    fig = attention_figure(ex, torch.rand(8, 12, 3), class_names=["a", "b"], label=0)
    assert fig.subfigs[0]._suptitle.get_text() == "no classification head: attention maps only   true: a"
    assert len([c for a in fig.subfigs[0].axes for c in a.child_axes]) == 2  # rollout and token norm


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_gradient_maps_under_no_grad_and_inference_mode(context):
    from utils.img2attn import explain

    model = forced_vit()
    x = bright_patch_image(2, 0)
    want = gradient_rollout(model, x, target=0)
    with context():
        got, ex = gradient_rollout(model, x, target=0), explain(model, x, target=0)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ex.gradient_rollout, want, rtol=1e-5, atol=1e-6)
