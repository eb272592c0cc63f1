"""bench.gpu_check: its small `--device cpu` variant end to end (every stage ok, the SIGUSR1-stopped torchrun run
continued to its planned steps), a failing stage reported as FAILED with a non-zero exit, and its helpers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, dict[str, str]]]:
    """`python -m bench.gpu_check --device cpu --out tmp_path/table.md ARGS` (temp files under tmp_path) ->
    (the process, {stage: {"status", "seconds", "img/s", "detail"}} from the table file)."""
    table = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--out", str(table), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert table.is_file(), proc.stderr[-3000:]
    rows = {}
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 5 and cells[0] not in ("stage", "---"):
            rows[cells[0]] = dict(zip(("status", "seconds", "img/s", "detail"), cells[1:], strict=True))
    return proc, rows


def test_cpu_variant_runs_every_stage_and_the_signalled_run_continues(tmp_path):
    proc, rows = run_check(tmp_path, "--keep")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| stage | status |" in proc.stdout  # the table on stdout too
    timm = "speed vit_ti timm"
    assert set(rows) == {"gloo all-reduce + DDP", "imagenet train", "SIGUSR1 continue", "speed vit_ti ours", timm,
                         "mnist"}
    for stage, row in rows.items():
        assert row["status"] == ("skipped" if stage == timm and "not installed" in row["detail"] else "ok"), row
    for stage in ("imagenet train", "SIGUSR1 continue", "speed vit_ti ours", "mnist"):
        assert float(rows[stage]["img/s"]) > 0, rows[stage]
    if rows[timm]["status"] == "ok":
        assert float(rows[timm]["img/s"]) > 0
    plan = gpu_check.Plan.cpu()
    assert f"{plan.total_steps}/{plan.total_steps} optimizer steps" in rows["SIGUSR1 continue"]["detail"]
    assert "worker 138" in rows["SIGUSR1 continue"]["detail"]
    (work,) = tmp_path.glob("gpu_check_*")  # --keep: data and runs stay
    ckpt = torch.load(work / "imagenet_run" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == plan.epochs and ckpt.get("step_in_epoch", 0) == 0
    assert int(next(iter(ckpt["optimizer"]["state"].values()))["step"]) == plan.total_steps
    logs = tmp_path / "table_logs"
    assert {"imagenet_1.out", "imagenet_2.out", "speed.out", "mnist.out", "nccl.out"} <= {p.name for p in
                                                                                           logs.iterdir()}


def test_a_failing_stage_is_reported_and_fails_the_exit_status(tmp_path):
    proc, rows = run_check(tmp_path, "--stages", "mnist", "--mnist-root", str(tmp_path / "no_mnist"))
    assert proc.returncode == 1
    assert list(rows) == ["mnist"] and rows["mnist"]["status"] == "FAILED"
    assert "MNIST" in rows["mnist"]["detail"] and "exit 1" in rows["mnist"]["detail"]
    assert "mnist: last lines of" in (tmp_path / "table.md").read_text()  # the log's tail below the table


def test_budget_shares_and_the_fixed_mnist_time():
    """MNIST keeps its fixed time; the others share the rest by WEIGHTS, and what a stage leaves unused (here all,
    no time passes) goes to the later ones."""
    budget = gpu_check.Budget(1000.0, ["nccl", "imagenet", "speed", "mnist"], mnist_s=200.0)
    assert budget.take("nccl") == pytest.approx(800 * 0.05, rel=0.01)
    assert budget.take("imagenet") == pytest.approx(800 * 0.55 / 0.95, rel=0.01)
    assert budget.take("speed") == pytest.approx(800, rel=0.01)
    assert budget.take("mnist") == pytest.approx(200, rel=0.01)
    assert gpu_check.Budget(10.0, ["speed"], 0.0).take("speed") == gpu_check.MIN_STAGE_S


def test_reason_is_one_line():
    assert gpu_check.reason(None, 12.0).startswith("timeout: still running after 12 s")
    err = "Traceback (most recent call last):\n  File x\nValueError: bad thing\n"
    assert gpu_check.reason(1, 5.0, err, "") == "exit 1: ValueError: bad thing"
    assert gpu_check.reason(1, 5.0, "noise\nerror: MNIST is missing\nmore noise\n") == "exit 1: error: MNIST is missing"
    assert gpu_check.reason(2, 5.0, "", "") == "exit 2: no output"


def test_a_timeout_kills_the_whole_tree(tmp_path):
    """A child in a session of its own (as torchrun's workers) goes too."""
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              "start_new_session=True); print('started', flush=True); time.sleep(60)")
    proc = gpu_check.spawn([sys.executable, "-c", script], tmp_path / "sleepy")
    deadline = time.monotonic() + 30
    while "started" not in gpu_check.read(tmp_path / "sleepy.out") and time.monotonic() < deadline:
        time.sleep(0.1)
    kids = gpu_check.descendants(proc.pid)
    assert len(kids) == 1
    assert gpu_check.finish(proc, 0.5) is None
    time.sleep(0.5)
    assert kids[0] not in gpu_check.parent_pids() or "Z" in gpu_check.read(f"/proc/{kids[0]}/stat").split()[2]


def test_synthetic_data_shapes(tmp_path):
    images, labels = gpu_check.fake_digits(np.random.default_rng(0), 50)
    assert images.shape == (50, 28, 28) and images.dtype == np.uint8 and set(labels) <= set(range(10))
    assert images.max() == 255  # the drawn digit
    root = gpu_check.make_mnist(tmp_path / "m", 30, 10)
    raw = root / "MNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").stat().st_size == 16 + 30 * 28 * 28
    assert (raw / "t10k-labels-idx1-ubyte").stat().st_size == 8 + 10
    plan = gpu_check.Plan.cpu()
    folder = gpu_check.make_imagefolder(tmp_path / "f", plan)
    train = sorted(folder.glob("train/*/*.jpg"))
    assert len(train) >= plan.batch * plan.steps_per_epoch
    assert sorted(p.name for p in (folder / "val").iterdir()) == [f"c{c}" for c in range(plan.classes)]
