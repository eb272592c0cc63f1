"""bench.explain_eval end to end: a tiny ViT that has learnt six tiny photos (so the mosaics have photos it
classifies correctly), every method x metric in the table, the JSON and the figure written; bad input in one line;
and a few real photos with the real DeiT-tiny weights when ../shared/data is there."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attention.attribution import METHODS
from attention.faithfulness import deletion_score
from attention.saco import saco
from bench import explain_eval
from imagenet.dataloaders.classes import NAMES, WNIDS
from models.pretrained import load_pretrained
from models.vit import VisionTransformer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEIT = DATA / "weights" / "deit_tiny_patch16_224_lnq.pth"
PHOTOS = DATA / "imagenet-samples"


def write_photos(folder: Path, count: int = 8) -> Path:
    """`count` small noise photos of the first `count` ImageNet classes, named <wnid>_<name>.png."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{WNIDS[i]}_{NAMES[i].replace(' ', '_')}.png")
    return folder


def learnt_checkpoint(path: Path, photos: Path) -> Path:
    """A ViT on 32 px (2 x 2 patches of 16, ImageNet's 1000 classes) trained until it names every photo right."""
    torch.manual_seed(0)
    model = VisionTransformer(64, 128, 1, 1, 16, 3, 4, 1000)
    files = explain_eval.list_images(photos, 0)
    x, y = explain_eval.load_photos(files, model), explain_eval.labels_of(files, 1000)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (model(x).argmax(-1) == y).all():
            break
    assert (model.eval()(x).argmax(-1) == y).all()
    torch.save(model.state_dict(), path)
    return path


def exit_message(argv: list[str], capsys) -> str:
    """The one line explain_eval exits with (not 0) for `argv`, no traceback."""
    with pytest.raises(SystemExit) as e:
        explain_eval.main(argv)
    assert e.value.code not in (0, None)
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert len(text.strip().splitlines()) == 1, text
    return text


