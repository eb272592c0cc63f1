"""Named pretrained weights: DeiT III / DINO / DINOv2 (registers) parity with timm, the registry, the download;
which weights a repo checkpoint gives (the EMA only when its run reported it); files that pickle Python objects,
damaged files, unknown names; architectures the built-in model cannot build; DINO / DINOv2's own resampling of the
position table under their project's names; DINOv2 training dumps with block chunks."""

import argparse
import hashlib
import http.server
import math
import os
import pickle
import re
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
    """Every registry entry builds timm's model of the same name (shapes of every tensor), on the meta device;
    DINO / DINOv2 also under their torch.hub name: the same file and model, resampled by their own rule."""
    project_names = {n: r for n, r in pretrained.REGISTRY.items() if n.startswith("dino")}
    assert sorted(project_names) == sorted(["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"] + [
        f"dinov2_vit{s}14{r}" for s in "sbl" for r in ("", "_reg")])
    for name, release in project_names.items():
        twin = next(n for n, r in pretrained.REGISTRY.items() if r.url == release.url and n != name)
        assert release.arch == dict(pretrained.REGISTRY[twin].arch, pos_embed_interp=release.family.lower()), name
        assert "pos_embed_interp" not in pretrained.REGISTRY[twin].arch and release.family in ("DINO", "DINOv2")
    for name, release in pretrained.REGISTRY.items():
        if name in project_names:
            continue
        with torch.device("meta"):
            ours = VisionTransformer(**release.arch)
            if name == "vit_b_16":
                from torchvision.models import vit_b_16
                theirs = pretrained.to_timm_state_dict(vit_b_16().state_dict())[0]
            else:
                theirs = timm.create_model(name, pretrained=False).state_dict()
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}, name
        assert release.img_size == release.arch["patch_size"] * release.arch["grid_size"][0]
    assert pretrained.registry_name("dinov2_vits14_reg") == "dinov2_vits14_reg"


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
    rows = {line.split()[0]: line.split()[2] for line in out.splitlines()[1:] if "https://" in line}
    assert rows["dinov2_vits14"] == "dinov2" and rows["dino_vits16"] == "dino"
    assert rows["vit_small_patch14_dinov2"] == rows["vit_small_patch16_224.dino"] == "timm"


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
    assert f"{tmp_path / 'reg.pth'}: the checkpoint's weights; 1 attention head assumed (embed_dim 48 // 64" in out
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
    assert load_pretrained(sd).weights_note.startswith("the checkpoint's weights; 1 attention head assumed")  # 3 it was
    assert load_pretrained(sd, num_heads=3).weights_note == "the checkpoint's weights"
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



# Malicious and damaged files (#20 fault 5): a refusal is told from damage by the exception and the file itself.
class Planted:
    """Unpickling it would call os.mkdir(path) (or any function): the classic malicious checkpoint."""

    def __init__(self, path, call=os.mkdir):
        self.path, self.call = str(path), call

    def __reduce__(self):
        return self.call, (self.path,)


def malicious_files(tmp_path):
    """(file, the global it plants): torch.save (zip and legacy format) and plain pickle of every protocol."""
    ran = tmp_path / "ran"
    payload = {"weight": torch.zeros(2), "x": Planted(ran)}
    torch.save(payload, tmp_path / "zip.pth")
    torch.save(payload, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    yield tmp_path / "zip.pth", f"{os.mkdir.__module__}.mkdir"
    yield tmp_path / "legacy.pth", f"{os.mkdir.__module__}.mkdir"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / f"p{protocol}.pkl").write_bytes(pickle.dumps({"x": Planted(ran)}, protocol=protocol))
        yield tmp_path / f"p{protocol}.pkl", f"{os.mkdir.__module__}.mkdir"
    torch.save({"x": Planted("hi", print)}, tmp_path / "print.pth")
    yield tmp_path / "print.pth", "builtins.print"
    torch.save({"x": Planted(ran, os.getpid)}, tmp_path / "getpid.pth")  # the reported case (getpid takes no
    yield tmp_path / "getpid.pth", f"{os.getpid.__module__}.getpid"     # argument, but it is refused before)


def test_malicious_pickle_is_refused_not_called_truncated(tmp_path):
    for path, planted in malicious_files(tmp_path):
        with pytest.raises(CheckpointError) as err:
            load_pretrained(path)
        assert str(err.value) == (f"'{path}' pickles Python objects (e.g. {planted}) that weights_only loading "
                                  f"refuses: they could run arbitrary code; load it only if you trust it, then "
                                  f"re-save its state dict."), path
        assert not (tmp_path / "ran").exists()  # nothing ran


