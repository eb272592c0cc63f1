"""How a ViT looks (utils.img2attn, ViT paper Fig. 7): statistics against brute force, figures, the --inspect CLIs,
attention tracked through mnist.train / imagenet.train (resume keeps it), DeiT-tiny on the sample photos."""

from __future__ import annotations

import gzip
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attention.figures import inspection_figure
from attention.inspection import (
    attention_entropy,
    attention_stats,
    attention_table,
    inspect_model,
    mean_attention_distance,
    patch_filter_components,
    position_similarity,
)
from attention.tracking import track_attention
from imagenet import train as imagenet_train
from imagenet import vis_attn as imagenet_vis
from imagenet.dataloaders.transforms import device_transform, eval_transform
from mnist import train as mnist_train
from mnist import vis_attn as mnist_vis
from models.pretrained import load_pretrained
from models.vit import VisionTransformer
from utils.images import load_image
from utils.img2attn import attention_rollout
from utils.plots import plot_attention_curves, save_figure

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEIT = SHARED / "weights" / "deit_tiny_patch16_224_lnq.pth"
SAMPLES = SHARED / "imagenet-samples"
needs_shared = pytest.mark.skipif(not DEIT.is_file() or not SAMPLES.is_dir(), reason="needs ../shared/data")


def random_attn(B=2, heads=3, layers=2, T=7, seed=0) -> list[torch.Tensor]:
    """Random row-stochastic maps, some rows peaked: list of (B, heads, T, T) float64."""
    g = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(B, heads, T, T, generator=g, dtype=torch.float64)).softmax(-1) for _ in range(layers)]


def distance_reference(attn, grid, patch, prefix=1) -> torch.Tensor:
    """The ViT paper's mean attention distance with loops: (layers, heads)."""
    gh, gw = grid
    centres = [(i, j) for i in range(gh) for j in range(gw)]
    out = []
    for a in attn:
        B, H = a.shape[:2]
        row = []
        for h in range(H):
            total = 0.0
            for b in range(B):
                for q in range(gh * gw):
                    w = [float(a[b, h, prefix + q, prefix + k]) for k in range(gh * gw)]
                    total += sum(wk / sum(w) * math.dist(centres[q], centres[k]) * patch for k, wk in enumerate(w))
            row.append(total / (B * gh * gw))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def entropy_reference(attn) -> torch.Tensor:
    out = []
    for a in attn:
        B, H, T, _ = a.shape
        out.append([sum(-float(p) * math.log(float(p)) for b in range(B) for q in range(T) for p in a[b, h, q] if p > 0)
                    / (B * T) for h in range(H)])
    return torch.tensor(out, dtype=torch.float64)


def tiny_vit(seed=0, grid=(2, 3), channels=3) -> VisionTransformer:
    """A random ViT on 8 x 12 images (patch 4, grid 2 x 3), weights large enough for peaked attention."""
    torch.manual_seed(seed)
    model = VisionTransformer(16, 32, 2, 3, 4, channels, grid[0] * grid[1], 5, dropout=0.1, grid_size=grid)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


# ------------------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("prefix", [1, 2])
def test_distance_matches_brute_force_list_or_stacked(prefix):
    attn = random_attn(T=prefix + 6)
    want = distance_reference(attn, (2, 3), 4, prefix)
    for given in (attn, torch.stack(attn)):
        got = mean_attention_distance(given, (2, 3), 4, prefix_tokens=prefix)
        assert got.shape == (2, 3)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_attention_to_self_only_is_distance_zero():
    T = 1 + 12
    eye = torch.eye(T).expand(2, 4, T, T)
    assert torch.all(mean_attention_distance([eye, eye], (3, 4), 16) == 0)
    half = 0.5 * eye.clone()
    half[..., 0] += 0.5  # half of every row on the class token: left out, the rest is still on self
    assert torch.all(mean_attention_distance([half], (3, 4), 16) == 0)


