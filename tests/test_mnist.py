"""mnist.train / mnist.vis_attn end to end on tiny MNIST-format files written here (CPU, offline, seconds)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mnist import data as mnist_data
from mnist import train as mnist_train
from mnist import vis_attn
from models.vit import VisionTransformer
from utils import checkpoint, hardware, schedule, training
from utils.config import UsageError

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST"
TINY = ["--embed-dim", "16", "--hidden-dim", "32", "--num-heads", "2", "--num-layers", "2", "--patch-size", "7",
        "--batch-size", "64", "--threads", "1", "--no-compile", "--no-progress", "--no-download", "--minutes", "0"]


def fake_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n (28, 28) uint8 images whose class (0-9) is the row of a bright bar, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for img, c in zip(images, labels, strict=True):
        img[4 + 2 * c:6 + 2 * c, 6:22] = 255
    return images, labels


def write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, *images.shape) + images.tobytes())
    with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist_data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw, "train", *fake_digits(640, 0))
    write_idx(raw, "t10k", *fake_digits(200, 1))
    return root


def run(module: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def call(main, *args: str | Path) -> str:
    """Run a script's main() in this process; -> the message it exits with (it must exit non-zero)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    assert "\n" not in e.value.code
    return e.value.code


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory) -> Path:
    """A 2-epoch run, in a subprocess (the real command line)."""
    out = tmp_path_factory.mktemp("straight")
    p = run("mnist.train", *TINY, "--data-root", data_root, "--out", out, "--epochs", "2", "--ema-decay", "0.9",
            "--deskew", "--elastic", "8")
    assert p.returncode == 0, p.stderr
    assert "final: test accuracy" in p.stdout and "wall time" in p.stdout
    (out / "stdout.txt").write_text(p.stdout)
    return out


