"""Named pretrained weights: DeiT III / DINO / DINOv2 (registers) parity with timm, the registry, the download;
which weights a repo checkpoint gives (the EMA only when its run reported it); files that pickle Python objects."""

import argparse
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

from models import pretrained
from models.pretrained import CheckpointError, Release, load_pretrained
from models.vit import VisionTransformer

timm = pytest.importorskip("timm")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOL = dict(atol=1e-5, rtol=0)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights: noisy biases and norms, LayerScale gammas of order 1 (not 1e-5) so every block counts."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.5 * torch.randn_like(p) if name.endswith("gamma") else p + 0.05 * torch.randn_like(p))
    return model.eval()


def official_keys(sd: dict, family: str) -> dict:
    """timm's keys -> the official release's (the inverse of timm's checkpoint filters)."""
    sd = dict(sd)
    if family == "deit3":  # facebookresearch/deit models_v2.py: blocks.N.gamma_1 / gamma_2, inside {"model": ...}
        return {"model": {k.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2"): v
                          for k, v in sd.items()}}
    if family == "dinov2":  # facebookresearch/dinov2: mask_token; registers as register_tokens, after cls + pos
        sd["mask_token"] = torch.randn(1, sd["cls_token"].shape[-1])
        if "reg_token" in sd:
            cls_pos = torch.randn_like(sd["cls_token"])
            sd["register_tokens"] = sd.pop("reg_token")
            sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
            sd["cls_token"] = sd["cls_token"] - cls_pos
    return sd


def explicit_twin(name: str, **kw) -> torch.nn.Module:
    """timm's model, random weights, explicit attention, every layer's softmax captured in `twin.maps`."""
    twin = randomized(timm.create_model(name, pretrained=False, dynamic_img_size=True, **kw))
    twin.maps = []
    for block in twin.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, inp, out: twin.maps.append(inp[0]))
    return twin


# DINOv2 at its native 518 px (37 x 37 patches) and DINO / DeiT III at 224 are run with depth=2 (full width) for CPU
# speed; the other size exercises the position-embedding resampling.
CASES = [("deit3_small_patch16_224", "deit3", [(224, 224), (160, 192)]),
         ("vit_small_patch16_224.dino", "dino", [(224, 224), (128, 176)]),
         ("vit_small_patch14_dinov2", "dinov2", [(518, 518), (224, 168)]),
         ("vit_small_patch14_reg4_dinov2", "dinov2", [(518, 518), (224, 168)])]


@pytest.mark.parametrize("name, family, sizes", CASES)
def test_official_releases_match_timm(name, family, sizes):
    twin = explicit_twin(name, depth=2)
    model = load_pretrained(official_keys(twin.state_dict(), family)).eval()
    assert model.num_prefix_tokens == twin.num_prefix_tokens
    assert sorted(model.state_dict()) == sorted(twin.state_dict())
    for size in sizes:
        x = torch.randn(1, 3, *size)
        twin.maps.clear()
        with torch.no_grad():
            out, maps = model(x, return_attn=True)
            expected = twin(x)
            cls_out, rows = model(x, return_attn="cls")
        torch.testing.assert_close(out, expected, **TOL)
        torch.testing.assert_close(cls_out, expected, **TOL)
        tokens = model.num_prefix_tokens + (size[0] // model.patch_size) * (size[1] // model.patch_size)
        assert len(maps) == len(twin.maps) == 2
        for ours, theirs, row in zip(maps, twin.maps, rows, strict=True):
            assert ours.shape == (1, 6, tokens, tokens)
            torch.testing.assert_close(ours, theirs, **TOL)
            torch.testing.assert_close(row, ours[:, :, 0], **TOL)
        print(f"{name} {size}: max |out diff| {(out - expected).abs().max():.2e}, max |attn diff| "
              f"{max((a - b).abs().max() for a, b in zip(maps, twin.maps, strict=True)):.2e}")


def test_registry_architectures_match_timm():
    """Every registry entry builds timm's model of the same name (shapes of every tensor), on the meta device."""
    for name, release in pretrained.REGISTRY.items():
        with torch.device("meta"):
            ours = VisionTransformer(**release.arch)
            if name == "vit_b_16":
                from torchvision.models import vit_b_16
                theirs = pretrained.to_timm_state_dict(vit_b_16().state_dict())[0]
            else:
                theirs = timm.create_model(name, pretrained=False).state_dict()
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}, name
        assert release.img_size == release.arch["patch_size"] * release.arch["grid_size"][0]
    for alias, name in pretrained.ALIASES.items():
        assert pretrained.registry_name(alias) == name
    assert pretrained.registry_name("dinov2_vits14_reg") == "vit_small_patch14_reg4_dinov2"


