"""Train a ViT on ImageNet-1k (or any ImageFolder dataset) with the DeiT recipe, on one GPU or many.

    python -m imagenet.train --data-root /data/imagenet --model vit_s                # one GPU (or --device cpu)
    torchrun --nproc_per_node=8 -m imagenet.train --data-root /data/imagenet         # DDP on 8 GPUs
    srun python -m imagenet.train --data-root /data/imagenet                         # SLURM: one task per GPU
    python -m imagenet.train --data-root my_data --pretrained deit_tiny_patch16_224 --epochs 30 --lr 1e-4
    python -m imagenet.train --evaluate-only --pretrained deit_tiny.pth --data-root imagenet-samples

Restarts are safe: a run whose --output holds a checkpoint continues it exactly (the same command again, a torchrun
restart, a requeued SLURM job), with the model, recipe and data root it was trained with; recipe flags given then
apply from there on (--batch-size excepted) and metrics.json records them; timm's --resume PATH continues PATH.
--fresh starts over. --pretrained weights run at the size they were trained at (--img-size to change it).
SIGTERM / SIGUSR1 (time limit, preemption) write a checkpoint at the next step and exit. Anchors (DeiT paper, 300
epochs, 224 px, top-1): DeiT-Ti 72.2, DeiT-S 79.9, DeiT-B 81.8.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from attention.tracking import track_attention
from imagenet.dataloaders.classes import WNIDS, is_wnid
from imagenet.dataloaders.dataset import DatasetError, ImageDataset, TrainSampler, build_datasets, class_difference
from imagenet.dataloaders.loader import BatchLog, DeviceBatches, eval_loader, make_loader, stop_workers
from imagenet.dataloaders.randaugment import parse_timm_config
from imagenet.dataloaders.transforms import device_transform, eval_transform, mixup_cutmix, train_transform
from models.pretrained import load_pretrained, registry_name
from models.vit import VisionTransformer
from utils import hardware
from utils.checkpoint import (
    CheckpointError,
    checkpoint_state,
    read_checkpoint,
    reported_weights,
    restore_checkpoint,
    save_checkpoint,
    save_metrics,
)
from utils.config import UsageError, continue_config, flag, parse_config
from utils.distributed import (
    DistContext,
    StopSignal,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    close_distributed,
    gather_states,
    init_distributed,
    load_state,
)
from utils.ema import ModelEma
from utils.optim import adamw
from utils.plots import plot_attention_curves, plot_curves
from utils.schedule import warmup_cosine
from utils.seed import epoch_seed, rng_states, seed_everything, set_rng_states
from utils.training import NonFiniteLossError, evaluate, train_one_epoch

# ----------------------------------------------------------------------------------------------------------- config
# Every entry is a command-line flag (`batch_size` -> --batch-size, booleans also --no-...); (default, help). Where
# timm spells a setting, its spelling is the flag; this repo's earlier names stay as aliases (ALIASES below).
MODEL = {  # DeiT shapes: patch 16, 12 blocks, MLP 4·D; sizes > 0 override the --model preset
    "model": ("vit_ti", "preset: vit_ti (D=192, 3 heads) | vit_s (D=384, 6 heads) | vit_b (D=768, 12 heads) | vit_l "
                        "(D=1024, 16 heads, 24 blocks), or a timm / DeiT name such as deit_tiny_patch16_224 or "
                        "vit_small_patch16_384 (that preset, patch and size)"),
    "embed_dim": (0, "token width D (0: the preset's)"),
    "num_heads": (0, "attention heads (0: the preset's)"),
    "depth": (0, "transformer blocks (0: the preset's, 12)"),
    "mlp_ratio": (4.0, "MLP hidden width / D"),
    "hidden_dim": (0, "MLP hidden width, as mnist.train says it (0: mlp_ratio x D)"),
    "patch_size": (16, "patch side in pixels (default: 16, or the --model name's); --img-size must be a multiple"),
    "img_size": (224, "training crop (default: 224, the --model name's, or the size the --pretrained weights were "
                      "trained at); evaluation resizes to img_size / 0.875, then center-crops img_size"),
    "drop_path": (0.1, "stochastic depth of the last block, linear from 0 (DeiT: 0.1 for Ti, S and B)"),
    "dropout": (0.0, "dropout (DeiT: 0)"),
}
RECIPE = {  # DeiT (Touvron et al. 2021, Table 9); per-step warm-up then cosine
    "epochs": (300, "training epochs"),
    "batch_size": (1024, "global batch over all ranks and accumulation steps (see --device-batch)"),
    "lr": (5e-4, "peak AdamW learning rate for a batch of 512; the run uses lr * batch_size / 512"),
    "min_lr": (1e-5, "learning rate at the end of the cosine: an absolute floor, not scaled with the batch (timm's "
                     "meaning); a peak below it is refused"),
    "warmup_epochs": (5, "linear warm-up epochs"),
    "weight_decay": (0.05, "AdamW weight decay (none on biases, norms, position embedding, class token)"),
    "clip_grad": (0.0, "max gradient norm (0 = off; DeiT: off)"),
    "smoothing": (0.1, "cross-entropy label smoothing (also on MixUp / CutMix targets)"),
    "repeated_aug": (0, "repeated augmentation k (DeiT's RASampler): an epoch still holds N samples (N training "
                        "images), ~N/k distinct images each shown k times, each copy augmented differently and on "
                        "another rank; 0: 3 from scratch, 1 (off) with --pretrained"),
    "aa": ("", "timm's RandAugment string, e.g. DeiT's rand-m9-mstd0.5-inc1 or rand-m7-n3-mstd1-inc1: sets "
               "--randaug-n / -m / -mstd (those given too win); none: off"),
    "randaug_n": (2, "RandAugment ops per image (0 = off)"),
    "randaug_m": (9, "RandAugment magnitude of 10 (DeiT's rand-m9-mstd0.5-inc1; each op with probability 0.5)"),
    "randaug_mstd": (0.5, "std of the noise on the RandAugment magnitude, per op"),
    "mixup": (0.8, "MixUp alpha (0 = off); each batch gets MixUp or CutMix, 50/50"),
    "cutmix": (1.0, "CutMix alpha (0 = off)"),
    "reprob": (0.25, "RandomErasing probability (per-pixel noise, on the device)"),
    "model_ema_decay": (0.0, "decay of an EMA of the weights (with warm-up), updated every step and evaluated too; "
                             "the run reports it where it scores higher (0 = off; DeiT: 0.99996)"),
    "seed": (0, "initial weights, data order, per-sample augmentation and per-rank dropout all derive from it"),
}
RUN = {
    "data_root": ("data/imagenet", "dataset: ROOT/train/<class>/<image> + ROOT/val/<class>/<image> (for the "
                                   "ILSVRC2012 archives run `python -m imagenet.dataloaders.imagenet-1k ROOT "
                                   "--prepare` once); --evaluate-only also takes a folder of <wnid>_<name>.JPEG"),
    "output": ("runs/imagenet", "output folder, on storage every node shares: checkpoint.pth, metrics.json, "
                                "curves.png; a run whose --output holds a checkpoint continues it"),
    "fresh": (False, "start over even though --output holds a checkpoint (it is replaced after the first epoch)"),
    "resume": ("", "--resume alone: continue --output's checkpoint (the default anyway; without one yet, start a "
                   "new run); --resume PATH (timm's): continue that checkpoint or run folder, in its folder unless "
                   "--output is given"),
    "pretrained": ("", "initial weights: a registry name (python -m models.pretrained --list; downloaded once), "
                       "this repo's checkpoint or timm / DeiT / DINO / torchvision ViT weights; sets the model and "
                       "the size (timm's --model NAME --pretrained works too)"),
    "evaluate_only": (False, "only report top-1 / top-5 of the --pretrained weights on the validation images"),
    "device": ("auto", hardware.DEVICE_HELP + "; under torchrun / srun each rank takes cuda:<local rank>"),
    "amp": ("auto", hardware.AMP_HELP),
    "compile": (False, "torch.compile the model"),
    "channels_last": (True, "NHWC input and patch-embedding conv on GPU (tensor-core layout); ignored on CPU"),
    "device_batch": (0, "images per rank in one forward / backward (0: batch_size / ranks); smaller values "
                        "accumulate gradients: the same recipe in less memory"),
    "workers": (hardware.data_workers(), "data-loading processes per rank (uint8 batches, pinned memory, persistent "
                                         "workers; default: the CPUs here / processes per node, at most 8: "
                                         f"{hardware.data_workers()} here)"),
    "threads": (0, "CPU threads for torch (0: torch's default)"),
    "dist_timeout": (30.0, "minutes a collective waits for a slow or dead rank before the run fails"),
    "steps_per_epoch": (0, "0: the whole training split; N > 0: stop each epoch after N steps (smoke tests)"),
    "stop_after": (0, "stop after this many epochs in this run (0 = never); the same command continues"),
    "progress": (True, "progress bars on rank 0 when stderr is a terminal (else, and with --no-progress: only the "
                       "per-epoch lines)"),
    "track_attention": (True, "every epoch, on rank 0, one forward of 64 fixed validation images (evenly spaced over "
                              "the split): per-layer attention distance and entropy into metrics.json and "
                              "attention_curves.png (--no-track-attention: off)"),
}
ALIASES = {"output": ["--out"], "clip_grad": ["--grad-clip"], "smoothing": ["--label-smoothing"],
           "model_ema_decay": ["--ema-decay"], "drop_path": ["--drop-path-rate"], "depth": ["--num-layers"],
           "evaluate_only": ["--eval"]}
PRESETS = {"vit_ti": dict(embed_dim=192, num_heads=3), "vit_s": dict(embed_dim=384, num_heads=6),
           "vit_b": dict(embed_dim=768, num_heads=12), "vit_l": dict(embed_dim=1024, num_heads=16, depth=24)}
TIMM_NAME = re.compile(r"(?:vit|deit3?)_(tiny|small|base|large)_patch(\d+)_(\d+)(?:\.\w+)?")  # + timm's ".tag"
TIMM_SIZES = {"tiny": "vit_ti", "small": "vit_s", "base": "vit_b", "large": "vit_l"}
ARCH = ("model", "embed_dim", "num_heads", "depth", "mlp_ratio", "hidden_dim", "patch_size")  # --pretrained decides
LIMITS = {  # flag: (lowest, highest, what it must be); None: no bound. Checked on the command line, before any work
    **dict.fromkeys(("epochs", "batch_size", "patch_size", "img_size"), (1, None, "a positive whole number")),
    **dict.fromkeys(("lr", "mlp_ratio", "dist_timeout"), (1e-300, None, "a positive number")),
    **dict.fromkeys(("embed_dim", "hidden_dim", "num_heads", "depth", "repeated_aug", "randaug_n", "device_batch",
                     "workers", "threads", "steps_per_epoch", "stop_after", "seed"), (0, None, "a whole number >= 0")),
    **dict.fromkeys(("min_lr", "warmup_epochs", "weight_decay", "clip_grad", "randaug_mstd", "mixup", "cutmix"),
                    (0, None, "a number >= 0")),
    **dict.fromkeys(("drop_path", "dropout", "smoothing", "model_ema_decay"), (0, 1 - 1e-12, "in [0, 1)")),
    "reprob": (0, 1, "in [0, 1]"), "randaug_m": (0, 10, "in [0, 10]"),
}
# -------------------------------------------------------------------------------------------------------------------


class Preempted(SystemExit):
    """A signal stopped training after a checkpoint was written; the exit status is 128 + the signal's number."""