def test_train_writes_checkpoint_metrics_and_plot(straight):
    ckpt = torch.load(straight / "checkpoint.pth", weights_only=True)
    assert {"model_config", "model", "optimizer", "scheduler", "epoch", "rng", "metrics", "train_config",
            "ema_model"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and len(ckpt["metrics"]) == 2
    model = VisionTransformer(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    metrics = json.loads((straight / "metrics.json").read_text())["epochs"]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert {"train_loss", "test_top1", "ema_test_top1", "ema_tta_test_top1", "img_per_s", "wall_s"} <= set(metrics[-1])
    assert "tta_test_top1" not in metrics[0]  # shift TTA only in the final evaluation
    assert 0 <= metrics[-1]["ema_test_top1"] <= 100
    assert (straight / "curves.png").read_bytes()[:4] == b"\x89PNG"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint.pth", "metrics.json", "curves.png"):  # atomic writes keep open()'s permissions
        assert (straight / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_first_line_and_metrics_say_what_ran(straight):
    hw = hardware.resolve("auto", "auto")  # the fixture's defaults: --device auto --amp auto
    first = (straight / "stdout.txt").read_text().splitlines()[0]
    ran_as = json.loads((straight / "metrics.json").read_text())["ran_as"]
    assert ran_as == {"device": str(hw.device), "amp": hw.amp, "hardware": first.removesuffix(", eager"),
                      "compiled": False}
    assert first.endswith(", eager") and (hw.device.type != "cpu" or "1 thread," in first)
    if hw.device.type == "cpu" and not hardware.cpu_native_bf16():
        assert ran_as["amp"] == "none" and first.endswith("no native bf16 -> fp32, eager")


def test_minutes_sets_the_epochs_once_and_resume_keeps_them(data_root, tmp_path):
    args = [*TINY, "--data-root", data_root, "--epochs", "1000", "--minutes", "0.15"]  # 9 s: room for 5 epochs
    mnist_train.main([str(a) for a in args] + ["--out", str(tmp_path / "straight")])
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert len(metrics["epochs"]) == metrics["train_config"]["epochs_fit"] < 1000
    args += ["--out", tmp_path]
    mnist_train.main([str(a) for a in args] + ["--stop-after", "5"])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    first, done = ckpt["metrics"][0], ckpt["metrics"][3]  # decided after epoch 4 from epochs 2-4 (or lowered after)
    decided = ckpt["train_config"]["epochs_fit"]
    final_s = 5 * done["eval_s"] + mnist_train.EXIT_S
    period = (done["wall_s"] - first["wall_s"]) / 3
    at_most = max(5, schedule.epochs_within(9, done["wall_s"], period, final_s, 4, cap=1000))  # decided a little later
    assert 5 <= decided <= at_most < 1000  # 9 s cannot hold 1000 epochs of even this tiny model
    assert ckpt["scheduler"]["last_epoch"] == 5 * (640 // 64)
    mnist_train.main([str(a) for a in args])  # the same command again continues the run
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["epochs"]) == decided == metrics["train_config"]["epochs_fit"]
    assert metrics["epochs"][-1]["lr"] == pytest.approx(3e-3 * 0.01)  # the stretched cosine ends where it should


def test_replan_follows_the_clock_both_ways_and_a_continued_run_keeps_its_count():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    run = SimpleNamespace(start=0, epochs=64, cap=None, steps_per_epoch=10, train_config={},
                          scheduler=schedule.warmup_cosine(optimizer, 640, 10), metrics=[])
    cfg = {"minutes": 10.0, "tta_shift": 0, "warmup_epochs": 1.0, "lr": 1.0, "min_lr": 0.01}

    def finish(wall_s: float) -> None:
        run.metrics.append({"wall_s": wall_s, "eval_s": 0.5})
        run.scheduler.last_epoch = 10 * len(run.metrics)

    for wall in (40.0, 70.0, 100.0, 130.0):  # 30 s an epoch: after epoch 4, 540 s hold 4 + 13 epochs
        finish(wall)
    mnist_train.replan(run, cfg, 4, 131.0)
    assert run.epochs == run.train_config["epochs_fit"] == 4 + int((540 - 131 - mnist_train.EXIT_S) // 30)
    for wall in (140.0, 150.0, 160.0):  # 10 s an epoch now: the plan would end far too early
        finish(wall)
    mnist_train.replan(run, cfg, 7, 161.0)
    assert run.epochs == 7 + int((540 - 161 - mnist_train.EXIT_S) // 10)  # raised
    assert run.scheduler.last_epoch == 70 and run.scheduler.lr_lambdas[0](run.epochs * 10) == pytest.approx(0.01)
    raised = run.epochs
    for wall in (200.0, 240.0, 280.0):  # 40 s an epoch: it would end past the budget
        finish(wall)
    mnist_train.replan(run, cfg, 10, 281.0)
    assert run.epochs == 10 + int((540 - 281 - mnist_train.EXIT_S) // 40) < raised  # lowered
    run.start, kept = 5, run.epochs  # a continued run keeps the count it saved
    finish(300.0)
    mnist_train.replan(run, cfg, 11, 301.0)
    assert run.epochs == kept


def test_resume_equals_straight_run(straight, data_root, tmp_path):
    args = [*TINY, "--data-root", data_root, "--out", tmp_path, "--epochs", "2", "--ema-decay", "0.9", "--deskew",
            "--elastic", "8"]
    mnist_train.main([str(a) for a in args] + ["--stop-after", "1"])
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1
    mnist_train.main([str(a) for a in args] + ["--resume", "--tta-shift", "1"])  # evaluation only: no clash
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert b["epoch"] == 2
    for key in ("model", "ema_model"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after --resume"
    assert a["metrics"][-1]["test_top1"] == b["metrics"][-1]["test_top1"]


def test_resume_refuses_other_settings_and_fresh_starts_over(straight, data_root, tmp_path, capsys):
    msg = call(mnist_train.main, "--out", straight, "--lr", "0.5")
    assert "--lr 0.5 differs" in msg and "--fresh to start over" in msg
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    mnist_train.main([str(a) for a in [*TINY, "--data-root", data_root, "--out", out, "--epochs", "1", "--fresh"]])
    assert "--fresh: starting over" in capsys.readouterr().out
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    mnist_train.main([str(a) for a in [*TINY, "--data-root", data_root, "--out", tmp_path / "new", "--epochs", "1",
                                       "--resume"]])
    assert "does not exist yet, so this starts a new run" in capsys.readouterr().out


def test_run_from_before_the_optimizer_flag_continues_with_adamw(data_root, tmp_path):
    args = [str(a) for a in [*TINY, "--data-root", data_root, "--out", tmp_path, "--epochs", "2"]]
    mnist_train.main([*args, "--optimizer", "adamw", "--stop-after", "1"])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    del ckpt["train_config"]["optimizer"]  # as written before --optimizer existed (AdamW then)
    checkpoint.save_checkpoint(ckpt, tmp_path / "checkpoint.pth")
    mnist_train.main(args)  # the default is now muon: the run still continues with its AdamW state
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["train_config"]["optimizer"] == "adamw" and "param_groups" in ckpt["optimizer"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path):
    steps_per_epoch = 640 // 64
    msg = call(mnist_train.main, *TINY, "--data-root", data_root, "--out", tmp_path, "--epochs", "3",
               "--nan-at-step", str(steps_per_epoch + 3))
    assert f"step {steps_per_epoch + 3} (epoch 2)" in msg and "epoch 1" in msg
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_missing_data_offline(tmp_path):
    msg = call(mnist_train.main, *TINY, "--data-root", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert "MNIST is not in" in msg and "train-images-idx3-ubyte.gz" in msg


def test_vis_attn_test_digit_and_own_picture(straight, data_root, tmp_path):
    out = tmp_path / "attn.png"
    p = run("mnist.vis_attn", "--model", straight / "checkpoint.pth", "--data-root", data_root, "--index", "3",
            "--output", out)
    assert p.returncode == 0, p.stderr
    assert "predicted" in p.stdout and Image.open(out).format == "PNG"
    # a dark digit on light paper, RGB, odd size: brought to the MNIST form
    picture = np.full((90, 70, 3), 230, np.uint8)
    picture[20:70, 30:40] = (20, 30, 60)
    Image.fromarray(picture).save(tmp_path / "one.jpg")
    vis_attn.main(["--model", str(straight / "checkpoint.pth"), "--image", str(tmp_path / "one.jpg"),
                   "--output", str(tmp_path / "own.png")])
    assert Image.open(tmp_path / "own.png").size[0] > 500


def test_to_mnist_form():
    picture = np.full((100, 200), 255, np.uint8)  # black stroke on white, off-centre
    picture[10:60, 20:30] = 0
    digit = vis_attn.to_mnist(Image.fromarray(picture))
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit[0].max() == 0 and digit.max() == 255  # light on dark
    rows, cols = np.nonzero(digit > 0)
    assert rows.max() - rows.min() + 1 <= 20  # fits the 20x20 box
    ys, xs = np.indices(digit.shape)
    w = digit.astype(float) / digit.sum()
    assert abs((ys * w).sum() - 13.5) <= 1 and abs((xs * w).sum() - 13.5) <= 1  # centred by mass


def test_vis_attn_bad_inputs(straight, tmp_path):
    ckpt = straight / "checkpoint.pth"
    assert "does not exist" in call(vis_attn.main, "--model", ckpt, "--image", tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not a picture")
    assert "cannot be decoded" in call(vis_attn.main, "--model", ckpt, "--image", tmp_path / "notes.png")
    assert "does not exist" in call(vis_attn.main, "--model", tmp_path / "none.pth")
    (tmp_path / "cut.pth").write_bytes(ckpt.read_bytes()[:5000])
    assert "not a readable" in call(vis_attn.main, "--model", tmp_path / "cut.pth")
    torch.save({"lr": 0.1, "notes": "hello"}, tmp_path / "foreign.pth")
    assert "holds no tensors" in call(vis_attn.main, "--model", tmp_path / "foreign.pth")
    rgb = VisionTransformer(16, 32, 2, 1, 16, 3, 4, 1000)  # an "ImageNet" model: 3 channels, 32x32, 1000 classes
    torch.save({"model_config": rgb.config, "model": rgb.state_dict()}, tmp_path / "rgb.pth")
    assert "not MNIST" in call(vis_attn.main, "--model", tmp_path / "rgb.pth")


def test_bad_input_is_one_line_without_traceback(tmp_path):
    p = run("mnist.vis_attn", "--model", tmp_path / "none.pth")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: ")


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="needs the real MNIST in ../shared/data")
def test_real_mnist_short_run(tmp_path):
    shutil.copytree(SHARED_MNIST, tmp_path / "MNIST")
    # 4 tokens of 14x14 pixels: a ViT that learns as fast as an MLP (patch 7 needs ~10x more images for 90 %)
    mnist_train.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--limit-train", "6000",
                      "--epochs", "3", "--embed-dim", "64", "--hidden-dim", "128", "--num-heads", "2",
                      "--num-layers", "2", "--patch-size", "14", "--batch-size", "32", "--lr", "2e-3",
                      "--warmup-epochs", "0.3", "--rotate", "0", "--scale", "0", "--shift", "0", "--threads", "1",
                      "--no-compile", "--no-progress", "--no-download"])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["epochs"]
    assert metrics[-1]["test_top1"] > 90


def test_deskew_makes_a_slanted_stroke_upright():
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    for r in range(4, 24):  # a stroke leaning right: column grows with the row
        img[0, r, 8 + (r - 4) // 2:11 + (r - 4) // 2] = 255
    out = mnist_data.deskew(img)[0].float()
    cols = [(out[r] * torch.arange(28)).sum() / out[r].sum() for r in range(6, 22) if out[r].sum() > 0]
    assert max(cols) - min(cols) < 1.5  # was 8 columns of lean
    assert out.sum() > 0.8 * img.float().sum()


def test_shift_tta_averages_the_softmax_over_five_shifted_copies():
    torch.manual_seed(0)
    x = torch.full((3, 1, 28, 28), -mnist_data.MEAN / mnist_data.STD)  # blank, normalised
    x[..., 8:20, 9:19] = torch.randn(3, 1, 12, 10)  # a "digit" away from the border: roll == shift with blank fill
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    views = [x] + [torch.roll(x, s, dim) for s in (2, -2) for dim in (-1, -2)]
    want = torch.stack([model(v).softmax(-1) for v in views]).mean(0).log()
    torch.testing.assert_close(mnist_data.ShiftTTA(model, 2)(x), want)


def test_compile_or_eager_falls_back_with_one_line(monkeypatch, capsys):
    def broken_compile(model):
        def fail(x):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler\n(long details)")
        return fail
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = torch.nn.Linear(4, 2)
    assert training.compile_or_eager(model, torch.randn(8, 4)) is model
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "InvalidCxxCompiler" in err and "without it" in err


# ------------------------------------------------------------------------- the MNIST files (#21 fault 3)
def mnist_root(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A fresh MNIST root of .gz files -> (root, its raw folder, the training images written)."""
    root = tmp_path / "data"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images, labels = fake_digits(640, 0)
    write_idx(raw, "train", images, labels)
    write_idx(raw, "t10k", *fake_digits(200, 1))
    return root, raw, images


def test_a_cut_short_archive_is_named_and_the_good_one_works_after(tmp_path):
    root, raw, images = mnist_root(tmp_path)
    gz = raw / "train-images-idx3-ubyte.gz"
    good = gz.read_bytes()
    gz.write_bytes(good[:len(good) // 2])  # a download cut short
    msg = call(mnist_train.main, *TINY, "--data-root", root, "--output", tmp_path / "out", "--epochs", "1")
    assert f"{gz} is cut short or corrupt (EOFError" in msg and "delete it (the next run downloads it again" in msg
    assert not (raw / "train-images-idx3-ubyte").exists()  # nothing half-written under the real name
    assert not [p.name for p in raw.iterdir() if p.name.startswith(".")]  # nor a temporary file left
    gz.write_bytes(b"not gzip at all")
    assert f"{gz} is cut short or corrupt (BadGzipFile" in call(mnist_train.main, *TINY, "--data-root", root)
    gz.write_bytes(good)  # the good archive back: the next run works
    data = mnist_data.load_mnist(root, download=False)
    assert torch.equal(data["train_x"], torch.from_numpy(images)) and data["test_x"].shape == (200, 28, 28)


def test_incomplete_or_stale_extracted_files_count_as_missing(tmp_path):
    root, raw, images = mnist_root(tmp_path)
    (raw / "train-images-idx3-ubyte").write_bytes(b"")  # what an interrupted extraction left
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, 200) + bytes(10))  # 10 of 200 labels
    data = mnist_data.load_mnist(root, download=False)
    assert torch.equal(data["train_x"], torch.from_numpy(images)) and data["test_y"].shape == (200,)
    newer, labels = fake_digits(640, 5)  # a new archive over an extracted file of the old one: extracted again
    extracted = raw / "train-images-idx3-ubyte"
    os.utime(extracted, (extracted.stat().st_mtime - 60,) * 2)
    write_idx(raw, "train", newer, labels)
    assert torch.equal(mnist_data.load_mnist(root, download=False)["train_x"], torch.from_numpy(newer))
    (raw / "t10k-images-idx3-ubyte.gz").unlink()  # no archive, and the extracted file cut short: missing
    (raw / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 200, 28, 28) + bytes(100))
    with pytest.raises(mnist_data.DataError, match="no t10k-images-idx3-ubyte"):
        mnist_data.load_mnist(root, download=False)
    assert not (raw / "t10k-images-idx3-ubyte").exists()


def test_an_archive_of_the_wrong_file_is_named(tmp_path):
    root, raw, _ = mnist_root(tmp_path)
    shutil.copy(raw / "train-labels-idx1-ubyte.gz", raw / "train-images-idx3-ubyte.gz")
    with pytest.raises(mnist_data.DataError) as e:
        mnist_data.load_mnist(root, download=False)
    assert str(e.value).startswith(f"{raw / 'train-images-idx3-ubyte.gz'} does not hold an MNIST images file")
    write_idx(raw, "train", *fake_digits(640, 0))
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "wb") as f:  # 600 labels for 640 images
        f.write(struct.pack(">II", 0x801, 600) + bytes(600))
    with pytest.raises(mnist_data.DataError, match="640 images of 28x28 pixels and its labels file 600 labels"):
        mnist_data.load_mnist(root, download=False)


# ----------------------------------------------------------------------- settings checked before any work
def not_here(*args, **kwargs):
    pytest.fail("reached work that a bad setting or a finished run should have prevented")


@pytest.mark.parametrize("args, named", [
    (["--patch-size", "5"], "--patch-size 5 does not divide 28"),
    (["--epochs", "-5"], "--epochs -5 must be positive"),
    (["--batch-size", "-4"], "--batch-size -4 must be positive"),
    (["--batch-size", "70000"], "--batch-size 70000 exceeds the 60000 training images"),
    (["--num-heads", "3"], "--num-heads 3 does not divide --embed-dim 16; use one of its divisors (1, 2, 4, 8, 16)"),
    (["--num-heads", "0"], "--num-heads 0 must be positive"),
    (["--embed-dim", "0"], "--embed-dim 0 must be positive"),
    (["--hidden-dim", "-1"], "--hidden-dim -1 must be positive"),
    (["--depth", "0"], "--num-layers 0 must be positive"),
    (["--dropout", "1"], "--dropout 1.0 must be in [0, 1)"),
    (["--drop-path", "1.5"], "--drop-path 1.5 must be in [0, 1)"),
    (["--minutes", "-1"], "--minutes -1.0 must be >= 0"),
    (["--lr", "0"], "--lr 0.0 must be positive"),
    (["--lr", "1e-5"], "peak lr 1e-05 (--lr) is below --min-lr 3e-05; pass --min-lr 1e-07"),
    (["--min-lr", "-1"], "--min-lr -1.0 must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay -1.0 must be >= 0"),
    (["--beta2", "1"], "--beta2 1.0 must be in [0, 1)"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1.0 must be >= 0"),
    (["--clip-grad", "-1"], "--clip-grad -1.0 must be >= 0"),
    (["--smoothing", "1"], "--smoothing 1.0 must be in [0, 1)"),
    (["--ema-decay", "1"], "--model-ema-decay 1.0 must be in [0, 1)"),
    (["--rotate", "-3"], "--rotate -3.0 must be in [0, 180]"),
    (["--elastic", "-1"], "--elastic -1.0 must be >= 0"),
    (["--scale", "1"], "--scale 1.0 must be in [0, 1)"),
    (["--shift", "14"], "--shift 14.0 must be in [0, 14) pixels"),
    (["--limit-train", "-1"], "--limit-train -1 must be >= 0"),
    (["--val-split", "60000"], "--val-split 60000 must be in [0, 60000)"),
    (["--limit-train", "100", "--val-split", "100"], "--val-split 100 must be in [0, 100)"),
    (["--limit-train", "100", "--val-split", "50"], "--batch-size 64 exceeds the 50 training images left"),
    (["--seed", "-1"], "--seed -1 must be >= 0"),
    (["--threads", "-1"], "--threads -1 must be >= 0"),
    (["--tta-shift", "14"], "--tta-shift 14 must be in [0, 14)"),
    (["--stop-after", "-1"], "--stop-after -1 must be >= 0"),
    (["--min-lr", "1e-5", "--min-lr-ratio", "0.1"], "--min-lr-ratio and --min-lr both set the floor"),
])
def test_bad_settings_are_refused_in_one_line_before_any_work(args, named, tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_train, "load_splits", not_here)
    monkeypatch.setattr(mnist_train.hardware, "resolve", not_here)
    msg = call(mnist_train.main, *TINY, "--data-root", tmp_path, "--output", tmp_path / "out", *args)
    assert msg.startswith(f"error: {named}"), msg


def test_an_output_that_cannot_be_a_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_train, "load_splits", not_here)
    (tmp_path / "taken").write_text("a file")
    msg = call(mnist_train.main, *TINY, "--output", tmp_path / "taken" / "run")
    assert msg.startswith(f"error: --output {tmp_path / 'taken' / 'run'} cannot be a folder here")


def test_files_smaller_than_mnist_name_the_batch_and_the_split(data_root, tmp_path):
    msg = call(mnist_train.main, *TINY, "--data-root", data_root, "--output", tmp_path, "--val-split", "600")
    assert msg == (f"error: --batch-size 64 exceeds the 40 training images in {data_root} left after --val-split "
                   f"600; pass a smaller --batch-size.")


def test_the_floor_message_names_both_rates_and_what_to_pass(tmp_path):
    msg = call(mnist_train.main, *TINY, "--output", tmp_path, "--lr", "1e-3", "--min-lr", "2e-3")
    assert msg == ("error: peak lr 0.001 (--lr) is below --min-lr 0.002; pass --min-lr 1e-05 (or anything up to "
                   "0.001) or a larger --lr.")


def test_min_lr_is_an_absolute_floor_and_the_old_ratio_converts(data_root, tmp_path, capsys):
    args = [*TINY, "--data-root", data_root, "--epochs", "2", "--lr", "2e-3", "--no-track-attention"]
    mnist_train.main([str(a) for a in args] + ["--output", str(tmp_path / "a"), "--min-lr", "1e-4"])
    rows = json.loads((tmp_path / "a" / "metrics.json").read_text())["epochs"]
    assert rows[-1]["lr"] == pytest.approx(1e-4, rel=1e-9)  # the cosine ends at --min-lr, whatever --lr is
    mnist_train.main([str(a) for a in args] + ["--output", str(tmp_path / "b"), "--min-lr-ratio", "0.1"])
    assert "--min-lr-ratio 0.1 is now --min-lr 0.0002" in capsys.readouterr().out
    rows = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert rows["train_config"]["min_lr"] == pytest.approx(2e-4) and "min_lr_ratio" not in rows["train_config"]
    assert rows["epochs"][-1]["lr"] == pytest.approx(2e-4, rel=1e-9)


def test_a_run_saved_under_the_old_names_continues_bit_for_bit(straight, data_root, tmp_path, capsys):
    args = [str(a) for a in [*TINY, "--data-root", data_root, "--out", tmp_path, "--epochs", "2", "--ema-decay",
                             "0.9", "--deskew", "--elastic", "8"]]  # the straight run's command, our old spellings
    mnist_train.main([*args, "--stop-after", "1"])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    config = ckpt["train_config"]
    ratio = config.pop("min_lr") / config["lr"]
    del config["clip_grad"]  # written before --clip-grad existed, with the keys of then
    ckpt["train_config"] = {{"smoothing": "label_smoothing", "model_ema_decay": "ema_decay",
                             "drop_path": "drop_path_rate"}.get(k, k): v for k, v in config.items()}
    ckpt["train_config"]["min_lr_ratio"] = ratio
    checkpoint.save_checkpoint(ckpt, tmp_path / "checkpoint.pth")
    assert mnist_train.build_model(ckpt["train_config"]).config == mnist_train.build_model(
        mnist_train.parse_args(args)[0]).config  # bench.mnist_tta builds the model of old checkpoints too
    mnist_train.main(args)
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert b["epoch"] == 2 and b["train_config"]["model_ema_decay"] == 0.9 and "ema_decay" not in b["train_config"]
    for key in ("model", "ema_model"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"
    capsys.readouterr()
    from bench import mnist_tta
    mnist_tta.main([str(tmp_path / "checkpoint.pth"), "--data-root", str(data_root), "--shifts", "0,1"])
    assert f"| {tmp_path / 'checkpoint.pth'} | " in capsys.readouterr().out


# --------------------------------------------------------------------------- a run's length: --minutes, --epochs
NO_BUDGET = [a for a in TINY if a not in ("--minutes", "0")]  # TINY without --minutes 0


def test_a_finished_run_says_so_and_continues_to_more_epochs(data_root, tmp_path, capsys, monkeypatch):
    args = [str(a) for a in [*TINY, "--data-root", data_root, "--output", tmp_path, "--epochs", "1"]]
    mnist_train.main(args)
    capsys.readouterr()
    with monkeypatch.context() as m:  # a plain rerun: says it is finished, loads, compiles and trains nothing
        for name in ("load_splits", "compile_or_eager", "train_epoch"):
            m.setattr(mnist_train, name, not_here)
        mnist_train.main(args)  # returns: exit status 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'checkpoint.pth'} is a finished run: 1 of 1 epochs, test accuracy ")
    assert f"results in {tmp_path / 'metrics.json'}" in out and "--epochs N continues it" in out
    assert out.count("\n") == 1
    mnist_train.main(args[:-1] + ["3"])  # more epochs: continued, the cosine stretched to the new end
    assert "continuing" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["train_config"]["epochs"] == 3
    assert ckpt["train_config"]["changes"] == [{"epoch": 1, "epochs": [1, 3]}]
    rows = ckpt["metrics"]
    steps = 640 // 64
    cosine = schedule.warmup_cosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3), 3 * steps,
                                    steps, 0.01, start_step=2 * steps)  # epoch 2 of a 3-epoch schedule ends here
    assert rows[1]["lr"] == pytest.approx(cosine.get_last_lr()[0], rel=1e-9) and rows[2]["lr"] == pytest.approx(3e-5)
    msg = call(mnist_train.main, *args[:-1], "2")
    assert "--epochs 2: " in msg and "has already trained 3 epochs" in msg and "--epochs 4 or more" in msg


def test_a_budget_run_continues_with_minutes_0_and_refuses_other_lengths_with_the_true_numbers(data_root, tmp_path,
                                                                                              capsys):
    args = [str(a) for a in [*NO_BUDGET, "--data-root", data_root, "--output", tmp_path]]
    mnist_train.main([*args, "--minutes", "0", "--epochs", "2", "--stop-after", "1"])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    ckpt["train_config"] |= {"minutes": 10.0, "epochs": 64, "epochs_fit": 1}  # as if --minutes 10 had set 1 epoch
    checkpoint.save_checkpoint(ckpt, tmp_path / "checkpoint.pth")
    capsys.readouterr()
    mnist_train.main(args)  # the command of a 10-minute run, again
    assert "is a finished run: 1 of 1 epochs" in capsys.readouterr().out
    msg = call(mnist_train.main, *args, "--epochs", "3")
    assert "--epochs 3 would change the length" in msg and "(1 of the 1 epochs its budget set ran)" in msg
    assert "pass --minutes 0 --epochs N" in msg and "64" not in msg
    assert "--minutes 5 would change" in call(mnist_train.main, *args, "--minutes", "5")
    mnist_train.main([*args, "--minutes", "0", "--epochs", "2"])
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["train_config"]["minutes"] == 0 and "epochs_fit" not in ckpt["train_config"]
    assert ckpt["train_config"]["changes"] == [{"epoch": 1, "epochs": [1, 2], "minutes": [10.0, 0.0]}]


def test_a_budget_too_short_to_measure_is_decided_early_with_a_warning(data_root, tmp_path, capsys):
    mnist_train.main([str(a) for a in [*NO_BUDGET, "--data-root", data_root, "--output", tmp_path, "--minutes",
                                       "0.02", "--no-track-attention"]])  # 1.2 s: less than the exit alone
    out = capsys.readouterr().out
    assert "--minutes 0.02: 2 epochs fit on this machine (decided after epoch 1" in out
    assert "warning: --minutes 0.02 (1 s) cannot be kept on this machine" in out and "--minutes 0 --epochs N" in out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["epochs"]) == metrics["train_config"]["epochs_fit"] == 2


def test_replan_decides_early_only_when_the_budget_cannot_wait(capsys):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = {"minutes": 1.0, "tta_shift": 0, "warmup_epochs": 1.0, "lr": 1.0, "min_lr": 0.01}

    def fresh_run():
        return SimpleNamespace(start=0, epochs=64, cap=None, steps_per_epoch=10, train_config={},
                               scheduler=schedule.warmup_cosine(optimizer, 640, 10), metrics=[])

    run = fresh_run()
    run.metrics.append({"wall_s": 20.0, "eval_s": 0.5, "epoch_s": 5.0})  # 54 s hold 4 + 1 epochs of 5 s
    mnist_train.replan(run, cfg, 1, 20.0)
    assert run.epochs == 64 and "epochs_fit" not in run.train_config and capsys.readouterr().out == ""
    run = fresh_run()
    run.metrics.append({"wall_s": 30.0, "eval_s": 0.5, "epoch_s": 10.0})  # 10 s epochs: 54 s hold 3, not 5
    mnist_train.replan(run, cfg, 1, 30.0)
    assert run.epochs == run.train_config["epochs_fit"] == 3
    assert capsys.readouterr().out == "--minutes 1: 3 epochs fit on this machine (decided after epoch 1: the budget " \
                                      "is too short to measure 4 epochs first)\n"
    assert run.scheduler.lr_lambdas[0](30) == pytest.approx(0.01)  # the cosine ends with the third epoch
    run.metrics.append({"wall_s": 40.0, "eval_s": 0.5, "epoch_s": 10.0})
    mnist_train.replan(run, cfg, 2, 40.0)  # decided: not again
    assert run.epochs == 3 and capsys.readouterr().out == ""
    run = fresh_run()
    run.metrics.append({"wall_s": 50.0, "eval_s": 0.5, "epoch_s": 15.0})  # not even one more epoch fits
    mnist_train.replan(run, cfg, 1, 50.0)
    assert run.epochs == 2
    out = capsys.readouterr().out
    assert "2 epochs fit on this machine (decided after epoch 1" in out
    assert "warning: --minutes 1 (60 s) cannot be kept on this machine: 50.0 s have passed since the start" in out
    assert "it ends near 68 s" in out


# ------------------------------------------------------------------------------- flag names (#21, from timm)
def test_timm_spellings_parse_to_the_same_config_as_ours(capsys):
    timm = ["--output", "o", "--smoothing", "0.2", "--model-ema-decay", "0.99", "--drop-path", "0.1",
            "--clip-grad", "1.5", "--depth", "4"]
    ours = ["--out", "o", "--label-smoothing", "0.2", "--ema-decay", "0.99", "--drop-path-rate", "0.1",
            "--grad-clip", "1.5", "--num-layers", "4"]
    assert mnist_train.parse_args(timm) == mnist_train.parse_args(ours)
    cfg, given = mnist_train.parse_args(timm)
    assert (cfg["output"], cfg["smoothing"], cfg["model_ema_decay"], cfg["drop_path"], cfg["clip_grad"],
            cfg["num_layers"]) == ("o", 0.2, 0.99, 0.1, 1.5, 4)
    assert given == {"output", "smoothing", "model_ema_decay", "drop_path", "clip_grad", "num_layers"}
    with pytest.raises(SystemExit):
        mnist_train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--amp {auto,bf16,fp16,none}", "--num-layers NUM_LAYERS, --depth NUM_LAYERS",
                  "--output OUTPUT, --out OUTPUT", "--min-lr MIN_LR", "--clip-grad CLIP_GRAD, --grad-clip"):
        assert shown in text
    assert "--min-lr-ratio" not in text  # the old flag still converts, unlisted


def test_mlp_ratio_sets_the_hidden_width_as_imagenet_train_does():
    cfg, given = mnist_train.parse_args(["--embed-dim", "96", "--mlp-ratio", "2.5"])
    assert cfg["hidden_dim"] == 240 and "hidden_dim" in given
    assert mnist_train.build_model(cfg).blocks[0].mlp.fc1.out_features == 240
    for argv in (["--mlp-ratio", "2", "--hidden-dim", "64"], ["--mlp-ratio", "-1"]):
        with pytest.raises(UsageError, match="--mlp-ratio"):
            mnist_train.parse_args(argv)


def test_clip_grad_reaches_the_optimizer_step(data_root, tmp_path, monkeypatch):
    seen = []
    real = training.optimizer_step

    def spy(*args, grad_clip=None, **kwargs):
        seen.append(grad_clip)
        return real(*args, grad_clip=grad_clip, **kwargs)

    monkeypatch.setattr(training, "optimizer_step", spy)
    mnist_train.main([str(a) for a in [*TINY, "--data-root", data_root, "--output", tmp_path, "--epochs", "1",
                                       "--clip-grad", "0.5", "--no-track-attention"]])
    assert seen and set(seen) == {0.5}


def test_bench_scripts_take_the_new_names(tmp_path, capsys):
    from bench import mnist_search, mnist_tta
    args = mnist_search.parse_args(["--out", str(tmp_path), "--epochs", "3"])
    for name, flags in mnist_search.CANDIDATES.items():
        cmd = mnist_search.command(name, flags, args)
        assert cmd[1:3] == ["-m", "mnist.train"]
        cfg, _ = mnist_train.parse_args(cmd[3:])  # every flag is one of mnist.train's
        mnist_train.check_config(cfg)
        assert cfg["output"] == str(tmp_path / name) and cfg["epochs"] == 3
        if not name.startswith("default"):
            assert cfg["min_lr"] == pytest.approx(mnist_search.MIN_LR_RATIO * cfg["lr"])
    for module in (mnist_search, mnist_tta):
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: python -m bench.{module.__name__.split('.')[-1]} ")
