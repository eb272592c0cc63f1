"""Train a Vision Transformer on MNIST: `python -m mnist.train` (then `python -m mnist.vis_attn`).

The whole data set lives on the device as one uint8 tensor; shuffling and augmentation (random rotation, scale and
shift through one batched affine_grid + grid_sample) happen there, a batch at a time. Every epoch's randomness comes
from a generator seeded with (seed, epoch), so the same command run again continues bit for bit (on a CPU) where a
run stopped (--fresh starts over). Each epoch writes <out>/checkpoint.pth (atomically) and <out>/metrics.json
(curves.png every 5 epochs and at the end). By default the run fits a 10-minute budget (--minutes): after epoch 4
the epoch count is set from the measured speed. Device and precision come from the hardware (`utils.hardware`). The
last epoch's test score is reported for the single view and with shift test-time augmentation (`ShiftTTA`, --tta-shift).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # the --minutes clock of `python -m mnist.train`: before torch's import (~4 s)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.vit import VisionTransformer  # noqa: E402
from utils import hardware  # noqa: E402
from utils import training as T  # noqa: E402
from utils.optim import OPTIMIZERS, make_optimizer  # noqa: E402

EXIT_S = 3.0  # what --minutes keeps for the interpreter's exit after the last line (1.5-2.3 s measured, Zen 3 VM)
DECIDE_AFTER = 4  # --minutes sets the epoch count after this many epochs, from the mean time of the last 3 (the first
#                   runs slower after compiling), and lowers it later if the run falls behind: on our shared VM the
#                   speed drifted by 20-25 % within a run

# ----------------------------------------------------------------------------------------------------------- config
# Every entry is a command-line flag (`embed_dim` -> --embed-dim); (default, help).
MODEL = {  # VisionTransformer arguments; num_channels=1, num_patches=(28/patch_size)^2, num_classes=10 follow
    "embed_dim": (64, "token width D"),
    "hidden_dim": (128, "MLP hidden width"),
    "num_heads": (4, "attention heads (must divide embed_dim)"),
    "num_layers": (3, "transformer blocks"),
    "patch_size": (7, "patch side in pixels; divides 28: 2, 4, 7 or 14 (4 -> 49 tokens, 7 -> 16 tokens)"),
    "dropout": (0.0, "dropout after position embedding, attention projection and MLP"),
    "drop_path_rate": (0.0, "stochastic depth of the last block (linear from 0)"),
}
RECIPE = {
    "epochs": (64, "epochs to train (with --minutes: at most)"),
    "minutes": (10.0, "time budget: after the fourth epoch the epoch count becomes the smaller of --epochs and what "
                      "ends the run (start to exit) within this many minutes on this machine, lowered if later "
                      "epochs run slower; saved in the checkpoint (0 = off: exactly --epochs)"),
    "batch_size": (256, "images per optimizer step"),
    "optimizer": ("muon", "muon: Muon on the transformer blocks' weight matrices, AdamW on the rest (utils/optim.py); "
                          "adamw: AdamW on all"),
    "lr": (3e-3, "peak learning rate (Muon's update is scaled to AdamW's RMS: the same lr for both)"),
    "weight_decay": (0.05, "decoupled weight decay (matrices only)"),
    "beta2": (0.999, "AdamW second-moment decay"),
    "warmup_epochs": (1.0, "linear warm-up, in epochs, before the cosine decay"),
    "min_lr_ratio": (0.01, "final learning rate as a fraction of --lr"),
    "label_smoothing": (0.1, "cross-entropy label smoothing"),
    "ema_decay": (0.0, "decay of an EMA of the weights, updated every step (0 = off); the EMA is the final model"),
    "deskew": (True, "shear every image (train, test, yours) upright by its second moments, the classic MNIST "
                      "preprocessing (--no-deskew: off)"),
    "rotate": (15.0, "random rotation, +- degrees"),
    "elastic": (0.0, "elastic distortion strength in pixels (Simard et al. 2003, sigma 4 px; ~34 is theirs); 0 = off"),
    "scale": (0.15, "random zoom, +- fraction"),
    "shift": (3.0, "random translation, +- pixels"),
    "val_split": (0, "hold out this many training images for validation; the test set is then scored only at "
                     "the end (use it to choose settings)"),
    "limit_train": (0, "train on only the first N training images (0 = all; for quick checks)"),
    "amp": ("auto", hardware.AMP_HELP),
    "compile": (True, "torch.compile the model (~30 s, counted in the wall time; ~1.4x faster steps)"),
    "seed": (0, "seed of the initial weights, the shuffling and the augmentation"),
}
RUN = {
    "data_root": ("data", "MNIST folder; holds MNIST/raw/*-ubyte(.gz) or receives the download"),
    "out": ("runs/mnist", "output folder: checkpoint.pth, metrics.json, curves.png"),
    "device": ("auto", hardware.DEVICE_HELP),
    "tta_shift": (2, "the final evaluation also averages the softmax over each image and its copies shifted this many "
                     "pixels right, left, down and up: five placements of the patch grid (0 = off)"),
    "threads": (0, "CPU threads for torch (0 = torch's default, one per core)"),
    "fresh": (False, "start over even though <out> holds a checkpoint (it is replaced after the first epoch)"),
    "resume": (False, "continue <out>/checkpoint.pth (the default anyway: a run whose <out> holds a checkpoint "
                      "continues it with the settings it was trained with); without one yet, start a new run"),
    "stop_after": (0, "stop after this many epochs in this run (0 = never); the same command continues"),
    "download": (True, "download MNIST into --data-root when it is not there (--no-download: never)"),
    "progress": (True, "tqdm progress bars when stderr is a terminal (--no-progress: only the per-epoch lines)"),
    "track_attention": (True, "every epoch, one forward of 256 fixed test digits: per-layer attention distance and "
                               "entropy into metrics.json and attention_curves.png, the rollout of the first 8 into "
                               "attention_over_training.gif and .png at the end (--no-track-attention: off)"),
}
PRESETS = {  # --preset NAME sets these; explicit flags still win
    "default": {},  # 10 minutes on the machine it runs on (--minutes 10; README)
    # GPU-sized (49 tokens, 4.2 M parameters); not run by us yet (no GPU was lent)
    "long": dict(patch_size=4, embed_dim=256, hidden_dim=512, num_heads=8, num_layers=8, dropout=0.1,
                 drop_path_rate=0.1, epochs=100, batch_size=128, lr=1e-3, warmup_epochs=5.0, rotate=15.0, scale=0.15,
                 shift=3.0, ema_decay=0.9998, minutes=0.0, out="runs/mnist_long"),
}
MEAN, STD = 0.1307, 0.3081  # pixel statistics of the MNIST training set (in [0, 1])
IMAGE_SIZE, NUM_CLASSES = 28, 10
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
VAL_SPLIT_SEED = 1234  # the validation images do not change with --seed
# -------------------------------------------------------------------------------------------------------------------


class DataError(ValueError):
    """MNIST is missing or unreadable."""


def load_mnist(root: str | Path, download: bool = True,
               splits: tuple[str, ...] = ("train", "test")) -> dict[str, Tensor]:
    """MNIST from `root`/MNIST/raw via torchvision -> {"train_x": (60000, 28, 28) uint8, "train_y": (60000,) int64,
    "test_x": (10000, 28, 28) uint8, "test_y": (10000,) int64} (the `splits` asked for).

    Gzipped files already in raw/ are extracted here (torchvision would first re-download files whose checksum
    differs); otherwise torchvision downloads them when `download` is set.
    """
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import extract_archive

    raw = Path(root) / "MNIST" / "raw"
    for name in FILES:
        if not (raw / name).exists() and (raw / f"{name}.gz").exists():
            extract_archive(str(raw / f"{name}.gz"), str(raw))
    missing = [n for n in FILES if not (raw / n).exists()]  # torchvision wants all four, whatever the split
    put = f"put {', '.join(f'{n}.gz' for n in FILES)} there"
    if missing and not download:
        raise DataError(f"MNIST is not in {raw} (no {missing[0]}); {put}, or drop --no-download to fetch it.")
    try:
        sets = {split: MNIST(str(root), train=split == "train", download=download) for split in splits}
    except Exception as e:  # no network (URLError / RuntimeError), a bad file (AssertionError, ValueError)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[-1][:120] if lines else type(e).__name__
        what = "downloading it failed" if missing else "reading it failed"
        raise DataError(f"MNIST is not usable in {raw}: {what} ({reason}); {put}.") from None
    return {f"{split}_{k}": v for split, ds in sets.items() for k, v in (("x", ds.data), ("y", ds.targets))}


def deskew(images: Tensor, chunk: int = 10000) -> Tensor:
    """images: (N, H, W) uint8 -> the same, each sheared so its principal axis is vertical (slope from the image's
    second moments, mu11 / mu02) with its centre of mass moved to the centre; one batched affine_grid per chunk."""
    out = torch.empty_like(images)
    H, W = images.shape[-2:]
    rows = torch.arange(H, dtype=torch.float32, device=images.device)[:, None]
    cols = torch.arange(W, dtype=torch.float32, device=images.device)[None, :]
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].float() / 255  # (B, H, W)
        mass = x.sum((1, 2)).clamp_min(1e-6)
        cy, cx = (x * rows).sum((1, 2)) / mass, (x * cols).sum((1, 2)) / mass
        dy, dx = rows - cy[:, None, None], cols - cx[:, None, None]
        slope = (x * dy * dx).sum((1, 2)) / (x * dy * dy).sum((1, 2)).clamp_min(1e-6)
        one, zero = torch.ones_like(slope), torch.zeros_like(slope)
        theta = torch.stack([torch.stack([one, slope, (2 * cx + 1) / W - 1], 1),  # output -> input, in [-1, 1]
                             torch.stack([zero, one, (2 * cy + 1) / H - 1], 1)], 1)
        grid = F.affine_grid(theta, [len(x), 1, H, W], align_corners=False)
        y = F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
        out[i:i + chunk] = (y * 255).round().clamp(0, 255).to(torch.uint8)
    return out


def split_indices(n: int, val_split: int) -> tuple[Tensor, Tensor]:
    """(validation, training) indices of `n` training images: `val_split` held out, the same ones for every --seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    return perm[:val_split], perm[val_split:]