def parse_args(argv: list[str] | None = None) -> tuple[dict[str, Any], set[str]]:
    """-> (config: every MODEL / RECIPE / RUN entry, names of the flags given explicitly). timm's ways are read
    too: a timm model name, --aa, bare --pretrained / --resume. UsageError for a value out of range."""
    argv = bare_flags(sys.argv[1:] if argv is None else list(argv), ("--resume", "--pretrained"))
    cfg, given = parse_config("python -m imagenet.train", __doc__, {"model": MODEL, "recipe": RECIPE, "run": RUN},
                              argv, choices={"amp": hardware.AMP_CHOICES}, aliases=ALIASES)
    for k, (lo, hi, what) in LIMITS.items():
        if k in given and not (lo <= cfg[k] and (hi is None or cfg[k] <= hi)):  # (NaN fails both)
            raise UsageError(f"{flag(k)} {cfg[k]} is out of range: it must be {what}.")
    if "pretrained" in given and not cfg["pretrained"]:  # timm: --model deit_tiny_patch16_224 --pretrained
        if "model" not in given or registry_name(cfg["model"]) is None:
            raise UsageError("--pretrained needs weights: --pretrained NAME_OR_PATH (a registry name, python -m "
                             "models.pretrained --list, or a checkpoint), or --model <registry name> --pretrained.")
        cfg["pretrained"] = cfg["model"]
    if "model" in given and cfg["model"] != cfg["pretrained"]:
        cfg = {**cfg, **model_name_sizes(cfg["model"], given)}
    if cfg["aa"]:
        try:
            ra = parse_timm_config(cfg["aa"])
        except ValueError as e:
            raise UsageError(str(e)) from None
        taken = {k: v for k, v in zip(("randaug_n", "randaug_m", "randaug_mstd"), ra.values(), strict=True)
                 if k not in given}
        cfg, given = {**cfg, **taken}, given | set(taken)  # as if given: a continued run takes them as changes
    return cfg, given