def test_uniform_attention_is_the_grid_mean_pairwise_distance():
    gh, gw, p = 3, 4, 5
    pairs = [((i, j), (k, m)) for i in range(gh) for j in range(gw) for k in range(gh) for m in range(gw)]
    want = sum(math.dist(a, b) for a, b in pairs) * p / len(pairs)  # brute force, every ordered pair
    T = 1 + gh * gw
    uniform = torch.full((3, 2, T, T), 1 / T, dtype=torch.float64)
    torch.testing.assert_close(mean_attention_distance([uniform] * 2, (gh, gw), p),
                               torch.full((2, 2), want, dtype=torch.float64), rtol=0, atol=1e-12)


def test_entropy_uniform_one_hot_and_brute_force():
    T = 10
    uniform = torch.full((2, 3, T, T), 1 / T)
    torch.testing.assert_close(attention_entropy([uniform]), torch.full((1, 3), math.log(T)))
    one_hot = F.one_hot(torch.randint(0, T, (2, 3, T)), T).float()
    assert torch.all(attention_entropy([one_hot, one_hot]) == 0)
    attn = random_attn()
    torch.testing.assert_close(attention_entropy(attn), entropy_reference(attn), rtol=0, atol=1e-12)
    torch.testing.assert_close(attention_entropy(torch.stack(attn)), entropy_reference(attn), rtol=0, atol=1e-12)


def test_batch_equals_mean_over_images():
    attn = random_attn(B=4)
    for fn in (lambda a: mean_attention_distance(a, (2, 3), 7), attention_entropy):
        single = torch.stack([fn([a[b:b + 1] for a in attn]) for b in range(4)]).mean(0)
        torch.testing.assert_close(fn(attn), single, rtol=0, atol=1e-12)
    model = tiny_vit().double()
    x = torch.randn(5, 3, 8, 12, dtype=torch.float64)
    chunked = attention_stats(model, x, batch_size=2, rollout=5)
    whole = attention_stats(model, x, batch_size=5, rollout=5)
    torch.testing.assert_close(chunked["rollout"], whole["rollout"], rtol=0, atol=1e-12)
    per_image = [attention_stats(model, x[b:b + 1]) for b in range(5)]
    for key in ("distance", "entropy"):
        torch.testing.assert_close(chunked[key], whole[key], rtol=0, atol=1e-12)
        torch.testing.assert_close(whole[key], torch.stack([s[key] for s in per_image]).mean(0), rtol=0, atol=1e-12)


def test_class_token_and_registers_are_left_out_of_the_distance():
    attn = random_attn()
    changed = []
    for a in attn:
        a = a.clone()
        a[..., 0, :] = torch.rand_like(a[..., 0, :])  # the class token's own row: not a query
        a[..., 1:, 0] *= 7  # its column: renormalised away
        changed.append(a)
    torch.testing.assert_close(mean_attention_distance(changed, (2, 3), 4), mean_attention_distance(attn, (2, 3), 4),
                               rtol=0, atol=1e-12)
    registers = [torch.cat([a[..., :1, :], torch.rand_like(a[..., :2, :]), a[..., 1:, :]], -2) for a in attn]  # rows
    registers = [torch.cat([a[..., :1], torch.rand_like(a[..., :2]), a[..., 1:]], -1) for a in registers]  # columns
    torch.testing.assert_close(mean_attention_distance(registers, (2, 3), 4, prefix_tokens=3),
                               mean_attention_distance(attn, (2, 3), 4), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="full maps"):
        mean_attention_distance([a[:, :, 0] for a in attn], (2, 3))
    with pytest.raises(ValueError, match="square"):
        mean_attention_distance(attn)


