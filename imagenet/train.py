"""Train a ViT on ImageNet-1k (or any ImageFolder dataset) with the DeiT recipe, on one GPU or many.

    python -m imagenet.train --data-root /data/imagenet --model vit_s          # one GPU (or --device cpu)
    torchrun --nproc_per_node=8 -m imagenet.train --data-root /data/imagenet   # DDP on 8 GPUs
    python -m imagenet.train --resume                                          # continue runs/imagenet exactly
    python -m imagenet.train --data-root my_data --pretrained deit_tiny.pth --epochs 30 --lr 1e-4  # fine-tune
    python -m imagenet.train --evaluate-only --pretrained deit_tiny.pth --data-root imagenet-samples

Every entry of the config block below is a flag. `--resume` takes the model, recipe and data root the run was
trained with; recipe flags given with it override them. Anchors (DeiT paper, 300 epochs, 224 px, top-1):
DeiT-Ti 72.2, DeiT-S 79.9, DeiT-B 81.8.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from imagenet.dataloaders.dataset import (
    BatchLog,
    DatasetError,
    SeededSampler,
    build_datasets,
    eval_transform,
    mixup_cutmix,
    train_transform,
)
from models.pretrained import CheckpointError, load_pretrained
from models.vit import VisionTransformer
from utils import hardware
from utils.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    close_distributed,
    init_distributed,
)
from utils.img2attn import plot_attention_curves, track_attention
from utils.training import (
    NonFiniteLossError,
    checkpoint_state,
    epoch_seed,
    evaluate,
    load_checkpoint,
    make_ema,
    param_groups,
    plot_curves,
    restore_checkpoint,
    save_checkpoint,
    save_metrics,
    seed_everything,
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
    "batch_size": (1024, "global batch over all ranks (each rank: batch_size / world size)"),
    "lr": (5e-4, "peak AdamW learning rate for a batch of 512; the run uses lr * batch_size / 512"),
    "min_lr": (1e-5, "learning rate at the end of the cosine"),
    "warmup_epochs": (5, "linear warm-up epochs"),
    "weight_decay": (0.05, "AdamW weight decay (none on biases, norms, position embedding, class token)"),
    "grad_clip": (0.0, "max gradient norm (0 = off; DeiT: off)"),
    "label_smoothing": (0.1, "cross-entropy label smoothing (also on MixUp / CutMix targets)"),
    "randaug_n": (2, "RandAugment ops per image (0 = off)"),
    "randaug_m": (9, "RandAugment magnitude (DeiT: timm's rand-m9-mstd0.5-inc1; torchvision's RandAugment here)"),
    "mixup": (0.8, "MixUp alpha (0 = off); each batch gets MixUp or CutMix, 50/50"),
    "cutmix": (1.0, "CutMix alpha (0 = off)"),
    "reprob": (0.25, "RandomErasing probability (per-pixel noise)"),
    "ema_decay": (0.0, "decay of an EMA of the weights, updated every step and evaluated too (0 = off; DeiT: "
                       "0.99996)"),
    "seed": (0, "initial weights, data order, per-sample augmentation and per-rank dropout all derive from it"),
}
RUN = {
    "data_root": ("data/imagenet", "dataset: ROOT/train/<class>/<image> + ROOT/val/<class>/<image>, or the "
                                   "ILSVRC2012 archives in ROOT; --evaluate-only also takes a folder of "
                                   "<wnid>_<name>.JPEG"),
    "out": ("runs/imagenet", "output folder: checkpoint.pth (every epoch), metrics.json, curves.png (rank 0)"),
    "pretrained": ("", "initial weights: a registry name (python -m models.pretrained --list; downloaded once), "
                       "this repo's checkpoint or timm / DeiT / DINO / torchvision ViT weights"),
    "resume": (False, "continue <out>/checkpoint.pth exactly, with the settings it was trained with"),
    "evaluate_only": (False, "only report top-1 / top-5 of the --pretrained weights on the validation images"),
    "device": ("auto", hardware.DEVICE_HELP + "; under torchrun each rank takes cuda:<LOCAL_RANK>"),
    "amp": ("auto", hardware.AMP_HELP),
    "compile": (False, "torch.compile the model"),
    "channels_last": (True, "NHWC input and patch-embedding conv on GPU (tensor-core layout); ignored on CPU"),
    "workers": (8, "data-loading processes per rank (pinned memory, persistent workers)"),
    "threads": (0, "CPU threads for torch (0: torch's default)"),
    "steps_per_epoch": (0, "0: the whole training split; N > 0: stop each epoch after N steps (smoke tests)"),
    "stop_after": (0, "stop after this many epochs in this run (0 = never); continue later with --resume"),
    "progress": (True, "tqdm progress bars on rank 0 (--no-progress: only the per-epoch lines)"),
    "track_attention": (True, "every epoch, on rank 0, one forward of 64 fixed validation images (evenly spaced over "
                               "the split): per-layer attention distance and entropy into metrics.json and "
                               "attention_curves.png (--no-track-attention: off)"),
}
PRESETS = {"vit_ti": dict(embed_dim=192, num_heads=3), "vit_s": dict(embed_dim=384, num_heads=6),
           "vit_b": dict(embed_dim=768, num_heads=12)}
# -------------------------------------------------------------------------------------------------------------------


class UsageError(ValueError):
    """A bad combination of settings; the message says what to change."""


def parse_args(argv: list[str] | None = None) -> tuple[dict[str, Any], set[str]]:
    """-> (config: every MODEL/RECIPE/RUN entry, names of the flags given explicitly)."""
    parser = argparse.ArgumentParser(prog="python -m imagenet.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for title, table in (("model", MODEL), ("recipe", RECIPE), ("run", RUN)):
        group = parser.add_argument_group(title)
        for name, (default, help_text) in table.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            else:
                kw = {"choices": sorted(PRESETS)} if name == "model" else {}
                group.add_argument(flag, type=type(default), default=default, help=help_text, **kw)
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


def model_for_finetuning(path: str, cfg: dict[str, Any], num_classes: int, ctx: DistContext) -> VisionTransformer:
    """The pretrained ViT with this run's dropout and stochastic depth; a head of another class count is re-made."""
    try:
        source = load_pretrained(path)
    except CheckpointError as e:
        raise CheckpointError(f"--pretrained: {e}") from None
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