def test_damaged_files_are_called_damaged(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(VisionTransformer(**TINY).state_dict(), good)
    data = good.read_bytes()
    torch.save(VisionTransformer(**TINY).state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    at = data.find(b"_rebuild_tensor_v2")  # a byte flipped inside the pickle: the zip's CRC tells
    damaged = {"truncated.pth": data[:len(data) // 2], "tail.pth": data[:-40], "flipped.pth": data[:at] + b"X"
               + data[at + 1:], "legacy_truncated.pth": (tmp_path / "legacy.pth").read_bytes()[:3000],
               "text.pth": b"hello, I am a text file\n", "random.pth": torch.randint(0, 256, (4096,),
               generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()}
    import zipfile
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
    for path in [*(tmp_path / name for name in damaged), tmp_path / "other.zip"]:
        with pytest.raises(CheckpointError) as err:
            pretrained.read_checkpoint(path)
        assert str(err.value) == (f"'{path}' is not a readable PyTorch checkpoint: it is truncated, damaged or "
                                  f"another kind of file."), path
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"'.*empty.pth' is empty \(0 bytes\), not a checkpoint\.$"):
        pretrained.read_checkpoint(tmp_path / "empty.pth")
    assert set(pretrained.read_checkpoint(good)) == set(VisionTransformer(**TINY).state_dict())


def test_folders_missing_files_and_registry_typos(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match=r"^'.*run' is a folder, not a checkpoint file\.$"):
        load_pretrained(run)
    torch.save(VisionTransformer(**TINY).state_dict(), run / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"^'.*run' is a folder, not a checkpoint file; pass a file in it, e\.g\. "
                                              r"'.*run/checkpoint\.pth'\.$"):
        load_pretrained(str(run))
    for path in (tmp_path / "nope.pth", str(tmp_path / "nope.pth"), "runs/x/checkpoint.pth"):
        with pytest.raises(CheckpointError, match=r"^checkpoint '.*nope.pth' does not exist\.$|^checkpoint "
                                                  r"'runs/x/checkpoint.pth' does not exist\.$"):
            load_pretrained(path)
    for typo, meant in [("dinov2_vits41", "dinov2_vits14"), ("deit_tiny_patch16_244", "deit_tiny_patch16_224"),
                        ("DINOv2_ViTS14_reg", "dinov2_vits14_reg"), ("vit_small_patch14_dinov2.lvd142m",
                                                                       "vit_small_patch14_dinov2")]:
        with pytest.raises(CheckpointError) as err:
            load_pretrained(typo)
        assert str(err.value) == (f"'{typo}' is neither a file nor a registry name; did you mean '{meant}'? "
                                  f"(python -m models.pretrained --list)")
    with pytest.raises(CheckpointError, match=r"^checkpoint 'my_model' does not exist and is not a registry name "
                                              r"\(python -m models\.pretrained --list\)\.$"):
        load_pretrained("my_model")
    monkeypatch.chdir(tmp_path)
    torch.save(VisionTransformer(**TINY).state_dict(), tmp_path / "deit_tiny_patch16_224")
    assert pretrained.resolve("deit_tiny_patch16_224") is None  # a file of that name wins: nothing is downloaded


# Checkpoints of architectures the built-in model cannot build (#20 fault 3): one line naming what they hold.
def per_block(**shapes) -> dict:
    """Random tensors for both blocks of TINY: per_block(**{"mlp.w3.weight": (48, 96)})."""
    return {f"blocks.{i}.{key}": torch.randn(shape) for i in range(2) for key, shape in shapes.items()}


def without(sd: dict, *patterns: str) -> dict:
    return {k: v for k, v in sd.items() if not any(re.search(p, k) for p in patterns)}


def chunked(sd: dict, chunks: int = 2) -> dict:
    """DINOv2's block_chunks layout: blocks.<chunk>.<i>.* with the global block index i."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    per = depth // chunks
    return {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // per}.{m[1]}.", k): v for k, v in sd.items()}


def torchvision_pre_logits(sd: dict) -> dict:
    from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT
    return TorchvisionViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                          num_classes=5, representation_size=8).state_dict()


SWIGLU_G = {"mlp.w12.weight": (192, 48), "mlp.w12.bias": (192,), "mlp.w3.weight": (48, 96), "mlp.w3.bias": (48,)}
POOL = {"attn_pool.latent": (1, 1, 48), "attn_pool.q.weight": (48, 48), "attn_pool.kv.weight": (96, 48)}
T = torch.randn
UNSUPPORTED = [  # (file, what it holds -> its keys, fragments the message must have)
    ("DINOv2 ViT-g, official chunked", lambda sd: chunked(without(sd, r"\.mlp\.") | per_block(**SWIGLU_G))
     | {"mask_token": T(1, 48)}, ["a ViT with a SwiGLU MLP", "blocks.N.mlp.w12.weight", "vit_giant_patch14_dinov2"]),
    ("timm SwiGLU", lambda sd: without(sd, r"\.mlp\.fc1") | per_block(**{"mlp.fc1_g.weight": (96, 48),
     "mlp.fc1_x.weight": (96, 48)}), ["a SwiGLU MLP (timm's SwiGLU, EVA-02) (blocks.N.mlp.fc1_g.weight)", "eva02_*"]),
    ("timm SwiGLUPacked / GluMlp", lambda sd: without(sd, r"\.mlp\.fc1") | per_block(
        **{"mlp.fc1.weight": (192, 48), "mlp.fc1.bias": (192,)}), ["a gated MLP packed in mlp.fc1"]),
    ("DINOv3, official", lambda sd: without(sd, "pos_embed") | {"rope_embed.periods": T(6), "storage_tokens":
     T(1, 4, 48)}, ["rotary position embedding (rope_embed.periods)", "storage tokens", "no position table",
                    "load it with timm (vit_*_dinov3"]),
    ("DINOv3, timm", lambda sd: without(sd, "pos_embed", r"qkv\.bias"), ["no position table (no pos_embed",
                                                                         "no qkv bias", "vit_*_dinov3"]),
    ("EVA-02", lambda sd: sd | {"rope.freqs_cos": T(64, 16)}, ["rotary position embedding (rope.freqs_cos)"]),
    ("q/k norm", lambda sd: sd | per_block(**{"attn.q_norm.weight": (16,), "attn.k_norm.weight": (16,)}),
     ["q/k normalisation (blocks.N.attn.q_norm.weight)", "qk_norm=True"]),
    ("average pooling, no class token", lambda sd: without(sd, "cls_token") | {"pos_embed": T(1, 64, 48),
     "fc_norm.weight": T(48)}, ["no class token (no cls_token", "fc_norm", "class_token=False"]),
    ("SigLIP", lambda sd: without(sd, "cls_token") | {"pos_embed": T(1, 64, 48)} | {k: T(s) for k, s in POOL.items()},
     ["attention-pool head (SigLIP) (attn_pool.latent)", "no class token", "vit_*_siglip_*"]),
    ("distilled DeiT", lambda sd: sd | {"dist_token": T(1, 1, 48), "head_dist.weight": T(5, 48)},
     ["distillation token (distilled DeiT) (dist_token)", "deit_*_distilled_patch16_224"]),
    ("BEiT", lambda sd: without(sd, r"qkv\.bias") | per_block(**{"attn.q_bias": (48,), "attn.v_bias": (48,),
     "attn.relative_position_bias_table": (100, 3)}), ["relative position bias (BEiT)", "beit_*"]),
    ("CaiT", lambda sd: sd | {"blocks_token_only.0.attn.q.weight": T(48, 48)}, ["class-attention blocks (CaiT)"]),
    ("CLIP image tower, timm", lambda sd: sd | {"norm_pre.weight": T(48)}, ["a norm before the blocks (CLIP)"]),
    ("hybrid ViT", lambda sd: sd | {"patch_embed.backbone.stem.conv.weight": T(8, 3, 7, 7)},
     ["a convolutional stem (a hybrid ViT) (patch_embed.backbone.stem.conv.weight)", "vit_*_r50_*"]),
    ("ConViT", lambda sd: sd | per_block(**{"attn.gating_param": (3,)}), ["gated positional self-attention"]),
    ("torchvision with pre-logits", torchvision_pre_logits, ["pre-logits layer", "heads.pre_logits.weight"]),
    ("ConvNeXt", lambda sd: {"stem.0.weight": T(8, 3, 4, 4), "stages.0.blocks.0.conv_dw.weight": T(8, 1, 7, 7)},
     ["a ConvNeXt (keys such as stages.N.blocks.N.conv_dw.weight)", "convnext_*"]),
    ("ResNet", lambda sd: {"conv1.weight": T(8, 3, 7, 7), "layer1.0.conv1.weight": T(8, 8, 3, 3), "fc.weight": T(5, 8)},
     ["a ResNet (keys such as layer1.N.conv1.weight)", "resnet*"]),
    ("Swin", lambda sd: {"patch_embed.proj.weight": T(8, 3, 4, 4), "layers.0.blocks.0.attn.qkv.weight": T(24, 8),
                         "layers.0.blocks.0.attn.relative_position_bias_table": T(169, 2)}, ["a Swin Transformer"]),
    ("CLIP text tower", lambda sd: {"token_embedding.weight": T(100, 8), "positional_embedding": T(77, 8)},
     ["a text model (keys such as token_embedding.weight)"]),
    ("BERT", lambda sd: {"bert.embeddings.word_embeddings.weight": T(100, 8)}, ["a text model"]),
    ("OpenAI CLIP", lambda sd: {"visual.conv1.weight": T(8, 3, 4, 4), "visual.class_embedding": T(8),
                                "token_embedding.weight": T(100, 8)}, ["a CLIP model", "load it with open_clip"]),
    ("transformers ViT", lambda sd: {"vit.embeddings.cls_token": T(1, 1, 8), "vit.embeddings.patch_embeddings."
                                     "projection.weight": T(8, 3, 4, 4)}, ["Hugging Face transformers model"]),
    ("no ViT at all", lambda sd: {"foo.weight": T(3), "bar": T(2)}, ["not a ViT checkpoint: it has no "
                                                                      "patch_embed.proj.weight", "foo.weight"]),
]


@pytest.mark.parametrize("label, make, fragments", UNSUPPORTED, ids=[c[0] for c in UNSUPPORTED])
def test_unsupported_architectures_named_in_one_line(tmp_path, label, make, fragments):
    torch.manual_seed(0)
    torch.save(make(VisionTransformer(**TINY).state_dict()), tmp_path / "c.pth")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tmp_path / "c.pth")
    message = str(err.value)
    assert "\n" not in message and message.endswith("."), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    if "not a ViT checkpoint" not in message:
        assert "which the built-in VisionTransformer does not support" in message
    if label == "torchvision with pre-logits":
        assert "timm" not in message  # timm has no model for torchvision's file


def test_unsupported_file_through_the_script(tmp_path):
    """--model of imagenet.vis_attn: one line, exit != 0, no traceback."""
    from imagenet import vis_attn

    sd = VisionTransformer(**TINY).state_dict()
    torch.save(without(sd, r"\.mlp\.") | per_block(**SWIGLU_G), tmp_path / "g.pth")
    with pytest.raises(SystemExit, match=r"error: .*g\.pth: the checkpoint holds a ViT with a SwiGLU MLP"):
        vis_attn.main(["--model", str(tmp_path / "g.pth"), "--img-size", "32"])


def test_any_dict_of_tensors_gives_a_checkpoint_error():
    """Every key of a good state dict dropped, or replaced by a tensor of the wrong number of dimensions: a
    CheckpointError (never a KeyError / IndexError / RuntimeError). Without reg_token the register model is a
    whole model without registers (DeiT III's layout), and loads as one."""
    for options in (TINY, REG):
        sd = VisionTransformer(**options).state_dict()
        for key in sd:
            for broken in (without(sd, f"^{re.escape(key)}$"), sd | {key: torch.zeros(())},
                           sd | {key: torch.zeros(2, 2, 2, 2, 2)}):
                if "reg_token" in sd and broken.keys() == sd.keys() - {"reg_token"}:
                    assert load_pretrained(broken).num_prefix_tokens == 1
                    continue
                with pytest.raises(CheckpointError):
                    load_pretrained(broken)
    for odd in ({}, {"x": torch.zeros(())}, {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)},
                {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 2), "pos_embed": torch.zeros(1, 5, 8)},
                {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "cls_token": torch.zeros(1, 1, 8),
                 "pos_embed": torch.zeros(1, 1, 8), "blocks.0.mlp.fc1.weight": torch.zeros(16, 8)}):
        with pytest.raises(CheckpointError):
            load_pretrained(odd)


def test_table_without_class_row_and_no_layer_scale():
    """A position table of 64 rows in a model without LayerScale or registers: 63 patches after the class token's
    row (not a grid) or 8 x 8 without one (FlexiViT's layout); the message offers both, no_embed_class=True loads."""
    model = randomized(VisionTransformer(**TINY, no_embed_class=True))
    with pytest.raises(CheckpointError, match=r"holds 63 patches, not a square grid \(pass grid_size=\(grid_h, "
                                              r"grid_w\)\) or 64 patches without a row for the class token \(pass "
                                              r"no_embed_class=True\)\.$"):
        load_pretrained(model.state_dict())
    loaded = load_pretrained(model.state_dict(), num_heads=3, no_embed_class=True).eval()
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_giant_patch14_dinov2", "eva02_tiny_patch14_224",
                                  "vit_base_patch16_siglip_224", "vit_medium_patch16_gap_256", "beit_base_patch16_224",
                                  "cait_xxs24_224", "convnext_atto", "resnet18", "swin_tiny_patch4_window7_224",
                                  "deit_tiny_distilled_patch16_224", "vit_base_patch16_clip_224",
                                  "vit_base_patch16_rope_reg1_gap_256", "vit_small_patch16_18x2_224",
                                  "convit_tiny", "vit_small_r26_s32_224", "volo_d1_224"])
