"""Where the MNIST ViT looks: `python -m mnist.vis_attn` (after `python -m mnist.train`).

Shows a digit, the prediction and its probability, attention rollout and gradient rollout overlays, and the class
token's attention in every layer x head (`utils.img2attn.attention_figure`). The digit is a test-set image
(--index) or your own picture (--image): any size, colour or gray, dark-on-light or light-on-dark; it is brought
to the MNIST form first (gray, light digit on black, scaled into a 20x20 box, centred by centre of mass in 28x28).

`--inspect` draws how the model looks instead (`utils.img2attn.inspection_figure`): the principal components of its
patch-embedding filters, the similarity of its position embeddings, and the mean attention distance and entropy of
every head against depth over the first --num-images test digits; the table of those is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnist.train import IMAGE_SIZE, MEAN, NUM_CLASSES, STD, deskew, load_mnist
from models.pretrained import CheckpointError, load_pretrained, read_checkpoint
from models.vit import VisionTransformer
from utils import hardware

# ----------------------------------------------------------------------------------------------------------- config
image_path = None  # a PNG/JPG of a digit; None: test-set digit number `index` (from `data_root`)
index = 0  # which test-set digit when no image is given
model_path = "runs/mnist/checkpoint.pth"  # what `python -m mnist.train` writes (the weights its run reported)
output_path = "imgs/mnist_attention.png"
data_root = "data"  # MNIST root, as for mnist.train --data-root
target = None  # class explained by the gradient rollout; None: the predicted one
device = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps; the maps are computed in fp32
# Maps drawn (fixed by attention_figure): attention rollout (mean over heads), gradient rollout for `target`,
# and the class token's raw attention per layer x head.
inspect = False  # True: how the model looks instead (ViT paper Fig. 7 + attention entropy; utils.img2attn)
num_images = 256  # --inspect: averaged over the first this many test digits (or over `image_path` alone)
inspect_output_path = "imgs/mnist_inspect.png"
# -------------------------------------------------------------------------------------------------------------------


def to_mnist(image: Image.Image) -> np.ndarray:
    """Any picture of one digit -> (28, 28) uint8 in the MNIST form: light digit on black, its bounding box scaled
    to fit 20x20 (aspect kept), placed so its centre of mass is at the centre of the 28x28 frame.

    The background is the median of the border pixels; a light background is inverted. Transparent pixels count
    as background.
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
        raise ValueError("the image has no digit: it is (almost) a single colour.")
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


def load_image(path: str | Path) -> np.ndarray:
    """Read a picture of a digit and bring it to the MNIST form -> (28, 28) uint8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; pass the path of a PNG or JPG of a digit.")
    try:
        with Image.open(path) as im:
            im.load()
            return to_mnist(im)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not an image that PIL can read ({type(e).__name__}); pass a PNG or JPG.") from None


def load_model(path: str | Path) -> tuple[VisionTransformer, dict]:
    """A trained MNIST ViT (the weights its run reported, EMA or not: `model.weights_note` says which) and its
    input preparation {"mean", "std", "deskew"} from a checkpoint of mnist.train."""
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mnist.vis_attn", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", default=image_path, help="PNG/JPG of a digit (default: a test-set digit)")
    p.add_argument("--index", type=int, default=index, help="test-set digit to show when no --image is given")
    p.add_argument("--model", default=model_path, help="checkpoint written by python -m mnist.train")
    p.add_argument("--output", default=None, help=f"where to write the figure (PNG; default {output_path}, with "
                                                  f"--inspect {inspect_output_path})")
    p.add_argument("--data-root", default=data_root, help="MNIST root for the test-set digits")
    p.add_argument("--target", type=int, default=target, help="class (0-9) the gradient rollout explains "
                                                                "(default: the predicted one)")
    p.add_argument("--inspect", action=argparse.BooleanOptionalAction, default=inspect,
                   help="instead: the ViT paper's Fig. 7 (patch-filter components, position-embedding similarity, "
                        "mean attention distance per head) and attention entropy, over --num-images test digits "
                        "(or the --image); prints the distance / entropy table")
    p.add_argument("--num-images", type=int, default=num_images, help="--inspect: the first N test digits")
    p.add_argument("--device", default=device, help=hardware.DEVICE_HELP + "; maps in fp32")
    args = p.parse_args(argv)
    output = args.output or (inspect_output_path if args.inspect else output_path)
    try:
        if args.target is not None and not 0 <= args.target < NUM_CLASSES:
            raise ValueError(f"--target {args.target} is not a digit; pass 0-9.")
        if args.num_images < 1:
            raise ValueError(f"--num-images {args.num_images} must be at least 1.")
        dev = hardware.resolve_device(args.device)
        model, prep = load_model(args.model)
        model.to(dev)
        if args.image:
            digits, label = load_image(args.image)[None], None
        else:
            test = load_mnist(args.data_root, download=True, splits=("test",))
            n = len(test["test_x"])
            if args.inspect:
                digits, label = test["test_x"][:args.num_images].numpy(), None
            elif not 0 <= args.index < n:
                raise ValueError(f"--index {args.index} is outside the test set (0..{n - 1}).")
            else:
                digits, label = test["test_x"][args.index:args.index + 1].numpy(), int(test["test_y"][args.index])
        from utils.img2attn import attention_figure, attention_stats, attention_table, inspection_figure, save_figure

        if prep["deskew"]:  # the model was trained on upright digits: show and feed it the same
            digits = deskew(torch.from_numpy(digits)).numpy()
        x = ((torch.from_numpy(digits).float() / 255 - prep["mean"]) / prep["std"])[:, None].to(dev)  # (n,1,28,28)
        if args.inspect:
            stats = attention_stats(model, x)
            save_figure(inspection_figure(model, x, stats=stats, name="MNIST ViT"), output, dpi=100)
        else:
            fig = attention_figure(model, x, digits[0], class_names=[str(i) for i in range(NUM_CLASSES)],
                                   target=args.target)
            with torch.no_grad():
                probs = model(x).softmax(-1)[0]
            save_figure(fig, output)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError and DataError are ValueErrors
        sys.exit(f"error: {e}")
    if args.inspect:
        print(f"{args.model} ({model.weights_note}), {len(x)} digit(s):\n{attention_table(stats)}\nwrote {output}")
        return
    truth = f" (label {label})" if label is not None else ""
    print(f"{args.model}: {model.weights_note}")
    print(f"predicted {int(probs.argmax())} ({float(probs.max()):.1%}){truth}; wrote {output}")


if __name__ == "__main__":
    main()