def bare_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """timm's value-less `--pretrained` / `--resume` (last, or followed by another flag) -> `--name=` (empty)."""
    ends = [i + 1 == len(argv) or argv[i + 1].startswith("-") for i in range(len(argv))]
    return [f"{a}=" if a in names and end else a for a, end in zip(argv, ends, strict=True)]


def model_name_sizes(name: str, given: set[str]) -> dict[str, int]:
    """A preset -> {}; a timm name (vit_small_patch16_384) -> the patch and image size it names, where not given.
    UsageError for anything else."""
    if name in PRESETS:
        return {}
    m = TIMM_NAME.fullmatch(name)
    if m is None:
        raise UsageError(f"--model {name} is neither a preset ({', '.join(PRESETS)}) nor a timm ViT name like "
                         f"deit_tiny_patch16_224 or vit_base_patch32_384 (tiny / small / base / large).")
    sizes = {"patch_size": int(m.group(2)), "img_size": int(m.group(3))}
    return {k: v for k, v in sizes.items() if k not in given}


def preset_of(model: str) -> dict[str, int]:
    """embed_dim, num_heads, depth of a preset or timm name."""
    m = TIMM_NAME.fullmatch(model)
    return dict(depth=12) | PRESETS[TIMM_SIZES[m.group(1)] if m else model]


# ---------------------------------------------------------------------------------------------------- config, once
def checkpoint_path(cfg: dict[str, Any], given: set[str]) -> tuple[Path, dict[str, Any]]:
    """-> (the checkpoint this run continues if it exists, the config): --output's, or timm's --resume PATH (a
    file or a run folder), whose folder becomes --output unless that was given."""
    own = Path(cfg["output"]) / "checkpoint.pth"
    if not cfg["resume"]:
        return own, cfg
    path = Path(cfg["resume"])
    path = path / "checkpoint.pth" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--resume {cfg['resume']}: {path} does not exist; give a checkpoint file or a run folder "
                         f"(or --resume alone to continue --output's checkpoint).")
    if cfg["fresh"]:
        raise UsageError(f"--resume {cfg['resume']} continues a run and --fresh starts over; drop one.")
    if "output" not in given:
        return path, {**cfg, "output": str(path.parent)}
    if own.is_file() and not own.samefile(path):
        raise UsageError(f"--output {cfg['output']} holds another run's checkpoint, which continuing --resume "
                         f"{cfg['resume']} there would replace; choose another --output, or drop it to continue "
                         f"in {path.parent}.")
    return path, cfg


def find_checkpoint(cfg: dict[str, Any], given: set[str], path: Path,
                    ctx: DistContext) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """-> (config, the checkpoint this run continues or None). A checkpoint at `path` is continued unless --fresh
    (ignored on a launcher's restart): a restarted or repeated command never overwrites a run. Every rank must
    find the same one. Continuing takes the model, recipe and data root the run was trained with; recipe flags
    given now apply from here on (a note each; train_config["changes"] records them); model flags and
    --batch-size are refused."""
    restarts = max(int(os.environ.get(k, "0")) for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    if cfg["fresh"] and restarts > 0:  # the launcher restarted this command: --fresh meant its first start
        ctx.print(f"note: --fresh is ignored on restart {restarts}: continuing the run it started")
        cfg = {**cfg, "fresh": False}
    ckpt = read_checkpoint(path) if path.is_file() and not cfg["fresh"] else None
    seen = all_gather_objects((int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))) if ckpt else None)
    if len(set(seen)) > 1:
        raise UsageError(f"the ranks found different checkpoints in --output {path.parent} ((epoch, step) per rank: "
                         f"{seen}); --output must be a folder that all nodes share.")
    if cfg["fresh"] and path.is_file():
        ctx.print(f"note: --fresh: starting over; {path} is replaced after the first epoch")
    elif ckpt is None and "resume" in given:
        ctx.print(f"note: --resume: {path} does not exist yet, so this starts a new run")
    if ckpt is None:
        return {**cfg, "changes": []}, None
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict) or saved.get("dataset") != "imagenet" or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not an imagenet.train checkpoint of this repo; cannot continue it (use "
                              f"another --output, or --fresh to replace it).")
    cfg, changed = continue_config(saved, cfg, given, path=path, fixed=[*MODEL, "batch_size", "pretrained"],
                                   adjustable=set(RECIPE) - {"batch_size"}, kept=["data_root"],
                                   why={"batch_size": " (it sets the steps per epoch; --device-batch saves memory "
                                                      "instead)"})
    for k, (old, new) in changed.items():
        ctx.print(f"note: {flag(k)} {new} replaces the {old} the run was trained with, from epoch "
                  f"{ckpt['epoch'] + 1} on")
    history = list(saved.get("changes", [])) + ([{"epoch": ckpt["epoch"] + 1, **changed}] if changed else [])
    return {**cfg, "changes": history}, ckpt