def test_position_similarity_grid():
    model = tiny_vit(grid=(2, 3))
    sim = position_similarity(model)
    assert sim.shape == (2, 3, 2, 3)
    pos = model.pos_embed.detach()[0, 1:]
    for q in range(6):
        torch.testing.assert_close(sim[q // 3, q % 3, q // 3, q % 3], torch.tensor(1.0))  # the diagonal
        for k in range(6):
            want = F.cosine_similarity(pos[q], pos[k], dim=0)
            torch.testing.assert_close(sim[q // 3, q % 3, k // 3, k % 3], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_models_with_registers_leave_them_out(no_embed_class):
    torch.manual_seed(0)
    model = VisionTransformer(16, 32, 2, 2, 4, 3, 6, 5, grid_size=(2, 3), reg_tokens=2,
                              no_embed_class=no_embed_class).eval()
    patches = model.pos_embed.detach()[0, -6:]
    torch.testing.assert_close(position_similarity(model).reshape(6, 6),
                               F.normalize(patches, dim=-1) @ F.normalize(patches, dim=-1).T)
    x = torch.randn(3, 3, 8, 12)
    with torch.no_grad():
        _, attn = model(x, return_attn=True)
    stats = attention_stats(model, x)
    assert stats["tokens"] == 1 + 2 + 6
    torch.testing.assert_close(stats["distance"], mean_attention_distance(attn, (2, 3), 4, prefix_tokens=3))
    rolled = attention_stats(model, x, rollout=1)["rollout"]  # registers left out, as attention_rollout does
    torch.testing.assert_close(rolled, attention_rollout([a[:1] for a in attn], grid=(2, 3)))


def test_patch_filter_components_are_the_pca_of_the_filters():
    model = tiny_vit()  # 16 filters of 3 x 4 x 4 = 48 values
    comps, ratio = patch_filter_components(model, k=5)
    assert comps.shape == (5, 3, 4, 4) and ratio.shape == (5,)
    flat = comps.flatten(1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(5), rtol=0, atol=1e-5)  # orthonormal
    w = model.patch_embed.proj.weight.detach().flatten(1).double()
    w = w - w.mean(0)
    eig = torch.linalg.eigvalsh(w.T @ w).flip(0)  # covariance spectrum, largest first
    torch.testing.assert_close(ratio.double(), eig[:5] / eig.sum(), rtol=1e-4, atol=1e-6)
    for c in flat:
        assert c[c.abs().argmax()] > 0  # the deterministic sign
    assert len(patch_filter_components(model, k=1000)[0]) == 16  # capped at min(D, C·p·p)
    with torch.no_grad():  # rank-1 filters: one component holds all the variance
        v = torch.randn(3, 4, 4)
        model.patch_embed.proj.weight.copy_(torch.randn(16, 1, 1, 1) * v)
    comps, ratio = patch_filter_components(model, k=2)
    assert ratio[0] > 0.9999
    torch.testing.assert_close(comps[0].abs(), (v / v.norm()).abs(), rtol=0, atol=1e-5)


def test_inspection_figure_and_table(tmp_path):
    model = tiny_vit()
    x = torch.randn(5, 3, 8, 12)
    stats = attention_stats(model, x, rollout=2)
    assert stats["distance"].shape == stats["entropy"].shape == (3, 2) and stats["tokens"] == 7
    assert stats["grid"] == (2, 3) and stats["rollout"].shape == (2, 2, 3)
    assert torch.all(stats["entropy"] <= math.log(7) + 1e-6) and torch.all(stats["distance"] >= 0)
    table = attention_table(stats)
    assert table.count("\n") == 2 + 3 - 1 and table.splitlines()[2].startswith("| 1 |")
    save_figure(inspection_figure(inspect_model(model, x, stats=stats), name="tiny"), tmp_path / "f" / "inspect.png")
    with Image.open(tmp_path / "f" / "inspect.png") as png:
        assert png.size[0] > 1000 and png.size[1] > 800
    gray = VisionTransformer(16, 32, 2, 2, 7, 1, 16, 10)  # MNIST-shaped: gray filters, 4 x 4 grid
    save_figure(inspection_figure(inspect_model(gray, torch.randn(3, 1, 28, 28))), tmp_path / "gray.png")


def test_track_attention_draws_no_random_numbers_and_keeps_the_mode(tmp_path):
    model = tiny_vit().train()
    x = torch.randn(4, 3, 8, 12)
    before = torch.get_rng_state()
    row, maps = track_attention(model, x, rollout=3, batch_size=2)
    assert torch.equal(before, torch.get_rng_state()) and model.training
    assert maps.shape == (3, 2, 3)
    assert len(row["attn_distance"]) == len(row["attn_entropy"]) == 3
    assert len(row["attn_distance_heads"]) == 3 and len(row["attn_distance_heads"][0]) == 2
    assert row["inspect_s"] > 0 and json.loads(json.dumps(row)) == row
    metrics = [{"epoch": 1}, {"epoch": 2, **row}, {"epoch": 3, **row}]
    plot_attention_curves(metrics, tmp_path / "curves.png", title="tiny")
    assert Image.open(tmp_path / "curves.png").format == "PNG"
    plot_attention_curves(metrics[:1], tmp_path / "none.png")  # nothing tracked: no file
    assert not (tmp_path / "none.png").exists()


# ----------------------------------------------------------------------------------------------------------- MNIST
@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory) -> Path:
    """Fake MNIST files: the class is the row of a bright bar."""
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 320), ("t10k", 40)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for img, c in zip(images, labels, strict=True):
            img[4 + 2 * c:6 + 2 * c, 6:22] = 255
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, *images.shape) + images.tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


def mnist_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--embed-dim", "16", "--hidden-dim", "32", "--num-heads", "2", "--num-layers", "3", "--patch-size", "7",
            "--batch-size", "64", "--threads", "1", "--no-compile", "--no-progress", "--no-download", "--minutes", "0",
            "--epochs", "2", "--data-root", str(root), "--out", str(out), *extra]