# ------------------------------------------------------------------------------------------------------------- data
class DeviceBatches:
    """(x, y) batches moved to the device (NHWC if asked), with the batch MixUp / CutMix applied there."""

    def __init__(self, batches: BatchLog, device: torch.device, channels_last: bool = False, mix=None):
        self.batches, self.device, self.channels_last, self.mix = batches, device, channels_last, mix

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield self.mix(x, y) if self.mix is not None else (x, y)


def make_loader(dataset, batch_size: int, sampler, cfg: dict[str, Any], device: torch.device,
                drop_last: bool) -> DataLoader:
    workers = cfg["workers"]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=drop_last,
                      prefetch_factor=4 if workers > 0 else None)


def eval_loader(dataset, batch_size: int, cfg: dict[str, Any], ctx: DistContext) -> BatchLog:
    """Each rank evaluates every world_size-th image (no padding, so every image counts exactly once)."""
    shard = list(range(ctx.rank, len(dataset), ctx.world_size))
    return BatchLog(make_loader(dataset, batch_size, shard, cfg, ctx.device, drop_last=False))


def report_skipped(log: BatchLog, ctx: DistContext, what: str) -> int:
    """Warn (rank 0) about the unreadable images every rank skipped; returns their number."""
    skipped = [p for paths in all_gather_objects(log.skipped) for p in paths]
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        ctx.print(f"warning: {what}: skipped {len(skipped)} unreadable image(s), each replaced by the next one: "
                  f"{shown}. Check the data with `python -m imagenet.dataloaders.imagenet-1k ROOT`.")
    return len(skipped)


