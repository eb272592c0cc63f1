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
    args = [*TINY, "--data-root", data_root, "--epochs", "1000", "--minutes", "0.1"]
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
    at_most = max(5, schedule.epochs_within(6, done["wall_s"], period, final_s, 4, cap=1000))  # decided a little later
    assert 5 <= decided <= at_most < 1000  # 6 s cannot hold 1000 epochs of even this tiny model
    assert ckpt["scheduler"]["last_epoch"] == 5 * (640 // 64)
    mnist_train.main([str(a) for a in args])  # the same command again continues the run
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["epochs"]) == decided == metrics["train_config"]["epochs_fit"]
    assert metrics["epochs"][-1]["lr"] == pytest.approx(3e-3 * 0.01)  # the stretched cosine ends where it should


def test_replan_follows_the_clock_both_ways_and_a_continued_run_keeps_its_count():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    run = SimpleNamespace(start=0, epochs=64, cap=None, steps_per_epoch=10, train_config={},
                          scheduler=schedule.warmup_cosine(optimizer, 640, 10), metrics=[])
    cfg = {"minutes": 10.0, "tta_shift": 0, "warmup_epochs": 1.0, "min_lr_ratio": 0.01}

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
    assert "not an image" in call(vis_attn.main, "--model", ckpt, "--image", tmp_path / "notes.png")
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
