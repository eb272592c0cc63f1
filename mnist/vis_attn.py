"""Where the MNIST ViT looks: `python -m mnist.vis_attn` (after `python -m mnist.train`).

Shows a digit, the prediction and its probability, attention rollout and gradient rollout overlays, and the class
token's attention in every layer x head (`attention.figures.attention_figure`). The digit is a test-set image
(--index; its true label goes in the title) or your own picture (--image): any size, colour or gray, any bit depth
(16-bit PNGs too), dark-on-light or light-on-dark, a phone photo turned upright by its EXIF orientation; it is
brought to the MNIST form first (gray, light digit on black, scaled into a 20x20 box, centred by centre of mass in
28x28). The figure goes to runs/mnist/attention.png unless --output names another file.

`--html PATH` writes the attention explorer of the --index digits (several: `--index 0 1 2 3`) instead of the figure
(`attention.explorer`, docs/explorer.md): one HTML file, no server; click a patch, see where it looks.

`--inspect` draws how the model looks instead (`attention.figures.inspection_figure`): the principal components of its
patch-embedding filters, the similarity of its position embeddings, and the mean attention distance and entropy of
every head against depth over the first --num-images test digits; the table of those is printed and the figure goes
to runs/mnist/inspect.png (or --output).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attention.explorer import check_path, explorer_html
from attention.figures import attention_figure, inspection_figure
from attention.inspection import attention_table, inspect_model
from mnist.data import IMAGE_SIZE, MEAN, NUM_CLASSES, STD, deskew, load_mnist
from models.pretrained import load_pretrained
from models.vit import VisionTransformer
from utils import hardware
from utils.checkpoint import CheckpointError, read_checkpoint
from utils.config import UsageError, parse_config
from utils.images import load_image
from utils.img2attn import explain
from utils.plots import figure_path, save_figure

# ----------------------------------------------------------------------------------------------------------- config
OPTIONS = {
    "image": (None, "picture of one digit (PNG, JPEG, ...; any size, colour, bit depth; default: test-set digit "
                    "number --index)"),
    "index": (0, "test-set digit to show when no --image is given; --html takes several (--index 0 1 2 3)"),
    "model": ("runs/mnist/checkpoint.pth", "checkpoint written by python -m mnist.train (the weights its run "
                                           "reported)"),
    "output": (None, "the figure's file (.png, .pdf, .svg, ...; folders are made; default runs/mnist/attention.png, "
                     "with --inspect runs/mnist/inspect.png)"),
    "data_root": ("data", "MNIST root for the test-set digits, as for mnist.train --data-root"),
    "target": (None, "class (0-9) the gradient rollout explains (default: the predicted one)"),
    "device": ("auto", hardware.DEVICE_HELP + "; maps in fp32"),
    "inspect": (False, "instead: the ViT paper's Fig. 7 (patch-filter components, position-embedding similarity, "
                       "mean attention distance per head) and attention entropy, over --num-images test digits (or "
                       "the --image); prints the distance / entropy table"),
    "num_images": (256, "--inspect: the first N test digits"),
    "html": (None, "instead of the figure: this HTML file, the attention explorer of the --index digits "
                   "(attention.explorer; click a patch, see where it looks; one file, no server)"),
}
ALIASES = {"output": ["--out"]}
OUTPUTS = {False: "runs/mnist/attention.png", True: "runs/mnist/inspect.png"}  # runs/ is git-ignored
# -------------------------------------------------------------------------------------------------------------------


class NoDigitError(ValueError):
    """A picture with nothing drawn on it."""


def to_mnist(image: Image.Image) -> np.ndarray:
    """Any picture of one digit -> (28, 28) uint8 in the MNIST form: light digit on black, its bounding box scaled
    to fit 20x20 (aspect kept), placed so its centre of mass is at the centre of the 28x28 frame.

    The background is the median of the border pixels; a light background is inverted. Transparent pixels count
    as background. Raises NoDigitError for a picture of (almost) one colour.
    """
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
    gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W) in [0, 255]
    alpha = rgba[..., 3] / 255
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if alpha.min() < 1:  # transparent background: the opaque pixels are the ink; fill behind them with the opposite
        ink = np.median(gray[alpha > 0.5]) if (alpha > 0.5).any() else 0.0
        gray = alpha * gray + (1 - alpha) * (0.0 if ink > 127 else 255.0)
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = np.abs(gray - background)  # distance from the background, whatever the polarity
    peak = float(ink.max())
    if peak < 32:
        raise NoDigitError("it is (almost) a single colour.")
    ink = np.clip((ink - 0.15 * peak) / (0.85 * peak), 0, 1)  # drop paper texture / noise, then stretch to [0, 1]
    rows, cols = np.nonzero(ink)
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = ink.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    box = np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS),
                     dtype=np.float32)
    total = box.sum()
    cy, cx = ((np.indices(box.shape) * box).reshape(2, -1).sum(1) / total) if total > 0 else np.array(box.shape) / 2
    top, left = round(IMAGE_SIZE / 2 - cy), round(IMAGE_SIZE / 2 - cx)
    top = min(max(top, 0), IMAGE_SIZE - box.shape[0])
    left = min(max(left, 0), IMAGE_SIZE - box.shape[1])
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    out[top:top + box.shape[0], left:left + box.shape[1]] = box
    return np.clip(out, 0, 255).round().astype(np.uint8)


def load_digit(path: str | Path) -> np.ndarray:
    """Read a picture of a digit (`utils.images.load_image`: any mode and bit depth, EXIF orientation applied,
    transparency kept) and bring it to the MNIST form -> (28, 28) uint8.

    Raises ImageError (missing file, a folder, not an image) or ValueError (no digit), one sentence naming the file."""
    try:
        return to_mnist(load_image(path, "RGBA"))
    except NoDigitError as e:
        raise NoDigitError(f"image '{path}' has no digit: {e}") from None


def check_model_path(path: str | Path) -> None:
    """One sentence for a --model that is not a file: a folder, or no checkpoint yet (train one first)."""
    path = Path(path)
    if path.is_dir():
        inside = f" such as '{path / 'checkpoint.pth'}'" if (path / "checkpoint.pth").is_file() else ""
        raise CheckpointError(f"--model '{path}' is a folder; pass the checkpoint file in it{inside}.")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist: train a model first with python -m mnist.train "
                              f"(it writes runs/mnist/checkpoint.pth), or pass --model with a run's checkpoint.")


def load_model(path: str | Path) -> tuple[VisionTransformer, dict]:
    """A trained MNIST ViT (the weights its run reported, EMA or not: `model.weights_note` says which) and its
    input preparation {"mean", "std", "deskew"} from a checkpoint of mnist.train."""
    check_model_path(path)
    ckpt = read_checkpoint(path)
    cfg = ckpt.get("model_config")
    model = load_pretrained(ckpt)
    c = model.config
    side = IMAGE_SIZE // c["patch_size"] if IMAGE_SIZE % c["patch_size"] == 0 else None
    if c["num_channels"] != 1 or c["num_classes"] != NUM_CLASSES or list(c["grid_size"]) != [side, side]:
        raise CheckpointError(
            f"{path} holds a ViT for {c['num_channels']}-channel {c['grid_size'][0] * c['patch_size']}x"
            f"{c['grid_size'][1] * c['patch_size']} images and {c['num_classes']} classes, not MNIST (1-channel "
            f"28x28, 10 classes); pass a checkpoint of python -m mnist.train.")
    recipe = (ckpt.get("train_config") or {}) if cfg is not None else {}
    mean, std = recipe.get("normalize", [MEAN, STD])
    return model.eval(), {"mean": float(mean), "std": float(std), "deskew": bool(recipe.get("deskew", False))}


def digits_to_show(cfg: dict) -> tuple[np.ndarray, int | None]:
    """The digits asked for -> ((n, 28, 28) uint8, the label of the first test digit or None)."""
    if cfg["image"]:
        return load_digit(cfg["image"])[None], None
    test = load_mnist(cfg["data_root"], download=True, splits=("test",))
    n = len(test["test_x"])
    if cfg["inspect"]:
        return test["test_x"][:cfg["num_images"]].numpy(), None
    indices = indices_of(cfg)
    for i in indices:
        if not 0 <= i < n:
            raise UsageError(f"--index {i} is outside the test set; pass 0..{n - 1}.")
    return test["test_x"][indices].numpy(), int(test["test_y"][indices[0]])


def indices_of(cfg: dict) -> list[int]:
    """--index as a list (one int or several)."""
    return list(cfg["index"]) if isinstance(cfg["index"], list | tuple) else [cfg["index"]]


def split_index(argv: list[str]) -> tuple[list[str], list[int] | None]:
    """--index may name several digits (--index 0 1 2 3): -> (argv with the first only, all of them or None)."""
    if "--index" not in argv:
        return argv, None
    at = argv.index("--index")
    end = at + 1
    while end < len(argv) and argv[end].lstrip("-").isdigit():
        end += 1
    if end - at <= 2:
        return argv, None
    return argv[:at + 2] + argv[end:], [int(v) for v in argv[at + 1:end]]


def check_options(cfg: dict) -> Path:
    """The cheap checks, before any loading -> the figure's path."""
    if cfg["target"] is not None and not 0 <= cfg["target"] < NUM_CLASSES:
        raise UsageError(f"--target {cfg['target']} is not a digit; pass 0-9.")
    if cfg["num_images"] < 1:
        raise UsageError(f"--num-images {cfg['num_images']} must be at least 1.")
    for i in indices_of(cfg):
        if i < 0 and not cfg["image"] and not cfg["inspect"]:
            raise UsageError(f"--index {i} is negative; pass a test-set index from 0.")
    if cfg.get("html"):
        if cfg["inspect"]:
            raise UsageError("--html and --inspect draw different things; pass one of them.")
        return check_path(cfg["html"])
    if len(indices_of(cfg)) > 1:
        raise UsageError(f"--index {' '.join(map(str, indices_of(cfg)))}: the figure shows one digit; pass one "
                         f"index, or add --html PATH for the explorer of several.")
    return figure_path(cfg["output"] or OUTPUTS[cfg["inspect"]])