# -------------------------------------------------------------------------------------------------------------- run
def merge_resumed(cfg: dict[str, Any], given: set[str], ckpt: dict[str, Any], path: Path, ctx: DistContext) -> None:
    """Take the model, recipe and data root a run was trained with; explicit recipe flags override (with a note)."""
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict) or saved.get("dataset") != "imagenet" or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not an imagenet.train checkpoint of this repo; cannot resume it "
                              f"(use --pretrained to start from foreign weights).")
    clash = sorted(k for k in given & set(MODEL) if saved.get(k) != cfg[k])
    if clash:
        k = clash[0]
        raise UsageError(f"--{k.replace('_', '-')} {cfg[k]} differs from the {saved.get(k)} that {path} was trained "
                         f"with; drop it to resume, or pick a new --out to start over.")
    for k in sorted(given & set(RECIPE)):
        if k in saved and saved[k] != cfg[k]:
            ctx.print(f"note: --{k.replace('_', '-')} {cfg[k]} overrides the {saved[k]} the run was trained with")
    cfg.update({k: saved[k] for k in (*MODEL, *RECIPE, "data_root", "pretrained") if k in saved and k not in given})


def build_model(cfg: dict[str, Any], num_classes: int, ckpt: dict[str, Any] | None,
                ctx: DistContext) -> VisionTransformer:
    if ckpt is not None:  # resuming: the saved shape (weights follow in restore_checkpoint)
        return VisionTransformer(**ckpt["model_config"])
    if cfg["pretrained"] and cfg["evaluate_only"]:
        try:
            return load_pretrained(cfg["pretrained"])
        except CheckpointError as e:
            raise CheckpointError(f"--pretrained: {e}") from None
    if cfg["pretrained"]:
        return model_for_finetuning(cfg["pretrained"], cfg, num_classes, ctx)
    return model_from_config(cfg, num_classes)