def test_mnist_tracks_attention_and_resume_keeps_it(mnist_root, tmp_path, capsys):
    mnist_train.main(mnist_args(mnist_root, tmp_path / "straight"))
    mnist_train.main(mnist_args(mnist_root, tmp_path / "split", "--stop-after", "1"))
    assert not (tmp_path / "split" / "attention_over_training.gif").exists()  # only at the end
    mnist_train.main(mnist_args(mnist_root, tmp_path / "split", "--resume"))
    a, b = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=True) for run in ("straight", "split"))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name  # tracking does not change training
    assert a["attention_frames"]["epochs"] == b["attention_frames"]["epochs"] == [1, 2]
    assert a["attention_frames"]["maps"].shape == (2, 8, 4, 4)
    assert torch.equal(a["attention_frames"]["maps"], b["attention_frames"]["maps"])
    rows = [json.loads((tmp_path / run / "metrics.json").read_text())["epochs"] for run in ("straight", "split")]
    for ra, rb in zip(*rows, strict=True):
        assert len(ra["attn_distance"]) == len(ra["attn_entropy"]) == 3 and ra["inspect_s"] > 0
        assert ra["attn_distance_heads"] == rb["attn_distance_heads"] and ra["attn_entropy"] == rb["attn_entropy"]
        assert 0 < ra["attn_entropy"][0] <= math.log(17) + 1e-4
    for run in ("straight", "split"):
        with Image.open(tmp_path / run / "attention_over_training.gif") as gif:
            assert gif.n_frames == 2 and gif.size[0] == 8 * 56 + 7 * 2
        with Image.open(tmp_path / run / "attention_over_training.png") as strip:
            assert strip.size == (8 * 56 + 7 * 2, 2 * (56 + 16))
        assert Image.open(tmp_path / run / "attention_curves.png").format == "PNG"

    capsys.readouterr()
    mnist_vis.main(["--inspect", "--model", str(tmp_path / "straight" / "checkpoint.pth"), "--data-root",
                    str(mnist_root), "--num-images", "30", "--output", str(tmp_path / "inspect.png")])
    out = capsys.readouterr().out
    assert "30 digit(s)" in out and "| 3 |" in out and "wrote" in out
    assert Image.open(tmp_path / "inspect.png").size[0] > 1000
    with pytest.raises(SystemExit) as e:
        mnist_vis.main(["--inspect", "--model", str(tmp_path / "straight" / "checkpoint.pth"), "--num-images", "0"])
    assert str(e.value.code).startswith("error: --num-images 0") and "\n" not in str(e.value.code)


def test_mnist_without_tracking(mnist_root, tmp_path):
    mnist_train.main(mnist_args(mnist_root, tmp_path, "--no-track-attention", "--epochs", "1"))
    row = json.loads((tmp_path / "metrics.json").read_text())["epochs"][0]
    assert "attn_distance" not in row and "inspect_s" not in row
    assert not (tmp_path / "attention_over_training.gif").exists() and not (tmp_path / "attention_curves.png").exists()


