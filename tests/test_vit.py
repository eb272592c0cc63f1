"""The core model: timm / torchvision parity, attention paths, input sizes, config errors, the loader."""

from pathlib import Path

import pytest
import torch
from torch import nn

from models.pretrained import CheckpointError, load_pretrained, read_checkpoint
from models.vit import VisionTransformer
from utils.img_to_patch import img_to_patch, patch_to_img

timm = pytest.importorskip("timm")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOL = dict(atol=1e-5, rtol=0)
SMALL = dict(embed_dim=48, hidden_dim=96, num_heads=3, num_layers=3, patch_size=4, num_channels=3,
             num_patches=64, num_classes=7)


def small_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(**{**SMALL, **kw}).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a wrong mapping cannot hide behind zeros
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def timm_twin(model: VisionTransformer, img_size) -> nn.Module:
    """timm's ViT with the same weights, explicit attention, capturing every layer's softmax probabilities."""
    c = model.config
    twin = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=c["patch_size"], in_chans=c["num_channels"], num_classes=c["num_classes"],
        embed_dim=c["embed_dim"], depth=c["num_layers"], num_heads=c["num_heads"],
        mlp_ratio=c["hidden_dim"] / c["embed_dim"], dynamic_img_size=True).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    twin.maps = []
    for block in twin.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, inp, out: twin.maps.append(inp[0]))
    return twin


@pytest.mark.parametrize("size", [(32, 32), (48, 40), (20, 36)])
def test_matches_timm_logits_and_every_attention_map(size):
    model = small_vit()
    twin = timm_twin(model, 32)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits, maps = model(x, return_attn=True)
        expected = twin(x)
    torch.testing.assert_close(logits, expected, **TOL)
    assert len(maps) == len(twin.maps) == 3
    for ours, theirs in zip(maps, twin.maps, strict=True):
        assert ours.shape == (2, 3, 1 + size[0] // 4 * size[1] // 4, 1 + size[0] // 4 * size[1] // 4)
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_training_gradients_match_timm():
    model = small_vit().train()
    twin = timm_twin(model, 32).train()
    for block in twin.blocks:
        block.attn.fused_attn = True
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    theirs = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_fused_explicit_and_cls_paths_agree():
    model = small_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        explicit, maps = model(x, return_attn=True)
        cls_logits, rows = model(x, return_attn="cls")
    torch.testing.assert_close(explicit, fused, **TOL)
    torch.testing.assert_close(cls_logits, fused, atol=0, rtol=0)
    for full, row in zip(maps, rows, strict=True):
        assert row.shape == full[:, :, 0].shape
        torch.testing.assert_close(row, full[:, :, 0], **TOL)
        torch.testing.assert_close(full.sum(-1), torch.ones(full.shape[:-1]), **TOL)
    for block in model.blocks:  # the explicit softmax without maps (fused_attn=False): same numbers
        block.attn.fused_attn = False
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused, **TOL)
        unfused_logits, unfused_rows = model(x, return_attn="cls")
    torch.testing.assert_close(unfused_logits, fused, **TOL)
    for a, b in zip(unfused_rows, rows, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_batch_equals_single_images():
    model = small_vit()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        logits, maps = model(x, return_attn=True)
        for i in range(4):
            one, one_maps = model(x[i:i + 1], return_attn=True)
            torch.testing.assert_close(one, logits[i:i + 1], **TOL)
            for a, b in zip(one_maps, maps, strict=True):
                torch.testing.assert_close(a, b[i:i + 1], **TOL)


def test_returned_attention_is_differentiable():
    model = small_vit()
    logits, maps = model(torch.randn(1, 3, 32, 32), return_attn=True)
    grads = torch.autograd.grad(logits[0, 0], maps)
    assert all(g.shape == m.shape and g.abs().sum() > 0 for g, m in zip(grads, maps, strict=True))


def test_defaults_change_nothing_in_training_mode():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), model.eval()(x), atol=0, rtol=0)
    noisy = VisionTransformer(**SMALL, dropout=0.1, attn_dropout=0.1, drop_path_rate=0.2).train()
    with torch.no_grad():
        assert not torch.equal(noisy(x), noisy(x))
        logits, maps = noisy(x, return_attn=True)  # maps are taken before attention dropout
        torch.testing.assert_close(maps[0].sum(-1), torch.ones(maps[0].shape[:-1]), **TOL)