def test_timm_architectures_named(name):
    """timm's own state dicts of other architectures (shapes only, on the meta device) are refused by name."""
    with torch.device("meta"):
        sd = timm.create_model(name, pretrained=False).state_dict()
    with pytest.raises(CheckpointError, match="does not support|not a ViT checkpoint|a ViT's has 3 dimensions"):
        sd, _ = pretrained.to_timm_state_dict(sd)
        pretrained.infer_config(sd)


# DINO / DINOv2 under their project's name resample the position table as their official code does (#20 fault 6).
def official_resample(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(g0h, g0w, D) -> (gh, gw, D) in float64, written from the description of DINO's and DINOv2's
    interpolate_pos_encoding: bicubic (Keys' kernel, a = -0.75, edge samples repeated), no antialiasing, with the
    scale factor (g + 0.1) / g0 per side: output pixel i samples the table at x = (i + 0.5) · g0 / (g + 0.1) - 0.5."""
    def cubic(d: float, a: float = -0.75) -> float:
        d = abs(d)
        return (a + 2) * d**3 - (a + 3) * d**2 + 1 if d <= 1 else a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a

    def weights(g0: int, g: int) -> torch.Tensor:
        w = torch.zeros(g, g0, dtype=torch.float64)
        for i in range(g):
            x = (i + 0.5) * g0 / (g + 0.1) - 0.5
            left = math.floor(x)
            for j in range(left - 1, left + 3):
                w[i, min(max(j, 0), g0 - 1)] += cubic(x - j)
        return w

    return torch.einsum("ia,abd,jb->ijd", weights(table.shape[0], grid[0]), table.double(),
                        weights(table.shape[1], grid[1]))


@pytest.mark.parametrize("rule", ["dino", "dinov2"])
@pytest.mark.parametrize("grid0, grids", [((37, 37), [(16, 16), (16, 12), (24, 40), (40, 37), (5, 3)]),
                                          ((14, 14), [(16, 16), (9, 16), (28, 28), (7, 11)]),
                                          ((6, 8), [(8, 6), (9, 12), (3, 4)])])
def test_project_rule_equals_the_official_formula(rule, grid0, grids):
    """In float64 the formula itself (to 1e-9); in float32, at the scale of a trained table (std 0.02), to 1e-6."""
    options = dict(TINY, num_patches=grid0[0] * grid0[1], grid_size=grid0, reg_tokens=4, no_embed_class=True)
    model = VisionTransformer(**options, pos_embed_interp=rule)
    timm_rule = VisionTransformer(**options)
    torch.manual_seed(0)
    with torch.no_grad():
        timm_rule.pos_embed.copy_(model.pos_embed)
        for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-6)):
            model.to(dtype)
            for grid in grids:
                ours = model.position_embedding(grid)[0].reshape(*grid, -1)
                expected = official_resample(model.pos_embed[0].reshape(*grid0, -1), grid)
                assert ours.dtype == dtype
                torch.testing.assert_close(ours.double(), expected, atol=tol, rtol=0)
                assert (timm_rule.position_embedding(grid)[0].reshape(*grid, -1) - ours.float()).abs().max() > 1e-3
    assert model.config["pos_embed_interp"] == rule and "pos_embed_interp" not in timm_rule.config
    rebuilt = VisionTransformer(**model.config)
    assert rebuilt.pos_embed_interp == rule and rebuilt.config == model.config


def test_project_name_loads_with_its_rule(host, monkeypatch):
    served, url, requests = host
    model = randomized(VisionTransformer(**TINY))
    torch.save(model.state_dict(), served / "tiny.pth")
    register(monkeypatch, "tiny_timm_name", f"{url}/tiny.pth")
    monkeypatch.setitem(pretrained.REGISTRY, "tiny_hub_name",
                        Release(f"{url}/tiny.pth", "DINOv2", dict(TINY, pos_embed_interp="dinov2"), 32))
    by_hub, by_timm = load_pretrained("tiny_hub_name").eval(), load_pretrained("tiny_timm_name").eval()
    assert len(requests) == 1  # one file for both names
    assert by_hub.pos_embed_interp == "dinov2" and by_timm.pos_embed_interp == "timm"
    x = torch.randn(1, 3, 48, 36)
    with torch.no_grad():
        assert not torch.allclose(by_hub(x), by_timm(x), atol=1e-4)
        torch.testing.assert_close(by_hub(x[..., :32, :32]), by_timm(x[..., :32, :32]), atol=0, rtol=0)
    assert load_pretrained(model.state_dict(), pos_embed_interp="dino").pos_embed_interp == "dino"


def test_dinov2_training_dump_with_block_chunks():
    """A DINOv2 training checkpoint: {"model": teacher.backbone.* / student.backbone.* / heads}, blocks in
    chunks (blocks.<chunk>.<i>.*), registers as register_tokens: the teacher's backbone, all 4 blocks in order."""
    teacher = randomized(VisionTransformer(**dict(REG, num_layers=4, num_classes=0)))
    official = official_keys(teacher.state_dict(), "dinov2")
    student = {k: v + 1 for k, v in official.items()}
    dump = {"model": {f"teacher.backbone.{k}": v for k, v in chunked(official).items()}
            | {f"student.backbone.{k}": v for k, v in chunked(student).items()}
            | {"teacher.dino_head.mlp.0.weight": torch.randn(8, 48), "student.ibot_head.last_layer.weight": T(9, 8)},
            "iteration": 1250}
    assert "teacher.backbone.blocks.1.3.norm1.weight" in dump["model"]
    loaded = load_pretrained(dump, num_heads=3).eval()
    assert loaded.config["num_layers"] == 4 and loaded.num_prefix_tokens == 5
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), teacher(x), **TOL)


