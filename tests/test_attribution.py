"""attention/attribution.py: every method on this repo's ViT equals the same method on timm's ViT with the same weights
(through the wrapper); CP-LRP equals a loop written from Ali et al. 2022 and lxt's cp_LRP on torchvision's ViT with the
same weights (skipped without lxt), and conserves the logit without biases; attention x gradient equals a hand
computation; the baselines are seeded / centred; batching, eval mode, .grad and no_grad are respected."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attention.attribution import METHODS, ConservativeMode, centre_map, explain_map, random_map, token_relevance
from models.vit import VisionTransformer

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(embed_dim=32, hidden_dim=64, num_heads=2, num_layers=2, patch_size=8, num_channels=3, num_patches=16,
              num_classes=5)
MODEL_METHODS = [m for m in METHODS if m != "random"]  # random: its own test (a shared generator)


def tiny_vit(biases=True, **kw):
    torch.manual_seed(0)
    model = VisionTransformer(**{**CONFIG, **kw}).eval()
    with torch.no_grad():  # non-trivial weights; biases (and LayerNorm shifts) zero when not `biases`
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
            if not biases and name.endswith("bias"):
                p.zero_()
    return model


def timm_twin(model):
    """timm's ViT with the same weights, through load_pretrained (models.timm_vit.TimmViT)."""
    timm = pytest.importorskip("timm")
    from models.pretrained import load_pretrained

    c = model.config
    twin = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=c["patch_size"], num_classes=c["num_classes"], embed_dim=c["embed_dim"],
        depth=c["num_layers"], num_heads=c["num_heads"], mlp_ratio=c["hidden_dim"] / c["embed_dim"],
        reg_tokens=c.get("reg_tokens", 0), no_embed_class=c.get("no_embed_class", False)).eval()
    twin.load_state_dict(model.state_dict(), strict=True)
    return load_pretrained(twin)


def inputs(size=(32, 32), batch=3):
    torch.manual_seed(1)
    return torch.randn(batch, 3, *size), torch.tensor([0, 3, 4, 1][:batch])


def manual_forward(model, x, cp=False, last_attn=None):
    """This repo's ViT written out (no registers), tokens z0 entering block 0 as a leaf -> (logits, z0).
    cp: Ali et al. 2022's modified backward (softmax and LayerNorm's std detached, GELU's gradient gelu(u)/u).
    last_attn: a list that receives the last layer's softmax as a leaf (its gradient can be asked for)."""
    z = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=8).flatten(2).transpose(1, 2)
    z0 = (torch.cat([model.cls_token.expand(len(x), -1, -1), z], 1) + model.pos_embed).detach().requires_grad_()

    def norm(ln, h):
        c = h - h.mean(-1, keepdim=True)
        std = (c.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
        return c / (std.detach() if cp else std) * ln.weight + ln.bias

    h = z0
    for i, block in enumerate(model.blocks):
        a = block.attn
        q, k, v = a.qkv(norm(block.norm1, h)).unflatten(-1, (3, a.num_heads, -1)).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) * a.scale).softmax(-1)
        attn = attn.detach() if cp else attn
        if last_attn is not None and i == len(model.blocks) - 1:
            attn = attn.detach().requires_grad_()
            last_attn.append(attn)
        h = h + a.proj((attn @ v).transpose(1, 2).flatten(2))
        u = block.mlp.fc1(norm(block.norm2, h))
        g = u * (F.gelu(u) / u).detach() if cp else F.gelu(u)
        h = h + block.mlp.fc2(g)
    return model.head(norm(model.norm, h)[:, 0]), z0


@pytest.mark.parametrize("method", MODEL_METHODS)
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_same_map_for_our_vit_and_timm(method, size):
    model = tiny_vit()
    twin = timm_twin(model)
    x, t = inputs(size)
    ours, theirs = explain_map(method, model, x, t), explain_map(method, twin, x, t)
    assert ours.shape == (3, size[0] // 8, size[1] // 8) and ours.dtype == torch.float32
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), method