def run(cfg: dict) -> None:
    """Draw the figure asked for and print what the model predicted (or the inspection table)."""
    output = check_options(cfg)
    dev = hardware.resolve_device(cfg["device"])
    model, prep = load_model(cfg["model"])
    model.to(dev)
    digits, label = digits_to_show(cfg)
    if prep["deskew"]:  # the model was trained on upright digits: show and feed it the same
        digits = deskew(torch.from_numpy(digits)).numpy()
    x = ((torch.from_numpy(digits).float() / 255 - prep["mean"]) / prep["std"])[:, None].to(dev)  # (n, 1, 28, 28)
    if cfg["inspect"]:
        inspection = inspect_model(model, x)
        save_figure(inspection_figure(inspection, name="MNIST ViT"), output, dpi=100)
        print(f"{cfg['model']} ({model.weights_note}), {len(x)} digit(s):\n{attention_table(inspection)}\n"
              f"wrote {output}")
        return
    if cfg.get("html"):
        return write_explorer(cfg, model, x, digits)
    ex = explain(model, x, cfg["target"])
    figure = attention_figure(ex, digits[0], class_names=[str(i) for i in range(NUM_CLASSES)], label=label)
    save_figure(figure, output)
    probs = ex.logits[0].softmax(-1)
    truth = f" (true label {label})" if label is not None else ""
    print(f"{cfg['model']}: {model.weights_note}")
    print(f"predicted {int(probs.argmax())} ({float(probs.max()):.1%}){truth}; wrote {output}")


