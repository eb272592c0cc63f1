"""models/hf_vit.py against transformers itself: tiny random-weight models of every supported family, their outputs
against transformers' own forward (default attention implementation), every layer's attention against a
recomputation from the q / k projections (hooks written here), the maps at native and non-square sizes, and loading
through a pre-filled Hugging Face cache with no request."""

import importlib.util
import json
import socket
from copy import deepcopy

import pytest
import torch
from matplotlib.figure import Figure

transformers = pytest.importorskip("transformers")

from attention.faithfulness import deletion_score  # noqa: E402
from attention.figures import attention_figure  # noqa: E402
from attention.inspection import attention_stats  # noqa: E402
from models.any_vit import MissingLibraryError  # noqa: E402
from models.hf_vit import HFViT, load_hf, wrap_hf  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.img2attn import attention_rollout, cls_attention, explain, gradient_rollout, token_norms  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
             patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=99)
SIZES = [(32, 32), (24, 40)]  # native 4x4 grid, and a non-square 3x5 one


def build(family: str) -> torch.nn.Module:
    """A tiny random model of `family`, in eval mode, with transformers' default attention implementation."""
    torch.manual_seed(0)
    t = transformers
    make = {
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(**SMALL, num_labels=5)),
        "vit_model": lambda: t.ViTModel(t.ViTConfig(**SMALL)),
        "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(**SMALL)),
        "dinov2_cls": lambda: t.Dinov2ForImageClassification(t.Dinov2Config(**SMALL, num_labels=3)),
        "dinov2_reg": lambda: t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4)),
        "dinov2_reg_cls": lambda: t.Dinov2WithRegistersForImageClassification(
            t.Dinov2WithRegistersConfig(**SMALL, num_register_tokens=2, num_labels=3)),
        "clip_vision": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**SMALL)),
        "clip": lambda: t.CLIPModel(t.CLIPConfig(vision_config=SMALL, text_config=TEXT, projection_dim=16)),
        "siglip_vision": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**SMALL)),
        "siglip": lambda: t.SiglipModel(t.SiglipConfig(vision_config=SMALL, text_config=TEXT)),
    }
    return make[family]().eval()


FAMILIES = ["vit", "vit_model", "dinov2", "dinov2_cls", "dinov2_reg", "dinov2_reg_cls", "clip_vision", "clip",
            "siglip_vision", "siglip"]
HEADS = {"vit": 5, "dinov2_cls": 3, "dinov2_reg_cls": 3}
PREFIX = {"dinov2_reg": 5, "dinov2_reg_cls": 3}


