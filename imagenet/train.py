"""Train a ViT on ImageNet-1k (or any ImageFolder dataset) with the DeiT recipe, on one GPU or many.

    python -m imagenet.train --data-root /data/imagenet --model vit_s                # one GPU (or --device cpu)
    torchrun --nproc_per_node=8 -m imagenet.train --data-root /data/imagenet         # DDP on 8 GPUs
    srun python -m imagenet.train --data-root /data/imagenet                         # SLURM: one task per GPU
    python -m imagenet.train --data-root my_data --pretrained deit_tiny_patch16_224 --epochs 30 --lr 1e-4
    python -m imagenet.train --evaluate-only --pretrained deit_tiny.pth --data-root imagenet-samples

Restarts are safe: a run whose --out holds a checkpoint continues it exactly (the same command again, a torchrun
restart, a requeued SLURM job), with the model, recipe and data root it was trained with; recipe flags given then
apply from there on (--batch-size excepted) and metrics.json records them. --fresh starts over. SIGTERM / SIGUSR1
(time limit, preemption) write a checkpoint at the next step and exit. Anchors (DeiT paper, 300 epochs, 224 px,
top-1): DeiT-Ti 72.2, DeiT-S 79.9, DeiT-B 81.8.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from attention.tracking import track_attention
from imagenet.dataloaders.dataset import DatasetError, ImageDataset, TrainSampler, build_datasets
from imagenet.dataloaders.loader import BatchLog, DeviceBatches, eval_loader, make_loader, stop_workers
from imagenet.dataloaders.transforms import device_transform, eval_transform, mixup_cutmix, train_transform
from models.pretrained import load_pretrained
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
# Every entry is a command-line flag (`batch_size` -> --batch-size, booleans also --no-...); (default, help).
MODEL = {  # DeiT shapes: patch 16, 12 blocks, MLP 4·D; sizes > 0 override the --model preset
    "model": ("vit_ti", "preset: vit_ti (D=192, 3 heads) | vit_s (D=384, 6 heads) | vit_b (D=768, 12 heads)"),
    "embed_dim": (0, "token width D (0: the preset's)"),
    "num_heads": (0, "attention heads (0: the preset's)"),
    "depth": (0, "transformer blocks (0: the preset's, 12)"),
    "mlp_ratio": (4.0, "MLP hidden width / D"),
    "patch_size": (16, "patch side in pixels; --img-size must be a multiple"),
    "img_size": (224, "training crop; evaluation resizes to img_size / 0.875, then center-crops img_size"),
    "drop_path": (0.1, "stochastic depth of the last block, linear from 0 (DeiT: 0.1 for Ti, S and B)"),
    "dropout": (0.0, "dropout (DeiT: 0)"),
}
RECIPE = {  # DeiT (Touvron et al. 2021, Table 9); per-step warm-up then cosine
    "epochs": (300, "training epochs"),
    "batch_size": (1024, "global batch over all ranks and accumulation steps (see --device-batch)"),
    "lr": (5e-4, "peak AdamW learning rate for a batch of 512; the run uses lr * batch_size / 512"),
    "min_lr": (1e-5, "learning rate at the end of the cosine"),
    "warmup_epochs": (5, "linear warm-up epochs"),
    "weight_decay": (0.05, "AdamW weight decay (none on biases, norms, position embedding, class token)"),
    "grad_clip": (0.0, "max gradient norm (0 = off; DeiT: off)"),
    "label_smoothing": (0.1, "cross-entropy label smoothing (also on MixUp / CutMix targets)"),
    "repeated_aug": (0, "repeated augmentation: every image this many times an epoch, each copy augmented "
                        "differently, on different ranks (DeiT's RASampler); 0: 3 from scratch, 1 (off) with "
                        "--pretrained"),
    "randaug_n": (2, "RandAugment ops per image (0 = off)"),
    "randaug_m": (9, "RandAugment magnitude of 10 (DeiT's rand-m9-mstd0.5-inc1: magnitude noise 0.5, each op "
                     "with probability 0.5)"),
    "mixup": (0.8, "MixUp alpha (0 = off); each batch gets MixUp or CutMix, 50/50"),
    "cutmix": (1.0, "CutMix alpha (0 = off)"),
    "reprob": (0.25, "RandomErasing probability (per-pixel noise, on the device)"),
    "ema_decay": (0.0, "decay of an EMA of the weights (with warm-up), updated every step and evaluated too; the "
                       "run reports it where it scores higher (0 = off; DeiT: 0.99996)"),
    "seed": (0, "initial weights, data order, per-sample augmentation and per-rank dropout all derive from it"),
}
RUN = {
    "data_root": ("data/imagenet", "dataset: ROOT/train/<class>/<image> + ROOT/val/<class>/<image> (for the "
                                   "ILSVRC2012 archives run `python -m imagenet.dataloaders.imagenet-1k ROOT "
                                   "--prepare` once); --evaluate-only also takes a folder of <wnid>_<name>.JPEG"),
    "out": ("runs/imagenet", "output folder, on storage every node shares: checkpoint.pth, metrics.json, "
                             "curves.png; a run whose --out holds a checkpoint continues it"),
    "fresh": (False, "start over even though --out holds a checkpoint (it is replaced after the first epoch)"),
    "resume": (False, "continue --out's checkpoint (the default anyway); without one yet, start a new run"),
    "pretrained": ("", "initial weights: a registry name (python -m models.pretrained --list; downloaded once), "
                       "this repo's checkpoint or timm / DeiT / DINO / torchvision ViT weights; sets the model"),
    "evaluate_only": (False, "only report top-1 / top-5 of the --pretrained weights on the validation images"),
    "device": ("auto", hardware.DEVICE_HELP + "; under torchrun / srun each rank takes cuda:<local rank>"),
    "amp": ("auto", hardware.AMP_HELP),
    "compile": (False, "torch.compile the model"),
    "channels_last": (True, "NHWC input and patch-embedding conv on GPU (tensor-core layout); ignored on CPU"),
    "device_batch": (0, "images per rank in one forward / backward (0: batch_size / ranks); smaller values "
                        "accumulate gradients: the same recipe in less memory"),
    "workers": (8, "data-loading processes per rank (uint8 batches, pinned memory, persistent workers)"),
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
PRESETS = {"vit_ti": dict(embed_dim=192, num_heads=3), "vit_s": dict(embed_dim=384, num_heads=6),
           "vit_b": dict(embed_dim=768, num_heads=12)}
ARCH = ("model", "embed_dim", "num_heads", "depth", "mlp_ratio", "patch_size")  # what --pretrained decides
# -------------------------------------------------------------------------------------------------------------------


class Preempted(SystemExit):
    """A signal stopped training after a checkpoint was written; the exit status is 128 + the signal's number."""