def test_mae_pretraining_file_gives_its_encoder():
    """MAE's pre-training checkpoint ({"model": encoder + mask_token + decoder_*}): the encoder."""
    encoder = randomized(VisionTransformer(**dict(TINY, num_classes=0)))
    mae = {"model": encoder.state_dict() | {"mask_token": T(1, 1, 48), "decoder_embed.weight": T(32, 48),
                                            "decoder_blocks.0.norm1.weight": T(32), "decoder_pred.weight": T(48, 32)}}
    loaded = load_pretrained(mae, num_heads=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x), atol=0, rtol=0)


@pytest.mark.parametrize("name, meant", [
    ("timm:vit_small_patch16_224", "timm/vit_small_patch16_224"),
    ("TIMM/vit_small_patch16_224", "timm/vit_small_patch16_224"),
    ("timm:/vit_small_patch16_224", "timm/vit_small_patch16_224"),
    ("timm/timm/vit_small_patch16_224.augreg_in21k", "timm/vit_small_patch16_224.augreg_in21k"),
    ("openclip:ViT-B-16/openai", "open_clip:ViT-B-16/openai"),
    ("open-clip:ViT-B-16/openai", "open_clip:ViT-B-16/openai"),
    ("open_clip/ViT-B-16/openai", "open_clip:ViT-B-16/openai"),
    ("hf/google/vit-base-patch16-224", "hf:google/vit-base-patch16-224"),
    ("huggingface:google/vit-base-patch16-224", "hf:google/vit-base-patch16-224"),
    ("hf:https://huggingface.co/google/vit-base-patch16-224", "hf:google/vit-base-patch16-224"),
    ("hf-hub:timm/vit_base_patch16_clip_224.openai", "timm/vit_base_patch16_clip_224.openai"),
    ("hf:timm/vit_base_patch16_clip_224.openai", "timm/vit_base_patch16_clip_224.openai"),
])
def test_misspelt_library_names_say_the_right_spelling(name, meant):
    """A near-miss of a scheme gives one line with the right spelling (not registry suggestions), with no import
    of the library and no request."""
    assert pretrained.library_name_meant(name) == meant
    with pytest.raises(CheckpointError) as info:
        load_pretrained(name)
    message = str(info.value)
    assert f"did you mean '{meant}'?" in message and "\n" not in message and "--list" not in message
    if name.startswith(pretrained.LIBRARY_PREFIXES):  # the same sentence from the library loader
        with pytest.raises(CheckpointError, match=f"^{re.escape(message)}$"):
            pretrained.load_library_model(name)


