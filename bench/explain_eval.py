"""Which map should I trust? Every explanation method x every faithfulness / localisation metric on one set of photos:
`python -m bench.explain_eval --images PHOTOS`.

    python -m bench.explain_eval --images PHOTOS --limit 200                    # DeiT-tiny by name (downloaded once)
    python -m bench.explain_eval --images PHOTOS --model timm/vit_small_patch16_224.augreg_in21k_ft_in1k
    python -m bench.explain_eval --images PHOTOS --methods LeGrad,CP-LRP,random --metrics road,saco --limit 20

Methods: attention.attribution.METHODS (the random map's and the centre-bias map's rows are the baselines). Each
method's maps are computed once per image and scored by every metric; the explained class is the photo's true class
where the file names say it (`<wnid>_<name>.JPEG`), else the model's prediction (the output says which).
Metrics (docs/explain_eval.md says where each comes from):
  road          ROAD (Rong et al. 2022): target probability after noisy linear imputation of the 10..90 % most
                (MoRF, lower = better) / least (LeRF, higher = better) relevant pixels; gap = LeRF - MoRF.
  saco          SaCo (Wu et al. 2024), in [-1, 1], higher = better.
  deletion      deletion AUC (Petsiuk et al. 2018), patches -> the image mean, lower = better.
  insertion     insertion AUC, higher = better.
  localisation  on 2x2 mosaics of four photos of four classes, each classified correctly alone (Arias-Duart et al.
                2022): the map's share in the explained photo's quadrant (0.25 = chance) and the pointing game.
Every cell is the mean +- standard error over images (mosaics). Writes table.md, table.json and figure.png (ROAD
curves and every method's map of one mosaic) under --output. The maps are computed in fp32; the metrics' forwards
in --amp's precision (auto: bf16 where the hardware does it natively); the photos' and their all-mean images'
probabilities, which SaCo, deletion and insertion share, are computed once for every method.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms import v2
from tqdm import tqdm

from attention.attribution import METHODS, random_map
from attention.faithfulness import deletion_score, target_probs
from attention.localisation import Mosaics, make_mosaics, pointing_game, quadrant_share
from attention.road import road
from attention.saco import saco
from bench.machine import cpu_name
from imagenet.dataloaders.classes import NAMES, NUM_CLASSES, index_from_filename
from imagenet.dataloaders.dataset import is_image_file
from imagenet.vis_attn import normalisation
from models.pretrained import load_pretrained
from utils import hardware
from utils.config import UsageError, build_parser
from utils.images import load_image
from utils.plots import figure_path, save_figure

PROG = "python -m bench.explain_eval"
CONFIG = {  # name -> (default, help); every entry is a flag (batch_size -> --batch-size)
    "images": (None, "folder of photos, or one photo (required; photos named <wnid>_<name>.JPEG give the true "
                     "class, which is then the one explained)"),
    "model": ("deit_tiny_patch16_224", "a registry name (python -m models.pretrained --list), a checkpoint with a "
                                       "classification head, or timm/<name>, hf:<repo>, open_clip:<arch>/<tag>"),
    "num_heads": (0, "attention heads of foreign weights (0: embed_dim // 64, right for DeiT / timm / torchvision)"),
    "limit": (200, "photos used, evenly spread over the sorted folder (0 = all)"),
    "mosaics": (0, "2x2 mosaics for the localisation metrics (0 = as many as the photos used)"),
    "methods": ("all", "comma-separated subset of: " + ", ".join(METHODS)),
    "metrics": ("all", "comma-separated subset of: road, saco, deletion, insertion, localisation"),
    "batch_size": (25, "images per batch of maps and of scoring"),
    "chunk": (64, "images per forward inside a metric"),
    "steps": (10, "deletion / insertion steps (each changes 1/steps of the patches; at least 2)"),
    "groups": (10, "SaCo's salience-ranked pixel groups K"),
    "seed": (0, "seed of the random map, the mosaics, ROAD's noise and the tie order of ROAD / SaCo"),
    "device": ("auto", hardware.DEVICE_HELP),
    "amp": ("auto", "precision of the metrics' forwards (the maps are always fp32): auto (bf16 autocast where the "
                    "hardware does bf16 natively, fp16 on older GPUs, else fp32) | bf16 | fp16 | none (fp32)"),
    "output": ("runs/explain_eval", "folder for table.md, table.json and figure.png"),
}
METRICS = ("road", "saco", "deletion", "insertion", "localisation")
FRACTIONS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # ROAD: share of the pixels removed
ROAD_CURVES = ("morf", "lerf", "morf top-1", "lerf top-1")  # mean probability / top-1 accuracy per fraction
# table column -> (metric it comes from, better: "high" | "low")
COLUMNS = {"ROAD MoRF": ("road", "low"), "ROAD LeRF": ("road", "high"), "ROAD gap": ("road", "high"),
           "SaCo": ("saco", "high"), "deletion AUC": ("deletion", "low"), "insertion AUC": ("insertion", "high"),
           "quadrant share": ("localisation", "high"), "pointing game": ("localisation", "high")}


# ------------------------------------------------------------------------------------------------------ input
def list_images(folder: Path, limit: int) -> list[Path]:
    """The image files of `folder` (sorted by name), `limit` of them evenly spread (0 = all); a photo: itself.

    Raises ValueError (one sentence) when the path is missing, neither a folder nor a photo, or holds no photos."""
    if folder.is_file() and is_image_file(folder.name):
        return [folder]
    if not folder.is_dir():
        what = "is not an image file or a folder" if folder.exists() else "does not exist"
        raise ValueError(f"--images '{folder}' {what}; pass a folder of photos (e.g. ImageNet sample photos named "
                         f"<wnid>_<name>.JPEG).")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))
    if not files:
        raise ValueError(f"--images '{folder}' holds no image files (.jpg, .jpeg, .png, ...); pass a folder of "
                         f"photos.")
    if 0 < limit < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    return files


def labels_of(files: list[Path], num_classes: int) -> Tensor | None:
    """ImageNet class index per file from `<wnid>_<name>` file names; None when a name has no WordNet id or the
    model does not have ImageNet-1k's 1000 classes."""
    if num_classes != NUM_CLASSES:
        return None
    try:
        return torch.tensor([index_from_filename(f) for f in files])
    except ValueError:
        return None