def test_tiny_model_end_to_end(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", 6)
    weights = str(learnt_checkpoint(tmp_path / "tiny.pth", photos))
    out = tmp_path / "out"
    argv = ["--images", str(photos), "--model", weights, "--device", "cpu", "--limit", "0", "--mosaics", "6",
            "--steps", "2", "--groups", "3", "--batch-size", "5", "--output", str(out)]
    info = explain_eval.main(argv)
    printed = capsys.readouterr().out
    assert "6 photos" in printed and "true class" in printed and "top-1 100.0%" in printed and "6 mosaics" in printed

    table = (out / "table.md").read_text()
    header = table.splitlines()[[i for i, line in enumerate(table.splitlines()) if line.startswith("| method")][0]]
    assert all(column in header for column in explain_eval.COLUMNS)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(METHODS)
    assert all("n/a" not in r and r.count("±") == len(explain_eval.COLUMNS) for r in rows)

    saved = json.loads((out / "table.json").read_text())
    assert saved["command"] == "python -m bench.explain_eval " + " ".join(argv)
    assert saved["photos"] == 6 and saved["mosaics"] == 6 and saved["target"] == "true class"
    assert {"cpu", "torch_threads"} <= saved["machine"].keys() and saved["torch"] == torch.__version__
    assert set(saved["seconds"]) == {"endpoints", "maps", *explain_eval.METRICS}
    for name in METHODS:
        cells = saved["results"][name]
        assert set(cells) == set(explain_eval.COLUMNS), name
        assert all(math.isfinite(c["mean"]) and math.isfinite(c["se"]) for c in cells.values()), name
        assert -1 <= cells["SaCo"]["mean"] <= 1 and 0 <= cells["quadrant share"]["mean"] <= 1
        assert cells["ROAD MoRF"]["n"] == 6 and cells["pointing game"]["n"] == 6
        assert len(saved["road_curves"][name]["morf"]) == len(explain_eval.FRACTIONS)
    assert saved == json.loads(json.dumps(info))  # what main returns is what it wrote
    assert (out / "figure.png").stat().st_size > 10_000

    # again for the random map: the same numbers (seeded map, ROAD noise, mosaics)
    again = explain_eval.main(argv[:-1] + [str(tmp_path / "again"), "--methods", "random"])
    assert again["results"]["random"] == info["results"]["random"]


def test_shared_endpoints_and_precision(tmp_path, capsys):
    """The photos' and all-mean images' probabilities, computed once for every method, give what the metric
    functions give on their own (fp32); --amp bf16 runs the metrics' forwards in bf16 and says so."""
    photos = write_photos(tmp_path / "photos", 5)
    weights = str(learnt_checkpoint(tmp_path / "tiny.pth", photos))
    argv = ["--images", str(photos), "--model", weights, "--device", "cpu", "--limit", "0", "--steps", "3",
            "--groups", "3", "--batch-size", "2", "--methods", "gradient rollout,centre", "--metrics",
            "saco,deletion,insertion"]
    info = explain_eval.main(argv + ["--amp", "none", "--output", str(tmp_path / "fp32")])
    assert info["machine"]["amp"] == "none" and "fp32" in (tmp_path / "fp32" / "table.md").read_text()
    model = load_pretrained(weights).eval()
    files = explain_eval.list_images(photos, 0)
    x, y = explain_eval.load_photos(files, model), explain_eval.labels_of(files, 1000)
    for name in ("gradient rollout", "centre"):
        heat = METHODS[name](model, x, y).detach()
        direct = {"SaCo": saco(model, x, heat, y, 3), "deletion AUC": deletion_score(model, x, heat, y, 3),
                  "insertion AUC": deletion_score(model, x, heat, y, 3, "insertion")}
        for column, values in direct.items():
            assert np.allclose(info["per_image"][name][column], values, atol=2e-6), (name, column)

    bf16 = explain_eval.main(argv + ["--amp", "bf16", "--output", str(tmp_path / "bf16")])
    assert bf16["machine"]["amp"] == "bf16" and "bf16 autocast" in (tmp_path / "bf16" / "table.md").read_text()
    for name, cells in bf16["results"].items():  # (SaCo's pair signs may flip where two drops are close)
        for column in ("deletion AUC", "insertion AUC"):
            assert cells[column]["mean"] == pytest.approx(info["results"][name][column]["mean"], abs=0.01), name


def test_subsets_and_predicted_class(tmp_path, capsys):
    photos = write_photos(tmp_path / "photos", 3)
    for f in photos.iterdir():  # no WordNet ids: the predicted class is explained, no mosaics
        f.rename(photos / f.name.split("_", 1)[1])
    weights = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    torch.save(VisionTransformer(64, 128, 1, 1, 16, 3, 4, 1000).state_dict(), weights)
    info = explain_eval.main(["--images", str(photos), "--model", str(weights), "--device", "cpu",
                              "--methods", "legrad,Random", "--metrics", "saco,localisation", "--num-heads", "1",
                              "--output", str(tmp_path / "out")])
    assert info["target"] == "predicted class" and info["top1"] is None and info["mosaics"] == 0
    assert "assumed" not in info["weights"]  # --num-heads given: no guess about the head count
    assert list(info["results"]) == ["LeGrad", "random"]
    assert all(set(r) == {"SaCo"} for r in info["results"].values())
    assert "localisation skipped" in capsys.readouterr().out
    note = (tmp_path / "out" / "table.md").read_text()  # the reason stays with the table; no ROAD, no ROAD footnote
    assert "Localisation skipped: the true classes are unknown" in note and "ROAD" not in note
    width, height = Image.open(tmp_path / "out" / "figure.png").size
    assert height < width / 3  # no ROAD: the maps' row alone, no empty curve axes


def test_bad_input(tmp_path, capsys):
    message = exit_message([], capsys)
    assert "--images is required" in message and "folder of photos" in message
    assert "does not exist" in exit_message(["--images", str(tmp_path / "nope")], capsys)
    assert "no image files" in exit_message(["--images", str(tmp_path)], capsys)
    photos = write_photos(tmp_path / "photos", 2)
    message = exit_message(["--images", str(photos), "--methods", "rollout,LeGrad"], capsys)
    assert "--methods 'rollout'" in message and "attention rollout" in message
    assert "--metrics 'auc'" in exit_message(["--images", str(photos), "--metrics", "auc"], capsys)
    assert "--steps 1 must be at least 2" in exit_message(["--images", str(photos), "--steps", "1"], capsys)
    assert "--limit -1 must be 0 (all the photos)" in exit_message(["--images", str(photos), "--limit", "-1"], capsys)
    assert "--groups 1 must be at least 2" in exit_message(["--images", str(photos), "--groups", "1"], capsys)
    (photos / "n01484850_shark.png").write_bytes(b"not a png")
    weights = tmp_path / "tiny.pth"
    torch.save(VisionTransformer(64, 128, 1, 1, 16, 3, 4, 1000).state_dict(), weights)
    message = exit_message(["--images", str(photos), "--model", str(weights), "--device", "cpu",
                            "--output", str(tmp_path / "out")], capsys)
    assert "n01484850_shark.png" in message and "cannot be decoded" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not (DEIT.exists() and PHOTOS.is_dir()), reason="needs ../shared/data (DeiT-tiny weights and "
                                                                    "the ImageNet sample photos)")
def test_real_deit_tiny(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    model = load_pretrained(str(DEIT)).eval()
    files = explain_eval.list_images(PHOTOS, 40)[:12]
    with torch.no_grad():  # four photos DeiT-tiny names right, of four classes, so the mosaics can be made
        right = [f for f, p in zip(files, explain_eval.predict(model, explain_eval.load_photos(files, model), 12),
                                   strict=True) if p == explain_eval.labels_of([f], 1000)[0]]
    for f in right[:4]:
        shutil.copy(f, photos / f.name)
    info = explain_eval.main(["--images", str(photos), "--model", str(DEIT), "--device", "cpu", "--mosaics", "4",
                              "--methods", "CP-LRP,random", "--steps", "2", "--groups", "2",
                              "--output", str(tmp_path / "out")])
    assert info["photos"] == 4 and info["mosaics"] == 4 and info["top1"] == 1.0
    for name, cells in info["results"].items():
        assert set(cells) == set(explain_eval.COLUMNS), name
        assert all(math.isfinite(c["mean"]) for c in cells.values()), (name, cells)