def parse_args(argv: list[str] | None = None) -> tuple[dict[str, Any], set[str]]:
    """-> (config: every MODEL / RECIPE / RUN entry, names of the flags given explicitly)."""
    return parse_config("python -m imagenet.train", __doc__, {"model": MODEL, "recipe": RECIPE, "run": RUN}, argv,
                        choices={"model": sorted(PRESETS), "amp": hardware.AMP_CHOICES})


# ---------------------------------------------------------------------------------------------------- config, once
def find_checkpoint(cfg: dict[str, Any], given: set[str], path: Path,
                    ctx: DistContext) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """-> (config, the checkpoint this run continues or None). A checkpoint in --out is continued unless --fresh
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
        raise UsageError(f"the ranks found different checkpoints in --out {path.parent} ((epoch, step) per rank: "
                         f"{seen}); --out must be a folder that all nodes share.")
    if cfg["fresh"] and path.is_file():
        ctx.print(f"note: --fresh: starting over; {path} is replaced after the first epoch")
    elif ckpt is None and cfg["resume"]:
        ctx.print(f"note: --resume: {path} does not exist yet, so this starts a new run")
    if ckpt is None:
        return {**cfg, "changes": []}, None
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict) or saved.get("dataset") != "imagenet" or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not an imagenet.train checkpoint of this repo; cannot continue it (use "
                              f"another --out, or --fresh to replace it).")
    cfg, changed = continue_config(saved, cfg, given, path=path, fixed=[*MODEL, "batch_size", "pretrained"],
                                   adjustable=set(RECIPE) - {"batch_size"}, kept=["data_root"],
                                   why={"batch_size": " (it sets the steps per epoch; --device-batch saves memory "
                                                      "instead)"})
    for k, (old, new) in changed.items():
        ctx.print(f"note: {flag(k)} {new} replaces the {old} the run was trained with, from epoch "
                  f"{ckpt['epoch'] + 1} on")
    history = list(saved.get("changes", [])) + ([{"epoch": ckpt["epoch"] + 1, **changed}] if changed else [])
    return {**cfg, "changes": history}, ckpt


def check_config(cfg: dict[str, Any], ctx: DistContext) -> int:
    """UsageError for a setting that cannot work -> images per rank in one forward / backward."""
    if cfg["img_size"] % cfg["patch_size"]:
        raise UsageError(f"--img-size {cfg['img_size']} is not a multiple of --patch-size {cfg['patch_size']}; "
                         f"use {max(1, cfg['img_size'] // cfg['patch_size']) * cfg['patch_size']}.")
    if cfg["batch_size"] <= 0 or cfg["batch_size"] % ctx.world_size:
        raise UsageError(f"--batch-size {cfg['batch_size']} does not split over {ctx.world_size} rank(s); use a "
                         f"positive multiple of {ctx.world_size}.")
    per_rank = cfg["batch_size"] // ctx.world_size
    micro = cfg["device_batch"] or per_rank
    if micro <= 0 or per_rank % micro:
        raise UsageError(f"--device-batch {cfg['device_batch']} does not divide the {per_rank} images per rank "
                         f"(--batch-size {cfg['batch_size']} over {ctx.world_size} rank(s)); use a divisor of "
                         f"{per_rank}.")
    if cfg["evaluate_only"] and not cfg["pretrained"]:
        raise UsageError("--evaluate-only needs weights: --pretrained PATH (this repo's checkpoint or timm / DeiT / "
                         "torchvision weights).")
    return micro


# ------------------------------------------------------------------------------------------------------------ model
def model_from_config(cfg: dict[str, Any], num_classes: int) -> VisionTransformer:
    """The preset, with the size overrides of `cfg`."""
    sizes = dict(PRESETS[cfg["model"]], depth=12)
    sizes.update({k: cfg[k] for k in ("embed_dim", "num_heads", "depth") if cfg[k] > 0})
    return VisionTransformer(sizes["embed_dim"], round(sizes["embed_dim"] * cfg["mlp_ratio"]), sizes["num_heads"],
                             sizes["depth"], cfg["patch_size"], 3, (cfg["img_size"] // cfg["patch_size"]) ** 2,
                             num_classes, cfg["dropout"], drop_path_rate=cfg["drop_path"])


def load_weights(path: str, **overrides: Any) -> VisionTransformer:
    try:
        return load_pretrained(path, **overrides)
    except CheckpointError as e:
        raise CheckpointError(f"--pretrained: {e}") from None


def model_for_finetuning(path: str, cfg: dict[str, Any], num_classes: int, ctx: DistContext) -> VisionTransformer:
    """The pretrained ViT with this run's dropout and stochastic depth; a head of another class count is re-made."""
    source = load_weights(path)
    config = dict(source.config, num_classes=num_classes, dropout=cfg["dropout"], drop_path_rate=cfg["drop_path"])
    model = VisionTransformer(**config)
    state = source.state_dict()
    if source.config["num_classes"] != num_classes:
        ctx.print(f"note: {path} has a {source.config['num_classes']}-class head and the dataset has {num_classes} "
                  f"classes: the head is re-initialised, the rest is fine-tuned.")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)
    return model