def reference(family: str, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own forward -> (what the wrapper returns: logits or features, the encoder's tokens)."""
    if family in ("clip", "siglip"):
        out = model.get_image_features(x, interpolate_pos_encoding=True)
        return out.pooler_output, out.last_hidden_state
    kwargs = {} if family.startswith("dinov2") else dict(interpolate_pos_encoding=True)
    if family in HEADS:
        out = model(x, output_hidden_states=True, **kwargs)
        return out.logits, out.hidden_states[-1]
    out = model(x, **kwargs)
    pooled = out.pooler_output if family in ("clip_vision", "siglip_vision") else out.last_hidden_state[:, 0]
    return pooled, out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_outputs_equal_transformers_forward(family, size):
    model = build(family)
    wrapped = wrap_hf(model)
    assert wrapped.model is model and wrapped.config["num_classes"] == HEADS.get(family, 0)
    assert wrapped.num_prefix_tokens == PREFIX.get(family, 1)
    assert wrapped.patch_grid(*size) == (size[0] // 8, size[1] // 8)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        want, hidden = reference(family, model, x)
        got = wrapped(x)
        got_attn, attn = wrapped(x, return_attn=True)
        tokens, _ = wrapped.forward_features(x)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    assert (got_attn - want).abs().max() < 1e-5  # the eager path gives the same output
    if family.endswith("_cls") or family == "vit":  # the classifier reads the final-normed tokens
        hidden = model.base_model.layernorm(hidden)
    patches = tokens[:, 1:] if family.startswith("siglip") else tokens
    assert (patches - hidden).abs().max() < 1e-5
    t = wrapped.num_prefix_tokens + size[0] // 8 * size[1] // 8
    layers = 2 + family.startswith("siglip")  # SigLIP: + the attention pool's layer
    assert len(attn) == layers and all(a.shape == (2, 4, t, t) for a in attn)
    assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in attn)
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {"sdpa"}


def qk_hooks(model: torch.nn.Module, family: str) -> tuple[list, list]:
    """Forward hooks on every encoder layer's q_proj / k_proj -> lists their outputs (B, T, D) fill in layer order,
    and (SigLIP) one on the attention pool's nn.MultiheadAttention keeping its (query, key) inputs."""
    qs, ks, handles = [], [], []
    for name, m in model.named_modules():
        if "text_model" in name:
            continue
        if name.endswith("q_proj"):
            handles.append(m.register_forward_hook(lambda m, i, o: qs.append(o.detach())))
        elif name.endswith("k_proj"):
            handles.append(m.register_forward_hook(lambda m, i, o: ks.append(o.detach())))
        elif name.endswith("head.attention"):
            handles.append(m.register_forward_pre_hook(lambda m, args: qs.append((m, args[0], args[1]))))
    return qs, ks


def softmax_qk(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head: q (B, Tq, D), k (B, Tk, D) -> (B, heads, Tq, Tk), in float64."""
    split = lambda t: t.double().unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
    q, k = split(q), split(k)
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_attention_equals_recomputation_from_q_and_k(family, size):
    model = build(family)
    wrapped = wrap_hf(model)
    qs, ks = qk_hooks(model, family)
    with torch.no_grad():
        _, attn = wrapped(torch.randn(2, 3, *size), return_attn=True)
    if family.startswith("siglip"):
        mha, probe, hidden = qs.pop()  # the pool: its packed in-projection, applied here
        wq, wk, _ = mha.in_proj_weight.chunk(3)
        bq, bk, _ = mha.in_proj_bias.chunk(3)
        pool = softmax_qk(probe @ wq.T + bq, hidden @ wk.T + bk, 4)  # (B, 4, 1, N)
        assert (attn[-1][:, :, 0, 1:] - pool[:, :, 0]).abs().max() < 1e-5
        assert (attn[-1][:, :, 0, 0] == 0).all() and (attn[-1][:, :, 1:, 1:] == torch.eye(attn[-1].shape[-1] - 1)).all()
        for a in attn[:-1]:  # the pseudo token attends only to itself; no patch attends to it
            assert (a[:, :, 0, 0] == 1).all() and (a[:, :, 1:, 0] == 0).all() and (a[:, :, 0, 1:] == 0).all()
        attn = [a[:, :, 1:, 1:] for a in attn[:-1]]
    assert len(qs) == len(ks) == len(attn) == 2
    for a, q, k in zip(attn, qs, ks, strict=True):
        assert (a.double() - softmax_qk(q, k, 4)).abs().max() < 1e-5
    if family.startswith("siglip"):  # the pool's row gets a gradient: the pool's output is computed through it
        x = torch.randn(1, 3, *size)
        features, maps = wrapped(x, return_attn=True)
        grads = torch.autograd.grad(features[:, 0].sum(), maps)
        assert all(g.abs().sum() > 0 for g in grads) and grads[-1][:, :, 0, 1:].abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_maps_on_the_wrapper(family, size):
    model = build(family)
    wrapped = wrap_hf(model)
    grid, prefix = wrapped.patch_grid(*size), wrapped.num_prefix_tokens
    x = torch.rand(2, 3, *size)
    ex = explain(wrapped, x)
    assert ex.grid == grid and ex.prefix_tokens == prefix and ex.rollout.shape == (2, *grid)
    assert ex.token_norms.shape == (2, 2, *grid) and torch.isfinite(ex.token_norms).all()
    assert torch.allclose(ex.token_norms, token_norms(wrapped, x))
    # the block hooks see the encoder's own layer outputs
    kwargs = {} if family.startswith("dinov2") else dict(interpolate_pos_encoding=True)
    with torch.no_grad():
        encoder = model.vision_model if family in ("clip", "siglip") else model.base_model
        hidden = encoder(x, output_hidden_states=True, **kwargs).hidden_states
    skip = 0 if family.startswith("siglip") else prefix
    for layer in range(2):
        want = hidden[layer + 1][:, skip:].norm(dim=-1).reshape(2, *grid)
        assert (ex.token_norms[:, layer] - want).abs().max() < 1e-4
    with torch.no_grad():
        attn = wrapped(x, return_attn=True)[1]
    assert cls_attention(attn, grid=grid, prefix_tokens=prefix).shape == (2, *grid)
    assert torch.allclose(attention_rollout(attn, grid=grid, prefix_tokens=prefix), ex.rollout, atol=1e-6)
    # every map is in the graph of the output (SigLIP's padded maps and pool layer too): without a head the
    # "class" is a feature index
    maps = gradient_rollout(wrapped, x, target=1)
    assert maps.shape == (2, *grid) and torch.isfinite(maps).all() and maps.abs().sum() > 0
    if family in HEADS:
        assert torch.allclose(explain(wrapped, x, target=1).gradient_rollout, maps, atol=1e-6)
    else:
        assert ex.gradient_rollout is None and ex.logits is None
    assert all(p.grad is None for p in model.parameters())


def test_other_tools_on_the_wrapper():
    wrapped = wrap_hf(build("vit"))
    x = torch.rand(3, 3, 24, 40)
    stats = attention_stats(wrapped, x, rollout=2)
    assert stats["distance"].shape == (2, 4) and stats["grid"] == (3, 5) and stats["rollout"].shape == (2, 3, 5)
    score = deletion_score(wrapped, x, gradient_rollout(wrapped, x), steps=3)
    assert score.shape == (3,) and ((score >= 0) & (score <= 1)).all()
    ex = explain(wrapped, x[:1])
    assert isinstance(attention_figure(ex, x[0], class_names=[f"c{i}" for i in range(5)]), Figure)
    siglip = wrap_hf(build("siglip_vision"))
    assert isinstance(attention_figure(explain(siglip, x[:1]), x[0]), Figure)


def test_cls_rows_and_state_dict():
    model = build("dinov2_reg")
    wrapped = wrap_hf(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        full = wrapped(x, return_attn=True)[1]
        rows = wrapped(x, return_attn="cls")[1]
    assert all(torch.equal(a[:, :, 0], r) for a, r in zip(full, rows, strict=True))
    assert list(wrapped.state_dict()) == [f"model.{k}" for k in model.state_dict()]  # the layers once
    copy = deepcopy(wrapped)  # EMA-style copies: the copy runs its own modules
    with torch.no_grad():
        assert torch.equal(copy(x), wrapped(x))
        next(copy.model.parameters()).add_(1.0)
        assert not torch.equal(copy(x), wrapped(x))


def test_data_config():
    clip = wrap_hf(build("clip"))
    assert clip.data_config == dict(input_size=(3, 32, 32), mean=(0.48145466, 0.4578275, 0.40821073),
                                    std=(0.26862954, 0.26130258, 0.27577711), interpolation="bicubic", crop_pct=1.0)
    assert wrap_hf(build("siglip")).data_config["mean"] == (0.5, 0.5, 0.5)
    processor = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3,
                     size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True)
    dino = wrap_hf(build("dinov2"), processor)
    assert dino.data_config == dict(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406),
                                    std=(0.229, 0.224, 0.225), interpolation="bicubic", crop_pct=0.875)
    vit = wrap_hf(build("vit"), dict(image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2,
                                     size={"height": 384, "width": 384}))
    assert vit.data_config["input_size"] == (3, 384, 384) and vit.data_config["interpolation"] == "bilinear"


def test_unsupported_models_are_named():
    siglip_cls = transformers.SiglipForImageClassification(
        transformers.SiglipConfig(vision_config=SMALL, text_config=TEXT, num_labels=2))
    with pytest.raises(ValueError, match="SiglipForImageClassification is not supported: it classifies the mean"):
        wrap_hf(siglip_cls)
    with pytest.raises(ValueError, match="Linear is not a supported transformers vision model; supported: CLIPModel"):
        wrap_hf(torch.nn.Linear(2, 2))
    wrapped = wrap_hf(build("vit"))
    with pytest.raises(ValueError, match="not a multiple of patch_size=8"):
        wrapped(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"not a batch \(B, 3, H, W\)"):
        wrapped(torch.randn(3, 32, 32))


def save_to_hub_cache(model, home, repo_id: str, processor: dict | None = None) -> None:
    """model.save_pretrained into the Hub cache layout under `home`: hub/models--ORG--NAME/{refs/main,
    snapshots/REV/...} (plain files where the hub keeps links to blobs/; it reads both)."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    model.save_pretrained(repo / "snapshots" / rev)
    if processor:
        (repo / "snapshots" / rev / "preprocessor_config.json").write_text(json.dumps(processor))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)


def offline_cache(monkeypatch, home) -> None:
    """The Hugging Face cache under `home` (HF_HOME), HF_HUB_OFFLINE=1, and any socket connection an error."""
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_connection(*args, **kwargs):
        raise AssertionError("a network request was made")

    monkeypatch.setattr(socket.socket, "connect", no_connection)
    monkeypatch.setattr(socket, "create_connection", no_connection)


def test_load_from_a_prefilled_cache_with_no_request(tmp_path, monkeypatch):
    model = build("vit")
    save_to_hub_cache(model, tmp_path, "tiny-org/tiny-vit", dict(image_mean=[0.1] * 3, image_std=[0.2] * 3,
                                                                resample=3, size={"height": 32, "width": 32}))
    offline_cache(monkeypatch, tmp_path)
    loaded = load_hf("tiny-org/tiny-vit")
    assert isinstance(loaded, HFViT) and not loaded.training
    assert type(loaded.model).__name__ == "ViTForImageClassification"  # config.json's architectures, not AutoModel
    assert loaded.weights_note == "hf:tiny-org/tiny-vit (transformers ViTForImageClassification)"
    assert loaded.data_config == dict(input_size=(3, 32, 32), mean=(0.1,) * 3, std=(0.2,) * 3,
                                      interpolation="bicubic", crop_pct=1.0)
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        want = model(x, interpolate_pos_encoding=True).logits
        assert (loaded(x) - want).abs().max() < 1e-5


def test_empty_cache_and_bad_names_give_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load_hf("tiny-org/missing-vit")
    message = str(e.value)
    assert "\n" not in message and "hf:tiny-org/missing-vit is not in the Hugging Face cache" in message
    assert str(tmp_path / "hub") in message and "HF_HOME" in message and "models--tiny-org--missing-vit" in message
    with pytest.raises(CheckpointError, match="hf:not a repo! is not a Hugging Face repo id"):
        load_hf("not a repo!")


def test_missing_transformers_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(MissingLibraryError, match="pip install transformers"):
        load_hf("google/vit-base-patch16-224")


def test_load_a_saved_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build("siglip")
    model.save_pretrained(tmp_path / "siglip")
    loaded = load_hf(str(tmp_path / "siglip"))
    assert type(loaded.model).__name__ == "SiglipModel" and loaded.data_config["mean"] == (0.5, 0.5, 0.5)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - model.get_image_features(x).pooler_output).abs().max() < 1e-5


# ------------------------------------------------------------------------------ prompts through the text towers
PROMPTS = ["a photo of a dog", "a red bicycle", "a cat"]
WORDS = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "dog", "red", "bicycle", "cat"]


