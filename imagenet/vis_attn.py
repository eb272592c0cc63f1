"""Where does an ImageNet ViT look in a photo? `python -m imagenet.vis_attn --image photo.jpg` (default: a cat).

The model may be a registry name (`python -m models.pretrained --list`: DeiT, DeiT III, DINO, DINOv2 with or
without registers, torchvision; downloaded once into torch's cache), a library name (timm/<name>[.<tag>], hf:<repo id>,
open_clip:<arch>/<pretrained tag>; --prompt TEXT, repeated, gives a CLIP / SigLIP model a zero-shot head whose
classes are the prompts), this repo's checkpoint
(runs/imagenet/checkpoint.pth: the weights its run reported, the EMA or the trained model) or a timm / DeiT / DINO /
torchvision weights file. Prints which weights it loaded and the top-5 classes with probabilities, and writes one
figure (runs/imagenet/attention.png unless --output names another file): the photo, the top-5, attention rollout,
gradient rollout for the top class (or --target), the last layer's token norms (high-norm artifacts), each map with
its colour bar, and the class token's attention in every layer x head. A photo whose file name (or folder) holds its
WordNet id, as in `n01440764_tench.JPEG` or `val/n01440764/...`, gets its true class in the title. Models without a
head (DINO, DINOv2) get the maps without the top-5 and the gradient map; register tokens are left out of every map.

Any photo size and aspect, any PIL mode and bit depth (16-bit PNGs too), EXIF orientation applied
(`utils.images.load_image`): the shorter side is resized to --img-size, the longer one to scale (at most 2x
--img-size, center-cropped), then both are center-cropped to multiples of the patch size; the model resamples its
position embedding for the new patch grid.

`--html PATH` writes the attention explorer instead of the figure (`attention.explorer`, docs/explorer.md): one HTML
file, no server, where a click on a patch shows its attention row or column in every layer and head, rollout from it,
the gradient rollout of each of the top-5 classes (and of --target, after them when it is not among them: the page
opens on its map) and the token norms.

`--inspect` draws how the model looks instead (`attention.figures.inspection_figure`): the principal components of
its patch-embedding filters, the similarity of its position embeddings, and the mean attention distance and entropy
of every head against depth over --num-images photos of a folder, or one photo (--inspect-images; each resized to
--img-size / 0.875 and center-cropped to --img-size, as in evaluation); the table of those is printed and the figure
goes to runs/imagenet/inspect.png (or --output).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from attention.explorer import check_path, explorer_html
from attention.figures import attention_figure, first_synonym, inspection_figure
from attention.inspection import attention_table, inspect_model
from attention.legrad import legrad
from imagenet.dataloaders import classes as IN
from imagenet.dataloaders import constants as IN1K
from imagenet.dataloaders.dataset import is_image_file
from imagenet.dataloaders.transforms import device_transform, eval_transform
from models.any_vit import output_probability, prefix_names, probabilities
from models.clip import with_prompts
from models.pretrained import load_pretrained
from models.vit import VisionTransformer
from utils import hardware
from utils.checkpoint import CheckpointError, read_checkpoint
from utils.config import UsageError, parse_config
from utils.images import load_image
from utils.img2attn import explain
from utils.plots import figure_path, save_figure

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = "imgs/chelsea.jpg"  # relative to the repo root (`shipped`); "Chelsea the cat" by Stefan van der Walt, CC0
# ("No copyright restrictions"), scikit-image 0.26.0's skimage/data/chelsea.png (license in
# skimage/data/_fetchers.py), as JPEG

# ----------------------------------------------------------------------------------------------------------- config
OPTIONS = {
    "image": (CHELSEA, "photo to explain (JPEG, PNG, ...): any size, aspect, colour mode or bit depth"),
    "model": ("deit_tiny_patch16_224", "a registry name (python -m models.pretrained --list; downloaded once), "
                                       "timm/<name>[.<tag>], hf:<repo id>, open_clip:<arch>/<pretrained tag>, this "
                                       "repo's checkpoint or timm / DeiT / DINO / torchvision ViT weights"),
    "prompt": (None, "a text for a CLIP / SigLIP model's zero-shot head (repeat the flag for more): the top-5 lists "
                     "the prompts, the gradient map and LeGrad explain the top one (or --target)"),
    "output": (None, "the figure's file (.png, .pdf, .svg, ...; folders are made; default "
                     "runs/imagenet/attention.png, with --inspect runs/imagenet/inspect.png)"),
    "img_size": (224, "shorter side of the model input, in pixels"),
    "target": ("", "class of the gradient map (with --html: a map among the page's classes): index, WordNet id, "
                   "name (\"tiger cat\") or one of the --prompt texts; empty = the top class"),
    "num_heads": (0, "attention heads of foreign weights (0: embed_dim // 64, right for DeiT / timm / torchvision)"),
    "device": ("auto", hardware.DEVICE_HELP + "; maps in fp32"),
    "inspect": (False, "instead: the ViT paper's Fig. 7 (patch-filter components, position-embedding similarity, "
                       "mean attention distance per head) and attention entropy over --inspect-images; prints the "
                       "distance / entropy table (weights without a head work too)"),
    "inspect_images": (CHELSEA, "--inspect: a folder of photos, or one photo (--inspect --image X: X)"),
    "num_images": (32, "--inspect: photos taken from the folder, evenly spaced over its sorted names"),
    "html": (None, "instead of the figure: this HTML file, the attention explorer (attention.explorer; click a "
                   "patch, see where it looks; one file, no server)"),
}
ALIASES = {"image": ["--image-path"], "model": ["--model-path"], "output": ["--output-path", "--out"]}
OUTPUTS = {False: "runs/imagenet/attention.png", True: "runs/imagenet/inspect.png"}  # runs/ is git-ignored
# -------------------------------------------------------------------------------------------------------------------


class InputError(UsageError):
    """A bad photo or option; one sentence."""


def shipped(path: str | Path) -> Path:
    """A path as given; the default photo (imgs/chelsea.jpg, relative to the repo) also from another folder."""
    path = Path(path)
    if str(path) == CHELSEA and not path.exists():
        return ROOT / path
    return path


def true_class(path: str | Path, names: Sequence[str] | None, classes: Sequence[str] | None) -> int | None:
    """The class of a photo whose file name starts with a WordNet id (n01440764_tench.JPEG) or whose folder is one
    (val/n01440764/x.JPEG) -> its index among the model's classes (its saved class folders, else ImageNet-1k's),
    or None when the path names no class of the model."""
    path = Path(path)
    for wnid in (path.name.split("_")[0].split(".")[0], path.parent.name):
        if not IN.is_wnid(wnid):
            continue
        if classes is not None and wnid in classes:
            return list(classes).index(wnid)
        if classes is None and names is not None and list(names) == list(IN.NAMES):
            return IN.wnid_to_index(wnid) if wnid in IN.WNIDS else None
    return None


def model_input(photo: Image.Image, size: int, patch: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic), center-crop the longer side to <= 2·size, both to multiples of
    the patch size."""
    w, h = photo.size
    scale = size / min(w, h)
    new_w, new_h = max(patch, round(w * scale)), max(patch, round(h * scale))
    photo = TF.resize(photo, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    crop_h, crop_w = (min(s, 2 * size) // patch * patch for s in (new_h, new_w))
    return TF.center_crop(photo, [max(patch, crop_h), max(patch, crop_w)])


def readable(name: str) -> str:
    """A WordNet id -> its ImageNet name; anything else unchanged."""
    try:
        return IN.NAMES[IN.wnid_to_index(name)]
    except ValueError:
        return name


def class_names_for(ckpt: dict, num_classes: int) -> list[str] | None:
    """Names of the model's classes: the class folders a repo checkpoint saved, or ImageNet-1k's for 1000."""
    saved = ckpt.get("classes")
    if isinstance(saved, list | tuple) and len(saved) == num_classes:
        return [readable(str(c)) for c in saved]
    if num_classes == IN.NUM_CLASSES:
        return list(IN.NAMES)
    return None


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    """" (did you mean 'zebra'?)" for a near miss among `choices`, else ""."""
    close = difflib.get_close_matches(value.lower(), [c.lower() for c in choices], n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close and close[0] != value.lower() else ""


def resolve_target(value: str, names: Sequence[str] | None, num_classes: int) -> int | None:
    """--target (a class index, a WordNet id or a class name; "" = the top class) -> the class index or None."""
    if not value:
        return None
    if value.lstrip("+-").isdigit():
        if not 0 <= int(value) < num_classes:
            raise InputError(f"--target {value} is out of range; the model has classes 0..{num_classes - 1}.")
        return int(value)
    if names is not None and list(names) == list(IN.NAMES):
        try:
            return IN.class_index(value)
        except ValueError as e:
            hint = _did_you_mean(value, names)
            raise InputError(f"--target {value!r} is not an ImageNet-1k class name{hint}." if hint else
                             f"--target: {e}") from None
    lowered = [n.lower() for n in names or []]
    if value.lower() in lowered:
        return lowered.index(value.lower())
    raise InputError(f"--target {value!r} is not a class of this model{_did_you_mean(value, names or [])}; give a "
                     f"class index 0..{num_classes - 1}" + (f" or a name such as {names[0]!r}." if names else "."))


def load_model(path: str, heads: int) -> tuple[nn.Module, dict]:
    """--model: a registry name (downloaded once), a library name (timm/..., hf:..., open_clip:...) or a checkpoint
    file -> (model, the checkpoint dict; {} for a name). A bad name or a missing file: load_pretrained's sentence
    (models.pretrained.resolve); a folder or weights for other than RGB photos: this script's."""
    if Path(path).is_dir():
        inside = f" such as '{Path(path) / 'checkpoint.pth'}'" if (Path(path) / "checkpoint.pth").is_file() else ""
        raise InputError(f"--model '{path}' is a folder; pass the checkpoint file in it{inside}, or a registry name.")
    if not Path(path).is_file():
        model, ckpt = load_pretrained(path, num_heads=heads or None), {}
    else:
        ckpt = read_checkpoint(path)
        try:
            model = load_pretrained(ckpt, num_heads=heads or None)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    if model.config["num_channels"] != 3:
        raise CheckpointError(f"{path} takes {model.config['num_channels']}-channel images, not RGB photos "
                              f"(an MNIST model? use mnist.vis_attn).")
    return model, ckpt


def inspection_inputs(path: str | Path, count: int, size: int) -> Tensor:
    """The photo at `path`, or `count` photos evenly spaced over the sorted images of the folder `path`, through the
    evaluation transform (shorter side to size / 0.875, center crop size x size) -> (n, 3, size, size)."""
    path = Path(path)
    files = [path]
    if not path.exists():
        raise InputError(f"--inspect-images '{path}' does not exist; pass a folder of photos or one photo.")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p.name))
        if not files:
            raise InputError(f"folder '{path}' holds no images; pass a folder of photos or one photo.")
        files = [files[i] for i in sorted({round(v) for v in np.linspace(0, len(files) - 1, min(count, len(files)))})]
    tf = eval_transform(size)  # -> uint8; device_transform normalises
    return device_transform()(torch.stack([tf(load_image(f)) for f in files]))


def inspect(cfg: dict) -> None:
    """--inspect: the ViT paper's Fig. 7 and attention entropy over photos; prints the distance / entropy table."""
    if cfg["num_images"] < 1:
        raise InputError(f"--num-images {cfg['num_images']} must be at least 1.")
    dev = hardware.resolve_device(cfg["device"])
    model, _ = load_model(cfg["model"], cfg["num_heads"])
    if cfg["img_size"] % model.patch_size:
        raise InputError(f"--img-size {cfg['img_size']} is not a multiple of the patch size {model.patch_size}.")
    x = inspection_inputs(shipped(cfg["inspect_images"]), cfg["num_images"], cfg["img_size"]).to(dev)
    model.eval().to(dev)
    inspection = inspect_model(model, x)
    print(f"{cfg['model']} ({model.weights_note}): {len(x)} photo(s) of {cfg['inspect_images']} at "
          f"{cfg['img_size']}x{cfg['img_size']} px")
    print(attention_table(inspection))
    save_figure(inspection_figure(inspection, name=Path(cfg["model"]).name), cfg["output"], dpi=100)
    print(f"saved {cfg['output']}")


def print_top5(probs: Tensor, names: Sequence[str] | None) -> None:
    top = probs.topk(min(5, len(probs)))
    for rank, (p, c) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
        label = names[c] if names else f"class {c}"
        wnid = f"{IN.WNIDS[c]}, " if names == list(IN.NAMES) else ""
        print(f"{rank}. {100 * p:5.1f}%  {label} ({wnid}index {c})")


def input_line(path: str | Path, photo: Image.Image, shown: Image.Image, grid: tuple[int, int]) -> str:
    """"photo.jpg: 451x300 px (W x H) -> model input 336x224 px, 14 rows x 21 columns of patches"."""
    return (f"{path}: {photo.size[0]}x{photo.size[1]} px (W x H) -> model input {shown.size[0]}x{shown.size[1]} px, "
            f"{grid[0]} rows x {grid[1]} columns of patches")


def normalisation(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the model's own preprocessing (model.data_config, as timm / open_clip / transformers give it),
    else ImageNet's."""
    dc = getattr(model, "data_config", None) or {}
    if "mean" in dc and "std" in dc:
        return tuple(dc["mean"]), tuple(dc["std"])
    return IN1K.MEAN, IN1K.STD


def run(cfg: dict) -> None:
    """The attention figure of one photo (or --inspect); prints the weights, the input size and the top-5."""
    if cfg["inspect"]:
        return inspect(cfg)
    photo = load_image(shipped(cfg["image"]))  # the photo first: cheap to check
    dev = hardware.resolve_device(cfg["device"])
    model, ckpt = load_model(cfg["model"], cfg["num_heads"])
    if cfg["prompt"]:
        model = with_prompts(model, cfg["prompt"])
    model.eval().to(dev)
    print(f"{cfg['model']}: {model.weights_note}")
    num_classes = model.config["num_classes"]
    if num_classes == 0 and cfg["target"]:
        raise InputError(f"--target needs a classification head; {cfg['model']} has none (a feature extractor "
                         f"such as DINO / DINOv2, or an image tower without --prompt).")
    names = list(cfg["prompt"]) if cfg["prompt"] else class_names_for(ckpt, num_classes)
    tgt = resolve_target(str(cfg["target"]), names, num_classes)
    saved = ckpt.get("classes")
    label = None if cfg["prompt"] else true_class(cfg["image"], names, [str(c) for c in saved]
                                                   if isinstance(saved, list | tuple) else None)
    shown = model_input(photo, cfg["img_size"], model.patch_size)
    mean, std = normalisation(model)
    x = TF.normalize(TF.to_tensor(shown), mean, std)[None].to(dev)  # (1, 3, H, W)
    print(input_line(cfg["image"], photo, shown, model.patch_grid(*x.shape[-2:])))
    if cfg["html"]:
        return write_explorer(cfg, model, x, shown, names, tgt)
    ex = explain(model, x, tgt)
    extra = {}
    if num_classes and (getattr(model, "layer_logits", None) is not None or isinstance(model, VisionTransformer)):
        c = int(ex.target[0])  # the class it explains, as the gradient-rollout panel names it
        name = (names[c] if cfg["prompt"] else first_synonym(names[c])) if names else f"class {c}"
        extra[f"LeGrad: {name}"] = (legrad(model, x, ex.target), "relevance, min-max scaled")
    query = prefix_names(model, model.num_prefix_tokens)[0] if getattr(model, "pool_query", False) else "class token"
    probability = output_probability(model)
    fig = attention_figure(ex, np.asarray(shown), class_names=names, topk=5, label=label, extra=extra, query=query,
                           kind="prompts" if cfg["prompt"] else "classes", probability=probability)
    save_figure(fig, cfg["output"])
    if label is not None:
        print(f"true class (from the file name): {names[label] if names else label} (index {label})")
    if num_classes == 0:
        print(f"saved {cfg['output']} ({cfg['model']} has no classification head: maps only, no top-5)")
        return
    print_top5(probabilities(ex.logits[0], probability), names)
    what = names[tgt] if names and tgt is not None else "the top class" if tgt is None else f"class {tgt}"
    print(f"saved {cfg['output']} (gradient map for {what}{', LeGrad map too' if extra else ''})")


def write_explorer(cfg: dict, model, x: Tensor, shown: Image.Image, names: Sequence[str] | None,
                   target: int | None) -> None:
    """--html: the attention explorer of the photo, opening on the gradient rollout of --target (among its
    classes); prints the top-5 and the file's size."""
    page = explorer_html(model, x, cfg["html"], pictures=[np.asarray(shown)], titles=[Path(cfg["image"]).name],
                         class_names=names, targets=[target])
    if model.config["num_classes"]:
        with torch.no_grad():
            print_top5(probabilities(model(x)[0], output_probability(model)), names)
    print(f"saved {cfg['html']} ({page.path.stat().st_size / 1024:,.0f} KiB; stored attention within "
          f"±{page.max_error:.2g})" + (f"; it opens on the gradient rollout of {names[target] if names else target}"
                                      if target is not None else ""))


def parse_args(argv: list[str] | None = None) -> dict:
    cfg, given = parse_config("python -m imagenet.vis_attn", __doc__, {"options": OPTIONS}, argv, aliases=ALIASES)
    if cfg["inspect"] and "image" in given and "inspect_images" not in given:
        cfg["inspect_images"] = cfg["image"]  # --inspect --image X: inspect X
    repeated = argparse.ArgumentParser(add_help=False)  # --prompt may be given many times: keep them all
    repeated.add_argument("--prompt", action="append", default=[])
    prompts = repeated.parse_known_args(argv)[0].prompt
    return {**cfg, "prompt": prompts, "output": cfg["output"] or OUTPUTS[cfg["inspect"]]}


def check_options(cfg: dict) -> None:
    """The checks that need no file read."""
    if cfg["img_size"] <= 0:
        raise InputError(f"--img-size {cfg['img_size']} must be positive.")
    if cfg["num_heads"] < 0:
        raise InputError(f"--num-heads {cfg['num_heads']} must be 0 (embed_dim // 64) or a positive head count.")
    if cfg["html"] and cfg["inspect"]:
        raise InputError("--html and --inspect draw different things; pass one of them.")
    if cfg["html"]:
        check_path(cfg["html"])
    else:
        figure_path(cfg["output"])


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        check_options(cfg)
        run(cfg)
    except (ValueError, OSError) as e:  # InputError, CheckpointError and ImageError are ValueErrors
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
