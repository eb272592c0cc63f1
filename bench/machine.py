"""What this machine gives torch, and so why a run takes what it takes: `python -m bench.machine`.

Prints the CPU / GPU capabilities torch sees and what `--amp auto` picks from them, matmul GFLOP/s in fp32 and
bf16 (and fp16 on a GPU), and the train-step img/s of the MNIST default model (`mnist.train`) in each precision.

    python -m bench.machine                    # the device --device auto picks
    python -m bench.machine --device cpu --compile
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m bench.machine
        # an AVX512 CPU capped to AVX2: the fp32 GFLOP/s drop to the AVX2 figure when the cap took effect
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from utils import hardware
from utils.config import build_parser
from utils.optim import make_optimizer
from utils.training import compile_or_eager

PROG = "python -m bench.machine"
CONFIG = {  # name -> (default, help); every entry is a flag (batch_size -> --batch-size)
    "device": ("auto", hardware.DEVICE_HELP),
    "threads": (0, "CPU threads (0: torch's default, one per core)"),
    "compile": (False, "also time the train step compiled (as mnist.train does; ~30 s per precision)"),
    "batch_size": (256, "train-step batch, as mnist.train's"),
    "seconds": (3.0, "timing per measurement"),
}
PRECISIONS = {"cpu": ("none", "bf16"), "cuda": ("none", "bf16", "fp16"), "mps": ("none", "fp16")}


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def rate(fn: Callable[[], None], device: torch.device, seconds: float) -> float:
    """Calls per second of `fn`: best of 3 rounds of ~seconds/3 each, after a warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    per_round = max(1, int(seconds / 3 / max(time.perf_counter() - start, 1e-6)))
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(per_round):
            fn()
        sync(device)
        best = max(best, per_round / (time.perf_counter() - start))
    return best


def matmul_gflops(device: torch.device, amp: str, seconds: float) -> float:
    n = 1024 if device.type == "cpu" else 8192  # emulated bf16 on a CPU: ~1 s a product at 1024
    dtype = hardware.DTYPES[amp] or torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 * rate(lambda: a @ b, device, seconds) / 1e9


def train_img_per_s(device: torch.device, amp: str, compile_: bool, batch: int, seconds: float) -> float:
    from mnist.train import MODEL, RECIPE, build_model

    model = build_model({k: v for k, (v, _) in MODEL.items()}).to(device).train()
    for block in model.blocks:  # as mnist.train does
        block.attn.fused_attn = device.type != "cpu"
    hw = hardware.Hardware(device, amp, "")
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    net = compile_or_eager(model, x, hw.amp_dtype) if compile_ else model
    opt = make_optimizer(RECIPE["optimizer"][0], model, 1e-3, 0.05, device, amp_dtype=hw.amp_dtype)  # as mnist.train
    scaler = hw.grad_scaler()

    def step():
        with hw.autocast():
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return batch * rate(step, device, seconds)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(PROG, __doc__, {"options": CONFIG})
    args = parser.parse_args(argv)
    if args.threads < 0:
        sys.exit(f"error: --threads {args.threads} must be 0 (torch's default) or a positive count.")
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size {args.batch_size} must be at least 1.")
    if args.seconds <= 0:
        sys.exit(f"error: --seconds {args.seconds} must be positive (e.g. 3).")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        hw = hardware.resolve(args.device, "auto")
    except ValueError as e:
        sys.exit(f"error: {e}")
    dev = hw.device
    print(f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.python_implementation()} "
          f"{platform.python_version()}")
    print(f"cpu: {cpu_name()}; {torch.get_num_threads()} threads; ISA {hardware.cpu_isa()}; "
          f"AVX512-BF16 {torch.cpu._is_avx512_bf16_supported()}, AMX {torch.cpu._is_amx_tile_supported()} -> "
          f"native bf16 {hardware.cpu_native_bf16()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}, compute capability "
                  f"{'.'.join(map(str, torch.cuda.get_device_capability(i)))}")
    print(f"--device auto --amp auto: {hw.summary}\n")
    print("| precision | matmul GFLOP/s | MNIST default train img/s (eager) |"
          + (" compiled |" if args.compile else "") + "\n|---|---:|---:|" + ("---:|" if args.compile else ""))
    for amp in PRECISIONS[dev.type]:
        row = [matmul_gflops(dev, amp, args.seconds), train_img_per_s(dev, amp, False, args.batch_size, args.seconds)]
        if args.compile:
            row.append(train_img_per_s(dev, amp, True, args.batch_size, args.seconds))
        label = ("fp32" if amp == "none" else amp) + (" (auto)" if amp == hw.amp else "")
        print(f"| {label} | " + " | ".join(f"{v:.0f}" if v >= 10 else f"{v:.2f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
