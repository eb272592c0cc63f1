"""One prepared check of the GPU paths (bf16, torch.compile, fused AdamW, NCCL, the trainers' speed), on synthetic data.

    python -m bench.gpu_check                                   # one GPU, ~8 minutes (--budget-minutes)
    python -m bench.gpu_check --output $OUT/gpu_check.md        # where the table (and <stem>_logs/) should go
    python -m bench.gpu_check --device cpu                      # the small variant: tiny sizes, ~1 minute on 2 cores
    python -m bench.gpu_check --stages imagenet speed           # some stages only

Stages, each in its own subprocess with its own timeout (a failing stage is reported, the others still run):
  nccl      a 1-rank process group (NCCL; gloo on the CPU): an all-reduce and a DistributedDataParallel step
  imagenet  `torchrun --standalone --nproc_per_node=1 -m imagenet.train` of ViT-S/16 (bf16, torch.compile, fused
            AdamW) on a synthetic ImageFolder written to a temp dir; SIGUSR1 to the training process after epoch 1,
            which checkpoints and exits 138 (torchrun reports 1); the same command again must finish every planned
            optimizer step. With one process imagenet.train forms no process group: the nccl stage covers NCCL.
  speed     train img/s of this repo's ViT-Ti/S/B (`imagenet.train.model_from_config`) and timm's same models, same
            batch, bf16 autocast, fused AdamW and torch.compile, timed interleaved (bench.vit_speed.measure)
  mnist     `python -m mnist.train --minutes 2` on a synthetic MNIST in the idx format (or --mnist-root)

Writes one markdown table (stage, status, seconds, img/s, detail; torch, device and date above it) to stdout and to
--output (default: runs/gpu_check.md), the tail of each failed stage's log below it, and every stage's log in
<out stem>_logs/. Exit status 1 when any stage failed. Data, checkpoints and runs live in a temp dir, removed at the
end (--keep keeps it). Linux only (/proc finds torchrun's worker).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from utils.config import HelpFormatter

REPO = Path(__file__).resolve().parents[1]
STAGES = ("nccl", "imagenet", "speed", "mnist")
TIMM_NAMES = {"vit_ti": "vit_tiny_patch16_224", "vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224"}
WEIGHTS = {"nccl": 0.05, "imagenet": 0.55, "speed": 0.40}  # shares of the budget that MNIST's run leaves
MNIST_SLACK_S = 45.0  # MNIST's timeout beyond --mnist-minutes: the final evaluation, the exit, a slow start
MIN_STAGE_S = 20.0
RESULT = "RESULT "  # the prefix of a worker's result lines (one JSON object each)


@dataclass(frozen=True)
class Plan:
    """Sizes of every stage: `gpu()` or the small `cpu()` variant, then command-line overrides."""

    model: str = "vit_s"
    arch: tuple[str, ...] = ()  # imagenet.train size flags beyond --model
    amp: str = "bf16"
    compile: bool = True
    classes: int = 10
    src_px: int = 64  # side of the synthetic JPEGs (the trainer crops and resizes them to --img-size)
    val_per_class: int = 20
    batch: int = 256
    steps_per_epoch: int = 70
    epochs: int = 3
    workers: int = 8
    signal_delay_s: float = 4.0  # after the epoch-1 line (validation, checkpoint, plots follow it): into epoch 2
    speed_models: tuple[str, ...] = ("vit_s", "vit_b", "vit_ti")  # the order they run in: what the budget may cut
    speed_sizes: dict[str, int] = field(default_factory=dict)  # overrides of both implementations (depth, img_size)
    speed_batch: int = 256
    speed_warmup: int = 3  # calls before timing; the first compiles
    speed_rounds: int = 5
    speed_iters: int = 4
    mnist_sizes: tuple[int, int] = (60000, 10000)  # synthetic train / test digits (the real sizes)
    mnist_epochs: int = 0  # > 0: exactly this many epochs (--minutes 0) instead of --mnist-minutes
    mnist_args: tuple[str, ...] = ()  # mnist.train flags beyond --minutes, --epochs, --data-root, --out, --device

    @staticmethod
    def gpu() -> Plan:
        return Plan()

    @staticmethod
    def cpu() -> Plan:
        return Plan(model="vit_ti", arch=("--embed-dim", "32", "--num-heads", "2", "--depth", "2", "--img-size", "32",
                                          "--patch-size", "16", "--no-track-attention"),
                    amp="none", compile=False, classes=4, src_px=40, val_per_class=2, batch=8, steps_per_epoch=3,
                    workers=0, signal_delay_s=0.0, speed_models=("vit_ti",), speed_sizes={"depth": 2, "img_size": 32},
                    speed_batch=16, speed_warmup=1, speed_rounds=2, speed_iters=2, mnist_sizes=(2048, 512),
                    mnist_epochs=1, mnist_args=("--no-compile", "--no-track-attention"))

    @property
    def precision(self) -> str:
        return "fp32" if self.amp == "none" else self.amp

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def train_per_class(self) -> int:
        return math.ceil(self.steps_per_epoch * self.batch / self.classes)


@dataclass
class Row:
    """One line of the table; `logs` (not shown in it) are tailed below the table when the row failed."""

    stage: str
    status: str  # "ok" | "FAILED" | "skipped"
    seconds: float
    img_s: float | None = None
    detail: str = ""
    logs: list[Path] = field(default_factory=list)


class Budget:
    """Timeouts from one deadline: MNIST gets its fixed need, the other stages their WEIGHTS' share of the rest."""

    def __init__(self, seconds: float, stages: list[str], mnist_s: float):
        self.deadline = time.monotonic() + seconds
        self.weights = {s: WEIGHTS[s] for s in stages if s in WEIGHTS}
        self.fixed = {"mnist": mnist_s} if "mnist" in stages else {}

    def take(self, stage: str) -> float:
        """Seconds `stage` may use (at least MIN_STAGE_S); what a stage leaves unused goes to the later ones."""
        left = self.deadline - time.monotonic()
        if stage in self.fixed:
            return max(min(self.fixed.pop(stage), left), MIN_STAGE_S)
        weight = self.weights.pop(stage)
        free = left - sum(self.fixed.values())
        return max(free * weight / (weight + sum(self.weights.values())), MIN_STAGE_S)


