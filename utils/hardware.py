"""Device and precision, chosen once from what the hardware does natively; every script asks here.

    hw = resolve("auto", "auto")      # -> Hardware(device, amp, summary)
    print(hw.summary)                 # "cpu, 2 threads, AVX2, no native bf16 -> fp32"
    with hw.autocast(): loss = ...    # and hw.grad_scaler() where the choice is fp16

`--device auto` is cuda, then mps, then cpu. `--amp auto` is bf16 where the device computes in bf16 natively
(CUDA compute capability >= 8.0; CPUs with AVX512-BF16 or AMX, as torch and oneDNN are allowed to use them),
fp16 with a GradScaler on older GPUs and on Apple GPUs, and fp32 elsewhere: bf16 autocast on a CPU without
native bf16 is emulated: on an AVX2 CPU it trains ~10x slower than fp32, its matmuls ~100x (docs/mnist.md).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
DEVICE_HELP = "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps"
AMP_HELP = ("autocast: auto (bf16 where the hardware does it natively, fp16 + GradScaler on older GPUs and Apple "
            "GPUs, else fp32) | bf16 | fp16 | none (fp32)")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first one with bf16 instructions
_ONEDNN_NO_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@dataclass(frozen=True)
class Hardware:
    """The device and autocast precision a run uses, and `summary`: one line saying what was chosen and why."""

    device: torch.device
    amp: str  # "bf16" | "fp16" | "none"
    summary: str

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return DTYPES[self.amp]

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 (its gradients underflow without one), else None."""
        return torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None

    def record(self) -> dict[str, str]:
        """What metrics.json keeps of the choice."""
        return {"device": str(self.device), "amp": self.amp, "hardware": self.summary}


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast on `device` in `amp_dtype`; a no-op context for None (fp32)."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask under taskset / SLURM / containers), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def processes_per_node(env: dict[str, str] | None = None) -> int:
    """Training processes sharing this node's CPUs: torchrun's LOCAL_WORLD_SIZE, srun's SLURM_NTASKS_PER_NODE
    (for a step of several tasks), else 1."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" in env:
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_NTASKS_PER_NODE") or "1"
        return max(1, int(per_node.split("(")[0].split(",")[0]))  # "8(x2),4" -> 8
    return 1


def data_workers(most: int = 8, env: dict[str, str] | None = None) -> int:
    """Data-loading processes per training process: the CPUs this process may use, shared by the processes of the
    node, at most `most` (PyTorch warns that more workers than CPUs may freeze a DataLoader). 2 on a 2-core box."""
    return max(0, min(most, cpu_count() // processes_per_node(env)))


def cpu_isa() -> str:
    """The vector ISA torch's CPU kernels use here: "AVX2", "AVX512", "DEFAULT", ... (ATEN_CPU_CAPABILITY caps it)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512-BF16 or AMX) and neither ATEN_CPU_CAPABILITY nor
    ONEDNN_MAX_CPU_ISA keeps torch from using them."""
    has = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    onednn_cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return has and cpu_isa().startswith("AVX512") and onednn_cap not in _ONEDNN_NO_BF16


def cuda_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 (A100, RTX 30xx) or newer."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda, then mps, then cpu; ValueError (one sentence) for a device that is not here."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use {DEVICE_HELP}.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here; use --device cpu (or auto).")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here (cuda:0..).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: no Apple GPU (MPS) here; use --device cpu (or auto).")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: only cpu, cuda and mps are supported.")
    return device


def _native(device: torch.device) -> tuple[str, str]:
    """(the fastest correct autocast choice, the reason) for `device`."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm {major}.{minor})"
        if cuda_native_bf16(device):
            return "bf16", f"{name}, native bf16"
        return "fp16", f"{name}, no native bf16"
    if device.type == "mps":
        return "fp16", "Apple GPU, native fp16"
    native, threads = cpu_native_bf16(), torch.get_num_threads()
    why = f"{threads} thread{'s' * (threads > 1)}, {cpu_isa()}, {'native' if native else 'no native'} bf16"
    return ("bf16" if native else "none"), why


def resolve(device: str | torch.device = "auto", amp: str = "auto", *, warn=None) -> Hardware:
    """Device and precision for a run. amp="auto" takes what the device does natively; an explicit "bf16" where
    bf16 is emulated runs after one warning line (on stderr, or through `warn`); ValueError for what cannot run."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp {amp!r} is unknown; use one of {', '.join(AMP_CHOICES)}.")
    dev = resolve_device(device)
    best, why = _native(dev)
    chosen = best if amp == "auto" else amp
    if chosen == "fp16" and dev.type == "cpu":
        raise ValueError("--amp fp16 needs a GPU; on the CPU use auto, bf16 or none.")
    if chosen == "bf16" and best != "bf16":
        message = (f"warning: --amp bf16 on {dev.type} ({why}): bf16 is emulated here and runs much slower than "
                   f"{'fp32' if best == 'none' else best}; --amp auto picks {'fp32' if best == 'none' else best}.")
        (warn or (lambda m: print(m, file=sys.stderr, flush=True)))(message)
    label = "fp32" if chosen == "none" else chosen + (" + GradScaler" if chosen == "fp16" else "")
    how = "" if amp == "auto" else f" (--amp {amp})"
    return Hardware(dev, chosen, f"{dev}, {why} -> {label}{how}")