def clip_tokenizer():
    """transformers' CLIPTokenizer (byte-level BPE) over a small vocabulary: the letters, word ends, a few merges."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate([*letters, *(c + "</w>" for c in letters), "do", "dog</w>", "ca", "cat</w>",
                                         "<|startoftext|>", "<|endoftext|>"])}
    return transformers.CLIPTokenizer(vocab=vocab, merges=[("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>")])


def siglip_tokenizer():
    """A word-level tokenizer with SigLIP's conventions (an </s> after the text, padding): SigLIP's own
    SentencePiece tokenizer needs the sentencepiece package."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def two_towers(family: str):
    """A tiny random CLIPModel / SiglipModel whose text tower reads its test tokenizer's ids -> (model, tokenizer)."""
    torch.manual_seed(1)
    t = transformers
    if family == "clip":
        tok = clip_tokenizer()
        text = dict(TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
        model = t.CLIPModel(t.CLIPConfig(vision_config=SMALL, text_config=text, projection_dim=16))
    else:
        tok = siglip_tokenizer()
        text = dict(TEXT, vocab_size=len(WORDS), pad_token_id=0, eos_token_id=1, bos_token_id=None)
        model = t.SiglipModel(t.SiglipConfig(vision_config=SMALL, text_config=text))
        with torch.no_grad():
            model.logit_bias.fill_(-2.5)  # a bias that shows when it is missing
    return model.eval(), tok


def transformers_logits(model, tok, family: str, x: torch.Tensor) -> torch.Tensor:
    """logits_per_image of transformers' own forward, the texts tokenized as the model's processor does (SigLIP:
    padded to max_length, its text tower pools the last position)."""
    pad = dict(padding="max_length", max_length=model.config.text_config.max_position_embeddings) \
        if family == "siglip" else dict(padding=True)
    with torch.no_grad():
        out = model(pixel_values=x, **tok(PROMPTS, return_tensors="pt", **pad))
    cos = torch.nn.functional.normalize(out.image_embeds, dim=-1) @ \
        torch.nn.functional.normalize(out.text_embeds, dim=-1).T
    bias = model.logit_bias if family == "siglip" else 0
    assert torch.allclose(out.logits_per_image, model.logit_scale.exp() * cos + bias, atol=1e-5)
    return out.logits_per_image


def check_prompt_head(zs, model, tok, family: str) -> None:
    """logits equal transformers' logits_per_image, the top-k lists the prompts, gradient rollout explains a
    chosen prompt at the native and a non-square size."""
    x = torch.randn(2, 3, 32, 32)
    ref = transformers_logits(model, tok, family, x)
    with torch.no_grad():
        logits = zs(x)
    assert zs.class_names == PROMPTS and zs.config["num_classes"] == 3
    assert (logits - ref).abs().max() < 1e-5
    top = [zs.class_names[i] for i in logits[0].topk(3).indices.tolist()]
    assert sorted(top) == sorted(PROMPTS) and top[0] == PROMPTS[int(ref[0].argmax())]
    for size in SIZES:
        grid = zs.patch_grid(*size)
        xs = torch.rand(1, 3, *size)
        maps = [gradient_rollout(zs, xs, target=k) for k in range(2)]
        assert all(m.shape == (1, *grid) and torch.isfinite(m).all() for m in maps)
        assert not torch.allclose(maps[0], maps[1])  # the map depends on the chosen prompt
        assert torch.allclose(explain(zs, xs, target=1).gradient_rollout, maps[1], atol=1e-6)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_prompts_with_a_given_tokenizer(family):
    from models.clip import with_prompts

    model, tok = two_towers(family)
    check_prompt_head(with_prompts(wrap_hf(model), PROMPTS, tokenizer=tok), model, tok, family)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_prompts_by_name_from_a_prefilled_cache(family, tmp_path, monkeypatch):
    """load_pretrained("hf:ORG/NAME") + with_prompts with no tokenizer: config, weights and tokenizer files from
    the cache (HF_HUB_OFFLINE=1), no request."""
    from models.clip import with_prompts
    from models.pretrained import load_pretrained

    model, tok = two_towers(family)
    repo_id = f"tiny-org/tiny-{family}"
    save_to_hub_cache(model, tmp_path, repo_id)
    snapshot = next((tmp_path / "hub" / f"models--tiny-org--tiny-{family}" / "snapshots").iterdir())
    tok.save_pretrained(snapshot)  # tokenizer.json + tokenizer_config.json, as the Hub repos hold them
    offline_cache(monkeypatch, tmp_path)
    loaded = load_pretrained(f"hf:{repo_id}")
    assert loaded.clip_model is loaded.model
    check_prompt_head(with_prompts(loaded, PROMPTS), model, tok, family)


def test_prompt_tokenizer_errors(tmp_path, monkeypatch):
    from models.clip import PromptError, with_prompts

    model, _ = two_towers("clip")
    with pytest.raises(PromptError, match="built in memory, so its tokenizer is unknown; pass tokenizer="):
        with_prompts(wrap_hf(model), PROMPTS)
    with pytest.raises(PromptError, match="no text tower"):
        with_prompts(wrap_hf(build("siglip_vision")), PROMPTS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "siglip"  # a SigLIP repo's tokenizer files: SentencePiece's spiece.model
    siglip, _ = two_towers("siglip")
    siglip.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SiglipTokenizer"}))
    (folder / "spiece.model").write_bytes(b"not read: the class needs sentencepiece first")
    loaded = load_hf(str(folder))
    if importlib.util.find_spec("sentencepiece") is None:
        with pytest.raises(PromptError, match=r"needs sentencepiece \(pip install sentencepiece\)") as e:
            with_prompts(loaded, PROMPTS)
        assert "\n" not in str(e.value)
    (folder / "tokenizer_config.json").unlink()
    (folder / "spiece.model").unlink()
    with pytest.raises(PromptError, match="cannot be loaded .*pass tokenizer=") as e:
        with_prompts(loaded, PROMPTS)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- an unreachable Hugging Face Hub
def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_unreachable_says_why(monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import huggingface_hub.constants

    from models.any_vit import hub_unreachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert hub_unreachable().startswith("the Hub at http://127.0.0.1:")

    class NotFound(BaseHTTPRequestHandler):  # any HTTP answer means the Hub is there
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_unreachable() is None
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert hub_unreachable() == "HF_HUB_OFFLINE is set"
    finally:
        server.shutdown()
        server.server_close()


def test_hf_name_with_an_unreachable_hub_fails_at_once_in_one_line(tmp_path, monkeypatch, caplog):
    """No HF_HUB_OFFLINE, the Hub at a closed port: an empty cache gives the one line with no retries (no
    "Retrying" warnings); a pre-filled cache loads, its tokenizer too."""
    import huggingface_hub.constants

    from models.clip import with_prompts

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(CheckpointError) as e:
        load_hf("tiny-org/missing-vit")
    message = str(e.value)
    assert "\n" not in message and "hf:tiny-org/missing-vit is not in the Hugging Face cache" in message
    assert "cannot be downloaded (the Hub at http://127.0.0.1:" in message
    assert "Retrying" not in caplog.text
    model, tok = two_towers("siglip")
    save_to_hub_cache(model, tmp_path, "tiny-org/tiny-siglip")
    tok.save_pretrained(next((tmp_path / "hub" / "models--tiny-org--tiny-siglip" / "snapshots").iterdir()))
    zs = with_prompts(load_hf("tiny-org/tiny-siglip"), PROMPTS)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (zs(x) - transformers_logits(model, tok, "siglip", x)).abs().max() < 1e-5
    assert "Retrying" not in caplog.text


# ---------------------------------------------------------------------------------- LeGrad's read-out, the script
@pytest.mark.parametrize("family", ["vit", "dinov2_reg_cls", "clip", "siglip"])
def test_layer_logits_read_a_layer_as_the_last(family):
    """ViT / DINOv2: the last block's output read out gives the logits; CLIP: projection(post_layernorm(mean of
    all tokens)), the LeGrad authors' read-out for CLIP; SigLIP (pool head): none."""
    model = build(family)
    wrapped = wrap_hf(model)
    if family == "siglip":
        assert wrapped.layer_logits is None
        return
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        hidden = wrapped._embed(x)
        for block in wrapped.blocks:
            hidden = block(hidden)
        read = wrapped.layer_logits(hidden)
        if family == "clip":
            want = model.visual_projection(model.vision_model.post_layernorm(hidden.mean(1)))
        else:
            want = wrapped(x)
    assert (read - want).abs().max() < 1e-5


def test_legrad_on_a_prompt_head():
    from attention.legrad import legrad
    from models.clip import with_prompts

    model, tok = two_towers("clip")
    zs = with_prompts(wrap_hf(model), PROMPTS, tokenizer=tok)
    heat = legrad(zs, torch.rand(2, 3, 24, 40), target=1)
    assert heat.shape == (2, 3, 5) and heat.min() >= 0 and heat.max() <= 1
    model, tok = two_towers("siglip")
    zs = with_prompts(wrap_hf(model), PROMPTS, tokenizer=tok)
    assert zs.layer_logits is None  # so the scripts leave LeGrad out
    with pytest.raises(ValueError, match="layer_logits"):
        legrad(zs, torch.rand(1, 3, 32, 32), target=1)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vis_attn_with_prompts_on_a_transformers_folder(family, tmp_path, capsys, monkeypatch):
    """python -m imagenet.vis_attn --model hf:<folder> --prompt ...: the top-k lists the prompts, the figure is
    written (with a LeGrad panel where the read-out is defined: CLIP)."""
    from PIL import Image

    from imagenet import vis_attn

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = two_towers(family)
    model.save_pretrained(tmp_path / family)
    tok.save_pretrained(tmp_path / family)
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "red.png")
    out = tmp_path / "fig.png"
    vis_attn.main(["--image", str(tmp_path / "red.png"), "--model", f"hf:{tmp_path / family}", "--prompt",
                   "a red bicycle", "--prompt", "a dog", "--target", "a dog", "--img-size", "32", "--output",
                   str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert out.is_file() and "a red bicycle" in text and "gradient map for a dog" in text
    assert ("LeGrad map too" in text) == (family == "clip")
    shown = sum(float(line.split("%")[0].split(".", 1)[1]) for line in text.splitlines()
                if line[:2] in ("1.", "2.") and "%" in line)  # the two prompts' percentages
    if family == "clip":  # a softmax over the prompts
        assert abs(shown - 100) < 0.2, text
    else:  # SigLIP: a sigmoid per prompt (its bias -2.5: far from summing to 100 %)
        assert shown < 90, text