def test_timm_init_statistics():
    model = VisionTransformer(192, 768, 3, 12, 16, 3, 196, 1000)
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() <= 2.0
    assert model.cls_token.abs().max() < 1e-4 and abs(model.pos_embed.std().item() - 0.02) < 0.002
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, nn.Linear))


def test_img_to_patch_round_trip_and_model_patch_order():
    x = torch.randn(2, 3, 12, 20)
    patches = img_to_patch(x, 4)
    assert patches.shape == (2, 15, 48) and img_to_patch(x, 4, flatten_channels=False).shape == (2, 15, 3, 4, 4)
    torch.testing.assert_close(patch_to_img(patches, (3, 5), 4), x, atol=0, rtol=0)
    torch.testing.assert_close(patch_to_img(img_to_patch(x, 4, False), (3, 5), 4), x, atol=0, rtol=0)
    # The model's token i+1 is patch i: the patch-embedding conv is a linear map of img_to_patch's rows.
    model = small_vit(num_patches=15, grid_size=(3, 5))
    proj = model.patch_embed.proj
    tokens = proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patches @ proj.weight.flatten(1).T + proj.bias, tokens, **TOL)
    scores = torch.arange(30.0).reshape(2, 15)
    assert patch_to_img(scores, (3, 5))[1, 2, 0] == 25.0  # row 2, column 0 of image 1 = patch 10


def test_matches_torchvision_through_the_converter():
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

    torch.manual_seed(0)
    tv = TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                        num_classes=10).eval()
    with torch.no_grad():
        for p in tv.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = load_pretrained(tv.state_dict(), num_heads=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), **TOL)


def test_loader_formats(tmp_path):
    model = small_vit()
    sd = model.state_dict()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)

    def check(obj, **kw):
        loaded = load_pretrained(obj, **kw).eval()
        with torch.no_grad():
            return loaded(x)

    torch.testing.assert_close(check(sd, num_heads=3), expected, atol=0, rtol=0)
    torch.testing.assert_close(check({"model": sd}, num_heads=3), expected, atol=0, rtol=0)  # DeiT release
    torch.testing.assert_close(check({"module." + k: v for k, v in sd.items()}, num_heads=3), expected, atol=0, rtol=0)
    path = tmp_path / "ours.pth"
    torch.save({"model_config": model.config, "model": sd, "epoch": 3}, path)
    torch.testing.assert_close(check(path), expected, atol=0, rtol=0)
    ema = {"module." + k: v for k, v in sd.items()} | {"n_averaged": torch.tensor(5)}
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.testing.assert_close(check({"model_config": model.config, "model": other, "ema_model": ema,
                                      "reported_weights": "ema"}), expected)
    # DINO: no classifier; its teacher holds backbone.* plus a projection head to drop.
    backbone = {k: v for k, v in sd.items() if not k.startswith("head.")}
    features = load_pretrained(backbone, num_heads=3).eval()
    assert features.config["num_classes"] == 0
    with torch.no_grad():
        assert features(x).shape == (1, 48)
    dino = {"teacher": {"backbone." + k: v for k, v in backbone.items()} | {"head.mlp.0.weight": torch.ones(4, 48)},
            "student": {"module.backbone." + k: v for k, v in backbone.items()}, "epoch": 100}
    torch.testing.assert_close(load_pretrained(dino, num_heads=3).eval()(x), features(x))
    torch.testing.assert_close(load_pretrained({"student": dino["student"]}, num_heads=3).eval()(x), features(x))


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), (b"hello, I am a text file\n", "not a readable PyTorch checkpoint"),
    (b"", "is empty"), ("folder", "is a folder, not a checkpoint file"),
    ("truncated", "not a readable PyTorch checkpoint"), ("list", "not a checkpoint dict"),
    ("foreign", "not a ViT checkpoint: it has no patch_embed.proj.weight; its keys are such as conv1.weight"),
    ("distilled", "distillation token .distilled DeiT.")])