# -------------------------------------------------------------------------------------------------------- ImageNet
def test_imagenet_tracks_attention_and_inspects(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 3)):
        for c, name in enumerate("ab"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 60, (36, 40, 3), dtype=np.uint8)
                a[..., c] += 180
                Image.fromarray(a).save(tmp_path / "data" / split / name / f"{i}.jpg")
    out = tmp_path / "run"
    imagenet_train.main(["--data-root", str(tmp_path / "data"), "--out", str(out), "--epochs", "1", "--device", "cpu",
                         "--embed-dim", "32", "--num-heads", "2", "--depth", "2", "--img-size", "32", "--patch-size",
                         "8", "--batch-size", "4", "--workers", "0", "--warmup-epochs", "1", "--min-lr", "0",
                         "--no-progress"])
    row = json.loads((out / "metrics.json").read_text())["epochs"][0]
    assert len(row["attn_distance"]) == 2 and len(row["attn_entropy_heads"][0]) == 2 and row["inspect_s"] > 0
    assert 0 <= min(row["attn_distance"]) and max(row["attn_entropy"]) <= math.log(17) + 1e-4
    assert (out / "attention_curves.png").is_file()

    capsys.readouterr()
    imagenet_vis.main(["--inspect", "--model", str(out / "checkpoint.pth"), "--inspect-images",
                       str(tmp_path / "data" / "val" / "a"), "--img-size", "32", "--num-images", "2", "--out",
                       str(tmp_path / "inspect.png")])
    text = capsys.readouterr().out
    assert "2 photo(s)" in text and "| 2 |" in text and (tmp_path / "inspect.png").is_file()
    one = next((tmp_path / "data" / "val" / "a").iterdir())
    imagenet_vis.main(["--inspect", "--model", str(out / "checkpoint.pth"), "--image", str(one), "--img-size", "32",
                       "--out", str(tmp_path / "inspect.png")])  # --image names what --inspect reads
    assert f"1 photo(s) of {one}" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    for argv, words in ((["--inspect-images", str(tmp_path / "empty")], "holds no images"),
                        (["--img-size", "30"], "not a multiple of the patch size"),
                        (["--num-images", "0"], "--num-images 0")):
        with pytest.raises(SystemExit) as e:
            imagenet_vis.main(["--inspect", "--model", str(out / "checkpoint.pth"), "--inspect-images",
                               str(tmp_path / "data" / "val" / "a"), "--img-size", "32", "--out",
                               str(tmp_path / "x.png"), *argv])
        assert str(e.value.code).startswith("error: ") and words in str(e.value.code)


@needs_shared
def test_deit_tiny_attention_distance_grows_with_depth():
    model = load_pretrained(DEIT).eval()
    files = sorted(SAMPLES.glob("*.JPEG"))[::63]  # 16 photos of 16 classes
    tf = eval_transform(224)
    x = device_transform()(torch.stack([tf(load_image(f)) for f in files]))  # uint8 -> normalised
    stats = attention_stats(model, x, batch_size=16)
    print(f"DeiT-tiny over {len(x)} sample photos (pytest -s shows it)\n{attention_table(stats)}")
    dist, ent = stats["distance"], stats["entropy"]
    assert dist.shape == ent.shape == (12, 3)
    per_layer = dist.mean(1)
    assert per_layer[-4:].mean() > 1.3 * per_layer[:3].mean()  # grows with depth
    early = dist[:4]
    assert early.min() < 0.6 * early.max()  # early layers: both local and global heads
    assert torch.all(ent > 0) and torch.all(ent <= math.log(197) + 1e-4)


# ------------------------------------------------------------------------------ the two vis_attn scripts (#20 newcomer)
REPO = Path(__file__).resolve().parents[1]


def digit_picture(size=(60, 40)) -> np.ndarray:
    """A dark "7" on light paper, (H, W) uint8: not symmetric, so a turn shows."""
    h, w = size
    a = np.full((h, w), 235, np.uint8)
    a[8:14, 6:34] = 20  # the bar at the top
    for r in range(14, 52):  # the stroke down to the left
        c = 30 - (r - 14) * 20 // 38
        a[r, c:c + 6] = 20
    return a