def choose(value: str, names: tuple[str, ...] | list[str], flag: str) -> list[str]:
    """"all" or a comma-separated subset of `names` (any case) -> the chosen names in `names`' order.

    Raises UsageError (one sentence) naming an unknown entry and the choices."""
    if value.strip().lower() == "all":
        return list(names)
    lower = {n.lower(): n for n in names}
    asked = [v.strip() for v in value.split(",") if v.strip()]
    for v in asked:
        if v.lower() not in lower:
            raise UsageError(f"{flag} {v!r} is not one of: {', '.join(names)} (comma-separated, or all).")
    if not asked:
        raise UsageError(f"{flag} is empty; pass all or a comma-separated subset of: {', '.join(names)}.")
    chosen = {lower[v.lower()] for v in asked}
    return [n for n in names if n in chosen]


def check_config(cfg: dict) -> None:
    if cfg["images"] is None:
        raise UsageError("--images is required: pass a folder of photos, e.g. --images PHOTOS with ImageNet sample "
                         "photos named <wnid>_<name>.JPEG.")
    for key, least in (("batch_size", 1), ("chunk", 1), ("steps", 2), ("groups", 2), ("num_heads", 0)):
        if cfg[key] < least:
            raise UsageError(f"--{key.replace('_', '-')} {cfg[key]} must be at least {least}.")
    for key, zero in (("limit", "all the photos"), ("mosaics", "as many as the photos used")):
        if cfg[key] < 0:
            raise UsageError(f"--{key} {cfg[key]} must be 0 ({zero}) or a positive count.")


def input_size(model: nn.Module) -> tuple[int, int]:
    """The model's native input (H, W): its data_config's input_size (timm / HF / open_clip), else grid x patch."""
    dc = getattr(model, "data_config", None) or {}
    if "input_size" in dc:
        return tuple(dc["input_size"][-2:])
    return tuple(g * model.patch_size for g in model.grid_size)


