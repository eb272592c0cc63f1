"""utils.hardware: the device / precision choice for each kind of hardware, with torch's queries faked."""

from __future__ import annotations

import pytest
import torch

from utils import hardware


@pytest.fixture
def fake(monkeypatch):
    """fake(cpu="avx2" | "avx512" | "avx512_bf16" | "amx", cuda=None | (major, minor), mps=False)."""

    def setup(cpu: str = "avx2", cuda: tuple[int, int] | None = None, mps: bool = False) -> None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2" if cpu == "avx2" else "AVX512")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: cpu == "avx512_bf16")
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: cpu == "amx")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda is not None))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "FakeGPU")
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    return setup


@pytest.mark.parametrize("cpu, amp", [("avx2", "none"), ("avx512", "none"), ("avx512_bf16", "bf16"), ("amx", "bf16")])
def test_cpu_takes_bf16_only_where_native(fake, cpu, amp):
    fake(cpu=cpu)
    hw = hardware.resolve("auto", "auto")
    assert (hw.device.type, hw.amp) == ("cpu", amp)
    assert hw.summary.endswith("-> fp32" if amp == "none" else "-> bf16")
    assert ("no native bf16" in hw.summary) == (amp == "none")
    threads = torch.get_num_threads()
    assert f"cpu, {threads} thread{'s' * (threads > 1)}, " in hw.summary


def test_isa_caps_turn_native_bf16_off(fake, monkeypatch):
    fake(cpu="avx512_bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert hardware.resolve("cpu").amp == "none"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert hardware.resolve("cpu").amp == "bf16"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ATEN_CPU_CAPABILITY=avx2
    assert hardware.resolve("cpu").amp == "none"


@pytest.mark.parametrize("capability, amp", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_cuda_bf16_from_compute_capability_8(fake, capability, amp):
    fake(cuda=capability, mps=True)  # cuda wins over mps
    hw = hardware.resolve("auto", "auto")
    assert (hw.device, hw.amp) == (torch.device("cuda"), amp)
    assert f"sm {capability[0]}.{capability[1]}" in hw.summary
    assert (hw.amp_dtype, hw.summary.endswith("fp16 + GradScaler")) == (hardware.DTYPES[amp], amp == "fp16")


def test_mps_fp16_with_scaler(fake):
    fake(mps=True)
    hw = hardware.resolve()
    assert (hw.device.type, hw.amp) == ("mps", "fp16")


def test_nothing_but_a_cpu(fake):
    fake()
    assert hardware.resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1", "mps"):
        with pytest.raises(ValueError, match=f"--device {name}: no"):
            hardware.resolve(name)
    with pytest.raises(ValueError, match="'tpu' is not a device"):
        hardware.resolve("tpu")
    with pytest.raises(ValueError, match="--amp 'fp8' is unknown"):
        hardware.resolve("cpu", "fp8")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        hardware.resolve("cpu", "fp16")


def test_forced_bf16_where_emulated_warns_once_and_runs(fake, capsys):
    fake(cpu="avx2")
    hw = hardware.resolve("cpu", "bf16")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: --amp bf16") and "emulated" in err[0]
    assert hw.amp == "bf16" and hw.summary.endswith("-> bf16 (--amp bf16)")
    with hw.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    fake(cpu="amx")
    hardware.resolve("cpu", "bf16")  # native: no warning
    hardware.resolve("cpu", "none")
    assert capsys.readouterr().err == ""


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
def test_fp16_gets_a_grad_scaler():
    assert hardware.Hardware(torch.device("cpu"), "none", "").grad_scaler() is None
    assert isinstance(hardware.Hardware(torch.device("cuda"), "fp16", "").grad_scaler(), torch.amp.GradScaler)


SRUN = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}


@pytest.mark.parametrize("cpus, env, workers", [(2, {}, 2), (64, {}, 8), (8, {"LOCAL_WORLD_SIZE": "4"}, 2),
                                                (8, SRUN, 1), (1, {"LOCAL_WORLD_SIZE": "2"}, 0)])
def test_data_workers_follow_the_cpus(monkeypatch, cpus, env, workers):
    """imagenet.train's --workers default: not 8 on a 2-core box (PyTorch warns it may freeze)."""
    monkeypatch.setattr(hardware, "cpu_count", lambda: cpus)
    assert hardware.data_workers(env=env) == workers