def write_explorer(cfg: dict, model: VisionTransformer, x: torch.Tensor, digits: np.ndarray) -> None:
    """--html: the attention explorer of the digits; prints each prediction and the file's size."""
    names = [str(i) for i in range(NUM_CLASSES)]
    titles = [Path(cfg["image"]).name] if cfg["image"] else [f"test digit {i}" for i in indices_of(cfg)]
    page = explorer_html(model, x, cfg["html"], pictures=digits, titles=titles, class_names=names)
    with torch.no_grad():
        probs = model(x).softmax(-1)
    print(f"{cfg['model']}: {model.weights_note}")
    for title, p in zip(titles, probs, strict=True):
        print(f"{title}: predicted {int(p.argmax())} ({float(p.max()):.1%})")
    print(f"wrote {cfg['html']} ({page.path.stat().st_size / 1024:,.0f} KiB; stored attention within "
          f"±{page.max_error:.2g})")


def main(argv: list[str] | None = None) -> None:
    argv, several = split_index(list(sys.argv[1:] if argv is None else argv))
    cfg, _ = parse_config("python -m mnist.vis_attn", __doc__, {"options": OPTIONS}, argv, types={"target": int},
                          aliases=ALIASES)
    if several is not None:
        cfg["index"] = several
    try:
        run(cfg)
    except (ValueError, OSError) as e:  # UsageError, CheckpointError, DataError, ImageError are ValueErrors
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
