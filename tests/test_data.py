"""Data pipeline: DeiT's RandAugment against timm's, uint8 transforms, device normalisation and random erasing,
TrainSampler (sharding, repeated augmentation, resuming) and no archive extraction in build_datasets."""

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from imagenet.dataloaders import constants as IN1K
from imagenet.dataloaders.dataset import DatasetError, TrainSampler, build_datasets, check_image
from imagenet.dataloaders.randaugment import OPS, RESAMPLE, DeiTRandAugment, parse_timm_config
from imagenet.dataloaders.transforms import device_transform, eval_transform, random_erasing, train_transform

FILL = (124, 116, 104)


def photo(w: int = 72, h: int = 56, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with noise (a histogram and edges for every op to act on)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h) + 60], -1)
    noise = np.random.default_rng(seed).normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("magnitude", [9, 10, 3.7])
def test_every_op_matches_timm_exactly(monkeypatch, magnitude):
    aa = pytest.importorskip("timm.data.auto_augment", reason="timm is the oracle for the ops")
    hparams = dict(translate_const=100, img_mean=FILL, interpolation=Image.Resampling.BICUBIC)
    img = photo()
    # PIL 13 refuses posterize to 0 bits (timm's PosterizeIncreasing at magnitude 10); older PIL gave black
    black = {"PosterizeIncreasing": lambda im, bits, **_: aa.posterize(im, bits) if bits else Image.new("RGB", im.size)}
    monkeypatch.setattr(aa, "NAME_TO_OP", {**aa.NAME_TO_OP, **black})
    for name, (signed, geometric, op) in OPS.items():
        for sign in (1, -1) if signed else (1,):
            with monkeypatch.context() as m:
                m.setattr(aa.random, "random", lambda s=sign: 0.75 if s < 0 else 0.25)  # timm negates if > 0.5
                theirs = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(img)
            kw = dict(resample=RESAMPLE["bicubic"], fillcolor=FILL) if geometric else {}
            ours = op(img, sign * magnitude / 10, kw)
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), (name, sign)
    assert set(OPS) == set(aa._RAND_INCREASING_TRANSFORMS)


def test_randaugment_survives_magnitude_10():
    torch.manual_seed(0)
    ra = DeiTRandAugment(num_ops=1, magnitude=10, magnitude_std=0, prob=1, ops=("PosterizeIncreasing",))
    assert np.asarray(ra(photo())).max() == 0


def test_randaugment_draws_only_from_torch():
    ra, img = DeiTRandAugment(), photo()

    def run(torch_seed: int, other_seed: int) -> np.ndarray:
        random.seed(other_seed)
        np.random.seed(other_seed)
        state = random.getstate()
        torch.manual_seed(torch_seed)
        out = np.asarray(ra(img))
        assert random.getstate() == state  # Python's RNG untouched
        return out

    for seed in range(8):
        assert np.array_equal(run(seed, 1), run(seed, 2))
    assert len({run(seed, 0).tobytes() for seed in range(8)}) > 2


def test_randaugment_rejects_bad_settings():
    for kwargs, word in [(dict(magnitude=11), "magnitude 11"), (dict(prob=2), "prob 2"),
                         (dict(interpolation="lanczos"), "lanczos"), (dict(ops=("Cutout",)), "Cutout")]:
        with pytest.raises(ValueError, match=word):
            DeiTRandAugment(**kwargs)


def test_transforms_give_uint8():
    img = photo(50, 40)
    for tf in (train_transform(32), eval_transform(32), train_transform(32, randaug_magnitude=0)):
        x = tf(img)
        assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    ra = [t for t in train_transform(32, mean=(0.5, 0.5, 0.5)).transforms if isinstance(t, DeiTRandAugment)]
    assert ra[0].fill == (128, 128, 128) and ra[0].interpolation == "bicubic" and ra[0].magnitude == 9


def test_device_transform_normalises_and_keeps_channels_last():
    x = torch.randint(0, 256, (4, 3, 8, 10), dtype=torch.uint8)
    mean, std = torch.tensor(IN1K.MEAN).view(1, 3, 1, 1), torch.tensor(IN1K.STD).view(1, 3, 1, 1)
    y = device_transform()(x)
    assert y.dtype == torch.float32 and torch.allclose(y, (x / 255 - mean) / std, atol=1e-5)
    x = x.contiguous(memory_format=torch.channels_last)
    for reprob in (0.0, 1.0):
        y = device_transform(reprob=reprob)(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="float32"):
        device_transform()(x.float())
    with pytest.raises(ValueError, match="1.5"):
        device_transform(reprob=1.5)


def erased_fractions(fn, n: int, h: int = 24, w: int = 32) -> torch.Tensor:
    """Erased area fraction per sample of fn(zeros (n, 3, h, w))."""
    return (fn(torch.zeros(n, 3, h, w)) != 0).all(1).float().mean((1, 2))


def test_random_erasing_boxes():
    torch.manual_seed(0)
    x = torch.zeros(2000, 3, 24, 32)
    y = random_erasing(x, 0.25)
    erased = (y != 0).all(1)  # (B, H, W)
    frac = erased.float().mean((1, 2))
    assert 0.2 < (frac > 0).float().mean() < 0.3
    assert frac.max() <= 1 / 3 + 0.05 and frac[frac > 0].min() >= 0.01
    for mask in erased[frac > 0][:50]:  # one rectangle: its bounding box is all erased
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert torch.equal(random_erasing(x[:4], 0.0), x[:4])


