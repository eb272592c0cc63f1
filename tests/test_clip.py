"""models/clip.py: open_clip's image tower behind the VisionTransformer interface, zero-shot heads from prompts.
Small random-weight open_clip models built by the test (no download)."""

import json

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from attention.faithfulness import deletion_score  # noqa: E402
from attention.inspection import attention_stats  # noqa: E402
from models.clip import PromptError, load_open_clip, parse_spec, with_prompts, wrap_open_clip  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.img2attn import attention_rollout, cls_attention, explain, gradient_rollout, token_norms  # noqa: E402

PROMPTS = ["a photo of a dog", "a red bicycle", "a cat"]
TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16),
            text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))


def tiny_clip(seed=0, **vision):
    torch.manual_seed(seed)
    cfg = dict(TINY, vision_cfg={**TINY["vision_cfg"], **vision})
    clip = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():  # open_clip's init leaves biases at 0 and the class token tiny: make every term count
        for p in clip.visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return clip


def qk_attention(clip, x):
    """Every layer's softmax recomputed from q and k, taken by hooks on each block's attention input."""
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, kw=None: inputs.append((m, a[0])))
             for b in clip.visual.transformer.resblocks]
    with torch.no_grad():
        clip.encode_image(x)
    for h in hooks:
        h.remove()
    maps = []
    for m, y in inputs:
        heads = m.num_heads
        q, k, _ = F.linear(y, m.in_proj_weight, m.in_proj_bias).chunk(3, -1)
        q, k = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k))
        q, k = getattr(m, "ln_q", torch.nn.Identity())(q), getattr(m, "ln_k", torch.nn.Identity())(k)
        maps.append((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1))
    return maps


@pytest.mark.parametrize("vision", [{}, {"qk_norm": True}, {"pool_type": "avg"}, {"ls_init_value": 0.5}],
                         ids=["mha", "custom-qk-norm", "avg-pool", "layerscale"])
def test_tower_equals_open_clip_and_attention_equals_qk(vision):
    clip = tiny_clip(**vision)
    model = wrap_open_clip(clip)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = clip.encode_image(x)  # open_clip's own (fused SDPA / MHA fast path) forward
        plain = model(x)
        feats, attn = model(x, return_attn=True)
    assert model.config["num_classes"] == 0 and model.num_prefix_tokens == 1
    assert torch.allclose(plain, ref, atol=1e-5) and torch.allclose(feats, ref, atol=1e-5)
    assert len(attn) == 3 and attn[0].shape == (2, 4, 17, 17)
    for ours, theirs in zip(attn, qk_attention(clip, x), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_zero_shot_logits_equal_open_clip_and_topk_names_prompts():
    clip = tiny_clip()
    model = with_prompts(wrap_open_clip(clip), PROMPTS)
    x = torch.randn(3, 3, 32, 32)
    text = open_clip.SimpleTokenizer()(PROMPTS)
    with torch.no_grad():
        img, txt, scale = clip(x, text)[:3]
        ref = scale * img @ txt.T
        logits = model(x)
    assert model.class_names == PROMPTS and model.config["num_classes"] == 3
    assert torch.allclose(logits, ref, atol=1e-5)
    assert torch.allclose(logits, clip.get_logits(x, text)[0].detach(), atol=1e-5)
    top = [model.class_names[i] for i in logits[0].topk(3).indices.tolist()]
    assert sorted(top) == sorted(PROMPTS) and top[0] == PROMPTS[int(ref[0].argmax())]
    again = with_prompts(model, ["a dog", "a cat"])  # new prompts replace the old head
    assert again.class_names == ["a dog", "a cat"] and again(x).shape == (3, 2)


def test_logit_bias_is_added():
    clip = tiny_clip()
    clip.logit_bias = torch.nn.Parameter(torch.tensor(-3.0))
    model = with_prompts(wrap_open_clip(clip), PROMPTS)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), clip.get_logits(x, open_clip.SimpleTokenizer()(PROMPTS))[0], atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)], ids=["native", "non-square"])
def test_maps_run_on_the_wrapper(size):
    model = with_prompts(wrap_open_clip(tiny_clip()), PROMPTS)
    x = torch.randn(2, 3, *size)
    grid = model.patch_grid(*size)
    logits, attn = model(x, return_attn=True)
    assert logits.shape == (2, 3) and attn[0].shape[-1] == 1 + grid[0] * grid[1]
    assert gradient_rollout(model, x, target=1).shape == (2, *grid)
    assert attention_rollout(attn, grid=grid).shape == (2, *grid)
    assert cls_attention(attn, grid=grid).shape == (2, *grid)
    assert token_norms(model, x).shape == (2, 3, *grid)
    ex = explain(model, x)
    assert ex.gradient_rollout.shape == (2, *grid) and ex.logits.shape == (2, 3)
    assert torch.allclose(ex.gradient_rollout, gradient_rollout(model, x, ex.target), atol=1e-6)
    assert attention_stats(model, x)["distance"].shape == (3, 4)
    assert deletion_score(model, x, ex.gradient_rollout, steps=2).shape == (2,)