def check_batches(cfg: dict[str, Any], ctx: DistContext) -> int:
    """UsageError for a batch or learning rate that cannot work -> images per rank in one forward / backward."""
    if cfg["batch_size"] % ctx.world_size:
        raise UsageError(f"--batch-size {cfg['batch_size']} does not split over {ctx.world_size} rank(s); use a "
                         f"positive multiple of {ctx.world_size}.")
    per_rank = cfg["batch_size"] // ctx.world_size
    micro = cfg["device_batch"] or per_rank
    if per_rank % micro:
        raise UsageError(f"--device-batch {cfg['device_batch']} does not divide the {per_rank} images per rank "
                         f"(--batch-size {cfg['batch_size']} over {ctx.world_size} rank(s)); use a divisor of "
                         f"{per_rank}.")
    if cfg["evaluate_only"] and not cfg["pretrained"]:
        raise UsageError("--evaluate-only needs weights: --pretrained PATH (this repo's checkpoint or timm / DeiT / "
                         "torchvision weights).")
    peak = cfg["lr"] * cfg["batch_size"] / 512
    if peak < cfg["min_lr"] and not cfg["evaluate_only"]:  # the cosine would be flat at --min-lr all run
        raise UsageError(f"peak lr {peak:.3g} (after batch scaling: --lr {cfg['lr']:g} x --batch-size "
                         f"{cfg['batch_size']} / 512) is below --min-lr {cfg['min_lr']:g}; pass --min-lr "
                         f"{peak / 100:.2g} (or anything up to {peak:.3g}) or a larger --lr.")
    return micro


def check_shape(cfg: dict[str, Any]) -> None:
    """UsageError for a model shape that cannot be built (the preset's sizes with the overrides)."""
    if cfg["img_size"] % cfg["patch_size"]:
        raise UsageError(f"--img-size {cfg['img_size']} is not a multiple of --patch-size {cfg['patch_size']}; "
                         f"use {max(1, cfg['img_size'] // cfg['patch_size']) * cfg['patch_size']}.")
    if cfg["model"] in PRESETS or TIMM_NAME.fullmatch(cfg["model"]):
        sizes = preset_of(cfg["model"]) | {k: cfg[k] for k in ("embed_dim", "num_heads") if cfg[k] > 0}
        if sizes["embed_dim"] % sizes["num_heads"]:
            raise UsageError(f"--embed-dim {sizes['embed_dim']} does not split into --num-heads "
                             f"{sizes['num_heads']}; use a divisor of {sizes['embed_dim']} (e.g. "
                             f"{max(1, sizes['embed_dim'] // 64)}).")


# ---------------------------------------------------------------------------------------------- --pretrained weights
@dataclass
class Weights:
    """--pretrained, read once: the model, the class names of its head by index (None: unknown) and whether the
    file names them (this repo's checkpoints) or they are assumed (a foreign 1000-class head: ImageNet-1k's
    WordNet ids in the standard order, compared only with folders named by WordNet ids)."""

    model: VisionTransformer
    classes: list[str] | None
    named: bool

    def comparable(self, found: list[str]) -> bool:
        """Whether the head's class names can be compared with the dataset's class folders `found`."""
        return self.classes is not None and (self.named or all(is_wnid(c) for c in found))


def read_weights(source: str) -> Weights:
    """--pretrained's weights. CheckpointError / UsageError in one line, a model for other than RGB images too."""
    try:
        obj = read_checkpoint(source) if os.path.isfile(source) else source
        model = load_pretrained(obj)
    except CheckpointError as e:
        raise CheckpointError(f"--pretrained {source}: {e}") from None
    channels = model.config["num_channels"]
    if channels != 3:
        raise UsageError(f"--pretrained {source} takes {channels}-channel images{' (an MNIST model)' * (channels == 1)}"
                         f", and imagenet.train feeds it RGB photos (3 channels); use RGB ViT weights (a registry "
                         f"name, an imagenet.train checkpoint, timm / DeiT weights).")
    stored = obj.get("classes") if isinstance(obj, dict) else None
    if stored is not None and len(stored) == model.config["num_classes"]:
        return Weights(model, [str(c) for c in stored], True)
    return Weights(model, list(WNIDS) if model.config["num_classes"] == len(WNIDS) else None, False)


def resample_grid(model: VisionTransformer, grid: tuple[int, int]) -> VisionTransformer:
    """The same weights for images of grid[0] x grid[1] patches: the position table resampled once, by the rule the
    model itself uses at another size (`VisionTransformer.position_embedding`)."""
    resized = VisionTransformer(**dict(model.config, grid_size=list(grid), num_patches=grid[0] * grid[1]))
    with torch.no_grad():
        resized.load_state_dict(dict(model.state_dict(), pos_embed=model.position_embedding(tuple(grid))))
    resized.weights_note = getattr(model, "weights_note", "as saved")
    return resized


