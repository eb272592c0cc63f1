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

import argparse
import io
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from imagenet.dataloaders.dataset import (
    BatchLog,
    DatasetError,
    TrainSampler,
    build_datasets,
    device_transform,
    eval_transform,
    mixup_cutmix,
    train_transform,
)
from models.pretrained import CheckpointError, load_pretrained
from models.vit import VisionTransformer
from utils import hardware
from utils.distributed import (
    DistContext,
    StopSignal,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    close_distributed,
    ignore_stop_signals,
    init_distributed,
)
from utils.img2attn import plot_attention_curves, track_attention
from utils.optim import adamw
from utils.training import (
    NonFiniteLossError,
    checkpoint_state,
    epoch_seed,
    evaluate,
    load_checkpoint,
    make_ema,
    plot_curves,
    restore_checkpoint,
    rng_states,
    save_checkpoint,
    save_metrics,
    seed_everything,
    set_rng_states,
    train_one_epoch,
    warmup_cosine,
)

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


class UsageError(ValueError):
    """A bad combination of settings; the message says what to change."""


class Preempted(SystemExit):
    """A signal stopped training after a checkpoint was written; the exit status is 128 + the signal's number."""


def flag(name: str) -> str:
    """A config key's command-line flag: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def reported_weights(row: dict[str, Any]) -> str:
    """"ema" when the EMA's validation top-1 in metrics `row` beats the model's, else "model": what a run reports."""
    return "ema" if row.get("ema_val_top1", -1.0) > row.get("val_top1", 0.0) else "model"


def parse_args(argv: list[str] | None = None) -> tuple[dict[str, Any], set[str]]:
    """-> (config: every MODEL/RECIPE/RUN entry, names of the flags given explicitly)."""
    parser = argparse.ArgumentParser(prog="python -m imagenet.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for title, table in (("model", MODEL), ("recipe", RECIPE), ("run", RUN)):
        group = parser.add_argument_group(title)
        for name, (default, help_text) in table.items():
            if isinstance(default, bool):
                group.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
            else:
                kw = {"choices": sorted(PRESETS)} if name == "model" else {}
                group.add_argument(flag(name), type=type(default), default=default, help=help_text, **kw)
    args = vars(parser.parse_args(argv))
    unset = object()  # parse again with every default replaced by `unset`: what remains was given explicitly
    parser.set_defaults(**{k: unset for k in args})
    given = {k for k, v in vars(parser.parse_args(argv)).items() if v is not unset}
    return args, given



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


def record_architecture(cfg: dict[str, Any], model: VisionTransformer) -> None:
    """Put the architecture the run really has into `cfg` (it is what metrics.json and the plots record)."""
    c = model.config
    cfg.update(embed_dim=c["embed_dim"], num_heads=c["num_heads"], depth=c["num_layers"],
               mlp_ratio=c["hidden_dim"] / c["embed_dim"], patch_size=c["patch_size"])


# ------------------------------------------------------------------------------------------------------------- data
class DeviceBatches:
    """uint8 (x, y) batches moved to the device (NHWC if asked), turned into floats there by `transform`
    (normalisation, random erasing), then MixUp / CutMix."""

    def __init__(self, batches: BatchLog, device: torch.device, transform: Callable[[Tensor], Tensor],
                 channels_last: bool = False, mix: Callable | None = None):
        self.batches, self.device, self.transform = batches, device, transform
        self.channels_last, self.mix = channels_last, mix

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = self.transform(x)
            yield self.mix(x, y) if self.mix is not None else (x, y)


def make_loader(dataset, batch_size: int, sampler, cfg: dict[str, Any], device: torch.device,
                drop_last: bool) -> DataLoader:
    """Persistent workers; their own RNG seed comes from a generator of --seed, never from the global RNG (which
    the training step's dropout and MixUp use): so resuming is exact with any number of workers. The workers
    ignore SIGTERM / SIGUSR1: their main process handles them."""
    workers = cfg["workers"]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=drop_last,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator().manual_seed(cfg["seed"]))


def stop_workers(*loaders: DataLoader) -> None:
    """End the persistent workers of `loaders` now. They ignore SIGTERM (as the main process's handler), so an exit
    that left them to Python's exit-time terminate-and-join would wait for them forever."""
    for loader in loaders:
        if getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()
            loader._iterator = None


def eval_loader(dataset, batch_size: int, cfg: dict[str, Any], ctx: DistContext) -> DataLoader:
    """Each rank evaluates every world_size-th image (no padding, so every image counts exactly once)."""
    shard = list(range(ctx.rank, len(dataset), ctx.world_size))
    return make_loader(dataset, batch_size, shard, cfg, ctx.device, drop_last=False)


def report_skipped(log: BatchLog, ctx: DistContext, what: str) -> int:
    """Warn (rank 0) about the unreadable images every rank skipped; returns their number."""
    skipped = [p for paths in all_gather_objects(log.skipped) for p in paths]
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        ctx.print(f"warning: {what}: skipped {len(skipped)} unreadable image(s), each replaced by the next one: "
                  f"{shown}. Check the data with `python -m imagenet.dataloaders.imagenet-1k ROOT`.")
    return len(skipped)


# ---------------------------------------------------------------------------------------------- continue or start
def to_bytes(obj: Any) -> bytes:
    """torch.save(obj) as bytes: how RNG states travel between ranks (all_gather_object cannot carry tensors
    under weights_only unpickling)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def as_bytes(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a checkpoint holds tensors, not bytes


def from_bytes(data: Tensor) -> Any:
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)


def find_checkpoint(cfg: dict[str, Any], given: set[str], path: Path, ctx: DistContext) -> dict[str, Any] | None:
    """The checkpoint this run continues, or None to start a new one. A checkpoint in --out is continued unless
    --fresh: a restarted or repeated command never overwrites a run. Every rank must find the same one."""
    restarts = max(int(os.environ.get(k, "0")) for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    if cfg["fresh"] and restarts > 0:  # the launcher restarted this command: --fresh meant its first start
        ctx.print(f"note: --fresh is ignored on restart {restarts}: continuing the run it started")
        cfg["fresh"] = False
    exists = path.is_file() and not cfg["fresh"]
    ckpt = load_checkpoint(path) if exists else None
    position = (int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))) if ckpt is not None else None
    seen = all_gather_objects(position)
    if len(set(seen)) > 1:
        raise UsageError(f"the ranks found different checkpoints in --out {path.parent} ((epoch, step) per rank: "
                         f"{seen}); --out must be a folder that all nodes share.")
    if cfg["fresh"] and path.is_file():
        ctx.print(f"note: --fresh: starting over; {path} is replaced after the first epoch")
    elif ckpt is None and cfg["resume"]:
        ctx.print(f"note: --resume: {path} does not exist yet, so this starts a new run")
    if ckpt is not None:
        merge_resumed(cfg, given, ckpt, path, ctx)
    return ckpt


def merge_resumed(cfg: dict[str, Any], given: set[str], ckpt: dict[str, Any], path: Path, ctx: DistContext) -> None:
    """Take the model, recipe and data root a run was trained with. Recipe flags given now apply from here on
    (with a note; train_config["changes"] records them); model flags and --batch-size are refused."""
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict) or saved.get("dataset") != "imagenet" or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not an imagenet.train checkpoint of this repo; cannot continue it (use "
                              f"another --out, or --fresh to replace it).")
    for k in sorted(given & {*MODEL, "batch_size", "pretrained"}):
        if k in saved and saved[k] != cfg[k]:
            why = " (it sets the steps per epoch; --device-batch saves memory instead)" if k == "batch_size" else ""
            raise UsageError(f"{flag(k)} {cfg[k]} differs from the {saved[k]} that {path} was trained with{why}; "
                             f"drop it to continue the run, or add --fresh to start over.")
    changed = {k: [saved[k], cfg[k]] for k in sorted(given & set(RECIPE)) if k in saved and saved[k] != cfg[k]}
    for k, (old, new) in changed.items():
        ctx.print(f"note: {flag(k)} {new} replaces the {old} the run was trained with, from epoch "
                  f"{ckpt['epoch'] + 1} on")
    cfg.update({k: saved[k] for k in (*MODEL, *RECIPE, "data_root", "pretrained") if k in saved and k not in given})
    cfg["changes"] = list(saved.get("changes", [])) + ([{"epoch": ckpt["epoch"] + 1, **changed}] if changed else [])


def build_model(cfg: dict[str, Any], given: set[str], num_classes: int, ckpt: dict[str, Any] | None,
                ctx: DistContext) -> VisionTransformer:
    if ckpt is not None:  # continuing: the saved shape (weights follow in restore_checkpoint)
        return VisionTransformer(**ckpt["model_config"])
    if not cfg["pretrained"]:
        return model_from_config(cfg, num_classes)
    ignored = sorted(given & set(ARCH))
    if ignored:
        raise UsageError(f"{flag(ignored[0])} has no effect with --pretrained, whose weights fix the architecture; "
                         f"drop it.")
    model = (load_weights(cfg["pretrained"]) if cfg["evaluate_only"]
             else model_for_finetuning(cfg["pretrained"], cfg, num_classes, ctx))
    grid = model.config.get("grid_size") or [round(model.config["num_patches"] ** 0.5)] * 2
    img_size = grid[0] * model.config["patch_size"]
    if "img_size" in given and cfg["img_size"] != img_size:
        raise UsageError(f"--img-size {cfg['img_size']} does not fit the --pretrained weights, trained at "
                         f"{img_size} px; drop it.")
    cfg.update(model=cfg["pretrained"], img_size=img_size)
    record_architecture(cfg, model)
    return model


# -------------------------------------------------------------------------------------------------------------- run
def run(cfg: dict[str, Any], given: set[str]) -> None:
    ctx = init_distributed(cfg["device"], cfg["dist_timeout"])
    out = Path(cfg["out"])
    ckpt_path = out / "checkpoint.pth"
    ckpt = None if cfg["evaluate_only"] else find_checkpoint(cfg, given, ckpt_path, ctx)
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    hw = hardware.resolve(ctx.device, cfg["amp"], warn=lambda m: ctx.print(m, file=sys.stderr))
    device, amp_dtype = hw.device, hw.amp_dtype
    ctx.print(f"{hw.summary}, {'compiled' if cfg['compile'] else 'eager'}")  # the first line of every run
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
    accum = per_rank // micro
    if cfg["evaluate_only"] and not cfg["pretrained"]:
        raise UsageError("--evaluate-only needs weights: --pretrained PATH (this repo's checkpoint or timm / DeiT / "
                         "torchvision weights).")
    channels_last = cfg["channels_last"] and device.type == "cuda"
    progress = cfg["progress"] and ctx.is_main and sys.stderr.isatty()  # no bars in SLURM / nohup logs
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside autocast
    seed_everything(cfg["seed"])  # the same on every rank: identical initial weights

    # ---- data: uint8 from the workers, floats on the device
    if not cfg["repeated_aug"]:
        cfg["repeated_aug"] = 1 if cfg["pretrained"] else 3
    tf_train = train_transform(cfg["img_size"], randaug_ops=cfg["randaug_n"], randaug_magnitude=cfg["randaug_m"])
    train_set, val_set = build_datasets(cfg["data_root"], tf_train, eval_transform(cfg["img_size"]),
                                        eval_only=cfg["evaluate_only"])
    num_classes = len(val_set.classes)
    to_float = device_transform()  # normalisation only: evaluation and attention tracking

    # ---- model
    model = build_model(cfg, given, num_classes, ckpt, ctx)
    if model.config["num_classes"] != num_classes:
        raise DatasetError(f"the dataset {cfg['data_root']} has {num_classes} classes but the model's head has "
                           f"{model.config['num_classes']}; use a dataset with the checkpoint's classes (or fine-tune "
                           f"with --pretrained, which re-initialises the head).")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    eval_model = torch.compile(model) if cfg["compile"] else model
    ctx.print(f"{describe(model)} on {ctx.world_size} x {device.type}")
    val_loader = eval_loader(val_set, micro, cfg, ctx)

    def validate(net: nn.Module, desc: str) -> tuple[dict[str, float], int]:
        log = BatchLog(val_loader)
        res = evaluate(net, DeviceBatches(log, device, to_float, channels_last), device=device, amp_dtype=amp_dtype,
                       progress=progress, desc=desc)
        return res, report_skipped(log, ctx, desc)

    if cfg["evaluate_only"]:
        ctx.print(f"weights: {cfg['pretrained']}, {getattr(model, 'weights_note', 'as saved')}")
        try:
            res, _ = validate(eval_model, "evaluation")
        finally:
            stop_workers(val_loader)
        ctx.print(f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  "
                  f"({res['n']} images of {cfg['data_root']})")
        return

    # ---- training objects
    sampler = TrainSampler(len(train_set), num_replicas=ctx.world_size, rank=ctx.rank, seed=cfg["seed"],
                           repeats=cfg["repeated_aug"])
    train_loader = make_loader(train_set, micro, sampler, cfg, device, drop_last=True)
    steps = len(train_loader) // accum  # optimizer steps per epoch
    if cfg["steps_per_epoch"] > 0:
        steps = min(steps, cfg["steps_per_epoch"])
    if steps == 0:
        raise UsageError(f"the training split has {len(train_set)} images, less than one batch of "
                         f"{cfg['batch_size']} over {ctx.world_size} rank(s); lower --batch-size.")
    lr = cfg["lr"] * cfg["batch_size"] / 512
    optimizer = adamw(model, lr, cfg["weight_decay"], device)
    scaler = hw.grad_scaler()
    ema = make_ema(model, cfg["ema_decay"], warmup=True) if cfg["ema_decay"] > 0 else None
    start_epoch, start_step, metrics, partial, saved_rng = 0, 0, [], {}, []
    configured = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]  # this run's, kept over a restore
    if ckpt is not None:
        start_epoch, metrics = restore_checkpoint(ckpt, model, optimizer, ema=ema, restore_rng=False,
                                                  scaler=scaler if "scaler" in ckpt else None)
        start_step, partial = int(ckpt.get("step_in_epoch", 0)), ckpt.get("partial_epoch", {})
        saved_rng = ckpt.get("rng_per_rank", []) if start_step else []
        if list(ckpt.get("classes", train_set.classes)) != list(train_set.classes):
            raise DatasetError(f"the class folders of {cfg['data_root']} differ from those the run was trained on "
                               f"(e.g. {list(ckpt['classes'])[:3]}); continue on the same dataset.")
        at = f"epoch {start_epoch}" + (f" and step {start_step} of epoch {start_epoch + 1}" if start_step else "")
        ctx.print(f"continuing {out / 'checkpoint.pth'} after {at} (--fresh starts over)")
        del ckpt  # (a whole checkpoint per rank, held for the run otherwise)
    for group, (base_lr, weight_decay) in zip(optimizer.param_groups, configured, strict=True):
        group.update(initial_lr=base_lr, weight_decay=weight_decay)  # whatever the checkpoint had
    scheduler = warmup_cosine(optimizer, cfg["epochs"] * steps, min(cfg["warmup_epochs"], cfg["epochs"]) * steps,
                              min_lr_ratio=min(1.0, cfg["min_lr"] / lr), start_step=start_epoch * steps + start_step)
    train_model = eval_model  # (compiled once when single-process)
    if ctx.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if cfg["compile"]:
            train_model = torch.compile(train_model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    mix = mixup_cutmix(len(train_set.classes), cfg["mixup"], cfg["cutmix"])
    augment = device_transform(reprob=cfg["reprob"])
    ctx.print(f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes; batch "
              f"{cfg['batch_size']} ({micro} per rank x {accum} accumulation step(s)), lr {lr:.2e}, {steps} steps per "
              f"epoch, repeated augmentation x{cfg['repeated_aug']}")
    tracked = None  # fixed held-out images for the attention tracking: evenly spaced, so of many classes
    if cfg["track_attention"] and ctx.is_main:
        picks = torch.linspace(0, len(val_set) - 1, min(64, len(val_set))).round().long().unique().tolist()
        tracked = to_float(torch.stack([val_set[i][0] for i in picks]).to(device))

    train_config = {k: cfg[k] for k in (*MODEL, *RECIPE, "data_root", "pretrained")} | {
        "dataset": "imagenet", "changes": cfg.get("changes", [])}
    title = f"{cfg['model']} on {cfg['data_root']}"
    stop = StopSignal(device)

    def save(epoch: int, **extra: Any) -> None:
        rng = [as_bytes(r) for r in all_gather_objects(to_bytes(rng_states()))]  # every rank's: exact mid-epoch
        if not ctx.is_main:
            return
        reported = reported_weights(metrics[-1] if metrics else {})
        state = checkpoint_state(model, optimizer, scheduler, epoch=epoch, metrics=metrics, train_config=train_config,
                                 ema=ema, scaler=scaler, classes=list(train_set.classes), rng_per_rank=rng,
                                 world_size=ctx.world_size, reported_weights=reported, **extra)
        save_checkpoint(state, out / "checkpoint.pth")

    last_epoch = cfg["epochs"] if cfg["stop_after"] <= 0 else min(cfg["epochs"], start_epoch + cfg["stop_after"])
    try:
        for epoch in range(start_epoch, last_epoch):
            first = start_step if epoch == start_epoch else 0  # optimizer steps of this epoch already done
            if first and len(saved_rng) == ctx.world_size:
                set_rng_states(from_bytes(saved_rng[ctx.rank]))  # exactly where the stopped run was
            else:  # dropout, drop-path, MixUp, erasing: per rank and epoch (and step, mid-epoch on other ranks)
                seed_everything(epoch_seed(cfg["seed"], epoch) + first * ctx.world_size + ctx.rank)
            sampler.set_epoch(epoch, start=first * accum * micro)
            log = BatchLog(train_loader)
            batches = itertools.islice(DeviceBatches(log, device, augment, channels_last, mix), (steps - first) * accum)
            stats = train_one_epoch(train_model, batches, optimizer, scheduler, loss_fn, device=device,
                                    epoch=epoch + 1, step=epoch * steps + first, total=(steps - first) * accum, ema=ema,
                                    amp_dtype=amp_dtype, scaler=scaler, grad_clip=cfg["grad_clip"] or None,
                                    progress=progress, desc=f"epoch {epoch + 1}/{cfg['epochs']}", accum_steps=accum,
                                    should_stop=stop)
            sums = all_reduce_sum(torch.tensor([stats["train_loss"] * stats["images"], stats["images"]],
                                               dtype=torch.float64, device=device)).tolist()
            seconds = float(all_reduce_max(torch.tensor([stats["seconds"]], dtype=torch.float64, device=device)))
            done = {"loss_sum": sums[0] + partial.get("loss_sum", 0.0), "images": sums[1] + partial.get("images", 0),
                    "seconds": seconds + partial.get("seconds", 0.0)}
            partial = {}
            if stats["stopped"]:
                save(epoch, step_in_epoch=first + stats["steps"], partial_epoch=done)
                barrier()  # no rank exits (and gets the job torn down) before the checkpoint is on disk
                ctx.print(f"{stop.caught}: saved {out / 'checkpoint.pth'} at step {first + stats['steps']} of epoch "
                          f"{epoch + 1}; run the same command to continue")
                raise Preempted(stop.exit_code)
            row = {"epoch": epoch + 1, "train_loss": done["loss_sum"] / max(done["images"], 1),
                   "lr": scheduler.get_last_lr()[0], "train_images": int(done["images"]),
                   "img_per_s": done["images"] / max(done["seconds"], 1e-9), "seconds": done["seconds"]}
            if ctx.distributed:  # which images each rank trained on (this session); without repeats: disjoint
                seen = all_gather_objects(log.indices)
                row["rank_images"] = [len(s) for s in seen]
                row["rank_distinct_images"] = len(set().union(*seen))
            row["skipped_images"] = report_skipped(log, ctx, f"epoch {epoch + 1}")
            res, skipped = validate(eval_model, "val")
            row.update(val_loss=res["loss"], val_top1=res["top1"], val_top5=res["top5"])
            row["skipped_images"] += skipped
            if ema is not None:
                res, _ = validate(ema.module, "val EMA")
                row.update(ema_val_loss=res["loss"], ema_val_top1=res["top1"], ema_val_top5=res["top5"])
            if tracked is not None:  # the bare model, eval mode, no RNG: training is unchanged
                row.update(track_attention(model, tracked)[0])
            metrics.append(row)
            ema_text = f", EMA top-1 {row['ema_val_top1']:.2f}%" if ema is not None else ""
            ctx.print(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {row['train_loss']:.4f}, val loss "
                      f"{row['val_loss']:.4f}, top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%{ema_text}, "
                      f"{row['img_per_s']:.0f} img/s")
            save(epoch + 1)
            if ctx.is_main:
                save_metrics(metrics, out / "metrics.json", config=train_config, world_size=ctx.world_size,
                             ran_as=hw.record() | {"compiled": cfg["compile"], "accumulation": accum})
                plot_curves(metrics, out / "curves.png", title=title)
                plot_attention_curves(metrics, out / "attention_curves.png", title=title)
            barrier()
            if stop(force_check=True):
                ctx.print(f"{stop.caught}: stopped after epoch {epoch + 1}; run the same command to continue")
                raise Preempted(stop.exit_code)
    finally:
        stop.restore()
        stop_workers(train_loader, val_loader)
    if last_epoch < cfg["epochs"]:
        ctx.print(f"stopped after epoch {last_epoch} (--stop-after {cfg['stop_after']}); run the same command to "
                  f"continue")
    elif last_epoch > start_epoch:
        final = metrics[-1]
        which = "the EMA" if reported_weights(final) == "ema" else "the model"
        ctx.print(f"saved {out / 'checkpoint.pth'}, {out / 'metrics.json'}, {out / 'curves.png'}"
                  + (f"; the checkpoint reports {which} (higher top-1)" if ema else ""))
    else:
        ctx.print(f"the run already has its {cfg['epochs']} epochs; raise --epochs to train on")


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