def test_defaults_change_nothing():
    model = VisionTransformer(48, 96, 3, 2, 4, 3, 64, 7)
    assert set(model.config) == {"embed_dim", "hidden_dim", "num_heads", "num_layers", "patch_size", "num_channels",
                                 "num_patches", "num_classes", "dropout", "grid_size", "attn_dropout", "drop_path_rate"}
    assert model.num_prefix_tokens == 1 and model.pos_embed.shape == (1, 65, 48)
    assert not any("ls1" in k or "ls2" in k or "reg_token" in k for k in model.state_dict())
    reg = VisionTransformer(48, 96, 3, 2, 4, 3, 64, 7, init_values=1e-5, reg_tokens=4, no_embed_class=True)
    assert reg.num_prefix_tokens == 5 and reg.pos_embed.shape == (1, 64, 48) and reg.reg_token.shape == (1, 4, 48)
    assert VisionTransformer(**reg.config).state_dict().keys() == reg.state_dict().keys()
    with pytest.raises(ValueError, match="reg_tokens=-1 must be a non-negative integer"):
        VisionTransformer(48, 96, 3, 2, 4, 3, 64, 7, reg_tokens=-1)


def test_cli_list(capsys):
    assert pretrained.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "vit_small_patch14_reg4_dinov2" in out and "dinov2_vits14_reg" in out and "deit_3_small_224_1k.pth" in out


# The download: a local HTTP server stands in for the release host; TORCH_HOME is a temporary folder.
TINY = dict(embed_dim=48, hidden_dim=96, num_heads=3, num_layers=2, patch_size=4, num_channels=3, num_patches=64,
            num_classes=5, grid_size=[8, 8])


@pytest.fixture
def host(tmp_path, monkeypatch):
    """(folder served at url, list of requested paths); torch's cache under tmp_path/torch."""
    served, requests = tmp_path / "served", []
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    yield served, f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def register(monkeypatch, name, url):
    monkeypatch.setitem(pretrained.REGISTRY, name, Release(url, "test", TINY, 32))


def test_download_once_then_cached(host, monkeypatch):
    served, url, requests = host
    model = randomized(VisionTransformer(**TINY))
    torch.save(model.state_dict(), served / "tmp.pth")
    digest = hashlib.sha256((served / "tmp.pth").read_bytes()).hexdigest()[:8]
    (served / "tmp.pth").rename(served / f"tiny-{digest}.pth")
    register(monkeypatch, "tiny_test", f"{url}/tiny-{digest}.pth")
    x = torch.randn(1, 3, 32, 32)
    first = load_pretrained("tiny_test").eval()
    assert requests == [f"/tiny-{digest}.pth"]
    assert Path(pretrained.cache_path("tiny_test")).is_file()
    assert Path(pretrained.cache_path("tiny_test")).parent.parent.parent == Path(str(served)).parent / "torch"
    second = load_pretrained("tiny_test").eval()
    assert len(requests) == 1  # no second request
    with torch.no_grad():
        torch.testing.assert_close(first(x), model(x), atol=0, rtol=0)
        torch.testing.assert_close(second(x), model(x), atol=0, rtol=0)