def test_loader_errors(tmp_path, content, message):
    path = tmp_path / "ckpt.pth"
    sd = small_vit().state_dict()
    if content == "truncated":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif content == "folder":
        path.mkdir()
    elif content == "list":
        torch.save([1, 2], path)
    elif content == "foreign":
        torch.save({"conv1.weight": torch.zeros(3)}, path)
    elif content == "distilled":
        torch.save(sd | {"dist_token": torch.zeros(1, 1, 48)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(path)
    if content is None:
        with pytest.raises(CheckpointError, match="does not exist"):
            read_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=5), "embed_dim=48 is not divisible by num_heads=5"),
    (dict(embed_dim=0), "embed_dim=0 must be a positive integer"),
    (dict(num_layers=-1), "num_layers=-1 must be a positive integer"),
    (dict(patch_size=0), "patch_size=0 must be a positive integer"),
    (dict(num_classes=-2), "num_classes=-2 must be a non-negative integer"),
    (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout=-0.1 must be in \[0, 1\)"),
    (dict(drop_path_rate=1.5), r"drop_path_rate=1.5 must be in \[0, 1\)"),
    (dict(num_patches=60), "num_patches=60 is not a square number; pass grid_size"),
    (dict(num_patches=60, grid_size=(7, 8)), "grid_size=.7, 8. does not hold num_patches=60"),
    (dict(pos_embed_interp="bilinear"), "pos_embed_interp='bilinear' must be one of timm, dino, dinov2"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VisionTransformer(**{**SMALL, **kwargs})


def test_no_divisibility_by_three_heads_needed():
    model = VisionTransformer(embed_dim=64, hidden_dim=100, num_heads=4, num_layers=1, patch_size=7,
                              num_channels=1, num_patches=16, num_classes=10)  # 64 % 12 != 0, 100 % 12 != 0
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_input_errors():
    model = small_vit()
    with pytest.raises(ValueError, match="image size 30x32 is not a multiple of patch_size=4"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="return_attn='all' must be False, True or 'cls'"):
        model(torch.randn(1, 3, 32, 32), return_attn="all")


def test_non_square_training_grid():
    model = small_vit(num_patches=40, grid_size=(5, 8))
    assert model.patch_grid(20, 32) == (5, 8)
    twin = timm_twin(model, (20, 32))
    x = torch.randn(2, 3, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), **TOL)
        torch.testing.assert_close(model(torch.randn(1, 3, 28, 24)).shape, torch.Size([1, 7]))


# Real DeiT-tiny weights against timm's deit_tiny_patch16_224 on real photos.
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")


@needs_data
def test_deit_tiny_real_weights_match_timm():
    from PIL import Image
    from torchvision.transforms import v2

    weights = SHARED / "weights" / "deit_tiny_patch16_224_lnq.pth"
    model = VisionTransformer(192, 768, 3, 12, 16, 3, 196, 1000).eval()
    model.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    loaded = load_pretrained(weights).eval()
    twin = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    twin.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    tf = v2.Compose([v2.ToImage(), v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(224),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    files = [SHARED / "photos" / "dog_and_cat.png"] + sorted((SHARED / "imagenet-samples").glob("*.JPEG"))[::250]
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        ours, theirs = model(x), twin(x)
        torch.testing.assert_close(loaded(x), ours, atol=0, rtol=0)
        torch.testing.assert_close(model(x, return_attn="cls")[0], ours, atol=0, rtol=0)
        torch.testing.assert_close(model(x, return_attn=True)[0], ours, atol=1e-4, rtol=0)
    # 12 real layers, logits up to ~15: float32 summation order (timm's fused kernel vs ours) reaches ~1.5e-5.
    torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=0)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))


def test_wrong_channels_or_dimensions_are_named():
    model = VisionTransformer(16, 32, 2, 1, 4, 3, 4, 10)
    with pytest.raises(ValueError, match=r"not a batch \(B, 3, H, W\) of 3-channel images; give 3-channel images "
                                         r"\(convert gray to RGB\)"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"add the batch dimension"):
        model(torch.randn(3, 8, 8))
