"""One process per device under `torchrun` or `srun`, or a single process: the same code either way.

    ctx = init_distributed("cuda")   # torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or SLURM's; NCCL on GPU, gloo on CPU
    ctx.print("only rank 0 prints")
    total = all_reduce_sum(torch.tensor(...))
    stop = StopSignal()              # SIGTERM / SIGUSR1 -> stop() is True on every rank at the same step
    DataLoader(..., worker_init_fn=ignore_stop_signals)
    close_distributed()
    gather_states(rng_states()) / load_state(t)   # every rank's RNG state, as checkpoint tensors
"""

from __future__ import annotations

import datetime
import io
import os
import re
import signal
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from utils.hardware import resolve_device


@dataclass(frozen=True)
class DistContext:
    """rank / world_size / local_rank of this process and its device (cuda:<local_rank> on GPU nodes)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu3" -> "gpu07"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]\-,]+))?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR to the first node's name.")
    return m.group(1) + (m.group(2) or "")


def launch_env(env: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process: torchrun's variables, else those of `srun` (a SLURM job step
    of several tasks; MASTER_ADDR / MASTER_PORT are then set from the node list and job id when missing), else a
    single process. A batch script's own shell (no srun) is a single process."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))  # set by srun only
    if tasks <= 1 or "SLURM_PROCID" not in env:
        return 0, 1, 0
    rank, local_rank = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
    env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]))
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000))  # 2 jobs on a node: apart
    # (20000-29999: below Linux's ephemeral ports)
    env.update(RANK=str(rank), WORLD_SIZE=str(tasks), LOCAL_RANK=str(local_rank))  # for init_process_group
    return rank, tasks, local_rank


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group when started by torchrun or srun with several processes, else a single-process
    context. Each process gets cuda:<local rank> on GPU (NCCL) or the CPU (gloo); collectives that wait longer
    than `timeout_minutes` (a rank that died or hangs) fail instead of blocking forever."""
    dev = resolve_device(device)
    rank, world_size, local_rank = launch_env()
    if world_size <= 1:
        return DistContext(device=dev)
    if dev.type == "cuda":
        if torch.cuda.device_count() == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # srun --gpus-per-task=1:
            local_rank = 0  # each task sees its own GPU as cuda:0
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                             f"start at most {torch.cuda.device_count()} processes per node.")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return DistContext(rank, world_size, local_rank, dev)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (in place; `t` itself on a single process)."""
    if _active():
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] on a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))


class StopSignal:
    """Catches SIGTERM and SIGUSR1 (a SLURM time limit or preemption, a spot instance going away, torchrun stopping
    its workers) so that training can write a checkpoint and exit instead of dying mid-epoch.

    Call `stop = StopSignal(device)` once, then `stop(steps_done)` after every optimizer step: it is True on every
    rank at the same step once any rank caught a signal. Ranks agree through one all-reduce every `every` steps
    (a sync, so not every step); a single process looks at its own flag every step. `stop.caught` names the
    signal, `stop.exit_code` is 128 + its number; `stop.restore()` puts the previous handlers back."""

    def __init__(self, device: torch.device | str = "cpu", every: int = 10):
        self.device, self.every, self.signum = torch.device(device), every, 0
        self.previous = {s: signal.signal(s, self._catch) for s in STOP_SIGNALS}

    def _catch(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __call__(self, steps_done: int = 0, force_check: bool = False) -> bool:
        if _active():
            if steps_done % self.every and not force_check:
                return False
            self.signum = int(all_reduce_max(torch.tensor([self.signum], device=self.device)).item())
        return self.signum > 0

    @property
    def caught(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it (not 0: the run is not finished)."""
        return 128 + self.signum

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker_init_fn: SLURM signals every process of a job step, and a data worker that died of
    SIGTERM would fail the step that is about to write the checkpoint; the workers end with their main process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def gather_states(obj: Any) -> list[torch.Tensor]:
    """Every rank's `obj` (e.g. `utils.seed.rng_states()`), each as the uint8 tensor of its torch.save bytes: what
    a checkpoint can hold (all_gather_object cannot carry tensors through weights_only unpickling)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in all_gather_objects(buffer.getvalue())]


def load_state(data: torch.Tensor) -> Any:
    """One entry of `gather_states` -> the object (torch.load, weights_only=True)."""
    return torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=True)