def test_hash_mismatch_refused_and_not_kept(host, monkeypatch):
    served, url, requests = host
    torch.save(VisionTransformer(**TINY).state_dict(), served / "tiny-deadbeef.pth")
    register(monkeypatch, "bad_test", f"{url}/tiny-deadbeef.pth")
    with pytest.raises(CheckpointError, match="invalid hash value") as err:
        load_pretrained("bad_test")
    assert "\n" not in str(err.value) and f"{url}/tiny-deadbeef.pth" in str(err.value)
    cache = Path(pretrained.cache_path("bad_test")).parent
    assert requests and not any(cache.iterdir())  # neither the file nor a temporary one is left


def test_offline_one_line_message(host, monkeypatch):
    served, url, requests = host
    register(monkeypatch, "missing_test", f"{url}/missing.pth")  # 404
    with pytest.raises(CheckpointError) as err:
        load_pretrained("missing_test")
    path = pretrained.cache_path("missing_test")
    assert str(err.value).startswith(f"could not download missing_test from {url}/missing.pth")
    assert str(err.value).endswith(f"put it at {path}.") and "\n" not in str(err.value)
    import socket
    with socket.socket() as s:  # a port nobody listens on: the connection is refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    register(monkeypatch, "offline_test", f"http://127.0.0.1:{port}/tiny.pth")
    with pytest.raises(CheckpointError, match=r"could not download offline_test from http://127\.0\.0\.1:\d+/tiny.pth "
                                              r"\(.*\); download it by hand and put it at .*tiny.pth\.$"):
        load_pretrained("offline_test")
    with pytest.raises(CheckpointError, match="does not exist and is not a registry name"):
        load_pretrained("no_such_model")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_real_deit_tiny_by_name_equals_the_path(tmp_path, monkeypatch):
    from PIL import Image
    from torchvision.transforms import v2

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = SHARED / "weights" / "deit_tiny_patch16_224_lnq.pth"
    cached = Path(pretrained.cache_path("deit_tiny_patch16_224"))
    cached.parent.mkdir(parents=True)
    shutil.copy(weights, cached)  # under the registry's file name, as if downloaded
    tf = v2.Compose([v2.ToImage(), v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(224),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = tf(Image.open(SHARED / "photos" / "dog_and_cat.png").convert("RGB"))[None]
    with torch.no_grad():
        by_name = load_pretrained("deit_tiny_patch16_224").eval()(x)
        by_path = load_pretrained(str(weights)).eval()(x)
    torch.testing.assert_close(by_name, by_path, atol=0, rtol=0)
    assert torch.equal(by_name.topk(5).indices, by_path.topk(5).indices)


# Maps with registers, token norms, and imagenet.vis_attn by name.
REG = dict(TINY, init_values=0.5, reg_tokens=4, no_embed_class=True)


def test_maps_cover_the_patches_only():
    from attention.figures import attention_figure
    from utils.img2attn import attention_rollout, cls_attention, explain, gradient_rollout, token_norms

    model = randomized(VisionTransformer(**REG))
    x = torch.randn(2, 3, 32, 40)
    grid = model.patch_grid(32, 40)
    with torch.no_grad():
        _, attn = model(x, return_attn=True)
        _, rows = model(x, return_attn="cls")
    assert attn[0].shape[-1] == 5 + 8 * 10 and model.num_prefix_tokens == 5
    for maps in (attn, rows):
        torch.testing.assert_close(cls_attention(maps, 0, 1, grid, prefix_tokens=5)[0],
                                   attn[0][0, 1, 0, 5:].reshape(8, 10), **TOL)
    rollout = attention_rollout(attn, grid=grid, prefix_tokens=5)
    assert rollout.shape == (2, 8, 10) and (rollout.sum((1, 2)) < 1).all()
    assert gradient_rollout(model, x).shape == (2, 8, 10)
    norms = token_norms(model, x)
    with torch.no_grad():  # by hand: every token through every block, the patch tokens' norms after the last one
        t = model
        h = torch.cat([t.cls_token.expand(2, -1, -1), t.reg_token.expand(2, -1, -1),
                       t.patch_embed.proj(x).flatten(2).transpose(1, 2) + t.position_embedding(grid)], 1)
        for block in t.blocks:
            h = block(h)[0]
    assert norms.shape == (2, 2, 8, 10)
    torch.testing.assert_close(norms[:, -1], h[:, 5:].norm(dim=-1).reshape(2, 8, 10), **TOL)
    headless = randomized(VisionTransformer(**{**REG, "num_classes": 0}))
    fig = attention_figure(explain(headless, x[:1]), torch.rand(32, 40, 3))
    titles = [a.get_title() for a in fig.subfigs[0].axes]
    assert titles == ["input", "attention rollout", "token norm, layer 2"]
    fig = attention_figure(explain(model, x[:1]), torch.rand(32, 40, 3))
    assert len(fig.subfigs[0].axes) == 5


def test_vis_attn_headless_registers(tmp_path, capsys):
    from imagenet import vis_attn

    assert Path(vis_attn.OPTIONS["image"][0]).is_file()  # the shipped photo
    torch.save(randomized(VisionTransformer(**{**REG, "num_classes": 0})).state_dict(), tmp_path / "reg.pth")
    vis_attn.main(["--model", str(tmp_path / "reg.pth"), "--img-size", "32", "--out", str(tmp_path / "f.png")])
    out = capsys.readouterr().out
    assert "no classification head" in out and "1. " not in out and (tmp_path / "f.png").is_file()
    with pytest.raises(SystemExit, match="error: --target needs a classification head"):
        vis_attn.main(["--model", str(tmp_path / "reg.pth"), "--img-size", "32", "--target", "3"])
    with pytest.raises(SystemExit, match="error: checkpoint 'nope' does not exist and is not a registry name"):
        vis_attn.main(["--model", "nope"])
    assert f"{tmp_path / 'reg.pth'}: released weights" in out
    model = VisionTransformer(**{**REG, "num_classes": 0})
    torch.save({"model_config": model.config, "model": model.state_dict(), "ema_model": model.state_dict(),
                "reported_weights": "ema"}, tmp_path / "run.pth")
    vis_attn.main(["--model", str(tmp_path / "run.pth"), "--img-size", "32", "--out", str(tmp_path / "f.png")])
    assert "run.pth: EMA weights (the run's reported model)" in capsys.readouterr().out
    vis_attn.main(["--inspect", "--model", str(tmp_path / "run.pth"), "--inspect-images", vis_attn.OPTIONS["image"][0],
                   "--img-size", "32", "--out", str(tmp_path / "i.png")])
    assert "run.pth (EMA weights (the run's reported model)): 1 photo(s)" in capsys.readouterr().out


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_vis_attn_by_name_equals_the_path(tmp_path, monkeypatch, capsys):
    from imagenet import vis_attn

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = SHARED / "weights" / "deit_tiny_patch16_224_lnq.pth"
    cached = Path(pretrained.cache_path("deit_tiny_patch16_224"))
    cached.parent.mkdir(parents=True)
    shutil.copy(weights, cached)
    photo = str(SHARED / "photos" / "dog_and_cat.png")
    tops = []
    for model in ("deit_tiny_patch16_224", str(weights)):
        vis_attn.main(["--image", photo, "--model", model, "--out", str(tmp_path / "f.png")])
        out = capsys.readouterr().out.splitlines()
        tops.append([line for line in out if line[:2] in {f"{i}." for i in range(1, 6)}])
    assert len(tops[0]) == 5 and tops[0] == tops[1]


# Which weights a checkpoint gives, and files that torch.load(weights_only=True) refuses.
@pytest.mark.parametrize("reported, prefer_ema, gives, note", [
    ("ema", None, "ema", "EMA weights (the run's reported model)"),
    ("model", None, "model", "trained weights (not the EMA: the run reported the model)"),
    (None, None, "model", "trained weights (not the EMA: the checkpoint does not say which weights the run reported)"),
    ("model", True, "ema", "EMA weights (prefer_ema=True; the run reported the model)"),
    ("ema", False, "model", "trained weights (prefer_ema=False; the run reported the EMA)")])
def test_checkpoint_gives_the_weights_its_run_reported(tmp_path, reported, prefer_ema, gives, note):
    trained, ema = randomized(VisionTransformer(**TINY)), VisionTransformer(**TINY)
    ckpt = {"model_config": trained.config, "model": trained.state_dict(), "ema_model": ema.state_dict()}
    if reported:
        ckpt["reported_weights"] = reported
    torch.save(ckpt, tmp_path / "c.pth")
    expected = (ema if gives == "ema" else trained).state_dict()
    for source in (ckpt, tmp_path / "c.pth"):
        model = load_pretrained(source, prefer_ema=prefer_ema)
        assert model.weights_note == note
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert pretrained.weights_choice(ckpt, prefer_ema) == (gives == "ema", note)


def test_weights_notes_and_bad_reported_weights():
    model = randomized(VisionTransformer(**TINY))
    sd = model.state_dict()
    assert load_pretrained(sd).weights_note == "released weights"
    assert load_pretrained({"model_config": model.config, "model": sd}).weights_note == "trained weights"
    assert load_pretrained({"model_config": model.config, "model": sd}, prefer_ema=True).weights_note == \
        "trained weights"  # no EMA to prefer
    old_ema = {"module." + k: v for k, v in sd.items()} | {"n_averaged": torch.tensor(5)}  # AveragedModel's format
    zeros = {k: torch.zeros_like(v) for k, v in sd.items()}
    loaded = load_pretrained({"model_config": model.config, "model": zeros, "ema_model": old_ema,
                              "reported_weights": "ema"})
    assert torch.equal(loaded.head.weight, model.head.weight)
    with pytest.raises(CheckpointError, match="reports its EMA weights .* but holds no ema_model"):
        load_pretrained({"model_config": model.config, "model": sd, "reported_weights": "ema"})
    with pytest.raises(CheckpointError, match="reported_weights 'best' is neither 'ema' nor 'model'"):
        load_pretrained({"model_config": model.config, "model": sd, "reported_weights": "best"})


class Settings:  # a class of the training script: weights_only loading refuses it
    lr = 0.1


@pytest.mark.parametrize("obj, named", [(torch.nn.Linear(2, 3), "torch.nn.modules.linear.Linear"),
                                        ({"model": {}, "args": Settings()}, "Settings")])
def test_pickled_objects_named_as_such(tmp_path, obj, named):
    torch.save(obj, tmp_path / "c.pth")
    with pytest.raises(CheckpointError) as err:
        pretrained.read_checkpoint(tmp_path / "c.pth")
    message = str(err.value)
    assert message.startswith(f"'{tmp_path / 'c.pth'}' pickles Python objects (e.g. ") and "\n" not in message
    assert f"{named}) that weights_only loading refuses: they could run arbitrary code" in message
    assert message.endswith("load it only if you trust it, then re-save its state dict.")
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "dino.pth")  # DINO's: allowed
    assert pretrained.read_checkpoint(tmp_path / "dino.pth")["args"].lr == 0.1
    torch.save(torch.nn.Linear(2, 3).state_dict(), tmp_path / "t.pth")
    for garbage in ((tmp_path / "t.pth").read_bytes()[:300], b"hello, I am a text file\n"):  # truncated, foreign
        (tmp_path / "g.pth").write_bytes(garbage)
        with pytest.raises(CheckpointError, match=r"is not a readable PyTorch checkpoint: it is truncated or another "
                                                  r"kind of file\.$"):
            pretrained.read_checkpoint(tmp_path / "g.pth")