def test_registers_same_map_for_our_vit_and_timm():
    model = tiny_vit(reg_tokens=2, no_embed_class=True)
    twin = timm_twin(model)
    x, t = inputs()
    for method in MODEL_METHODS:
        ours, theirs = explain_map(method, model, x, t), explain_map(method, twin, x, t)
        assert ours.shape == (3, 4, 4) and torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), method


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_batched_eval_mode_grads_and_no_grad(method):
    model = tiny_vit().train()
    x, t = inputs()
    with torch.inference_mode():
        batch = explain_map(method, model, x, t)
    assert model.training and all(p.grad is None for p in model.parameters())
    single = torch.cat([explain_map(method, model, x[i:i + 1], t[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(batch, single, atol=1e-5, rtol=1e-4)  # each image's own map, in eval mode
    with torch.no_grad():
        assert torch.allclose(explain_map(method, model, x, int(t[0])), explain_map(method, model, x, t[:1].expand(3)))


def test_cp_lrp_equals_the_papers_rule_and_conserves_the_logit():
    for biases in (True, False):
        model = tiny_vit(biases)
        x, t = inputs()
        logits, z0 = manual_forward(model, x, cp=True)
        score = logits.gather(1, t[:, None]).sum()
        reference = (torch.autograd.grad(score, z0)[0] * z0).sum(-1)
        ours = token_relevance(model, x, t)
        assert torch.allclose(ours, reference, atol=1e-6, rtol=1e-4)
        assert torch.allclose(explain_map("CP-LRP", model, x, t), ours[:, 1:].reshape(3, 4, 4))
        target_logit = model(x).gather(1, t[:, None])[:, 0]
        if not biases:  # conservation: the relevance of the tokens sums to the logit
            assert torch.allclose(ours.sum(1), target_logit, atol=1e-5, rtol=1e-4)
    plain = manual_forward(model, x)[0]
    assert torch.allclose(plain, model(x), atol=1e-5)  # the written-out forward is the model's


LXT_SCRIPT = textwrap.dedent("""
    # lxt 2.1's package __init__ imports its transformers patches, which fail under transformers 5; load the
    # torchvision ViT patch map (cp_LRP) without them.
    import importlib.util, sys, types
    import torch
    root = importlib.util.find_spec("lxt").submodule_search_locations[0]
    for name in ("lxt.efficient", "lxt.efficient.models"):
        package = types.ModuleType(name)
        package.__path__ = [root + "/" + name.split(".", 1)[1].replace(".", "/")]
        sys.modules[name] = package
    from lxt.efficient.models.vit_torch import cp_LRP
    from torchvision.models.vision_transformer import VisionTransformer
    for target, patch in cp_LRP.items():
        assert patch(target)
    sd, x, t = torch.load(sys.argv[1])
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=5).eval()
    model.load_state_dict(sd, strict=True)
    kept = []
    model.encoder.layers[0].register_forward_pre_hook(lambda m, a: kept.append(a[0]))
    logits = model(x)
    grad = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), kept[0])[0]
    torch.save(((grad * kept[0]).sum(-1), logits.detach()), sys.argv[2])
""")


def torchvision_state_dict(model):
    """This repo's ViT (timm keys) -> torchvision's VisionTransformer keys."""
    sd = {"class_token": model.cls_token, "conv_proj.weight": model.patch_embed.proj.weight,
          "conv_proj.bias": model.patch_embed.proj.bias, "encoder.pos_embedding": model.pos_embed,
          "encoder.ln.weight": model.norm.weight, "encoder.ln.bias": model.norm.bias,
          "heads.head.weight": model.head.weight, "heads.head.bias": model.head.bias}
    for i, b in enumerate(model.blocks):
        p = f"encoder.layers.encoder_layer_{i}."
        sd |= {p + "ln_1.weight": b.norm1.weight, p + "ln_1.bias": b.norm1.bias,
               p + "self_attention.in_proj_weight": b.attn.qkv.weight,
               p + "self_attention.in_proj_bias": b.attn.qkv.bias,
               p + "self_attention.out_proj.weight": b.attn.proj.weight,
               p + "self_attention.out_proj.bias": b.attn.proj.bias,
               p + "ln_2.weight": b.norm2.weight, p + "ln_2.bias": b.norm2.bias,
               p + "mlp.0.weight": b.mlp.fc1.weight, p + "mlp.0.bias": b.mlp.fc1.bias,
               p + "mlp.3.weight": b.mlp.fc2.weight, p + "mlp.3.bias": b.mlp.fc2.bias}
    return {k: v.detach().clone() for k, v in sd.items()}


def test_cp_lrp_equals_lxt_on_torchvision_vit(tmp_path):
    pytest.importorskip("lxt", reason="lxt (pip install lxt) is the independent CP-LRP implementation")
    pytest.importorskip("torchvision")
    model = tiny_vit()
    x, t = inputs()
    torch.save((torchvision_state_dict(model), x, t), tmp_path / "in.pt")
    subprocess.run([sys.executable, "-c", LXT_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   cwd=REPO, check=True, capture_output=True)  # lxt patches torch.nn classes: its own process
    relevance, logits = torch.load(tmp_path / "out.pt")
    assert torch.allclose(logits, model(x), atol=1e-5)  # the same network
    assert torch.allclose(token_relevance(model, x, t), relevance, atol=1e-5, rtol=1e-3)


def test_attention_x_gradient_by_hand():
    model = tiny_vit()
    x, t = inputs()
    leaf = []
    logits, _ = manual_forward(model, x, last_attn=leaf)
    grad = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), leaf[0])[0]
    a = leaf[0].detach()
    expected = torch.zeros(3, 16)
    for b in range(3):
        for h in range(a.shape[1]):
            for j in range(16):
                expected[b, j] += max(float(a[b, h, 0, 1 + j] * grad[b, h, 0, 1 + j]), 0.0) / a.shape[1]
    assert torch.allclose(explain_map("attention x gradient", model, x, t), expected.reshape(3, 4, 4), atol=1e-7)


def test_random_is_seeded_and_centre_is_centred():
    model = tiny_vit()
    x, t = inputs((40, 56))
    first, again = random_map(0), random_map(0)
    a, b = first(model, x, t), first(model, x, t)
    assert a.shape == (3, 5, 7) and float(a.min()) >= 0 and float(a.max()) < 1
    assert torch.equal(a, again(model, x, t)) and torch.equal(b, again(model, x, t))  # same seed, same sequence
    assert not torch.equal(a, b) and not torch.equal(a, random_map(1)(model, x, t))
    for size in ((40, 56), (32, 48)):  # odd (5 x 7) and even (4 x 6) grids
        c = centre_map(model, torch.zeros(2, 3, *size))
        assert torch.equal(c[0], c[1]) and torch.allclose(c, c.flip(1)) and torch.allclose(c, c.flip(2))
    c = centre_map(model, x)[0]
    assert c.argmax() == 2 * 7 + 3 and float(c[2, 3]) == 1.0 and float(c.min()) > 0


def test_errors_name_the_bad_value():
    model = tiny_vit()
    x, _ = inputs()
    with pytest.raises(ValueError, match="unknown method 'GradCAM'.*attention rollout.*centre"):
        explain_map("GradCAM", model, x, torch.zeros(3, dtype=torch.long))
    for method in ("gradient rollout", "attention x gradient", "LeGrad", "CP-LRP"):
        for target in (torch.tensor([0, 5, 1]), torch.tensor([0, 1]), None):
            with pytest.raises(ValueError, match="target"):
                explain_map(method, model, x, target)
    headless = tiny_vit(num_classes=0)
    with pytest.raises(ValueError, match="no head"):
        explain_map("CP-LRP", headless, x, torch.zeros(3, dtype=torch.long))
    assert explain_map("attention rollout", headless, x, None).shape == (3, 4, 4)  # class-agnostic methods run


def test_pool_query_and_library_models_give_a_map_or_one_clear_error():
    timm = pytest.importorskip("timm")
    from models.pretrained import load_pretrained

    torch.manual_seed(0)
    siglip = load_pretrained(timm.create_model("vit_base_patch16_siglip_224", pretrained=False, depth=2,
                                               embed_dim=32, num_heads=2, num_classes=5, img_size=32,
                                               patch_size=8).eval())
    x, t = inputs()
    for method in METHODS:
        try:
            heat = explain_map(method, siglip, x, t)
        except ValueError as e:  # LeGrad: no per-layer read-out for a pool head
            assert method == "LeGrad" and "layer_logits" in str(e)
            continue
        assert heat.shape == (3, 4, 4) and torch.isfinite(heat).all(), method


def test_cp_lrp_conserves_the_logit_through_transformers_and_open_clip():
    """Conservation needs every softmax, LayerNorm, GELU and the zero-shot head's L2 norm handled: with the biases
    at 0, a transformers ViT and an open_clip tower with prompts sum their relevance to the logit."""
    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    from models.clip import with_prompts
    from models.pretrained import load_pretrained

    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=5))
    clip = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2,
                                                        head_width=16),
                          text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    x, t = inputs()
    for raw in (hf, clip):
        with torch.no_grad():
            for name, p in raw.named_parameters():
                p.add_(0.05 * torch.randn_like(p))
                if name.endswith("bias"):
                    p.zero_()
        model = load_pretrained(raw.eval())
        if raw is clip:
            model = with_prompts(model, ["a dog", "a cat", "a car", "a tree", "a boat"])
        relevance = token_relevance(model, x, t)
        assert relevance.shape == (3, 17)
        assert torch.allclose(relevance.sum(1), model(x).gather(1, t[:, None])[:, 0], atol=1e-5, rtol=1e-4)