def pretrained_config(cfg: dict[str, Any], given: set[str], ctx: DistContext) -> tuple[Weights, dict[str, Any]]:
    """--pretrained's weights and the config they fix: the architecture and the size they were trained at, which
    evaluation, fine-tuning and restarts use; a given --img-size instead resamples the position table (recorded)."""
    ignored = sorted(given & set(ARCH) - ({"model"} if cfg["model"] == cfg["pretrained"] else set()))
    if ignored:
        raise UsageError(f"{flag(ignored[0])} has no effect with --pretrained, whose weights fix the "
                         f"architecture; drop it.")
    weights = read_weights(cfg["pretrained"])
    c = weights.model.config
    (gh, gw), p = c["grid_size"], c["patch_size"]
    if "img_size" in given:
        if cfg["img_size"] % p:
            raise UsageError(f"--img-size {cfg['img_size']} is not a multiple of the --pretrained weights' patch size "
                             f"{p}; use {max(1, cfg['img_size'] // p) * p}.")
        grid = (cfg["img_size"] // p,) * 2
        if grid != (gh, gw):
            weights.model = resample_grid(weights.model, grid)
            ctx.print(f"note: --img-size {cfg['img_size']}: the weights' position embedding ({gh}x{gw} patches, "
                      f"trained at {gh * p}x{gw * p} px) is resampled to {grid[0]}x{grid[1]} patches")
    elif gh != gw:
        raise UsageError(f"the --pretrained weights were trained on {gh}x{gw} patches ({gh * p}x{gw * p} px, not "
                         f"square); pass the --img-size to crop to (a multiple of {p}).")
    else:
        cfg = {**cfg, "img_size": gh * p}
        if gh * p != MODEL["img_size"][0]:
            ctx.print(f"note: {cfg['pretrained']} was trained at {gh * p} px, so this run uses {gh * p} px "
                      f"(--img-size N chooses another)")
    return weights, {**cfg, "model": cfg["pretrained"], "embed_dim": c["embed_dim"], "num_heads": c["num_heads"],
                     "depth": c["num_layers"], "mlp_ratio": c["hidden_dim"] / c["embed_dim"], "hidden_dim": 0,
                     "patch_size": p}


# ------------------------------------------------------------------------------------------------------------ model
def model_from_config(cfg: dict[str, Any], num_classes: int) -> VisionTransformer:
    """The preset (or timm name), with the size overrides of `cfg`."""
    sizes = preset_of(cfg["model"])
    sizes.update({k: cfg[k] for k in ("embed_dim", "num_heads", "depth") if cfg[k] > 0})
    hidden = cfg.get("hidden_dim") or round(sizes["embed_dim"] * cfg["mlp_ratio"])  # older configs: no hidden_dim
    return VisionTransformer(sizes["embed_dim"], hidden, sizes["num_heads"],
                             sizes["depth"], cfg["patch_size"], 3, (cfg["img_size"] // cfg["patch_size"]) ** 2,
                             num_classes, cfg["dropout"], drop_path_rate=cfg["drop_path"])


def match_classes(sets: list[ImageDataset], stored: list[str], what: str, root: str, ctx: DistContext, *,
                  subset: bool = False) -> None:
    """Index the datasets by the class list stored with the weights, by name (the same names in another order, or
    with `subset` some of them: a note); DatasetError naming the differences otherwise."""
    found = sets[-1].classes
    if not (set(found) == set(stored) or subset and set(found) <= set(stored)):
        raise DatasetError(f"the class folders of {root} are not the classes {what} was trained on "
                           f"({class_difference(found, stored)}); use folders named as its classes"
                           f"{' (or some of them)' if subset else ''}.")
    if len(found) < len(stored):
        ctx.print(f"note: {len(found)} class folders, scored among the {len(stored)} classes of {what} by name")
    elif found != list(stored):
        ctx.print(f"note: the class folders are the classes of {what} in another order: matched by name")
    for dataset in sets:
        dataset.relabel(stored)


def finetune_model(weights: Weights, cfg: dict[str, Any], sets: list[ImageDataset],
                   ctx: DistContext) -> VisionTransformer:
    """The pretrained ViT with this run's dropout and stochastic depth. Its head is kept when it holds the dataset's
    classes (by name where they can be compared: the datasets take the head's order) and re-made otherwise."""
    source, found, path = weights.model, sets[-1].classes, cfg["pretrained"]
    heads = source.config["num_classes"]
    keep = heads == len(found) and (not weights.comparable(found) or set(found) == set(weights.classes))
    if not keep:
        why = (f"has a {heads}-class head and the dataset has {len(found)} classes" if heads != len(found) else
               f"has a head for other classes than the dataset's ({class_difference(found, weights.classes)})")
        ctx.print(f"note: {path} {why}: the head is re-initialised, the rest is fine-tuned.")
    elif weights.comparable(found):
        match_classes(sets, weights.classes, path, cfg["data_root"], ctx)
    else:
        ctx.print(f"note: {path} names no classes: class folder i fine-tunes its class i")
    model = VisionTransformer(**dict(source.config, num_classes=len(found), dropout=cfg["dropout"],
                                     drop_path_rate=cfg["drop_path"]))
    state = {k: v for k, v in source.state_dict().items() if keep or not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return model


def describe(model: VisionTransformer) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return (f"ViT D={c['embed_dim']} heads={c['num_heads']} depth={c['num_layers']} mlp={c['hidden_dim']} "
            f"patch={c['patch_size']} classes={c['num_classes']} drop_path={c['drop_path_rate']} "
            f"({n / 1e6:.1f}M params)")


def build_model(cfg: dict[str, Any], weights: Weights | None, sets: list[ImageDataset], ckpt: dict[str, Any] | None,
                ctx: DistContext) -> VisionTransformer:
    """The model: the checkpoint's shape when continuing, --pretrained's weights, or the configured preset. Where
    a class list is stored with the weights, the datasets `sets` (train and val, or val) are indexed by it."""
    n, root = len(sets[-1].classes), cfg["data_root"]
    if ckpt is not None:  # continuing: the saved shape (weights follow in restore_checkpoint)
        model = VisionTransformer(**ckpt["model_config"])
        if "classes" in ckpt:
            match_classes(sets, list(ckpt["classes"]), "the run it continues", root, ctx)
    elif weights is None:
        model = model_from_config(cfg, n)
    elif not cfg["evaluate_only"]:
        model = finetune_model(weights, cfg, sets, ctx)
    else:
        model = weights.model
        if weights.comparable(sets[-1].classes):
            match_classes(sets, weights.classes, f"--pretrained {cfg['pretrained']}", root, ctx, subset=True)
        elif model.config["num_classes"] == n:
            ctx.print(f"note: {cfg['pretrained']} names no classes: class folder i is scored as its class i")
    if model.config["num_classes"] != len(sets[-1].classes):
        raise DatasetError(f"the dataset {root} has {len(sets[-1].classes)} classes but the model's head has "
                           f"{model.config['num_classes']}; use a dataset with the checkpoint's classes (or fine-tune "
                           f"with --pretrained, which re-initialises the head).")
    return model


# ------------------------------------------------------------------------------------------------------- the run
@dataclass
class Trainer:
    """A run's objects and position; `cfg` is decided before it is built and not changed afterwards."""

    cfg: dict[str, Any]
    ctx: DistContext
    hw: hardware.Hardware
    model: VisionTransformer
    eval_model: nn.Module  # compiled when asked
    train_set: ImageDataset
    val_loader: Any
    micro: int  # images per rank in one forward / backward
    progress: bool
    channels_last: bool
    to_float: Callable[[Tensor], Tensor] = field(default_factory=device_transform)  # uint8 -> normalised
    train_model: nn.Module | None = None  # DDP-wrapped under torchrun / srun
    augment: Callable[[Tensor], Tensor] | None = None  # to_float + random erasing
    mix: Callable | None = None  # MixUp / CutMix
    loss_fn: nn.Module | None = None
    train_loader: Any = None
    sampler: TrainSampler | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    ema: ModelEma | None = None
    scaler: torch.amp.GradScaler | None = None
    steps: int = 0  # optimizer steps per epoch
    start_epoch: int = 0
    start_step: int = 0  # optimizer steps of start_epoch already done (a preempted run)
    partial: dict[str, float] = field(default_factory=dict)  # loss / images / seconds of those steps
    saved_rng: list[Tensor] = field(default_factory=list)  # every rank's RNG state at that step
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accum(self) -> int:
        return self.cfg["batch_size"] // self.ctx.world_size // self.micro

    @property
    def train_config(self) -> dict[str, Any]:
        """What the checkpoint and metrics.json record of the config."""
        keys = (*MODEL, *RECIPE, "data_root", "pretrained", "changes")
        return {k: self.cfg[k] for k in keys} | {"dataset": "imagenet"}

    @property
    def out(self) -> Path:
        return Path(self.cfg["output"])

    def validate(self, net: nn.Module, desc: str) -> tuple[dict[str, float], int]:
        """Top-1 / top-5 / loss over the validation split (sharded over ranks) -> (results, skipped images)."""
        log = BatchLog(self.val_loader)
        res = evaluate(net, DeviceBatches(log, self.hw.device, self.to_float, self.channels_last),
                       device=self.hw.device, amp_dtype=self.hw.amp_dtype, progress=self.progress, desc=desc)
        return res, report_skipped(log, self.ctx, desc)

    def save(self, epoch: int, **extra: Any) -> None:
        """The checkpoint after `epoch` epochs (and `extra`: a preempted epoch's position), with every rank's RNG."""
        rng = gather_states(rng_states())  # every rank's: exact mid-epoch
        if self.ctx.is_main:
            state = checkpoint_state(self.model, self.optimizer, self.scheduler, epoch=epoch, metrics=self.metrics,
                                     train_config=self.train_config, ema=self.ema, scaler=self.scaler,
                                     classes=list(self.train_set.classes), rng_per_rank=rng,
                                     world_size=self.ctx.world_size, **extra)
            save_checkpoint(state, self.out / "checkpoint.pth")


def report_skipped(log: BatchLog, ctx: DistContext, what: str) -> int:
    """Warn (rank 0) about the unreadable images every rank skipped; returns their number."""
    skipped = [p for paths in all_gather_objects(log.skipped) for p in paths]
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        ctx.print(f"warning: {what}: skipped {len(skipped)} unreadable image(s), each replaced by the next one: "
                  f"{shown}. Check the data with `python -m imagenet.dataloaders.imagenet-1k ROOT`.")
    return len(skipped)


def setup(cfg: dict[str, Any], given: set[str], ctx: DistContext) -> tuple[Trainer, dict[str, Any] | None]:
    """Decide the config (a continued run's; --pretrained's architecture and size) before anything is built from
    it, then build the data and the model -> (the trainer without its training objects, its checkpoint or None)."""
    ckpt = weights = None
    if not cfg["evaluate_only"]:
        path, cfg = checkpoint_path(cfg, given)
        cfg, ckpt = find_checkpoint(cfg, given, path, ctx)
    if not cfg["repeated_aug"]:
        cfg = {**cfg, "repeated_aug": 1 if cfg["pretrained"] else 3}
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    hw = hardware.resolve(ctx.device, cfg["amp"], warn=lambda m: ctx.print(m, file=sys.stderr))
    ctx.print(f"{hw.summary}, {'compiled' if cfg['compile'] else 'eager'}")  # the first line of every run
    micro = check_batches(cfg, ctx)
    if ckpt is None and cfg["pretrained"]:
        weights, cfg = pretrained_config(cfg, given, ctx)  # the weights' size, before the transforms
    check_shape(cfg)
    if hw.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside autocast
    seed_everything(cfg["seed"])  # the same on every rank: identical initial weights
    tf_train = train_transform(cfg["img_size"], randaug_ops=cfg["randaug_n"], randaug_magnitude=cfg["randaug_m"],
                               randaug_std=cfg["randaug_mstd"])
    train_set, val_set = build_datasets(cfg["data_root"], tf_train, eval_transform(cfg["img_size"]),
                                        eval_only=cfg["evaluate_only"])
    model = build_model(cfg, weights, [d for d in (train_set, val_set) if d is not None], ckpt, ctx)
    channels_last = cfg["channels_last"] and hw.device.type == "cuda"
    model.to(hw.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    ctx.print(f"{describe(model)} at {cfg['img_size']} px on {ctx.world_size} x {hw.device.type}")
    tr = Trainer(cfg, ctx, hw, model, torch.compile(model) if cfg["compile"] else model, train_set,
                 eval_loader(val_set, micro, workers=cfg["workers"], seed=cfg["seed"], ctx=ctx), micro,
                 progress=cfg["progress"] and ctx.is_main and sys.stderr.isatty(),  # no bars in SLURM / nohup logs
                 channels_last=channels_last)
    return tr, ckpt


def build_training(tr: Trainer, ckpt: dict[str, Any] | None) -> None:
    """The sampler and loader, AdamW, the schedule, EMA and scaler, restored from `ckpt` when continuing; this
    run's lr and weight decay replace the checkpoint's."""
    cfg, ctx, device = tr.cfg, tr.ctx, tr.hw.device
    tr.sampler = TrainSampler(len(tr.train_set), num_replicas=ctx.world_size, rank=ctx.rank, seed=cfg["seed"],
                              repeats=cfg["repeated_aug"])
    tr.train_loader = make_loader(tr.train_set, tr.micro, tr.sampler, workers=cfg["workers"], seed=cfg["seed"],
                                  device=device, drop_last=True)
    tr.steps = len(tr.train_loader) // tr.accum
    if cfg["steps_per_epoch"] > 0:
        tr.steps = min(tr.steps, cfg["steps_per_epoch"])
    if tr.steps == 0:
        raise UsageError(f"the training split has {len(tr.train_set)} images, less than one batch of "
                         f"{cfg['batch_size']} over {ctx.world_size} rank(s); lower --batch-size.")
    lr = cfg["lr"] * cfg["batch_size"] / 512
    tr.optimizer = adamw(tr.model, lr, cfg["weight_decay"], device)
    tr.scaler = tr.hw.grad_scaler()
    tr.ema = ModelEma(tr.model, cfg["model_ema_decay"], warmup=True) if cfg["model_ema_decay"] > 0 else None
    configured = [(g["lr"], g["weight_decay"]) for g in tr.optimizer.param_groups]
    if ckpt is not None:
        tr.start_epoch, tr.metrics = restore_checkpoint(ckpt, tr.model, tr.optimizer, ema=tr.ema, restore_rng=False,
                                                        scaler=tr.scaler if "scaler" in ckpt else None)
        tr.start_step, tr.partial = int(ckpt.get("step_in_epoch", 0)), ckpt.get("partial_epoch", {})
        tr.saved_rng = ckpt.get("rng_per_rank", []) if tr.start_step else []
        at = f"epoch {tr.start_epoch}" + (f" and step {tr.start_step} of epoch {tr.start_epoch + 1}"
                                          if tr.start_step else "")
        ctx.print(f"continuing {tr.out / 'checkpoint.pth'} after {at} (--fresh starts over)")
    for group, (base_lr, weight_decay) in zip(tr.optimizer.param_groups, configured, strict=True):
        group.update(initial_lr=base_lr, weight_decay=weight_decay)  # whatever the checkpoint had
    tr.scheduler = warmup_cosine(tr.optimizer, cfg["epochs"] * tr.steps,
                                 min(cfg["warmup_epochs"], cfg["epochs"]) * tr.steps,
                                 min_lr_ratio=min(1.0, cfg["min_lr"] / lr),
                                 start_step=tr.start_epoch * tr.steps + tr.start_step)
    tr.augment = device_transform(reprob=cfg["reprob"])
    tr.mix = mixup_cutmix(len(tr.train_set.classes), cfg["mixup"], cfg["cutmix"])
    tr.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["smoothing"])
    tr.train_model = tr.eval_model  # (compiled once when single-process)
    if ctx.distributed:
        tr.train_model = DistributedDataParallel(tr.model, device_ids=[device] if device.type == "cuda" else None)
        if cfg["compile"]:
            tr.train_model = torch.compile(tr.train_model)
    ctx.print(f"{len(tr.train_set)} train / {len(tr.val_loader.dataset)} val images, {len(tr.train_set.classes)} "
              f"classes; batch {cfg['batch_size']} ({tr.micro} per rank x {tr.accum} accumulation step(s)), lr "
              f"{lr:.2e}, {tr.steps} steps per epoch, repeated augmentation x{cfg['repeated_aug']}")


def train_epoch(tr: Trainer, epoch: int, stop: StopSignal) -> dict[str, Any]:
    """One epoch (the rest of it, when a preempted run continues) -> its metrics row before validation. A signal
    writes a checkpoint at the step it is seen on every rank and raises Preempted."""
    cfg, ctx, device = tr.cfg, tr.ctx, tr.hw.device
    first = tr.start_step if epoch == tr.start_epoch else 0  # optimizer steps of this epoch already done
    if first and len(tr.saved_rng) == ctx.world_size:
        set_rng_states(load_state(tr.saved_rng[ctx.rank]))  # exactly where the stopped run was
    else:  # dropout, drop-path, MixUp, erasing: per rank and epoch (and step, mid-epoch on other ranks)
        seed_everything(epoch_seed(cfg["seed"], epoch) + first * ctx.world_size + ctx.rank)
    tr.sampler.set_epoch(epoch, start=first * tr.accum * tr.micro)
    log = BatchLog(tr.train_loader)
    batches = DeviceBatches(log, device, tr.augment, tr.channels_last, tr.mix)
    stats = train_one_epoch(tr.train_model, itertools.islice(batches, (tr.steps - first) * tr.accum), tr.optimizer,
                            tr.scheduler, tr.loss_fn, device=device,
                            epoch=epoch + 1, step=epoch * tr.steps + first, total=(tr.steps - first) * tr.accum,
                            ema=tr.ema, amp_dtype=tr.hw.amp_dtype, scaler=tr.scaler,
                            grad_clip=cfg["clip_grad"] or None, progress=tr.progress,
                            desc=f"epoch {epoch + 1}/{cfg['epochs']}", accum_steps=tr.accum, should_stop=stop)
    sums = all_reduce_sum(torch.tensor([stats["train_loss"] * stats["images"], stats["images"]],
                                       dtype=torch.float64, device=device)).tolist()
    seconds = float(all_reduce_max(torch.tensor([stats["seconds"]], dtype=torch.float64, device=device)))
    done = {"loss_sum": sums[0] + tr.partial.get("loss_sum", 0.0), "images": sums[1] + tr.partial.get("images", 0),
            "seconds": seconds + tr.partial.get("seconds", 0.0)}
    tr.partial = {}
    if stats["stopped"]:
        tr.save(epoch, step_in_epoch=first + stats["steps"], partial_epoch=done)
        barrier()  # no rank exits (and gets the job torn down) before the checkpoint is on disk
        ctx.print(f"{stop.caught}: saved {tr.out / 'checkpoint.pth'} at step {first + stats['steps']} of epoch "
                  f"{epoch + 1}; run the same command to continue")
        raise Preempted(stop.exit_code)
    row = {"epoch": epoch + 1, "train_loss": done["loss_sum"] / max(done["images"], 1),
           "lr": tr.scheduler.get_last_lr()[0], "train_images": int(done["images"]),
           "img_per_s": done["images"] / max(done["seconds"], 1e-9), "seconds": done["seconds"]}
    if ctx.distributed:  # which images each rank trained on (this session); without repeats: disjoint
        seen = all_gather_objects(log.indices)
        row["rank_images"] = [len(s) for s in seen]
        row["rank_distinct_images"] = len(set().union(*seen))
    row["skipped_images"] = report_skipped(log, ctx, f"epoch {epoch + 1}")
    return row


def end_epoch(tr: Trainer, row: dict[str, Any], tracked: Tensor | None) -> None:
    """Validate the model (and the EMA), track attention, print the epoch line, save the checkpoint, metrics.json
    and the curves."""
    res, skipped = tr.validate(tr.eval_model, "val")
    row.update(val_loss=res["loss"], val_top1=res["top1"], val_top5=res["top5"])
    row["skipped_images"] += skipped
    if tr.ema is not None:
        res, _ = tr.validate(tr.ema.module, "val EMA")
        row.update(ema_val_loss=res["loss"], ema_val_top1=res["top1"], ema_val_top5=res["top5"])
    if tracked is not None:  # the bare model, eval mode, no RNG: training is unchanged
        row.update(track_attention(tr.model, tracked)[0])
    tr.metrics.append(row)
    ema_text = f", EMA top-1 {row['ema_val_top1']:.2f}%" if tr.ema is not None else ""
    tr.ctx.print(f"epoch {row['epoch']}/{tr.cfg['epochs']}: train loss {row['train_loss']:.4f}, val loss "
                 f"{row['val_loss']:.4f}, top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%{ema_text}, "
                 f"{row['img_per_s']:.0f} img/s")
    tr.save(row["epoch"])
    if tr.ctx.is_main:
        save_metrics(tr.metrics, tr.out / "metrics.json", config=tr.train_config, world_size=tr.ctx.world_size,
                     ran_as=tr.hw.record() | {"compiled": tr.cfg["compile"], "accumulation": tr.accum})
        title = f"{tr.cfg['model']} on {tr.cfg['data_root']}"
        plot_curves(tr.metrics, tr.out / "curves.png", title=title)
        plot_attention_curves(tr.metrics, tr.out / "attention_curves.png", title=title)
    barrier()


def tracked_images(tr: Trainer) -> Tensor | None:
    """64 fixed validation images, evenly spaced (so of many classes), normalised on the device; rank 0 only."""
    if not (tr.cfg["track_attention"] and tr.ctx.is_main):
        return None
    val_set = tr.val_loader.dataset
    picks = torch.linspace(0, len(val_set) - 1, min(64, len(val_set))).round().long().unique().tolist()
    return tr.to_float(torch.stack([val_set[i][0] for i in picks]).to(tr.hw.device))


def evaluate_only(tr: Trainer) -> None:
    """--evaluate-only: top-1 / top-5 of the --pretrained weights on the validation images."""
    cfg = tr.cfg
    tr.ctx.print(f"weights: {cfg['pretrained']}, {getattr(tr.model, 'weights_note', 'as saved')}")
    res, _ = tr.validate(tr.eval_model, "evaluation")
    tr.ctx.print(f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  "
                 f"({res['n']} images of {cfg['data_root']})")


def run(cfg: dict[str, Any], given: set[str]) -> None:
    """Decide, build, train epoch by epoch (checkpoint after each), and say where the results are."""
    ctx = init_distributed(cfg["device"], cfg["dist_timeout"])
    tr, ckpt = setup(cfg, given, ctx)
    if tr.cfg["evaluate_only"]:
        try:
            return evaluate_only(tr)
        finally:
            stop_workers(tr.val_loader)
    build_training(tr, ckpt)
    del ckpt  # (a whole checkpoint per rank, held for the run otherwise)
    tracked, stop = tracked_images(tr), StopSignal(tr.hw.device)
    epochs, stop_after = tr.cfg["epochs"], tr.cfg["stop_after"]
    last_epoch = epochs if stop_after <= 0 else min(epochs, tr.start_epoch + stop_after)
    try:
        for epoch in range(tr.start_epoch, last_epoch):
            end_epoch(tr, train_epoch(tr, epoch, stop), tracked)
            if stop(force_check=True):
                ctx.print(f"{stop.caught}: stopped after epoch {epoch + 1}; run the same command to continue")
                raise Preempted(stop.exit_code)
    finally:
        stop.restore()
        stop_workers(tr.train_loader, tr.val_loader)
    if last_epoch < epochs:
        ctx.print(f"stopped after epoch {last_epoch} (--stop-after {stop_after}); run the same command to continue")
    elif last_epoch > tr.start_epoch:
        which = "the EMA" if reported_weights(tr.metrics[-1], tr.ema is not None) == "ema" else "the model"
        ctx.print(f"saved {tr.out / 'checkpoint.pth'}, {tr.out / 'metrics.json'}, {tr.out / 'curves.png'}"
                  + (f"; the checkpoint reports {which} (higher top-1)" if tr.ema else ""))
    else:
        ctx.print(f"the run already has its {epochs} epochs; raise --epochs to train on")


def main(argv: list[str] | None = None) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        cfg, given = parse_args(argv)  # out-of-range values: before any work
    except UsageError as e:
        sys.exit(f"error: {e}" if rank == 0 else 1)
    last = Path(cfg["resume"] if cfg["resume"] and "output" not in given else cfg["output"])  # (a run folder)
    try:
        run(cfg, given)
    except NonFiniteLossError as e:
        sys.exit(f"error: {e} The last finished epoch is in {last}." if rank == 0 else 1)  # every rank stops at
        # the same step: rank 0 says it
    except (ValueError, FileNotFoundError) as e:  # UsageError, DatasetError, CheckpointError are ValueErrors
        sys.exit(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}")  # it may be this rank's alone
    except KeyboardInterrupt:
        sys.exit(f"interrupted; the last finished epoch is in {last}")
    finally:
        close_distributed()

if __name__ == "__main__":
    main()