def test_random_erasing_matches_timm_distribution():
    re = pytest.importorskip("timm.data.random_erasing", reason="timm is the oracle")
    random.seed(0)
    torch.manual_seed(0)
    theirs = erased_fractions(re.RandomErasing(0.5, mode="pixel", max_count=1, device="cpu"), 4000)
    ours = erased_fractions(lambda x: random_erasing(x, 0.5), 4000)
    for a, b in [((ours > 0).float().mean(), (theirs > 0).float().mean()), (ours.mean(), theirs.mean())]:
        assert abs(a - b) < 0.1 * b, (a, b)


def epoch_keys(n: int, replicas: int, epoch: int = 0, repeats: int = 1, seed: int = 0) -> list[list[tuple]]:
    out = []
    for rank in range(replicas):
        sampler = TrainSampler(n, num_replicas=replicas, rank=rank, seed=seed, repeats=repeats)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(out[-1]) == len(sampler) == n // replicas
    return out


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_sampler_shards_are_disjoint(replicas):
    shards = epoch_keys(20, replicas, epoch=3)
    indices = [i for shard in shards for _, i in shard]
    assert len(set(indices)) == len(indices) == 20 // replicas * replicas
    assert len({s for shard in shards for s, _ in shard}) == len(indices)
    assert epoch_keys(20, replicas, epoch=4) != shards


@pytest.mark.parametrize("replicas", [3, 4])
def test_sampler_repeats_land_on_different_ranks(replicas):
    shards = epoch_keys(24, replicas, repeats=3)
    where: dict[int, list[tuple[int, int]]] = {}
    for rank, shard in enumerate(shards):
        for seed, index in shard:
            where.setdefault(index, []).append((rank, seed))
    assert max(len(v) for v in where.values()) == 3 and len(where) >= 24 // 3
    for copies in where.values():
        assert len({r for r, _ in copies}) == len(copies) and len({s for _, s in copies}) == len(copies)


def test_sampler_start_and_order_do_not_depend_on_history():
    a = TrainSampler(30, num_replicas=2, rank=1, seed=5, repeats=2)
    a.set_epoch(7)
    full = list(a)
    b = TrainSampler(30, num_replicas=2, rank=1, seed=5, repeats=2)
    for epoch in (0, 3):  # whatever ran before
        b.set_epoch(epoch)
        list(b)
    for start in (0, 4, 15):
        b.set_epoch(7, start)
        assert len(b) == 15 - start and list(b) == full[start:]
    with pytest.raises(ValueError, match="16"):
        b.set_epoch(7, 16)
    with pytest.raises(ValueError, match="2 samples for 3 ranks"):
        TrainSampler(2, num_replicas=3)


def test_build_datasets_does_not_extract_archives(tmp_path):
    for name in IN1K.ARCHIVES.values():
        (tmp_path / name).write_bytes(b"not really")
    with pytest.raises(DatasetError, match="--prepare"):
        build_datasets(tmp_path, None, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(IN1K.ARCHIVES.values())


def write_ramps(folder: Path) -> tuple[Path, Path]:
    """The same horizontal ramp as an 8-bit PNG and as a 16-bit grayscale PNG (I;16, values x 257)."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.tile(np.linspace(0, 255, 40).round().astype(np.uint16), (30, 1))
    Image.fromarray(ramp.astype(np.uint8)).save(folder / "8.png")
    Image.fromarray(ramp * 257).save(folder / "16.png")  # uint16 -> mode I;16
    assert Image.open(folder / "16.png").mode.startswith("I;16")
    return folder / "8.png", folder / "16.png"


def test_a_16_bit_png_trains_as_its_picture_and_the_checker_reads_it_so(tmp_path):
    """#20 fault 2: training decodes through utils.images.load_image: a 16-bit PNG in an ImageFolder is its ramp
    (the 8-bit ramp's pixels), not all white; the checker reads files the same way (a corrupt one: unreadable)."""
    eight, sixteen = write_ramps(tmp_path / "train" / "ramp")
    write_ramps(tmp_path / "val" / "ramp")
    train_set, _ = build_datasets(tmp_path, v2.PILToTensor(), None)
    images = {Path(train_set.samples[i][0]).name: train_set[i][0] for i in range(len(train_set))}
    assert images["16.png"].shape == (3, 30, 40) and images["16.png"].float().mean() < 200  # not white
    assert torch.equal(images["16.png"], images["8.png"])
    assert check_image(str(sixteen)) == (str(sixteen), None)
    (tmp_path / "cut.png").write_bytes(eight.read_bytes()[:60])
    path, error = check_image(str(tmp_path / "cut.png"))
    assert "cut.png" in error and "cannot be decoded" in error


def test_timm_aa_strings_as_timm_reads_them():
    assert parse_timm_config("rand-m9-mstd0.5-inc1") == {"num_ops": 2, "magnitude": 9.0, "magnitude_std": 0.5}
    aa = pytest.importorskip("timm.data.auto_augment", reason="timm is the oracle for its strings")
    for text in ("rand-m9-mstd0.5-inc1", "rand-m7-n3-mstd1-inc1", "rand-inc1", "rand-n1-m3-inc1-p0.5-mmax10"):
        theirs = aa.rand_augment_transform(text, {})
        ours = parse_timm_config(text)
        assert ours["num_ops"] == theirs.num_layers, text
        assert ours["magnitude"] == theirs.ops[0].magnitude, text
        assert ours["magnitude_std"] == theirs.ops[0].magnitude_std, text
    for text, words in (("rand-m9", "add -inc1"), ("v0", "not 'v0'"), ("rand-m9-inc1-p0.3", "p0.3"),
                        ("rand-m9-inc1-tweights", "'tweights'"), ("rand-m12-inc1", "in [0, 10]")):
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_timm_config(text)