def test_conservative_mode_on_fused_attention_and_multi_head_attention():
    """SDPA and nn.MultiheadAttention under ConservativeMode: the same output, the gradient of softmax(qk)·v with
    the probabilities constant (to q, k: none)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 2, 5, 4)
    with ConservativeMode():
        out = F.scaled_dot_product_attention(q, k, v)
    probs = (q @ k.transpose(-1, -2) / 2).softmax(-1)
    assert torch.allclose(out, probs @ v, atol=1e-6)
    gq, gk, gv = torch.autograd.grad((out * w).sum(), (q, k, v), allow_unused=True)
    assert gq is None and gk is None and torch.allclose(gv, probs.detach().transpose(-1, -2) @ w, atol=1e-6)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    y = torch.randn(2, 5, 8, requires_grad=True)
    with ConservativeMode():
        out = mha(y, y, y)[0]
    assert torch.allclose(out, mha(y, y, y)[0], atol=1e-6)  # (weights: still a function of the parameters)
    value = F.linear(y, mha.in_proj_weight[16:], mha.in_proj_bias[16:]).unflatten(-1, (2, 4)).transpose(1, 2)
    probs = F.linear(y, mha.in_proj_weight, mha.in_proj_bias)[..., :16].unflatten(-1, (2, 2, 4)).permute(2, 0, 3, 1, 4)
    probs = (probs[0] @ probs[1].transpose(-1, -2) / 2).softmax(-1).detach()
    expected = F.linear((probs @ value).transpose(1, 2).flatten(2), mha.out_proj.weight, mha.out_proj.bias)
    g = torch.randn_like(out)
    assert torch.allclose(torch.autograd.grad((out * g).sum(), y)[0], torch.autograd.grad((expected * g).sum(), y)[0],
                          atol=1e-6)
