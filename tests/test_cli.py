"""Every script's command line as a newcomer meets it: `--help` of every module that runs as a script (found by
listing the packages, so a new script is covered), and the bench scripts' answers to missing or bad input."""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MAIN_GUARD = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.M)
# A help entry stating its default: argparse's "(default: X)", or the help's own "default: X" / "; default X"
DEFAULT_STATEMENT = re.compile(r"\(default\b|(?<!\()\bdefault[:=]|[;,]\s*default\s+(?!of\b|anyway\b)", re.I)
# Paths a plain clone does not have, and the clone's own absolute path (a default built from __file__)
OUTSIDE = ("../", "/work", "shared/data", str(ROOT))
STALE = ("edit the paths below",)


def scripts() -> list[str]:
    """Every module of the repo's packages with a `__main__` guard, as `python -m` names it (sorted)."""
    found = []
    for init in sorted(ROOT.glob("*/__init__.py")):
        for path in sorted(init.parent.rglob("*.py")):
            if MAIN_GUARD.search(path.read_text(encoding="utf-8")):
                found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


SCRIPTS = scripts()


@cache
def helps() -> dict[str, subprocess.CompletedProcess]:
    """`python -m <script> --help` of every script, run in parallel from the repo root (each imports torch)."""
    env = {**os.environ, "COLUMNS": "100"}

    def run(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        return dict(zip(SCRIPTS, pool.map(run, SCRIPTS), strict=True))


def help_entries(text: str) -> dict[str, str]:
    """argparse's option / argument entries of a --help text -> {first line's name part: whole entry, one line}."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"  \S", line):  # "  --flag VALUE   help..." or "  positional   help..."
            current = line.split("  ")[1].strip()
            entries[current] = line.strip()
        elif current and line.startswith("   ") and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def stated_defaults(entry: str) -> list[str]:
    """The X of every "(default: X)" in one help entry (X may hold balanced parentheses)."""
    values = []
    for match in re.finditer(r"\(default: ", entry):
        depth, end = 1, match.end()
        while end < len(entry) and depth:
            depth += {"(": 1, ")": -1}.get(entry[end], 0)
            end += 1
        values.append(entry[match.end():end - 1])
    return values


def test_scripts_are_found():
    expected = {"mnist.train", "mnist.vis_attn", "imagenet.train", "imagenet.vis_attn", "models.pretrained",
                "imagenet.dataloaders.imagenet-1k", "bench.explain_eval", "bench.randaugment",
                "bench.imagenet_throughput", "bench.vit_speed", "bench.machine"}
    assert expected <= set(SCRIPTS), sorted(expected - set(SCRIPTS))


def help_problems(module: str, text: str) -> list[str]:
    """What a newcomer would trip over in one script's --help: its usage line, stale text, and per entry a default
    of None or nothing, a default stated twice, a path outside a plain clone, an absolute default path."""
    problems = []
    usage = text.lstrip().splitlines()[0] if text.strip() else ""
    if not re.match(rf"usage: python -m {re.escape(module)}(\s|$)", usage):
        problems.append(f"usage line {usage!r} does not start with 'usage: python -m {module}'")
    problems += [f"stale text {phrase!r}" for phrase in STALE if phrase in text.lower()]
    entries = help_entries(text)
    if not entries:
        problems.append("no option entries found")
    for name, entry in entries.items():
        defaults = stated_defaults(entry)
        if "None" in defaults or "" in defaults:
            problems.append(f"{name}: a default of None or nothing: {entry}")
        if len(DEFAULT_STATEMENT.findall(entry)) > 1:
            problems.append(f"{name}: the default is stated twice: {entry}")
        problems += [f"{name}: names {marker!r}, which a plain clone does not have: {entry}"
                     for marker in OUTSIDE if marker in entry]
        problems += [f"{name}: an absolute default path, outside the repo: {value}"
                     for value in defaults if re.search(r"(^|[\s'\"(\[=,])/\w", value)]
    return problems


@pytest.mark.parametrize("module", SCRIPTS)
def test_help(module: str):
    proc = helps()[module]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    problems = help_problems(module, proc.stdout)
    assert not problems, f"python -m {module} --help:\n" + "\n".join(problems)


def test_help_problems_are_seen():
    bad = ("usage: faithfulness.py [-h]\n\noptions:\n  --image IMAGE  a digit (default: a test digit) (default: None)\n"
           "  --data DATA    folder (default: ../shared/data/x)\n  --out OUT      table (default: /tmp/x.md)\n")
    problems = " | ".join(help_problems("bench.faithfulness", bad))
    for kind in ("usage line", "None or nothing", "stated twice", "'../'", "'shared/data'", "absolute default"):
        assert kind in problems, (kind, problems)
    good = "usage: python -m bench.x [-h]\n\noptions:\n  --threads N  threads (0: torch's default)\n"
    assert help_problems("bench.x", good) == []


# ------------------------------------------------------------------------------------ the bench scripts' input
def exit_message(main, argv: list[str], capsys) -> str:
    """The one line a script exits with (not 0) for `argv`, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert len(text.strip().splitlines()) == 1, text
    return text


def write_photos(folder: Path) -> Path:
    """Two small labelled photos (one a 16-bit grayscale PNG) and return the folder."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / "n01440764_tench.JPEG")
    ramp = np.tile(np.linspace(0, 65535, 48), (40, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "n01443537_goldfish.png")
    return folder


def test_randaugment_input(tmp_path, capsys):
    from bench import randaugment

    message = exit_message(randaugment.main, [], capsys)
    assert "--photos is required" in message and "folder of photos" in message
    assert "does not exist" in exit_message(randaugment.main, ["--photos", str(tmp_path / "nope")], capsys)
    assert "no image files" in exit_message(randaugment.main, ["--photos", str(tmp_path)], capsys)
    photos = write_photos(tmp_path / "photos")
    assert "--n 0" in exit_message(randaugment.main, ["--photos", str(photos), "--n", "0"], capsys)
    (photos / "broken.png").write_bytes(b"not a png")
    assert "cannot be decoded" in exit_message(randaugment.main, ["--photos", str(photos)], capsys)
    (photos / "broken.png").unlink()
    pytest.importorskip("timm")
    crops = randaugment.load_crops(photos, 2)
    assert [c.size for c in crops] == [(224, 224)] * 2 and all(c.mode == "RGB" for c in crops)
    gray = np.asarray(crops[1])  # the 16-bit ramp, scaled to 8 bits: dark on the left, bright on the right
    assert gray[:, :20].mean() < 80 and gray[:, -20:].mean() > 175


def test_imagenet_throughput_input(tmp_path, capsys):
    from bench import imagenet_throughput as bench

    assert "does not exist" in exit_message(bench.main, ["--data", str(tmp_path / "nope")], capsys)
    assert "no image files" in exit_message(bench.main, ["--data", str(tmp_path)], capsys)
    assert "multiple of the patch size" in exit_message(bench.main, ["--img-size", "100"], capsys)
    assert "--batch-size 0" in exit_message(bench.main, ["--batch-size", "0"], capsys)
    photos = write_photos(tmp_path / "photos")
    bench.main(["--img-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--device", "cpu",
                "--amp", "none", "--data", str(photos), "--workers", "0"])
    out = capsys.readouterr().out
    assert "model step:" in out and "2 photos of" in out and "training throughput" in out


def test_timing_benches_refuse_bad_counts(capsys):
    from bench import machine, vit_speed

    assert "--rounds 0" in exit_message(vit_speed.main, ["--rounds", "0"], capsys)
    assert "--threads -1" in exit_message(vit_speed.main, ["--threads", "-1"], capsys)
    assert "--seconds 0" in exit_message(machine.main, ["--seconds", "0"], capsys)
    assert "--batch-size 0" in exit_message(machine.main, ["--batch-size", "0"], capsys)