def run(cfg: dict[str, Any], given: set[str]) -> None:
    ctx = init_distributed(cfg["device"])
    out = Path(cfg["out"])
    ckpt = None
    if cfg["resume"]:
        ckpt = load_checkpoint(out / "checkpoint.pth")
        merge_resumed(cfg, given, ckpt, out / "checkpoint.pth", ctx)
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
    if cfg["evaluate_only"] and not cfg["pretrained"]:
        raise UsageError("--evaluate-only needs weights: --pretrained PATH (this repo's checkpoint or timm / DeiT / "
                         "torchvision weights).")
    per_rank = cfg["batch_size"] // ctx.world_size
    channels_last = cfg["channels_last"] and device.type == "cuda"
    progress = cfg["progress"] and ctx.is_main
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside autocast
    seed_everything(cfg["seed"])  # the same on every rank: identical initial weights

    # ---- data (rank 0 first: it may extract the archives)
    tf_train = train_transform(cfg["img_size"], randaug_ops=cfg["randaug_n"], randaug_magnitude=cfg["randaug_m"],
                               reprob=cfg["reprob"])
    tf_eval = eval_transform(cfg["img_size"])
    if not ctx.is_main:
        barrier()
    train_set, val_set = build_datasets(cfg["data_root"], tf_train, tf_eval, eval_only=cfg["evaluate_only"])
    if ctx.is_main:
        barrier()
    num_classes = len(val_set.classes)

    # ---- model
    model = build_model(cfg, num_classes, ckpt, ctx)
    if model.config["num_classes"] != num_classes:
        raise DatasetError(f"the dataset {cfg['data_root']} has {num_classes} classes but the model's head has "
                           f"{model.config['num_classes']}; use a dataset with the checkpoint's classes (or fine-tune "
                           f"with --pretrained, which re-initialises the head).")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    eval_model = torch.compile(model) if cfg["compile"] else model
    ctx.print(f"{describe(model)} on {ctx.world_size} x {device.type}")

    if cfg["evaluate_only"]:
        log = eval_loader(val_set, per_rank, cfg, ctx)
        res = evaluate(eval_model, DeviceBatches(log, device, channels_last), device=device, amp_dtype=amp_dtype,
                       progress=progress)
        report_skipped(log, ctx, "evaluation")
        ctx.print(f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  "
                  f"({res['n']} images of {cfg['data_root']})")
        return

    # ---- training objects
    train_sampler = SeededSampler(DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                                     shuffle=True, seed=cfg["seed"], drop_last=True), cfg["seed"])
    train_loader = make_loader(train_set, per_rank, train_sampler, cfg, device, drop_last=True)
    steps = len(train_loader) if cfg["steps_per_epoch"] <= 0 else min(cfg["steps_per_epoch"], len(train_loader))
    if steps == 0:
        raise UsageError(f"the training split has {len(train_set)} images, less than one batch of {per_rank} per "
                         f"rank ({ctx.world_size} rank(s)); lower --batch-size.")
    lr = cfg["lr"] * cfg["batch_size"] / 512
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=lr,
                                  fused=True if device.type == "cuda" else None)
    scheduler = warmup_cosine(optimizer, cfg["epochs"] * steps, min(cfg["warmup_epochs"], cfg["epochs"]) * steps,
                              min_lr_ratio=min(1.0, cfg["min_lr"] / lr))
    scaler = hw.grad_scaler()
    ema = make_ema(model, cfg["ema_decay"]) if cfg["ema_decay"] > 0 else None
    start_epoch, metrics = 0, []
    if ckpt is not None:
        start_epoch, metrics = restore_checkpoint(ckpt, model, optimizer, scheduler, ema=ema, scaler=scaler,
                                                  restore_rng=False)
        if list(ckpt.get("classes", train_set.classes)) != list(train_set.classes):
            raise DatasetError(f"the class folders of {cfg['data_root']} differ from those the run was trained on "
                               f"(e.g. {list(ckpt['classes'])[:3]}); resume on the same dataset.")
        ctx.print(f"resuming {out / 'checkpoint.pth'} after epoch {start_epoch}")
    train_model = eval_model  # (compiled once when single-process)
    if ctx.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if cfg["compile"]:
            train_model = torch.compile(train_model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    mix = mixup_cutmix(num_classes, cfg["mixup"], cfg["cutmix"])
    ctx.print(f"{len(train_set)} train / {len(val_set)} val images, {num_classes} classes; batch {cfg['batch_size']} "
              f"({per_rank} per rank), lr {lr:.2e}, {steps} steps per epoch")

    tracked = None  # fixed held-out images for the attention tracking: evenly spaced, so of many classes
    if cfg["track_attention"] and ctx.is_main:
        picks = torch.linspace(0, len(val_set) - 1, min(64, len(val_set))).round().long().unique().tolist()
        tracked = torch.stack([val_set[i][0] for i in picks]).to(device)

    # ---- epochs
    train_config = {k: cfg[k] for k in (*MODEL, *RECIPE, "data_root", "pretrained")} | {"dataset": "imagenet"}
    last_epoch = cfg["epochs"] if cfg["stop_after"] <= 0 else min(cfg["epochs"], start_epoch + cfg["stop_after"])
    for epoch in range(start_epoch, last_epoch):
        seed_everything(epoch_seed(cfg["seed"], epoch) + ctx.rank)  # dropout, drop-path, mixup: per rank and epoch
        train_sampler.set_epoch(epoch)
        log = BatchLog(train_loader)
        batches = itertools.islice(DeviceBatches(log, device, channels_last, mix), steps)
        stats = train_one_epoch(train_model, batches, optimizer, scheduler, loss_fn, device=device, epoch=epoch + 1,
                                step=epoch * steps, total=steps, ema=ema, amp_dtype=amp_dtype, scaler=scaler,
                                grad_clip=cfg["grad_clip"] or None, progress=progress,
                                desc=f"epoch {epoch + 1}/{cfg['epochs']}")
        sums = all_reduce_sum(torch.tensor([stats["train_loss"], stats["images"]], dtype=torch.float64, device=device))
        seconds = float(all_reduce_max(torch.tensor([stats["seconds"]], dtype=torch.float64, device=device)))
        row = {"epoch": epoch + 1, "train_loss": float(sums[0]) / ctx.world_size, "lr": scheduler.get_last_lr()[0],
               "train_images": int(sums[1]), "img_per_s": float(sums[1]) / max(seconds, 1e-9), "seconds": seconds}
        if ctx.distributed:  # which images each rank trained on: the shards must be disjoint
            seen = all_gather_objects(log.indices)
            row["rank_images"] = [len(s) for s in seen]
            row["rank_overlap"] = sum(map(len, seen)) - len(set().union(*seen))
        row["skipped_images"] = report_skipped(log, ctx, f"epoch {epoch + 1}")
        vlog = eval_loader(val_set, per_rank, cfg, ctx)
        res = evaluate(eval_model, DeviceBatches(vlog, device, channels_last), device=device, amp_dtype=amp_dtype,
                       progress=progress, desc="val")
        row.update(val_loss=res["loss"], val_top1=res["top1"], val_top5=res["top5"])
        row["skipped_images"] += report_skipped(vlog, ctx, "validation")
        if ema is not None:
            elog = DeviceBatches(eval_loader(val_set, per_rank, cfg, ctx), device, channels_last)
            res = evaluate(ema.module, elog, device=device, amp_dtype=amp_dtype, progress=progress, desc="val EMA")
            row.update(ema_val_loss=res["loss"], ema_val_top1=res["top1"], ema_val_top5=res["top5"])
        if tracked is not None:  # the bare model, eval mode, no RNG: training is unchanged
            row.update(track_attention(model, tracked)[0])
        metrics.append(row)
        ema_text = f", EMA top-1 {row['ema_val_top1']:.2f}%" if ema is not None else ""
        ctx.print(f"epoch {epoch + 1}/{cfg['epochs']}: train loss {row['train_loss']:.4f}, val loss "
                  f"{row['val_loss']:.4f}, top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%{ema_text}, "
                  f"{row['img_per_s']:.0f} img/s")
        if ctx.is_main:
            state = checkpoint_state(model, optimizer, scheduler, epoch=epoch + 1, metrics=metrics,
                                     train_config=train_config, ema=ema, scaler=scaler,
                                     classes=list(train_set.classes))
            save_checkpoint(state, out / "checkpoint.pth")
            save_metrics(metrics, out / "metrics.json", config=train_config, world_size=ctx.world_size,
                         ran_as=hw.record() | {"compiled": cfg["compile"]})
            plot_curves(metrics, out / "curves.png", title=f"{cfg['model']} on {cfg['data_root']}")
            plot_attention_curves(metrics, out / "attention_curves.png", title=f"{cfg['model']} on {cfg['data_root']}")
        barrier()
    if last_epoch < cfg["epochs"]:
        ctx.print(f"stopped after epoch {last_epoch} (--stop-after {cfg['stop_after']}); continue with --resume")
    elif last_epoch > start_epoch:
        ctx.print(f"saved {out / 'checkpoint.pth'}, {out / 'metrics.json'}, {out / 'curves.png'}")
    else:
        ctx.print(f"the run already has its {cfg['epochs']} epochs; raise --epochs to train on")


def main(argv: list[str] | None = None) -> None:
    cfg, given = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        run(cfg, given)
    except NonFiniteLossError as e:
        sys.exit(f"error: {e} The last finished epoch is in {Path(cfg['out']) / 'checkpoint.pth'} (--resume).")
    except (ValueError, FileNotFoundError) as e:  # UsageError, DatasetError, CheckpointError are ValueErrors
        sys.exit(f"error: {e}" if rank == 0 else 1)  # the same on every rank: rank 0 says it
    except KeyboardInterrupt:
        sys.exit(f"interrupted; the last finished epoch is in {Path(cfg['out']) / 'checkpoint.pth'} (--resume)")
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
