"""attention/legrad.py: LeGrad against a loop written from the paper's rule (this repo's ViT) and against the
authors' package legrad-torch on a random open_clip CLIP (skipped where legrad-torch is not installed)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from attention.legrad import legrad
from models.vit import VisionTransformer


def tiny_vit(seed=0, classes=5):
    torch.manual_seed(seed)
    model = VisionTransformer(embed_dim=32, hidden_dim=64, num_heads=4, num_layers=3, patch_size=4, num_channels=3,
                              num_patches=16, num_classes=classes, reg_tokens=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def reference(model, x, target, start_layer=0):
    """One image at a time, one forward per layer: s_l = head(norm(z_l))[target], ReLU(ds_l/dA_l), mean over heads
    and queries, patch columns, summed over layers, min-max scaled."""
    maps = []
    for b in range(len(x)):
        total = 0
        for layer in range(start_layer, len(model.blocks)):
            img = x[b:b + 1].clone().requires_grad_()
            z = model.patch_embed.proj(img).flatten(2).transpose(1, 2)
            z = torch.cat([model.cls_token, model.reg_token, z], 1) + model.pos_embed
            for i, block in enumerate(model.blocks):
                z, a = block(z, True)
                if i == layer:
                    break
            score = model.head(model.norm(z)[:, 0])[0, target[b]]
            g = torch.autograd.grad(score, a)[0][0]  # (heads, T, T)
            total = total + g.clamp(min=0).mean(0).mean(0)[model.num_prefix_tokens:]
        m = total.reshape(4, 4)
        maps.append((m - m.min()) / (m.max() - m.min()))
    return torch.stack(maps)


@pytest.mark.parametrize("start_layer", [0, 2])
def test_legrad_equals_the_rule_batched(start_layer):
    model = tiny_vit()
    x = torch.randn(3, 3, 16, 16)
    target = torch.tensor([0, 3, 4])
    ours = legrad(model, x, target, start_layer=start_layer)
    assert ours.shape == (3, 4, 4) and float(ours.min()) == 0.0 and float(ours.max()) == pytest.approx(1.0)
    assert torch.allclose(ours, reference(model, x, target, start_layer), atol=1e-5)
    single = torch.cat([legrad(model, x[i:i + 1], int(target[i]), start_layer) for i in range(3)])
    assert torch.allclose(ours, single, atol=1e-5)  # the batch is each image's own map


def test_default_target_is_the_prediction_and_state_is_kept():
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 24)  # non-square: a 4 x 6 grid
    model.train()
    with torch.no_grad():
        out = legrad(model, x)
    assert model.training and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        pred = model.eval()(x).argmax(-1)
    assert out.shape == (2, 4, 6) and torch.allclose(out, legrad(model, x, pred))


def test_errors():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="no head"):
        legrad(tiny_vit(classes=0), x)
    with pytest.raises(ValueError, match="start_layer=3"):
        legrad(tiny_vit(), x, start_layer=3)
    with pytest.raises(ValueError, match="target 7"):
        legrad(tiny_vit(), x, target=7)


def test_equals_the_authors_package_on_open_clip():
    """legrad-torch 1.1 (pip install legrad-torch --no-deps einops opencv-python-headless: it pins
    open_clip_torch<=2.23 but runs with 3.3), LeWrapper(layer_index=0).compute_legrad_clip: all layers, the map
    upsampled to pixels (bilinear) then min-max scaled; ours, upsampled and scaled the same way, equals it."""
    open_clip = pytest.importorskip("open_clip")
    authors = pytest.importorskip("legrad")
    from models.clip import with_prompts, wrap_open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=3,
                                                        head_width=16),
                          text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)).eval()
    prompts = ["a dog", "a cat", "a red bicycle"]
    model = with_prompts(wrap_open_clip(clip), prompts)
    theirs_model = authors.LeWrapper(copy.deepcopy(clip), layer_index=0)  # it rewires the model's forwards
    with torch.no_grad():
        text = F.normalize(theirs_model.encode_text(open_clip.SimpleTokenizer()(prompts)), dim=-1)
    x = torch.randn(1, 3, 32, 32)
    for t in range(3):
        theirs = theirs_model.compute_legrad_clip(text[t:t + 1], x).detach()[0, 0]  # (32, 32)
        ours = F.interpolate(legrad(model, x, t, normalize=False)[:, None], scale_factor=8, mode="bilinear")[0, 0]
        ours = (ours - ours.min()) / (ours.max() - ours.min())
        assert torch.allclose(ours, theirs, atol=1e-5)