def normalize(x: Tensor) -> Tensor:
    """x: (B, 1, H, W) in [0, 1] -> the model's input (zero mean, unit variance over MNIST)."""
    return (x - MEAN) / STD


def model_input(images: Tensor) -> Tensor:
    """images: (N, H, W) uint8 -> (N, 1, H, W) the model's input, unaugmented (evaluation)."""
    return normalize(images.unsqueeze(1).float() / 255)


def augment(x: Tensor, gen: torch.Generator, rotate: float, scale: float, shift: float,
            elastic: float = 0.0, sigma: float = 4.0) -> Tensor:
    """x: (B, 1, H, W) in [0, 1] -> each image rotated by U(+-rotate) degrees, zoomed by U(1 +- scale), shifted by
    U(+-shift) pixels and, if elastic > 0, elastically distorted (Simard et al. 2003: a U(-1, 1) displacement field
    per pixel, Gaussian-smoothed with `sigma` pixels, times `elastic` pixels), all in one batched grid_sample
    (bilinear, zero fill)."""
    if not (rotate or scale or shift or elastic):
        return x
    B, _, H, W = x.shape
    u = torch.rand(B, 4, generator=gen, device=x.device) * 2 - 1
    angle, zoom = u[:, 0] * math.radians(rotate), 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # theta maps output to input coordinates
    tx, ty = u[:, 2] * shift * 2 / W, u[:, 3] * shift * 2 / H
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2): (x, y) in [-1, 1]
    if elastic:
        field = torch.rand(B, 2, H, W, generator=gen, device=x.device) * 2 - 1
        r = int(2 * sigma)
        k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma**2))
        k = (k / k.sum()).expand(2, 1, 1, -1)  # (2, 1, 1, 2r+1): the same separable Gaussian for dx and dy
        field = F.conv2d(F.conv2d(field, k, padding=(0, r), groups=2), k.transpose(2, 3), padding=(r, 0), groups=2)
        grid = grid + field.permute(0, 2, 3, 1) * elastic * torch.tensor([2 / W, 2 / H], device=x.device)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_batches(images: Tensor, labels: Tensor, cfg: dict[str, Any], gen: torch.Generator):
    """Shuffled, augmented, normalised batches (x (B, 1, 28, 28), y (B,)) of uint8 `images` (N, 28, 28) that are
    already on the device; the last incomplete batch is dropped."""
    perm = torch.randperm(len(images), generator=gen, device=images.device)
    bs = cfg["batch_size"]
    for i in range(len(images) // bs):
        idx = perm[i * bs:(i + 1) * bs]
        x = images[idx].unsqueeze(1).float().div_(255)
        x = augment(x, gen, cfg["rotate"], cfg["scale"], cfg["shift"], cfg.get("elastic", 0.0))
        yield normalize(x), labels[idx]


def eval_batches(x: Tensor, y: Tensor, batch_size: int = 1000):
    """(x (B, 1, 28, 28), y (B,)) batches of a normalised set, in order."""
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


class ShiftTTA(nn.Module):
    """Test-time augmentation around `model`: x (B, 1, H, W) normalised -> (B, classes) log of the softmax averaged
    over x and x shifted `pixels` right, left, down and up (blank fill), i.e. over five offsets of the patch grid."""

    def __init__(self, model: nn.Module, pixels: int):
        super().__init__()
        self.model, self.pixels = model, pixels
        self.train(model.training)

    def forward(self, x: Tensor) -> Tensor:
        p, (H, W) = self.pixels, x.shape[-2:]
        padded = F.pad(x, (p, p, p, p), value=-MEAN / STD)  # the normalised value of a blank pixel
        shifts = ((0, -p), (0, p), (-p, 0), (p, 0))  # (dy, dx) of the window: the digit moves right, left, down, up
        views = [x] + [padded[..., p + dy:p + dy + H, p + dx:p + dx + W] for dy, dx in shifts]
        log_probs = self.model(torch.cat(views)).float().log_softmax(-1).unflatten(0, (len(views), len(x)))
        return log_probs.logsumexp(0) - math.log(len(views))  # log of the mean probability, without underflow


def budget_epochs(wall_s: list[float], now: float, epochs: int, budget_s: float, final_s: float) -> int:
    """--minutes: the epoch count for a run whose epochs ended at `wall_s` (seconds since the start, one per epoch
    done), now `now`, planned for `epochs`, to end within `budget_s` with `final_s` for the end. Each further epoch is
    taken to last as long as the mean of the last 3. After DECIDE_AFTER epochs: what fits with 10 % of the budget
    kept free (at most `epochs`); later: the same, lowered to fit, once the plan would end past 95 % of the budget,
    else `epochs`. Never fewer than one more epoch."""
    done, period = len(wall_s), (wall_s[-1] - wall_s[-4]) / 3
    if done > DECIDE_AFTER and now + (epochs - done) * period + final_s <= 0.95 * budget_s:
        return epochs
    return max(done + 1, T.epochs_within(budget_s, now, period, final_s, epochs, done))


def build_model(cfg: dict[str, Any]) -> VisionTransformer:
    """The VisionTransformer of the MODEL entries of `cfg`."""
    p = cfg["patch_size"]
    if p <= 0 or IMAGE_SIZE % p:
        raise ValueError(f"--patch-size {p} does not divide {IMAGE_SIZE}; use 2, 4, 7 or 14.")
    return VisionTransformer(**{k: cfg[k] for k in MODEL}, num_channels=1, num_patches=(IMAGE_SIZE // p) ** 2,
                             num_classes=NUM_CLASSES)


# ------------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> tuple[dict[str, Any], set[str]]:
    """-> (config: every MODEL/RECIPE/RUN entry, names of the flags given explicitly)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default", choices=sorted(PRESETS))
    preset = pre.parse_known_args(argv)[0].preset
    parser = argparse.ArgumentParser(
        prog="python -m mnist.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Presets: " + "; ".join(f"{k}: {v or 'the defaults above'}" for k, v in PRESETS.items()))
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="a named set of defaults (long: GPU-sized, aims at 99.7%%)")
    for title, table in (("model", MODEL), ("recipe", RECIPE), ("run", RUN)):
        group = parser.add_argument_group(title)
        for name, (default, help_text) in table.items():
            default = PRESETS[preset].get(name, default)
            flag = "--" + name.replace("_", "-")
            if isinstance(default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            else:
                kw = {"choices": {"amp": hardware.AMP_CHOICES, "optimizer": OPTIMIZERS}.get(name)}
                group.add_argument(flag, type=type(default), default=default, help=help_text, **kw)
    parser.add_argument("--nan-at-step", type=int, default=-1, help=argparse.SUPPRESS)  # tests: fake a NaN loss
    args = vars(parser.parse_args(argv))
    unset = object()  # parse again with every default replaced by `unset`: what remains was given explicitly
    parser.set_defaults(**{k: unset for k in args})
    given = {k for k, v in vars(parser.parse_args(argv)).items() if v is not unset}
    return args, given


def check_config(cfg: dict[str, Any]) -> None:
    """ValueError naming the first out-of-range setting."""
    for name in ("epochs", "batch_size"):
        if cfg[name] <= 0:
            raise ValueError(f"--{name.replace('_', '-')} {cfg[name]} must be positive.")
    if cfg["threads"] < 0:
        raise ValueError(f"--threads {cfg['threads']} must be >= 0 (0 = torch's default).")
    if not cfg["lr"] > 0:
        raise ValueError(f"--lr {cfg['lr']} must be positive.")
    if not 0 <= cfg["ema_decay"] < 1:
        raise ValueError(f"--ema-decay {cfg['ema_decay']} must be in [0, 1) (0 = no EMA).")
    if not 0 <= cfg["val_split"] < 60000:
        raise ValueError(f"--val-split {cfg['val_split']} must be in [0, 60000).")
    if not 0 <= cfg["tta_shift"] < IMAGE_SIZE // 2:
        raise ValueError(f"--tta-shift {cfg['tta_shift']} must be in [0, {IMAGE_SIZE // 2}) pixels (0 = off).")
    if cfg["limit_train"] < 0:
        raise ValueError(f"--limit-train {cfg['limit_train']} must be >= 0 (0 = all images).")


# ------------------------------------------------------------------------------------------------------------ main
def train(cfg: dict[str, Any], given: set[str], started: float | None = None) -> dict[str, Any]:
    """Run (or continue) training as configured; returns the final metrics dict. `started`: the perf_counter time
    the process started at (the wall clock and the --minutes budget count from it; default: now)."""
    from utils.img2attn import plot_attention_curves, save_attention_over_training, track_attention  # matplotlib

    t0 = started if started is not None else time.perf_counter()
    out = Path(cfg["out"])
    ckpt_path = out / "checkpoint.pth"
    ckpt = None
    if cfg["fresh"] and ckpt_path.is_file():
        print(f"note: --fresh: starting over; {ckpt_path} is replaced after the first epoch")
    elif cfg["resume"] and not ckpt_path.is_file():
        print(f"note: --resume: {ckpt_path} does not exist yet, so this starts a new run")
    elif ckpt_path.is_file():  # a repeated command continues its run, never overwrites it
        ckpt = T.load_checkpoint(ckpt_path)
        saved = ckpt.get("train_config")
        if not isinstance(saved, dict) or saved.get("dataset") != "mnist":
            raise T.CheckpointError(f"{ckpt_path} is not an MNIST training checkpoint of this repo; cannot continue "
                                    f"it (use another --out, or --fresh to replace it).")
        saved.setdefault("optimizer", "adamw")  # runs from before --optimizer trained with AdamW
        clash = {k for k in given & (set(MODEL) | set(RECIPE)) if k in saved and saved[k] != cfg[k]}
        if clash:
            k = sorted(clash)[0]
            raise ValueError(f"--{k.replace('_', '-')} {cfg[k]} differs from the {saved[k]} that {ckpt_path} was "
                             f"trained with; drop it to continue the run, or add --fresh to start over.")
        cfg.update({k: saved[k] for k in (*MODEL, *RECIPE) if k in saved})
    check_config(cfg)
    train_config = {k: cfg[k] for k in (*MODEL, *RECIPE)} | {"dataset": "mnist", "normalize": [MEAN, STD]}
    if ckpt is not None and "epochs_fit" in ckpt["train_config"]:  # what --minutes decided
        cfg["epochs"] = train_config["epochs_fit"] = ckpt["train_config"]["epochs_fit"]
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    hw = hardware.resolve(cfg["device"], cfg["amp"])
    device, amp_dtype = hw.device, hw.amp_dtype
    print(f"{hw.summary}, {'compiled' if cfg['compile'] else 'eager'}", flush=True)  # the first line of every run

    data = load_mnist(cfg["data_root"], cfg["download"])
    if cfg["deskew"]:
        data = {k: deskew(v) if k.endswith("_x") else v for k, v in data.items()}
    train_x, train_y = data["train_x"], data["train_y"]
    if cfg["limit_train"]:
        train_x, train_y = train_x[:cfg["limit_train"]], train_y[:cfg["limit_train"]]
    val = None
    if cfg["val_split"]:
        val_idx, train_idx = split_indices(len(train_x), cfg["val_split"])
        val = (model_input(train_x[val_idx]).to(device), train_y[val_idx].to(device))
        train_x, train_y = train_x[train_idx], train_y[train_idx]
    train_x, train_y = train_x.to(device), train_y.to(device)
    test = (model_input(data["test_x"]).to(device), data["test_y"].to(device))
    tracked = test[0][:256] if cfg["track_attention"] else None  # fixed held-out digits; the first 8 go in the GIF
    steps_per_epoch = len(train_x) // cfg["batch_size"]
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg['batch_size']} exceeds the {len(train_x)} training images.")

    T.seed_everything(cfg["seed"])
    model = build_model(cfg).to(device)
    for block in model.blocks:  # 17 tokens: the explicit softmax beats the CPU SDPA kernel (bench.vit_speed)
        block.attn.fused_attn = device.type != "cpu"
    optimizer = make_optimizer(cfg["optimizer"], model, cfg["lr"], cfg["weight_decay"], device,
                               betas=(0.9, cfg["beta2"]), amp_dtype=amp_dtype)
    warmup_steps = round(cfg["warmup_epochs"] * steps_per_epoch)
    total = cfg["epochs"] * steps_per_epoch  # with --minutes: until epoch 5 fixes it (lr step ~1 % if 20+ fit)
    scheduler = T.warmup_cosine(optimizer, total, min(warmup_steps, total), cfg["min_lr_ratio"])
    ema = T.make_ema(model, cfg["ema_decay"], warmup=True) if cfg["ema_decay"] else None
    scaler = hw.grad_scaler()
    start, metrics = 0, []
    frames: dict[str, Any] = {"epochs": [], "maps": torch.zeros(0)}  # rollout of the GIF digits after each epoch
    if ckpt is not None:
        start, metrics = T.restore_checkpoint(ckpt, model, optimizer, scheduler, ema=ema, scaler=scaler)
        frames = ckpt.get("attention_frames", frames)
    net = model
    if cfg["compile"]:  # compiled for the shape (and autocast) of every training step
        net = T.compile_or_eager(model, train_x[:cfg["batch_size"]].unsqueeze(1).float() / 255, amp_dtype)
    ran_as = hw.record() | {"compiled": net is not model}
    if ckpt is not None:
        print(f"continuing {ckpt_path} after epoch {start}/{cfg['epochs']} (--fresh starts over)")

    step = start * steps_per_epoch
    ce = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        nonlocal step
        loss = ce(logits.float(), y)
        step += 1
        return loss * float("nan") if step - 1 == cfg["nan_at_step"] else loss

    wall_before = metrics[-1]["wall_s"] if metrics else 0.0
    ran = 0
    for epoch in range(start, cfg["epochs"]):
        if cfg["minutes"] and start < DECIDE_AFTER <= epoch < cfg["epochs"]:  # the session that decides; a continued
            final_s = metrics[-1]["eval_s"] * (5 if cfg["tta_shift"] else 0) + EXIT_S  # run keeps the saved count
            fit = budget_epochs([r["wall_s"] for r in metrics], wall_before + time.perf_counter() - t0, cfg["epochs"],
                                60 * cfg["minutes"], final_s)
            if fit != cfg["epochs"] or epoch == DECIDE_AFTER:
                cfg["epochs"] = train_config["epochs_fit"] = fit
                total = cfg["epochs"] * steps_per_epoch
                scheduler = T.stretch_schedule(scheduler, total, min(warmup_steps, total), cfg["min_lr_ratio"])
                tqdm.write(f"--minutes {cfg['minutes']:g}: {fit} epochs fit on this machine"
                           + (" (fewer: the epochs got slower)" if epoch > DECIDE_AFTER else ""))
        if epoch >= cfg["epochs"]:
            break
        epoch_start = time.perf_counter()
        T.seed_everything(T.epoch_seed(cfg["seed"], epoch))  # dropout etc.: independent of what ran before
        gen = T.epoch_generator(cfg["seed"], epoch, device)
        try:
            stats = T.train_one_epoch(net, train_batches(train_x, train_y, cfg, gen), optimizer, scheduler, loss_fn,
                                      device=device, epoch=epoch + 1, step=epoch * steps_per_epoch,
                                      total=steps_per_epoch, ema=ema, amp_dtype=amp_dtype, scaler=scaler,
                                      progress=cfg["progress"] and sys.stderr.isatty(),
                                      desc=f"epoch {epoch + 1}/{cfg['epochs']}")
        except T.NonFiniteLossError as e:
            kept = (f"the last good checkpoint (epoch {epoch}) is kept at {ckpt_path}" if epoch > 0
                    else "no checkpoint was written")
            e.args = (f"{e} {kept[0].upper()}{kept[1:]}.",)
            raise
        last = epoch + 1 == cfg["epochs"]
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats}
        for prefix, m in (("", model), ("ema_", ema.module if ema is not None else None)):  # eager: no 2nd compile
            if m is None:
                continue
            sets = {"val": val} if val is not None else {}
            if val is None or last:
                sets["test"] = test
            views = [("", m)]
            if last and cfg["tta_shift"]:
                views.append(("tta_", ShiftTTA(T.unwrap(m), cfg["tta_shift"])))
            for (tta, viewer), (name, (x, y)) in itertools.product(views, sets.items()):
                eval_start = time.perf_counter()
                r = T.evaluate(viewer, eval_batches(x, y), device=device, amp_dtype=amp_dtype)
                row[f"{prefix}{tta}{name}_top1"], row[f"{prefix}{tta}{name}_loss"] = r["top1"], r["loss"]
                if not (prefix or tta):
                    row["eval_s"] = time.perf_counter() - eval_start
        if tracked is not None:  # the bare model, eval mode, no RNG: training is unchanged
            attn_row, maps = track_attention(model, tracked, rollout=min(8, len(tracked)), batch_size=len(tracked))
            row.update(attn_row)
            frames = {"epochs": [*frames["epochs"], epoch + 1],
                      "maps": torch.cat([frames["maps"], maps[None]]) if frames["epochs"] else maps[None]}
        row["wall_s"] = wall_before + time.perf_counter() - t0
        row["epoch_s"] = time.perf_counter() - epoch_start
        metrics.append(row)
        state = T.checkpoint_state(model, optimizer, scheduler, epoch=epoch + 1, metrics=metrics,
                                   train_config=train_config, ema=ema, scaler=scaler, attention_frames=frames,
                                   reported_weights="ema" if ema is not None else "model")
        T.save_checkpoint(state, ckpt_path)
        T.save_metrics(metrics, out / "metrics.json", train_config=train_config, ran_as=ran_as)
        ran += 1
        stop = cfg["stop_after"] and ran >= cfg["stop_after"] and not last
        if last or stop or (epoch + 1) % 5 == 0:  # ~0.5 s a plot
            title = f"MNIST ViT {cfg['embed_dim']}d x {cfg['num_layers']}, patch {cfg['patch_size']}"
            T.plot_curves(metrics, out / "curves.png", title=title)
            plot_attention_curves(metrics, out / "attention_curves.png", title=title)  # when rows were tracked
        scores = "  ".join(f"{k} {v:.2f}%" for k, v in row.items() if k.endswith("_top1"))
        tqdm.write(f"epoch {epoch + 1}/{cfg['epochs']}  train loss {stats['train_loss']:.4f}  {scores}  "
                   f"{stats['img_per_s']:.0f} img/s  {row['wall_s']:.0f} s")
        if stop:
            print(f"stopped after epoch {epoch + 1} (--stop-after {cfg['stop_after']}); the same command continues")
            return row
    if tracked is not None and frames["epochs"]:  # where the model looked, epoch by epoch
        save_attention_over_training(data["test_x"][:len(frames["maps"][0])], frames["maps"], frames["epochs"],
                                     out / "attention_over_training.gif", out / "attention_over_training.png")
    final = metrics[-1]
    which = "ema_" if ema is not None else ""
    notes = ["EMA weights"] if ema is not None else []
    if f"{which}tta_test_top1" in final:
        notes.append(f"shift TTA; single view {final[f'{which}test_top1']:.2f}%")
    acc = final.get(f"{which}tta_test_top1", final[f"{which}test_top1"])
    shown = f"{acc:.2f}%" + (f" ({'; '.join(notes)})" if notes else "")
    wall = time.perf_counter() - t0
    total = f", {final['wall_s']:.0f} s over all sessions" if start else ""
    print(f"final: test accuracy {shown} after {final['epoch']} epochs, wall time {wall:.0f} s ({wall / 60:.1f} "
          f"min{total}); checkpoint {ckpt_path}")
    return final


def main(argv: list[str] | None = None, started: float | None = None) -> None:
    cfg, given = parse_args(argv)
    try:
        train(cfg, given, started)
    except (ValueError, FileNotFoundError, T.NonFiniteLossError) as e:  # DataError, CheckpointError are ValueErrors
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted; the last finished epoch is in {Path(cfg['out']) / 'checkpoint.pth'}: the same command "
                 f"continues")


if __name__ == "__main__":
    main(started=STARTED)