@pytest.mark.parametrize("name", ["timm/vit_small_patch16_224", "hf:google/vit-base-patch16-224",
                                  "open_clip:ViT-B-16/openai", "deit_tiny_patch16_224", "runs/x.pth", "C:/x.pth"])
def test_right_names_and_paths_are_no_near_misses(name):
    assert pretrained.library_name_meant(name) is None


@pytest.mark.parametrize("name, spelling", [("timm/", "timm/<name>[.<tag>]"), ("hf:", "hf:<organisation>/<name>"),
                                            ("open_clip:", "open_clip:<architecture>/<pretrained tag>")])
def test_a_scheme_alone_says_what_to_write(name, spelling):
    with pytest.raises(CheckpointError, match=re.escape(f"'{name}' names no model; write {spelling}, e.g. ")):
        load_pretrained(name)


def tiny_rope_ape():
    """timm's RoPE-ViT with an absolute position table too (an Eva), small: its state dict has DeiT III's keys."""
    return timm.create_model("vit_small_patch16_rope_ape_224", pretrained=False, depth=1, embed_dim=64, num_heads=2,
                             img_size=32, num_classes=3).eval()


def test_rope_ape_weights_are_refused_where_the_checkpoint_names_them(tmp_path):
    """vit_*_rope_ape_* saves no rotary buffers: its keys and shapes are DeiT III's, so the name the checkpoint
    states (timm train.py's "arch", the config.json of timm's Hub layout) is what refuses it."""
    from timm.models import save_for_hf

    model = tiny_rope_ape()
    sd = model.state_dict()
    assert not [k for k in sd if "rope" in k] and "blocks.0.gamma_1" in sd and sd["pos_embed"].shape[1] == 4
    arch = "vit_small_patch16_rope_ape_224"
    torch.save({"arch": arch, "epoch": 3, "state_dict": sd}, tmp_path / "train.pth")  # timm's train.py
    save_for_hf(model, str(tmp_path / "hub"), safe_serialization=True)  # config.json + model.safetensors
    for source in (tmp_path / "train.pth", tmp_path / "hub" / "model.safetensors", {"arch": arch, "model": sd}):
        with pytest.raises(CheckpointError) as info:
            load_pretrained(source)
        message = str(info.value)
        assert message.startswith(f"the checkpoint is timm's {arch}: its rotary position embedding")
        assert f"load_pretrained('timm/{arch}')" in message and "\n" not in message
    deit3 = {"arch": "deit3_small_patch16_224", "state_dict": sd}  # the same keys under a name without RoPE load
    assert isinstance(load_pretrained(deit3, num_heads=2), VisionTransformer)
    wrapped = load_pretrained(model)  # the model object: timm's own forward, rotary positions included
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), model(x), atol=1e-5)


def test_the_hub_is_probed_once_per_endpoint(monkeypatch):
    """hub_unreachable: one request per endpoint for the process, its answer kept; HF_HUB_OFFLINE read at each
    call."""
    hub = pytest.importorskip("huggingface_hub")
    from models import any_vit

    asked = []

    class Session:
        def head(self, url, timeout):
            asked.append(url)
            if "down" in url:
                raise ConnectionError(url)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.utils, "get_session", Session)
    for endpoint, why in (("http://hub-up.invalid", None), ("http://hub-down.invalid", "cannot be reached")):
        monkeypatch.setattr(hub.constants, "ENDPOINT", endpoint)
        for _ in range(3):
            answer = any_vit.hub_unreachable()
            assert answer is None if why is None else why in answer
    assert asked == ["http://hub-up.invalid", "http://hub-down.invalid"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert any_vit.hub_unreachable() == "HF_HUB_OFFLINE is set" and len(asked) == 2