# ------------------------------------------------------------------------------------------------------------- data
def class_images(rng: np.random.Generator, c: int, n: int, px: int) -> np.ndarray:
    """(n, px, px, 3) uint8: class `c`'s colour plus +-40 of blocky (8 px) noise: learnable, small as JPEG."""
    colour = np.random.default_rng(1000 + c).integers(50, 206, 3)
    blocks = rng.integers(-40, 41, (n, math.ceil(px / 8), math.ceil(px / 8), 3))
    noise = blocks.repeat(8, axis=1).repeat(8, axis=2)[:, :px, :px]
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def make_imagefolder(root: Path, plan: Plan, seed: int = 0) -> Path:
    """ROOT/{train,val}/c<k>/<i>.jpg: plan.classes classes, enough training images for plan.steps_per_epoch full
    batches of plan.batch per epoch. -> root."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", plan.train_per_class), ("val", plan.val_per_class)):
        for c in range(plan.classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i, a in enumerate(class_images(rng, c, n, plan.src_px)):
                Image.fromarray(a).save(folder / f"{i}.jpg", quality=90)
    return root


def digit_templates(size: int = 22) -> np.ndarray:
    """(10, 36, 36) uint8: the digits 0-9 drawn white on black in PIL's default font, centred (28 px + a 4 px
    margin for shifts)."""
    from PIL import ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        font = ImageFont.load_default()
    out = []
    for d in range(10):
        img = Image.new("L", (36, 36))
        ImageDraw.Draw(img).text((18, 18), str(d), fill=255, font=font, anchor="mm")
        out.append(np.asarray(img))
    return np.stack(out)


def fake_digits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n (28, 28) uint8 digits (a drawn 0-9, shifted up to 4 px, on noise 0-59) and their uint8 labels: learnable,
    so the test accuracy says whether training works."""
    labels = rng.integers(0, 10, n).astype(np.uint8)
    dy, dx = rng.integers(0, 9, (2, n, 1, 1))
    grid = np.arange(28)
    images = digit_templates()[labels[:, None, None], dy + grid[None, :, None], dx + grid[None, None, :]]
    return np.maximum(images, rng.integers(0, 60, (n, 28, 28))).astype(np.uint8), labels