def test_image_tower_alone_gives_maps_without_head():
    model = wrap_open_clip(tiny_clip())
    ex = explain(model, torch.randn(1, 3, 32, 32))
    assert ex.logits is None and ex.rollout.shape == (1, 4, 4)


def test_prompt_errors():
    model = wrap_open_clip(tiny_clip())
    for bad in ([], [""], ["a", "a"]):
        with pytest.raises(PromptError, match="prompts"):
            with_prompts(model, bad)
    tower_only = wrap_open_clip(tiny_clip().visual)
    with pytest.raises(PromptError, match="no text tower"):
        with_prompts(tower_only, PROMPTS)


def test_spec_errors_and_offline_message(tmp_path, monkeypatch):
    assert parse_spec("open_clip:ViT-B-16/openai") == ("ViT-B-16", "openai")
    with pytest.raises(CheckpointError, match=r"'open_clip:ViT-B-16' names no weights; write open_clip:ViT-B-16/"
                                              r"<pretrained tag>, e.g. 'open_clip:ViT-B-16/openai' \(its tags: "):
        load_open_clip("open_clip:ViT-B-16")
    with pytest.raises(CheckpointError, match="open_clip:<architecture>/<pretrained tag>"):
        load_open_clip("open_clip:/openai")
    with pytest.raises(CheckpointError, match="did you mean 'ViT-B-16'"):
        load_open_clip("open_clip:ViT-B-61/openai")
    with pytest.raises(CheckpointError, match="neither a pretrained tag"):
        load_open_clip("open_clip:ViT-B-16/no-such-tag")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants  # reads HF_HUB_OFFLINE / HF_HUB_CACHE once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError) as e:
        load_open_clip("open_clip:ViT-B-16/openai")
    assert "run once online" in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("open_clip:ViT-B-16/openai: ") and "(HF_HUB_OFFLINE is set)" in str(e.value)


def test_unreachable_hub_fails_at_once_in_one_line(tmp_path, monkeypatch, caplog):
    """No HF_HUB_OFFLINE, the Hub at a closed local port: the cache only, no retries, one line saying why."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError) as e:
        load_open_clip("open_clip:ViT-B-16/openai")
    assert "\n" not in str(e.value) and f"(the Hub at http://127.0.0.1:{port} cannot be reached" in str(e.value)
    assert "Retrying" not in caplog.text


def test_load_from_a_weights_file(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "Tiny-Test-ViT.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "configs")
    clip = tiny_clip(seed=1)
    torch.save(clip.state_dict(), tmp_path / "tiny.pt")
    model = load_open_clip(f"open_clip:Tiny-Test-ViT/{tmp_path / 'tiny.pt'}")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), clip.encode_image(x), atol=1e-5)
    assert model.data_config["input_size"] == (3, 32, 32) and len(model.data_config["mean"]) == 3
    assert "tiny.pt" in model.weights_note
    zs = with_prompts(model, PROMPTS)  # the arch's own tokenizer (open_clip's BPE, shipped in the package)
    with torch.no_grad():
        assert torch.allclose(zs(x), clip.get_logits(x, open_clip.get_tokenizer("Tiny-Test-ViT")(PROMPTS))[0],
                              atol=1e-5)


def test_resnet_tower_refused():
    with pytest.raises(CheckpointError, match="not a ViT"):
        wrap_open_clip(torch.nn.Module())


def test_vis_attn_with_prompts(tmp_path, capsys):
    """python -m imagenet.vis_attn --model open_clip:<arch>/<file> --prompt ... --target <prompt>: the top-5 lists
    the prompts, the figure is written (LeGrad panel included)."""
    from PIL import Image

    from imagenet import vis_attn

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "Tiny-Vis-ViT.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "configs")
    torch.save(tiny_clip(seed=2).state_dict(), tmp_path / "tiny.pt")
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "red.png")
    out = tmp_path / "fig.png"
    vis_attn.main(["--image", str(tmp_path / "red.png"), "--model", f"open_clip:Tiny-Vis-ViT/{tmp_path / 'tiny.pt'}",
                   "--prompt", "a red bicycle", "--prompt", "a dog", "--prompt", "a cat", "--target", "a dog",
                   "--img-size", "32", "--output", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert out.is_file() and "gradient map for a dog, LeGrad map too" in text
    assert all(p in text for p in ("a red bicycle", "a dog", "a cat"))
    with pytest.raises(SystemExit, match="not a class of this model"):
        vis_attn.main(["--image", str(tmp_path / "red.png"), "--model",
                       f"open_clip:Tiny-Vis-ViT/{tmp_path / 'tiny.pt'}", "--prompt", "a dog", "--target", "a cow",
                       "--img-size", "32", "--output", str(out), "--device", "cpu"])