def describe(model: VisionTransformer) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return (f"ViT D={c['embed_dim']} heads={c['num_heads']} depth={c['num_layers']} mlp={c['hidden_dim']} "
            f"patch={c['patch_size']} classes={c['num_classes']} drop_path={c['drop_path_rate']} "
            f"({n / 1e6:.1f}M params)")


def build_model(cfg: dict[str, Any], given: set[str], num_classes: int, ckpt: dict[str, Any] | None,
                ctx: DistContext) -> tuple[VisionTransformer, dict[str, Any]]:
    """-> (the model: the checkpoint's shape when continuing, --pretrained's weights, or the configured preset;
    the config with the architecture it really has, which metrics.json and the plots record)."""
    if ckpt is not None:  # continuing: the saved shape (weights follow in restore_checkpoint)
        model = VisionTransformer(**ckpt["model_config"])
    elif not cfg["pretrained"]:
        model = model_from_config(cfg, num_classes)
    else:
        ignored = sorted(given & set(ARCH))
        if ignored:
            raise UsageError(f"{flag(ignored[0])} has no effect with --pretrained, whose weights fix the "
                             f"architecture; drop it.")
        model = (load_weights(cfg["pretrained"]) if cfg["evaluate_only"]
                 else model_for_finetuning(cfg["pretrained"], cfg, num_classes, ctx))
        grid = model.config.get("grid_size") or [round(model.config["num_patches"] ** 0.5)] * 2
        img_size = grid[0] * model.config["patch_size"]
        if "img_size" in given and cfg["img_size"] != img_size:
            raise UsageError(f"--img-size {cfg['img_size']} does not fit the --pretrained weights, trained at "
                             f"{img_size} px; drop it.")
        c = model.config
        cfg = {**cfg, "model": cfg["pretrained"], "img_size": img_size, "embed_dim": c["embed_dim"],
               "num_heads": c["num_heads"], "depth": c["num_layers"], "mlp_ratio": c["hidden_dim"] / c["embed_dim"],
               "patch_size": c["patch_size"]}
    if model.config["num_classes"] != num_classes:
        raise DatasetError(f"the dataset {cfg['data_root']} has {num_classes} classes but the model's head has "
                           f"{model.config['num_classes']}; use a dataset with the checkpoint's classes (or fine-tune "
                           f"with --pretrained, which re-initialises the head).")
    return model, cfg


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
        return Path(self.cfg["out"])

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
    """Decide the config (a continued run's, --pretrained's architecture), then build the data and the model
    -> (the trainer without its training objects, the checkpoint it continues or None)."""
    cfg, ckpt = (cfg, None) if cfg["evaluate_only"] else find_checkpoint(cfg, given, Path(cfg["out"]) /
                                                                         "checkpoint.pth", ctx)
    if not cfg["repeated_aug"]:
        cfg = {**cfg, "repeated_aug": 1 if cfg["pretrained"] else 3}
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    hw = hardware.resolve(ctx.device, cfg["amp"], warn=lambda m: ctx.print(m, file=sys.stderr))
    ctx.print(f"{hw.summary}, {'compiled' if cfg['compile'] else 'eager'}")  # the first line of every run
    micro = check_config(cfg, ctx)
    if hw.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside autocast
    seed_everything(cfg["seed"])  # the same on every rank: identical initial weights
    tf_train = train_transform(cfg["img_size"], randaug_ops=cfg["randaug_n"], randaug_magnitude=cfg["randaug_m"])
    train_set, val_set = build_datasets(cfg["data_root"], tf_train, eval_transform(cfg["img_size"]),
                                        eval_only=cfg["evaluate_only"])
    model, cfg = build_model(cfg, given, len(val_set.classes), ckpt, ctx)
    channels_last = cfg["channels_last"] and hw.device.type == "cuda"
    model.to(hw.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    ctx.print(f"{describe(model)} on {ctx.world_size} x {hw.device.type}")
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
    tr.ema = ModelEma(tr.model, cfg["ema_decay"], warmup=True) if cfg["ema_decay"] > 0 else None
    configured = [(g["lr"], g["weight_decay"]) for g in tr.optimizer.param_groups]
    if ckpt is not None:
        tr.start_epoch, tr.metrics = restore_checkpoint(ckpt, tr.model, tr.optimizer, ema=tr.ema, restore_rng=False,
                                                        scaler=tr.scaler if "scaler" in ckpt else None)
        tr.start_step, tr.partial = int(ckpt.get("step_in_epoch", 0)), ckpt.get("partial_epoch", {})
        tr.saved_rng = ckpt.get("rng_per_rank", []) if tr.start_step else []
        if list(ckpt.get("classes", tr.train_set.classes)) != list(tr.train_set.classes):
            raise DatasetError(f"the class folders of {cfg['data_root']} differ from those the run was trained on "
                               f"(e.g. {list(ckpt['classes'])[:3]}); continue on the same dataset.")
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
    tr.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
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
                            grad_clip=cfg["grad_clip"] or None, progress=tr.progress,
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
    cfg, given = parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    try:
        run(cfg, given)
    except NonFiniteLossError as e:
        sys.exit(f"error: {e} The last finished epoch is in {Path(cfg['out']) / 'checkpoint.pth'}." if rank == 0
                 else 1)  # every rank stops at the same step: rank 0 says it
    except (ValueError, FileNotFoundError) as e:  # UsageError, DatasetError, CheckpointError are ValueErrors
        sys.exit(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}")  # it may be this rank's alone
    except KeyboardInterrupt:
        sys.exit(f"interrupted; the last finished epoch is in {Path(cfg['out']) / 'checkpoint.pth'}")
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