def save_exif_rotated(upright: Image.Image, path: Path) -> None:
    """Save the pixels as a phone would with the camera turned: stored 90° counter-clockwise, EXIF orientation 6
    (the viewer turns it 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)


def test_mnist_digit_with_exif_orientation_or_16_bits_equals_the_upright_8_bit_one(tmp_path):
    upright = Image.fromarray(digit_picture())
    upright.save(tmp_path / "upright.png")
    save_exif_rotated(upright, tmp_path / "exif6.png")
    sixteen = Image.fromarray(digit_picture().astype(np.uint16) * 257)  # the same picture in 16 bits
    assert sixteen.mode == "I;16"
    sixteen.save(tmp_path / "sixteen.png")
    with Image.open(tmp_path / "sixteen.png") as im:
        assert im.mode.startswith("I")  # PNG kept the 16 bits
    want = mnist_vis.load_digit(tmp_path / "upright.png")
    assert want.shape == (28, 28) and want.max() == 255
    np.testing.assert_array_equal(mnist_vis.load_digit(tmp_path / "exif6.png"), want)
    np.testing.assert_array_equal(mnist_vis.load_digit(tmp_path / "sixteen.png"), want)
    with Image.open(tmp_path / "exif6.png") as raw:  # the file's own pixels lie on their side
        assert not np.array_equal(mnist_vis.to_mnist(raw), want)
    rgba = np.zeros((60, 40, 4), np.uint8)  # a black 7 on a transparent background: alpha is the ink
    rgba[..., 3] = 255 - digit_picture()
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    assert np.abs(mnist_vis.load_digit(tmp_path / "alpha.png").astype(int) - want).max() <= 8


def tiny_mnist_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = VisionTransformer(16, 32, 2, 2, 7, 1, 16, 10)
    torch.save({"model_config": model.config, "model": model.state_dict()}, path)
    return path


def tiny_imagenet_weights(path: Path, classes: int = 1000) -> Path:
    """Random ViT weights in timm's layout: patch 8, 4x4 grid, `classes` classes."""
    torch.save(tiny_vit(grid=(4, 4)).state_dict() if classes == 5 else
               VisionTransformer(16, 32, 2, 2, 8, 3, 16, classes).state_dict(), path)
    return path