def make_mnist(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (uncompressed idx, as torchvision reads them)
    with synthetic digits. -> root (mnist.train's --data-root)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = fake_digits(rng, n)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


# -------------------------------------------------------------------------------------------------------- processes
def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start `cmd` in the repo root, in a session of its own, stdout -> <log>.out and stderr -> <log>.err."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, env=env, start_new_session=True)


def parent_pids() -> dict[int, int]:
    """{pid: parent pid} of every process (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid` (torchrun starts its workers in sessions of their own)."""
    parents, found, todo = parent_pids(), [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process groups of `proc` and of all its descendants, then reap `proc`."""
    own = os.getpgid(0)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            group = os.getpgid(pid)
            if group != own:
                os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
    proc.wait()


def finish(proc: subprocess.Popen, timeout: float) -> int | None:
    """`proc`'s exit status, or None when it ran past `timeout` seconds (it and its descendants are killed)."""
    try:
        return proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return None


def run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, str, str]:
    """Run `cmd` to its end or `timeout` -> (exit status or None on timeout, stdout, stderr)."""
    rc = finish(spawn(cmd, log), timeout)
    return rc, read(f"{log}.out"), read(f"{log}.err")


def read(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def reason(rc: int | None, timeout: float, *texts: str) -> str:
    """One line saying why a process failed: the timeout, else its last `error...` line or exception line, else its
    last line of output, with its exit status."""
    if rc is None:
        return f"timeout: still running after {timeout:.0f} s (the stage's share of --budget-minutes)"
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    pattern = re.compile(r"^(error\b|[\w.]*(Error|Exception)\b)")
    picked = next((line for line in reversed(lines) if pattern.match(line)), lines[-1] if lines else "no output")
    return f"exit {rc}: {picked[:300]}"


def results(stdout: str) -> list[dict[str, Any]]:
    """The JSON objects of a worker's RESULT lines."""
    return [json.loads(line[len(RESULT):]) for line in stdout.splitlines() if line.startswith(RESULT)]


def emit(**result: Any) -> None:
    print(RESULT + json.dumps(result), flush=True)


def worker_command(args: argparse.Namespace, worker: str) -> list[str]:
    """This script again, as the `worker` stage's subprocess, with the same sizes."""
    cmd = [sys.executable, "-m", "bench.gpu_check", "--worker", worker, "--device", args.device]
    if args.speed_models:
        cmd += ["--speed-models", *args.speed_models]
    return cmd


# ------------------------------------------------------------------------------------------------------------- nccl
def worker_nccl(args: argparse.Namespace) -> None:
    """In the worker: a 1-rank process group (NCCL on CUDA, gloo on the CPU), an all-reduce and one DDP backward
    (its gradient all-reduce); emits {"backend", "ok", "detail"}."""
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        dev = torch.device("cuda", dev.index or 0)
        torch.cuda.set_device(dev)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60), **({"device_id": dev} if cuda else {}))
    try:
        t = torch.arange(4.0, device=dev)
        dist.all_reduce(t)
        model = DistributedDataParallel(torch.nn.Linear(64, 8).to(dev), device_ids=[dev] if cuda else None)
        model(torch.randn(32, 64, device=dev)).square().mean().backward()
        grads_ok = all(bool(p.grad.isfinite().all()) for p in model.parameters())
        ok = grads_ok and t.tolist() == [0.0, 1.0, 2.0, 3.0]
        version = "NCCL " + ".".join(map(str, torch.cuda.nccl.version())) if cuda else "gloo"
        del model  # DDP's reducer must go before its process group (else a crash at exit: "terminate called ...")
    finally:
        dist.destroy_process_group()
    emit(backend=backend, ok=ok, detail=f"{version}: all_reduce and a DDP backward on {dev}"
         + ("" if ok else ": wrong values"))
    sys.stderr.flush()
    # The verdict is out. Skip the interpreter's teardown: there, about 1 run in 20 of this 1-rank gloo group
    # aborts ("terminate called without an active exception", torch 2.14) after the check itself has passed.
    os._exit(0)


def stage_nccl(args: argparse.Namespace, logs: Path, timeout: float) -> list[Row]:
    start = time.monotonic()
    log = logs / "nccl"
    rc, out, err = run_logged(worker_command(args, "nccl"), log, timeout)
    found = results(out)
    backend = found[0]["backend"] if found else ("nccl" if args.device.startswith("cuda") else "gloo")
    ok = rc == 0 and bool(found) and found[0]["ok"]
    detail = found[0]["detail"] if found else reason(rc, timeout, err, out)
    return [Row(f"{backend} all-reduce + DDP", "ok" if ok else "FAILED", time.monotonic() - start, None, detail,
                [Path(f"{log}.err"), Path(f"{log}.out")])]


# --------------------------------------------------------------------------------------------------------- imagenet
def imagenet_command(args: argparse.Namespace, plan: Plan, data: Path, out: Path) -> list[str]:
    """torchrun, one process, of imagenet.train with the plan's model, precision and sizes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
            "imagenet.train", "--data-root", str(data), "--output", str(out), "--model", plan.model, *plan.arch,
            "--device", args.device, "--amp", plan.amp, "--compile" if plan.compile else "--no-compile",
            "--epochs", str(plan.epochs), "--steps-per-epoch", str(plan.steps_per_epoch), "--batch-size",
            str(plan.batch), "--workers", str(plan.workers), "--warmup-epochs", "1", "--min-lr", "1e-6",
            "--no-progress"]  # (--min-lr: the cpu variant's batch of 8 scales the peak lr to 7.8e-6)


def wait_for_line(proc: subprocess.Popen, path: Path, pattern: str, timeout: float) -> re.Match | None:
    """The first match of `pattern` (multiline) in the growing file `path`; None if `proc` ended or `timeout`
    seconds passed first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(pattern, read(path), re.MULTILINE)
        if m or proc.poll() is not None:
            return m
        time.sleep(0.2)
    return None


def signal_trainer(torchrun_pid: int, signum: int) -> list[int]:
    """Send `signum` to torchrun's imagenet.train worker process(es) (its children); -> their pids."""
    pids = [p for p, parent in parent_pids().items() if parent == torchrun_pid
            and "imagenet.train" in read(f"/proc/{p}/cmdline").replace("\0", " ")]
    for pid in pids:
        os.kill(pid, signum)
    return pids


def checkpoint_position(path: Path) -> tuple[int, int, int]:
    """(completed epochs, optimizer steps into the next epoch, optimizer steps in all) of an imagenet.train
    checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    steps = next(iter(ckpt["optimizer"]["state"].values()))["step"]
    return int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0)), int(float(steps))


def epochs_metrics(out: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((out / "metrics.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError):
        return []


def first_run(plan: Plan, cmd: list[str], log: Path, timeout: float) -> tuple[Row, str, str]:
    """The run that gets SIGUSR1 after its epoch-1 line -> (row "imagenet train", why the stop did not work or "",
    the exit statuses)."""
    start = time.monotonic()
    proc = spawn(cmd, log)
    try:
        line = wait_for_line(proc, Path(f"{log}.out"), r"^epoch 1/\d+: .*$", timeout)
        if line is not None:
            time.sleep(plan.signal_delay_s)
            signalled = signal_trainer(proc.pid, signal.SIGUSR1)
        left = timeout - (time.monotonic() - start)
        rc = finish(proc, left if line is None else max(left, 30.0))  # (30 s: time to write the checkpoint)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    out, err = read(f"{log}.out"), read(f"{log}.err")
    if line is None:
        why = f"no epoch-1 line: {reason(rc, timeout, err, out)}"
        return Row("imagenet train", "FAILED", time.monotonic() - start, None, why), why, ""
    rate = re.search(r"([\d.]+) img/s", line.group(0))
    row = Row("imagenet train", "ok", time.monotonic() - start, float(rate.group(1)) if rate else None,
              f"{plan.model} {plan.precision} {'compiled' if plan.compile else 'eager'}, batch {plan.batch}: "
              f"{line.group(0)}" + (" (img/s: with the compile)" if plan.compile else ""))
    return row, stop_problem(rc, signalled, out, err, timeout), exit_codes(rc, err)


def stop_problem(rc: int | None, signalled: list[int], out: str, err: str, timeout: float) -> str:
    """Why the SIGUSR1 stop did not work, or "": torchrun exits 1 (ChildFailedError, with the worker's 138 in its
    report) or 138, and the trainer says it saved a checkpoint or stopped after an epoch."""
    if not signalled:
        return "no imagenet.train process found under torchrun to send SIGUSR1 to"
    if rc == 0:
        return "the run ended before SIGUSR1 arrived (raise --steps-per-epoch)"
    if rc not in (1, 128 + signal.SIGUSR1) or "SIGUSR1: s" not in out:
        return f"after SIGUSR1: {reason(rc, timeout, err, out)}"
    return ""


def exit_codes(rc: int | None, err: str) -> str:
    """"torchrun exit 1, worker 138": torchrun's status and its workers' (from its failure report)."""
    workers = list(dict.fromkeys(re.findall(r"exitcode\s*:\s*(-?\d+)", err)))  # (each is in it twice)
    return f"torchrun exit {rc}" + (f", worker {', '.join(workers)}" if workers else "")


def second_run(plan: Plan, cmd: list[str], out: Path, log: Path, timeout: float) -> tuple[str, float | None]:
    """The same command again -> (why it failed or "", the last epoch's img/s); it must continue and end with
    every planned optimizer step in its checkpoint."""
    rc, stdout, stderr = run_logged(cmd, log, timeout)
    if rc != 0:
        return f"the same command again: {reason(rc, timeout, stderr, stdout)}", None
    if "continuing" not in stdout:
        return "the same command again started over instead of continuing", None
    epoch, _, steps = checkpoint_position(out / "checkpoint.pth")
    if (epoch, steps) != (plan.epochs, plan.total_steps):
        return (f"the continued run ended at epoch {epoch} with {steps} optimizer steps, planned {plan.epochs} and "
                f"{plan.total_steps}"), None
    rows = epochs_metrics(out)
    rate = rows[-1].get("img_per_s") if rows else None
    return "", rate


def continue_row(plan: Plan, cmd: list[str], out: Path, log: Path, timeout: float, stop: tuple[str, str],
                 files: list[Path]) -> Row:
    """Row "SIGUSR1 continue": where the signalled run's checkpoint stands, then the same command again. `stop`:
    (why the stop did not work or "", the exit statuses)."""
    start, rate = time.monotonic(), None
    problem, codes = stop
    try:
        if not problem:
            epoch, step, _ = checkpoint_position(out / "checkpoint.pth")
            at = f"step {step}/{plan.steps_per_epoch} of epoch {epoch + 1}" if step else f"the end of epoch {epoch}"
            problem, rate = second_run(plan, cmd, out, log, timeout)
    except Exception as e:  # no or an unreadable checkpoint
        problem = one_line(e)
    detail = problem or (f"SIGUSR1 ({codes}): checkpoint at {at}; the same command continued to {plan.total_steps}/"
                         f"{plan.total_steps} optimizer steps, {plan.epochs} epochs (img/s: the last epoch's)")
    return Row("SIGUSR1 continue", "FAILED" if problem else "ok", time.monotonic() - start, rate, detail, files)


def stage_imagenet(args: argparse.Namespace, plan: Plan, work: Path, logs: Path, timeout: float) -> list[Row]:
    """Synthetic ImageFolder, the signalled torchrun run (70 % of `timeout`), the same command again -> rows
    "imagenet train" and "SIGUSR1 continue"."""
    start = time.monotonic()
    data = make_imagefolder(work / "imagefolder", plan)
    made_s = time.monotonic() - start
    out = work / "imagenet_run"
    cmd = imagenet_command(args, plan, data, out)
    log1, log2 = logs / "imagenet_1", logs / "imagenet_2"
    files = [Path(f"{p}.{s}") for p in (log1, log2) for s in ("err", "out")]
    row, problem, codes = first_run(plan, cmd, log1, 0.7 * (timeout - made_s))
    row.detail += f"; {plan.classes * plan.train_per_class} synthetic images made in {made_s:.1f} s"
    row.logs = files[:2]
    if row.status != "ok":
        return [row, Row("SIGUSR1 continue", "FAILED", 0.0, None, "not reached: the first run failed")]
    left = timeout - (time.monotonic() - start)
    return [row, continue_row(plan, cmd, out, log2, left, (problem, codes), files)]


# ------------------------------------------------------------------------------------------------------------ speed
def speed_model(name: str, impl: str, plan: Plan, device: torch.device) -> torch.nn.Module:
    """impl "ours": this repo's ViT as imagenet.train builds it; "timm": timm's same model (ImportError without
    timm). 1000 classes, the recipe's drop_path, plan.speed_sizes; in training mode on `device`."""
    from imagenet.train import MODEL, RECIPE, model_from_config

    cfg = {k: v for k, (v, _) in {**MODEL, **RECIPE}.items()} | {"model": name} | plan.speed_sizes
    if impl == "ours":
        model = model_from_config(cfg, 1000)
    else:
        import timm

        model = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000,
                                  drop_path_rate=cfg["drop_path"], **plan.speed_sizes)
    model.to(device).train()
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def speed_step(model: torch.nn.Module, plan: Plan, hw, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One synchronised training step (bench.vit_speed.train_step: cross-entropy, backward, fused AdamW) of the
    compiled `model` under the run's autocast, as a no-argument callable."""
    from bench.vit_speed import train_step
    from utils.optim import adamw

    net = torch.compile(model) if plan.compile else model
    step = train_step(net, x, y, adamw(model, 1e-3, 0.05, hw.device))

    def run() -> None:
        with hw.autocast():
            step()
        if hw.device.type == "cuda":
            torch.cuda.synchronize(hw.device)
    return run


def warm_up(run: Callable[[], None], calls: int) -> float:
    """Call `run` `calls` times; -> seconds of the first call (the compile)."""
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    for _ in range(calls - 1):
        run()
    return first


def one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def time_pair(name: str, plan: Plan, hw) -> None:
    """Emit {"model", "impl", "seconds", "img_s" + "first_step_s" | "error" | "skipped"} for ours and timm's
    `name`: a (B, 3, S, S) random batch, plan.speed_warmup calls, then both timed interleaved (median img/s of
    plan.speed_rounds rounds of plan.speed_iters steps)."""
    from bench.vit_speed import measure

    start = time.perf_counter()
    size = plan.speed_sizes.get("img_size", 224)
    x = torch.randn(plan.speed_batch, 3, size, size, device=hw.device)
    x = x.contiguous(memory_format=torch.channels_last) if hw.device.type == "cuda" else x
    y = torch.randint(0, 1000, (plan.speed_batch,), device=hw.device)
    tasks, first = {}, {}
    for impl in ("ours", "timm"):
        try:
            tasks[impl] = speed_step(speed_model(name, impl, plan, hw.device), plan, hw, x, y)
            first[impl] = warm_up(tasks[impl], plan.speed_warmup)
        except ImportError as e:
            tasks.pop(impl, None)
            if impl != "timm":
                raise
            missing = "not installed" if getattr(e, "name", "") == "timm" else f"not importable ({one_line(e)})"
            emit(model=name, impl=impl, seconds=0.0, skipped=f"timm {missing}: pip install timm")
        except Exception as e:  # a compile or CUDA failure of one implementation: the other is still timed
            tasks.pop(impl, None)
            emit(model=name, impl=impl, seconds=time.perf_counter() - start, error=one_line(e))
    rates = measure(tasks, plan.speed_batch, plan.speed_rounds, plan.speed_iters) if tasks else {}
    for impl, rate in rates.items():
        emit(model=name, impl=impl, seconds=time.perf_counter() - start, img_s=rate, first_step_s=first[impl])


def worker_speed(args: argparse.Namespace, plan: Plan) -> None:
    """In the worker: time_pair for every plan.speed_models, one after the other (results as they come)."""
    from utils import hardware

    hw = hardware.resolve(args.device, plan.amp)
    if hw.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as imagenet.train
    print(f"{hw.summary}, {'compiled' if plan.compile else 'eager'}", flush=True)
    for name in plan.speed_models:
        torch.manual_seed(0)
        time_pair(name, plan, hw)
        torch._dynamo.reset()
        if hw.device.type == "cuda":
            torch.cuda.empty_cache()


def stage_speed(args: argparse.Namespace, plan: Plan, logs: Path, timeout: float) -> list[Row]:
    """Rows "speed <model> ours|timm" from the speed worker; what the timeout cut off is FAILED."""
    log = logs / "speed"
    rc, out, err = run_logged(worker_command(args, "speed"), log, timeout)
    got = {(r["model"], r["impl"]): r for r in results(out)}
    how = f"batch {plan.speed_batch}, {plan.precision}, {'compiled' if plan.compile else 'eager'}, fused AdamW"
    files, rows = [Path(f"{log}.err"), Path(f"{log}.out")], []
    for name in sorted(plan.speed_models, key=list(TIMM_NAMES).index):
        for impl in ("ours", "timm"):
            r, stage = got.get((name, impl), {}), f"speed {name} {impl}"
            if not r:
                rows.append(Row(stage, "FAILED", 0.0, None, f"not timed: {reason(rc, timeout, err, out)}", files))
            elif "skipped" in r:
                rows.append(Row(stage, "skipped", 0.0, None, r["skipped"]))
            elif "error" in r:
                rows.append(Row(stage, "FAILED", r["seconds"], None, r["error"], files))
            else:
                first = f"first step {r['first_step_s']:.1f} s" + (" (the compile)" if plan.compile else "")
                note = f"{how}; {first}; seconds: ours and timm together"
                rows.append(Row(stage, "ok", r["seconds"], r["img_s"], note))
    return rows


# ------------------------------------------------------------------------------------------------------------ mnist
def stage_mnist(args: argparse.Namespace, plan: Plan, work: Path, logs: Path, timeout: float) -> list[Row]:
    """`python -m mnist.train --minutes M` on --mnist-root or on synthetic digits -> row "mnist"."""
    start = time.monotonic()
    root = Path(args.mnist_root) if args.mnist_root else make_mnist(work / "mnist_data", *plan.mnist_sizes)
    out, log = work / "mnist_run", logs / "mnist"
    length = ["--minutes", "0", "--epochs", str(plan.mnist_epochs)] if plan.mnist_epochs else [
        "--minutes", f"{args.mnist_minutes:g}"]
    cmd = [sys.executable, "-m", "mnist.train", *length, "--data-root", str(root), "--out", str(out), "--device",
           args.device, "--no-download", "--no-progress", *plan.mnist_args]
    rc, stdout, stderr = run_logged(cmd, log, timeout)
    final = next((line for line in stdout.splitlines() if line.startswith("final:")), "")
    rows = epochs_metrics(out)
    rate = rows[-1].get("img_per_s") if rows else None
    data = f"MNIST in {root}" if args.mnist_root else f"synthetic digits {plan.mnist_sizes[0]}/{plan.mnist_sizes[1]}"
    ok = rc == 0 and bool(final)
    detail = f"{' '.join(length)} on {data}: {final[7:].split('; checkpoint')[0]}" if ok else reason(
        rc, timeout, stderr, stdout)
    return [Row("mnist", "ok" if ok else "FAILED", time.monotonic() - start, rate, detail,
                [Path(f"{log}.err"), Path(f"{log}.out")])]


# ------------------------------------------------------------------------------------------------------------ table
def header(args: argparse.Namespace) -> str:
    """Date, torch / CUDA / timm / Python versions and the device, as markdown lines."""
    dev = torch.device(args.device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        what = f"{props.name} (sm {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        what = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        timm_version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        timm_version = "not installed"
    return (f"# bench.gpu_check, {time.strftime('%Y-%m-%d %H:%M %Z')}\n\n"
            f"device: {what}; torch {torch.__version__} (CUDA {torch.version.cuda}); timm {timm_version}; "
            f"Python {platform.python_version()}\n\ncommand: `python -m bench.gpu_check {' '.join(sys.argv[1:])}`\n")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(head: str, rows: list[Row]) -> str:
    """The markdown: header, the table, then the last 15 lines of every failed row's logs."""
    lines = [head, "| stage | status | seconds | img/s | detail |", "|---|---|---:|---:|---|"]
    for r in rows:
        rate = f"{r.img_s:.1f}" if r.img_s is not None else ""
        lines.append(f"| {r.stage} | {r.status} | {r.seconds:.1f} | {rate} | {cell(r.detail)} |")
    shown = set()
    for r in rows:
        for log in (p for p in r.logs if r.status == "FAILED" and p not in shown):
            shown.add(log)
            tail = read(log).strip().splitlines()[-15:]
            if tail:
                lines += ["", f"{r.stage}: last lines of {log}", "```", *tail, "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: the small variant)")
    parser.add_argument("--output", "--out", default="runs/gpu_check.md",
                        help="the markdown table; the stages' logs go to <stem>_logs/ beside it")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="all stages together (each has a share)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    parser.add_argument("--mnist-root", default="",
                        help="a real MNIST (ROOT/MNIST/raw/...) instead of synthetic data (the default)")
    parser.add_argument("--mnist-minutes", type=float, default=2.0, help="mnist.train --minutes (cpu: 1 epoch)")
    parser.add_argument("--batch-size", type=int, default=0, help="imagenet.train batch (0: 256; cpu 8)")
    parser.add_argument("--steps-per-epoch", type=int, default=0, help="imagenet.train steps an epoch (0: 70; cpu 3)")
    parser.add_argument("--epochs", type=int, default=0, help="imagenet.train epochs, >= 3 (0: 3)")
    parser.add_argument("--workers", type=int, default=-1, help="imagenet.train data workers (-1: 8; cpu 0)")
    parser.add_argument("--speed-models", nargs="+", choices=sorted(TIMM_NAMES),
                        help="models of the speed stage (default: all; cpu: vit_ti)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir of data, checkpoints and runs")
    parser.add_argument("--worker", choices=("nccl", "speed"), help=argparse.SUPPRESS)  # a stage's subprocess
    args = parser.parse_args(argv)
    if args.epochs and args.epochs < 3:
        parser.error("--epochs must be at least 3 (SIGUSR1 arrives after epoch 1; the run must still be going)")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    """Plan.gpu() or Plan.cpu() for --device, with the size flags given."""
    plan = Plan.cpu() if torch.device(args.device).type == "cpu" else Plan.gpu()
    given = {"batch": args.batch_size, "steps_per_epoch": args.steps_per_epoch, "epochs": args.epochs}
    plan = replace(plan, **{k: v for k, v in given.items() if v > 0})
    if args.workers >= 0:
        plan = replace(plan, workers=args.workers)
    return replace(plan, speed_models=tuple(args.speed_models)) if args.speed_models else plan


def run_stage(stage: str, args: argparse.Namespace, plan: Plan, work: Path, logs: Path, timeout: float) -> list[Row]:
    """One stage's rows; an exception of this process (not the stage's subprocess) becomes a FAILED row."""
    start = time.monotonic()
    try:
        if stage == "nccl":
            return stage_nccl(args, logs, timeout)
        if stage == "imagenet":
            return stage_imagenet(args, plan, work, logs, timeout)
        if stage == "speed":
            return stage_speed(args, plan, logs, timeout)
        return stage_mnist(args, plan, work, logs, timeout)
    except Exception as e:
        return [Row(stage, "FAILED", time.monotonic() - start, None, f"{type(e).__name__}: {e}")]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from utils.hardware import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as e:
        sys.exit(f"error: {e}")
    plan = make_plan(args)
    if args.worker:
        return worker_nccl(args) if args.worker == "nccl" else worker_speed(args, plan)
    out = Path(args.output)
    logs = out.with_name(out.stem + "_logs")
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    mnist_s = (60.0 if plan.mnist_epochs else args.mnist_minutes * 60) + MNIST_SLACK_S
    budget = Budget(args.budget_minutes * 60, args.stages, mnist_s)
    rows: list[Row] = []
    try:
        for stage in STAGES:
            if stage in args.stages:
                new = run_stage(stage, args, plan, work, logs, budget.take(stage))
                for r in new:
                    print(f"[{r.stage}] {r.status} {r.seconds:.1f} s {r.detail}", flush=True)
                rows += new
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = render(header(args), rows)
    out.write_text(text)
    print(text + f"\nwritten to {out}" + (f"; data and runs kept in {work}" if args.keep else ""))
    sys.exit(1 if any(r.status == "FAILED" for r in rows) else 0)


if __name__ == "__main__":
    main()