def preprocessing(model: nn.Module) -> v2.Compose:
    """A photo -> (C, H, W) float as the model was evaluated: resize to size / crop_pct, centre crop, normalise
    with its own mean / std (imagenet.vis_attn.normalisation), interpolation from its data_config (else bicubic)."""
    dc = getattr(model, "data_config", None) or {}
    size = input_size(model)
    mode = v2.InterpolationMode(dc.get("interpolation", "bicubic"))
    mean, std = normalisation(model)
    return v2.Compose([v2.ToImage(), v2.Resize(int(min(size) / dc.get("crop_pct", 0.875)), interpolation=mode,
                                               antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def load_photos(files: list[Path], model: nn.Module) -> Tensor:
    """(N, C, H, W) of the photos, preprocessed; ImageError (one sentence) for a file that cannot be read."""
    preprocess = preprocessing(model)
    return torch.stack([preprocess(load_image(f)) for f in tqdm(files, desc="photos", unit="photo", leave=False)])


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Top-1 class of each image (N,), in batches."""
    return torch.cat([model(b).argmax(-1) for b in x.split(batch_size)])


def build_mosaics(x: Tensor, labels: Tensor, predicted: Tensor, count: int, seed: int) -> Mosaics | str:
    """Mosaics of the photos the model classifies correctly alone (attention.localisation.make_mosaics), or the
    reason there are none (a sentence)."""
    right = (predicted == labels).nonzero()[:, 0]
    if len(labels[right].unique()) < 4:
        return (f"only {len(labels[right].unique())} classes among the {len(right)} photos classified correctly; "
                f"a mosaic needs 4")
    return make_mosaics(x[right], labels[right], count, seed)


# ------------------------------------------------------------------------------------------------------ scoring
def maps_of(method, model: nn.Module, x: Tensor, target: Tensor, batch_size: int) -> Tensor:
    """One method's maps of all images (N, gh, gw), in batches."""
    return torch.cat([method(model, xb, tb).detach().float() for xb, tb in
                      zip(x.split(batch_size), target.split(batch_size), strict=True)])


class Autocast(nn.Module):
    """`model` run under `hw.autocast()` (--amp), its logits returned as float32: the metrics' forwards."""

    def __init__(self, model: nn.Module, hw: hardware.Hardware):
        super().__init__()
        self.model, self.hw = model, hw

    def forward(self, x: Tensor) -> Tensor:
        with self.hw.autocast():
            return self.model(x).float()


@torch.no_grad()
def endpoints(scorer: nn.Module, x: Tensor, target: Tensor, chunk: int) -> Tensor:
    """(2, N) softmax[target] of the photos and of their all-mean images: shared by SaCo (the unperturbed
    probability) and deletion / insertion (their first and last steps), computed once for every method."""
    n = len(x)

    def make(idx: Tensor) -> Tensor:  # idx < n: photo idx; else photo idx - n with every pixel its mean
        b = idx % n
        return torch.where((idx < n).view(-1, 1, 1, 1), x[b], x[b].mean((2, 3), keepdim=True))

    return target_probs(scorer, make, 2 * n, target.repeat(2), chunk)[0].view(2, n)


def score(metric: str, model: nn.Module, x: Tensor, heat: Tensor, target: Tensor, ends: Tensor, cfg: dict,
          generator: torch.Generator) -> dict[str, Tensor]:
    """One metric on one batch -> {per-image quantity: (B, ...)}; ends: the batch's (2, B) endpoints."""
    if metric == "road":
        out = {}
        for order in ("morf", "lerf"):
            out[order], out[f"{order} top-1"] = road(model, x, heat, target, FRACTIONS, order, cfg["chunk"],
                                                     generator=generator, seed=cfg["seed"])
        return out
    if metric == "saco":
        return {"saco": saco(model, x, heat, target, cfg["groups"], cfg["chunk"], seed=cfg["seed"], full=ends[0])}
    return {metric: deletion_score(model, x, heat, target, cfg["steps"], metric, cfg["chunk"], ends)}


def columns(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-image quantities of one method -> per-image values of each table column (ROAD: mean over fractions)."""
    out = {}
    if "morf" in values:
        morf, lerf = values["morf"].mean(1), values["lerf"].mean(1)
        out.update({"ROAD MoRF": morf, "ROAD LeRF": lerf, "ROAD gap": lerf - morf})
    for key, column in (("saco", "SaCo"), ("deletion", "deletion AUC"), ("insertion", "insertion AUC"),
                        ("share", "quadrant share"), ("pointing", "pointing game")):
        if key in values:
            out[column] = values[key].double()
    return out


def mean_se(v: Tensor) -> tuple[float, float | None]:
    """Mean and standard error of the mean (std with n - 1 over sqrt n; None for a single value)."""
    v = v.double()
    return float(v.mean()), float(v.std() / len(v) ** 0.5) if len(v) > 1 else None


# ------------------------------------------------------------------------------------------------------ output
def markdown(results: dict, columns_shown: list[str]) -> str:
    """The methods x metrics table (mean ± standard error), the best mean of each column in bold."""
    arrows = {c: "↓" if COLUMNS[c][1] == "low" else "↑" for c in columns_shown}
    lines = ["| method | " + " | ".join(f"{c} {arrows[c]}" for c in columns_shown) + " |",
             "|---|" + "---:|" * len(columns_shown)]
    best = {}
    for c in columns_shown:
        means = [r[c]["mean"] for r in results.values() if c in r]
        if means:
            best[c] = (min if COLUMNS[c][1] == "low" else max)(means)
    for name, row in results.items():
        cells = []
        for c in columns_shown:
            if c not in row:
                cells.append("n/a")
                continue
            m = f"{row[c]['mean']:.3f}"
            se = "" if row[c]["se"] is None else f" ± {row[c]['se']:.3f}"
            cells.append(f"{f'**{m}**' if row[c]['mean'] == best[c] else m}{se}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(curves: dict, example: tuple[Tensor, str, dict[str, Tensor]], mean_std: tuple, title: str):
    """ROAD curves per method (MoRF, LeRF; when ROAD ran) above every method's map over one example image (a
    mosaic)."""
    from matplotlib.figure import Figure

    from utils.img2attn import overlay, to_rgb

    fig = Figure(figsize=(16, 8 if curves else 3.4), layout="constrained")
    fig.suptitle(title, fontsize=10)
    top, bottom = fig.subfigures(2, 1, height_ratios=(1.4, 1)) if curves else (None, fig)
    for ax, order in zip(top.subplots(1, 2), ("morf", "lerf"), strict=True) if curves else ():
        for name, c in curves.items():
            ax.plot([100 * f for f in FRACTIONS], c[order], marker="o", ms=3, label=name,
                    ls="--" if name in ("random", "centre") else "-")
        better = "lower" if order == "morf" else "higher"
        ax.set(xlabel="pixels removed (%)", ylabel="target probability",
               title=f"ROAD, {'MoRF' if order == 'morf' else 'LeRF'} ({better} = better)")
        ax.grid(alpha=0.3)
        if order == "lerf":
            ax.legend(fontsize=8)
    image, label, maps = example
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in mean_std)
    rgb = to_rgb((image.cpu() * std + mean).clamp(0, 1))
    panels = bottom.subplots(1, len(maps) + 1, squeeze=False)[0]
    panels[0].imshow(rgb)
    panels[0].set_title(label, fontsize=8)
    for ax, (name, heat) in zip(panels[1:], maps.items(), strict=True):
        ax.imshow(overlay(rgb, heat.clamp(min=0)))
        ax.set_title(name, fontsize=8)
    for ax in panels:
        ax.axis("off")
    return fig


def machine(hw: hardware.Hardware) -> dict:
    gpu = torch.cuda.get_device_name(hw.device) if hw.device.type == "cuda" else None
    return {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "device": str(hw.device), "gpu": gpu,
            "amp": hw.amp, "hardware": hw.summary, "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------------ main
def setup(cfg: dict) -> tuple:
    """Checks and loads everything before the long work; raises ValueError / OSError (one sentence)."""
    check_config(cfg)
    methods = choose(cfg["methods"], list(METHODS), "--methods")
    metrics = choose(cfg["metrics"], METRICS, "--metrics")
    out = Path(cfg["output"])
    figure_path(out / "figure.png", "--output")
    files = list_images(cfg["images"], cfg["limit"])
    hw = hardware.resolve(cfg["device"], cfg["amp"])
    model = load_pretrained(cfg["model"], num_heads=cfg["num_heads"] or None).to(hw.device).eval()
    if model.config["num_classes"] == 0:
        raise UsageError(f"--model {cfg['model']} has no classification head: the maps explain a class; pass a "
                         f"classifier (e.g. deit_tiny_patch16_224).")
    return methods, metrics, out, files, hw, model


class Unsupported(Exception):
    """A method this model does not support (its ValueError's sentence): its row is n/a."""


def method_maps(method, model: nn.Module, x: Tensor, target: Tensor, batch_size: int) -> Tensor:
    """maps_of, with a method's ValueError / NotImplementedError raised as Unsupported."""
    try:
        return maps_of(method, model, x, target, batch_size)
    except (ValueError, NotImplementedError) as e:
        raise Unsupported(str(e).splitlines()[0]) from None


@dataclass
class Photos:
    """The photos (N, C, H, W) preprocessed, the class explained in each (N,) and their endpoints (2, N)."""

    x: Tensor
    target: Tensor
    ends: Tensor


def evaluate(name: str, method, model: nn.Module, scorer: nn.Module, photos: Photos, mosaics: Mosaics | None,
             metrics: list[str], cfg: dict, seconds: dict[str, float], bar: tqdm) -> tuple[dict[str, Tensor], Tensor]:
    """One method: its maps of every photo (batch by batch, from `model`) scored by every metric (forwards through
    `scorer`), and of every mosaic -> ({per-image quantity: (N, ...) or (M,)}, the map of the first mosaic (else of
    the first photo)). Adds each part's wall time to `seconds`; raises Unsupported when the method does not run on
    this model."""
    values: dict[str, list[Tensor]] = {}
    example = None
    bs = cfg["batch_size"]
    for i, (xb, tb, eb) in enumerate(zip(photos.x.split(bs), photos.target.split(bs), photos.ends.split(bs, 1),
                                         strict=True)):
        bar.set_description(f"{name}: maps")
        t0 = time.perf_counter()
        heat = method_maps(method, model, xb, tb, bs)
        example = heat[0].cpu() if example is None else example
        seconds["maps"] += time.perf_counter() - t0
        bar.update()
        for metric in (m for m in metrics if m != "localisation"):
            bar.set_description(f"{name}: {metric}")
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg["seed"] * 100_003 + i)  # ROAD's noise, the same every run
            for k, v in score(metric, scorer, xb, heat, tb, eb, cfg, gen).items():
                values.setdefault(k, []).append(v.detach().cpu())
            seconds[metric] += time.perf_counter() - t0
            bar.update()
    if mosaics is not None:
        bar.set_description(f"{name}: localisation")
        t0 = time.perf_counter()
        mx, mt, mq = (t.to(photos.x.device) for t in (mosaics.x, mosaics.target, mosaics.quadrant))
        heat = method_maps(method, model, mx, mt, bs)
        values["share"], values["pointing"] = [quadrant_share(heat, mq).cpu()], [pointing_game(heat, mq).cpu()]
        example = heat[0].cpu()
        seconds["localisation"] += time.perf_counter() - t0
        bar.update()
    return {k: torch.cat(v) for k, v in values.items()}, example


def prepare(cfg: dict, metrics: list[str], model: nn.Module, files: list[Path], device: torch.device) -> tuple:
    """Photos (their targets: the true class when the file names give it, else the prediction), top-1 (or None)
    and the mosaics (or None, and why)."""
    x = load_photos(files, model).to(device)
    labels = labels_of(files, model.config["num_classes"])
    predicted = predict(model, x, cfg["batch_size"])
    target = predicted if labels is None else labels.to(device)
    top1 = None if labels is None else float((predicted == target).float().mean())
    mosaics, why_none = None, None
    if "localisation" in metrics:
        built = "the true classes are unknown (no <wnid>_ file names), so no photo is known to be classified " \
                "correctly" if labels is None else \
            build_mosaics(x, target, predicted, cfg["mosaics"] or len(x), cfg["seed"])
        mosaics, why_none = (None, built) if isinstance(built, str) else (built, None)
    return x, target, top1, mosaics, why_none


def run(cfg: dict, argv: list[str]) -> dict:
    methods, metrics, out, files, hw, model = setup(cfg)
    x, target, top1, mosaics, why_none = prepare(cfg, metrics, model, files, hw.device)
    n, known = len(x), top1 is not None
    if why_none:
        print(f"localisation skipped: {why_none}.")
    print(f"{cfg['model']}: {model.weights_note}; {n} photos, explaining the "
          f"{'true class' if known else 'predicted class'}" + (f" (top-1 {top1:.1%})" if known else "")
          + (f"; {len(mosaics.x)} mosaics" if mosaics is not None else ""))

    table_methods = {m: METHODS[m] for m in methods}
    if "random" in table_methods:
        table_methods["random"] = random_map(cfg["seed"])  # a fresh generator: the same maps every run
    scored = [m for m in metrics if m != "localisation"]
    batches = -(-n // cfg["batch_size"])
    seconds = {"endpoints": 0.0, "maps": 0.0, **dict.fromkeys(metrics, 0.0)}
    scorer, t0 = Autocast(model, hw), time.perf_counter()
    shared = {"saco", "deletion", "insertion"} & set(metrics)  # the metrics that use the endpoints
    photos = Photos(x, target, endpoints(scorer, x, target, cfg["chunk"]) if shared else torch.full((2, n), torch.nan))
    seconds["endpoints"] = time.perf_counter() - t0
    results, curves, per_image, skipped, examples = {}, {}, {}, {}, {}
    bar = tqdm(total=len(methods) * (batches * (1 + len(scored)) + (mosaics is not None)), desc="scoring",
               unit="step")
    for name in methods:
        try:
            values, examples[name] = evaluate(name, table_methods[name], model, scorer, photos, mosaics, metrics,
                                              cfg, seconds, bar)
        except Unsupported as e:
            skipped[name] = str(e)
            tqdm.write(f"{name} skipped: {e}")
            results[name] = {}
            continue
        cols = columns(values)
        results[name] = {c: dict(zip(("mean", "se"), mean_se(v), strict=True), n=len(v)) for c, v in cols.items()}
        per_image[name] = {c: [round(a, 6) for a in v.tolist()] for c, v in cols.items()}
        if "morf" in values:
            curves[name] = {o: values[o].double().mean(0).tolist() for o in ROAD_CURVES}
    bar.close()
    if mosaics is None:
        seconds.pop("localisation", None)
    info = {"command": PROG + (" " + shlex.join(argv) if argv else ""), "model": cfg["model"],
            "weights": model.weights_note, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "machine": machine(hw), "photos": n, "images": str(cfg["images"]),
            "target": "true class" if known else "predicted class", "top1": top1,
            "mosaics": 0 if mosaics is None else len(mosaics.x), "no_mosaics_because": why_none,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()}, "seconds": seconds,
            "skipped": skipped, "results": results, "road_curves": {"fractions": list(FRACTIONS), **curves},
            "per_image": per_image}
    shown = [c for c, (m, _) in COLUMNS.items() if m in scored or (m == "localisation" and mosaics is not None)]
    write(info, shown, out)
    corner = ("top-left", "top-right", "bottom-left", "bottom-right")
    label = files[0].name if mosaics is None else \
        f"mosaic, explained: {NAMES[int(mosaics.target[0])]} ({corner[int(mosaics.quadrant[0])]})"
    example = (x[0] if mosaics is None else mosaics.x[0], label, examples)
    save_figure(figure(curves, example, normalisation(model), f"{cfg['model']}, {n} photos"), out / "figure.png")
    print(f"wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'figure.png'}")
    return info


def write(info: dict, shown: list[str], out: Path) -> None:
    """Print the table with its note and the per-metric seconds; write table.md and table.json under `out`."""
    m, top1 = info["machine"], info["top1"]
    note = (f"{info['photos']} photos from {info['images']}, {info['mosaics']} mosaics; {info['model']}; explained "
            f"class: {info['target']}" + (f" (top-1 {top1:.1%})" if top1 is not None else "")
            + f"; {info['date']}; {m['gpu'] or m['cpu']}, {m['torch_threads']} threads, torch {info['torch']}; "
            f"maps in fp32, the metrics' forwards in {'fp32' if m['amp'] == 'none' else m['amp'] + ' autocast'}.\n"
            f"`{info['command']}`\n\n± = standard error of the mean over images (over mosaics for quadrant share "
            f"and pointing game)" + ("; ROAD = the target's probability averaged over 10..90 % of the pixels removed"
                                     if "ROAD MoRF" in shown else "") + "."
            + (f"\nLocalisation skipped: {info['no_mosaics_because']}." if info["no_mosaics_because"] else ""))
    sec = info["seconds"]
    times = "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sec.items()) + f" (total {sum(sec.values()):.1f})"
    skipped = "".join(f"\n{k}: n/a, {v}" for k, v in info["skipped"].items())
    text = f"{note}\n\n{markdown(info['results'], shown)}\n{skipped}\n{times}"
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    (out / "table.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(PROG, __doc__, {"options": CONFIG}, types={"images": Path})
    parser.usage = "%(prog)s [-h] --images IMAGES [options]"  # required, but checked in check_config (one line)
    cfg = vars(parser.parse_args(argv))
    try:
        return run(cfg, argv)
    except (ValueError, OSError, ImportError) as e:  # UsageError, CheckpointError, ImageError, no SciPy: one line
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