def exit_line(main, argv) -> str:
    """The message main exits with: one line, not a traceback."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_vis_scripts_write_under_runs_by_default_and_take_output_or_out(tmp_path, monkeypatch, capsys):
    ckpt = tiny_mnist_checkpoint(tmp_path / "mnist.pth")
    Image.fromarray(digit_picture()).save(tmp_path / "seven.png")
    weights = tiny_imagenet_weights(tmp_path / "vit.pth")
    work = tmp_path / "clone"
    work.mkdir()
    monkeypatch.chdir(work)  # a folder without imgs/: the default photo is still the repo's
    mnist_vis.main(["--model", str(ckpt), "--image", str(tmp_path / "seven.png")])
    mnist_vis.main(["--model", str(ckpt), "--image", str(tmp_path / "seven.png"), "--inspect"])
    imagenet_vis.main(["--model", str(weights), "--img-size", "32"])
    imagenet_vis.main(["--model", str(weights), "--img-size", "32", "--inspect"])
    written = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
    assert written == ["runs/imagenet/attention.png", "runs/imagenet/inspect.png", "runs/mnist/attention.png",
                       "runs/mnist/inspect.png"]
    for flag in ("--output", "--out"):
        for main, argv in ((mnist_vis.main, ["--model", ckpt, "--image", tmp_path / "seven.png"]),
                           (imagenet_vis.main, ["--model", weights, "--img-size", "32"])):
            out = tmp_path / flag[2:] / main.__module__ / "new" / "fig.png"  # folders that do not exist yet
            main([*map(str, argv), flag, str(out)])
            assert Image.open(out).format == "PNG"
    assert "imgs" not in {p.parts[0] for p in work.rglob("*")}
    capsys.readouterr()


def test_vis_scripts_bad_inputs_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tiny_mnist_checkpoint(tmp_path / "mnist.pth")
    weights = tiny_imagenet_weights(tmp_path / "vit.pth")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "run").mkdir()
    tiny_mnist_checkpoint(tmp_path / "run" / "checkpoint.pth")
    Image.fromarray(np.full((30, 30), 128, np.uint8)).save(tmp_path / "blank.png")
    Image.fromarray(digit_picture()).save(tmp_path / "seven.png")
    seven = ["--image", tmp_path / "seven.png"]
    mnist_cases = [
        ([], "train a model first with python -m mnist.train"),  # no runs/mnist/checkpoint.pth yet
        (["--model", tmp_path / "run"], f"is a folder; pass the checkpoint file in it such as "
                                        f"'{tmp_path / 'run' / 'checkpoint.pth'}'"),
        (["--model", ckpt, "--image", tmp_path], "is a folder, not an image file"),
        (["--model", ckpt, "--image", tmp_path / "empty.png"], "is empty (0 bytes)"),
        (["--model", ckpt, "--image", tmp_path / "notes.png"], "cannot be decoded"),
        (["--model", ckpt, "--image", tmp_path / "blank.png"], "has no digit"),
        (["--model", ckpt, "--index", "-1"], "--index -1 is negative"),
        (["--model", ckpt, "--target", "11", *seven], "--target 11 is not a digit; pass 0-9"),
        (["--model", ckpt, "--num-images", "0", "--inspect"], "--num-images 0"),
        (["--model", weights, *seven], "not MNIST (1-channel 28x28, 10 classes)"),  # an RGB ImageNet model
        (["--model", tmp_path / "notes.png", *seven], "not a readable PyTorch checkpoint"),
        (["--model", ckpt, *seven, "--output", tmp_path], "is a folder; pass a file name"),
        (["--model", ckpt, *seven, "--output", tmp_path / "fig.txt"], "needs a file type matplotlib writes"),
        (["--model", ckpt, *seven, "--output", tmp_path / "notes.png" / "fig.png"], "which is a file, not a folder"),
    ]
    for argv, words in mnist_cases:
        msg = exit_line(mnist_vis.main, argv)
        assert words in msg, (argv, msg)
        assert "registry" not in msg, msg  # the ImageNet hint does not belong here
    photo = ["--image", tmp_path / "seven.png", "--img-size", "32"]
    imagenet_cases = [
        (["--model", tmp_path / "run"], "is a folder; pass the checkpoint file in it"),
        (["--model", "deit_tiny_patch16_22"], "did you mean 'deit_tiny_patch16_224'?"),
        (["--model", "timm:vit_small_patch16_224"], "did you mean 'timm/vit_small_patch16_224'?"),
        (["--model", "openclip:ViT-B-16/openai"], "did you mean 'open_clip:ViT-B-16/openai'?"),
        (["--model", weights, "--image", tmp_path], "is a folder, not an image file"),
        (["--model", weights, "--image", tmp_path / "empty.png"], "is empty (0 bytes)"),
        (["--model", weights, *photo, "--target", "1000"], "--target 1000 is out of range"),
        (["--model", weights, *photo, "--target", "-1"], "--target -1 is out of range"),
        (["--model", weights, *photo, "--target", "zebr"], "did you mean 'zebra'?"),
        (["--model", ckpt, *photo], "1-channel images, not RGB photos"),
        (["--model", weights, *photo, "--output", tmp_path], "is a folder; pass a file name"),
        (["--model", weights, *photo, "--num-heads", "-1"], "--num-heads -1"),
        (["--model", weights, "--inspect", "--inspect-images", tmp_path / "none"], "does not exist"),
    ]
    for argv, words in imagenet_cases:
        msg = exit_line(imagenet_vis.main, argv)
        assert words in msg, (argv, msg)
    assert not (tmp_path / "runs").exists()  # every bad input is refused before a figure is written


def test_vis_scripts_bad_input_from_the_shell_is_one_line(tmp_path):
    import subprocess
    import sys

    for module, argv in (("mnist.vis_attn", ["--model", str(tmp_path)]),
                         ("imagenet.vis_attn", ["--image", str(tmp_path / "none.png")])):
        p = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True)
        assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith("error: ") and p.stderr.strip().count("\n") == 0, p.stderr


def test_mnist_vis_names_the_true_label_of_a_test_digit(mnist_root, tmp_path, capsys):
    ckpt = tiny_mnist_checkpoint(tmp_path / "mnist.pth")
    mnist_vis.main(["--model", str(ckpt), "--data-root", str(mnist_root), "--index", "5", "--output",
                    str(tmp_path / "f.png")])
    from mnist.data import load_mnist

    label = int(load_mnist(mnist_root, download=False, splits=("test",))["test_y"][5])
    assert f"(true label {label})" in capsys.readouterr().out
    x = torch.zeros(1, 1, 28, 28)  # the same title the script draws, from the figure function it calls
    from attention.figures import attention_figure
    from utils.img2attn import explain

    fig = attention_figure(explain(load_pretrained(str(ckpt)).eval(), x), x[0, 0],
                           class_names=[str(i) for i in range(10)], label=label)
    assert f"true: {label}" in fig.subfigs[0]._suptitle.get_text()


def test_imagenet_vis_true_class_from_the_file_name_and_the_input_line(tmp_path, capsys):
    from imagenet.dataloaders import classes as IN

    assert imagenet_vis.true_class("s/n01440764_tench.JPEG", IN.NAMES, None) == 0
    assert imagenet_vis.true_class("val/n01443537/ILSVRC2012_val_00000001.JPEG", IN.NAMES, None) == 1
    assert imagenet_vis.true_class("photos/cat.jpg", IN.NAMES, None) is None
    assert imagenet_vis.true_class("n01440764_tench.JPEG", None, None) is None  # a model of other classes
    assert imagenet_vis.true_class("n01440764_tench.JPEG", None, ["n01443537", "n01440764"]) == 1  # saved folders
    assert imagenet_vis.true_class("n09999999_x.JPEG", IN.NAMES, None) is None  # a WordNet id of no class
    rng = np.random.default_rng(0)
    photo = tmp_path / "n01443537_goldfish.png"
    Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8)).save(photo)  # 70 wide, 45 high
    imagenet_vis.main(["--image", str(photo), "--model", str(tiny_imagenet_weights(tmp_path / "vit.pth")),
                       "--img-size", "32", "--output", str(tmp_path / "f.png")])
    out = capsys.readouterr().out
    # 70x45 -> shorter side 32: 50x32 -> cropped to multiples of 8: 48x32 = 4 patch rows x 6 patch columns
    assert "70x45 px (W x H) -> model input 48x32 px, 4 rows x 6 columns of patches" in out
    assert "true class (from the file name): goldfish (index 1)" in out


def test_inspection_figure_says_rows_and_columns():
    model = tiny_vit(grid=(2, 3))
    fig = inspection_figure(inspect_model(model, torch.randn(2, 3, 8, 12)), name="tiny")
    assert "2 rows x 3 columns of patches" in fig._suptitle.get_text()


def test_curves_have_whole_epoch_ticks():
    from utils.plots import attention_curves_figure, curves_figure

    rows = [{"epoch": e, "train_loss": 1 / e, "test_top1": 50 + e, "attn_distance": [10.0 + e, 12.0],
             "attn_entropy": [2.0, 2.5 - e / 10]} for e in (1, 2)]
    for fig in (curves_figure(rows), attention_curves_figure(rows)):
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks == [1, 2], ticks  # not 1.0, 1.2, 1.4, ...
            assert ax.get_xlabel() == "epoch"
    assert attention_curves_figure([{"epoch": 1}]) is None  # nothing tracked: no figure


@pytest.mark.parametrize("module", [mnist_vis, imagenet_vis])
def test_vis_help_usage_defaults_once_and_inside_the_repo(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m {module.__name__} ")
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert len(options) > 5
    for option in options:
        assert option.count("default") <= 1, option  # said once, not "(default: X) (default: None)"
    assert "edit the paths" not in text and "../" not in text and str(REPO.parent) not in text
    for name, (default, _) in module.OPTIONS.items():
        if isinstance(default, str) and "/" in default:
            assert not Path(default).is_absolute() and ".." not in Path(default).parts, name
            assert (REPO / default).exists() or Path(default).parts[0] == "runs", name  # shipped, or an output
    assert all(out.startswith("runs/") for out in module.OUTPUTS.values())
