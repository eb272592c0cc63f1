"""DeiT's RandAugment: timm's `rand-m9-mstd0.5-inc1` on PIL images, drawing its random numbers from torch's RNG.

Each image gets `num_ops` ops drawn with replacement from timm's "increasing" list; each op runs with probability
`prob` at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10] (10 = the strongest), with a random
sign for the signed ops. Level -> argument at level v = magnitude / 10 (as timm's `LEVEL_TO_ARG`):

    Rotate 30v degrees, ShearX/Y 0.3v, TranslateX/YRel 0.45v x the image side (all signed; `fill` outside),
    Color/Contrast/Brightness/SharpnessIncreasing factor max(0.1, 1 +- 0.9v),
    PosterizeIncreasing keep 4 - int(4v) bits (0: black), SolarizeIncreasing threshold 256 - int(256v),
    SolarizeAdd +int(110v) below 128; AutoContrast, Equalize, Invert take no level.

Only torch's RNG is used (not `random` or NumPy), so seeding torch per sample fixes the augmentation.
"""

from __future__ import annotations

import re

import torch
from PIL import Image, ImageEnhance, ImageOps

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}


def _affine(img: Image.Image, matrix: tuple, kw: dict) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, **kw)


def _enhance(enhancer: type):
    return lambda img, v, kw: enhancer(img).enhance(max(0.1, 1.0 + v * 0.9))


def _posterize(img: Image.Image, v: float, kw: dict) -> Image.Image:
    bits = 4 - int(v * 4)  # 0 at magnitude 10: black, as PIL < 13 gave (PIL 13 refuses 0 bits)
    return ImageOps.posterize(img, bits) if bits else Image.new(img.mode, img.size)


def _solarize_add(img: Image.Image, v: float, kw: dict) -> Image.Image:
    add = min(128, int(v * 110))
    return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * len(img.getbands()))


# name -> (signed, geometric, op(PIL image, level v in [-1, 1], dict(resample, fillcolor)) -> PIL image)
OPS = {
    "AutoContrast": (False, False, lambda img, v, kw: ImageOps.autocontrast(img)),
    "Equalize": (False, False, lambda img, v, kw: ImageOps.equalize(img)),
    "Invert": (False, False, lambda img, v, kw: ImageOps.invert(img)),
    "Rotate": (True, True, lambda img, v, kw: img.rotate(v * 30.0, **kw)),
    "PosterizeIncreasing": (False, False, _posterize),
    "SolarizeIncreasing": (False, False, lambda img, v, kw: ImageOps.solarize(img, 256 - min(256, int(v * 256)))),
    "SolarizeAdd": (False, False, _solarize_add),
    "ColorIncreasing": (True, False, _enhance(ImageEnhance.Color)),
    "ContrastIncreasing": (True, False, _enhance(ImageEnhance.Contrast)),
    "BrightnessIncreasing": (True, False, _enhance(ImageEnhance.Brightness)),
    "SharpnessIncreasing": (True, False, _enhance(ImageEnhance.Sharpness)),
    "ShearX": (True, True, lambda img, v, kw: _affine(img, (1, v * 0.3, 0, 0, 1, 0), kw)),
    "ShearY": (True, True, lambda img, v, kw: _affine(img, (1, 0, 0, v * 0.3, 1, 0), kw)),
    "TranslateXRel": (True, True, lambda img, v, kw: _affine(img, (1, 0, v * 0.45 * img.width, 0, 1, 0), kw)),
    "TranslateYRel": (True, True, lambda img, v, kw: _affine(img, (1, 0, 0, 0, 1, v * 0.45 * img.height), kw)),
}


def parse_timm_config(text: str) -> dict[str, float]:
    """timm's RandAugment string (its --aa) -> {"num_ops", "magnitude", "magnitude_std"} of `DeiTRandAugment`.

    "rand-m9-mstd0.5-inc1" (DeiT's) -> {num_ops 2, magnitude 9, magnitude_std 0.5}; missing parts take timm's
    defaults (n 2, m 10, mstd 0); "none" -> num_ops 0 (off). ValueError (one sentence) for what is not implemented
    here: other policies (AutoAugment "original" / "v0", AugMix), timm's non-increasing op list (no inc1), mmax, p
    and t other than 10, 0.5 and the default set, or a part timm does not know (timm's rand_augment_transform)."""
    if text.strip().lower() in ("none", "off"):
        return {"num_ops": 0, "magnitude": 0.0, "magnitude_std": 0.0}
    name, *parts = text.strip().split("-")
    if name != "rand":
        raise ValueError(f"--aa {text}: only timm's RandAugment (rand-..., e.g. DeiT's rand-m9-mstd0.5-inc1) is "
                         f"implemented here, not {name!r} (AutoAugment / AugMix); use a rand-... string or none.")
    out, increasing = {"num_ops": 2, "magnitude": 10.0, "magnitude_std": 0.0}, False
    for part in parts:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", part)
        if m is None:
            raise ValueError(f"--aa {text}: {part!r} is not a RandAugment setting implemented here (m, n, mstd, inc; "
                             f"mmax10 and p0.5 as timm's defaults).")
        key, value = m.group(1), float(m.group(2))
        if key in ("m", "n", "mstd"):
            out[{"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std"}[key]] = value
        elif key == "inc":
            increasing = value == 1
        elif (key, value) not in (("mmax", 10.0), ("p", 0.5)):
            raise ValueError(f"--aa {text}: {part} is not implemented here (only mmax10 and p0.5, timm's defaults); "
                             f"drop it.")
    if not increasing:
        raise ValueError(f"--aa {text}: without inc1 timm draws from its older, non-increasing op list, which is not "
                         f"implemented here; add -inc1 (as DeiT's rand-m9-mstd0.5-inc1).")
    if out["magnitude_std"] > 100:
        raise ValueError(f"--aa {text}: mstd above 100 (timm: uniform magnitudes) is not implemented here.")
    if not 0 <= out["magnitude"] <= 10:
        raise ValueError(f"--aa {text}: magnitude {out['magnitude']:g} must be in [0, 10].")
    return {**out, "num_ops": int(out["num_ops"])}


def _uniform() -> float:
    return torch.rand(()).item()


class DeiTRandAugment:
    """RandAugment as DeiT trains with it (timm's `rand-m9-mstd0.5-inc1`): PIL image -> PIL image of the same size.

    Args:
        num_ops: ops applied in sequence (drawn with replacement from `ops`).
        magnitude: mean strength in [0, 10] (timm's m; 10 is the strongest, unlike torchvision's 31 bins).
        magnitude_std: std of the gaussian noise added to the magnitude per op (0: none).
        prob: probability that each drawn op is applied.
        fill: RGB colour of the area uncovered by geometric ops (DeiT: the ImageNet mean, (124, 116, 104)).
        interpolation: resampling of the geometric ops, "bicubic" / "bilinear" / "nearest", or "random" (bilinear
            or bicubic per op, timm's default when not told; DeiT tells it its train interpolation, bicubic).
        ops: names of the ops to draw from (keys of `OPS`).
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9, magnitude_std: float = 0.5, prob: float = 0.5,
                 fill: tuple[int, int, int] = (124, 116, 104), interpolation: str = "bicubic",
                 ops: tuple[str, ...] = tuple(OPS)):
        if not 0 <= magnitude <= 10:
            raise ValueError(f"RandAugment magnitude {magnitude} must be in [0, 10].")
        if magnitude_std < 0 or not 0 <= prob <= 1:
            raise ValueError(f"RandAugment magnitude_std {magnitude_std} must be >= 0 and prob {prob} in [0, 1].")
        if interpolation != "random" and interpolation not in RESAMPLE:
            raise ValueError(f"RandAugment interpolation {interpolation!r} is unknown; use {', '.join(RESAMPLE)} "
                             f"or random.")
        unknown = [name for name in ops if name not in OPS]
        if unknown:
            raise ValueError(f"RandAugment ops {unknown} are unknown; choose from {', '.join(OPS)}.")
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.fill, self.interpolation, self.ops = tuple(fill), interpolation, tuple(ops)

    def __call__(self, img: Image.Image) -> Image.Image:
        for i in torch.randint(len(self.ops), (self.num_ops,)).tolist():
            if self.prob < 1 and _uniform() > self.prob:
                continue
            signed, geometric, op = OPS[self.ops[i]]
            m = self.magnitude
            if self.magnitude_std > 0:
                m += self.magnitude_std * torch.randn(()).item()
            v = min(max(m, 0.0), 10.0) / 10.0
            if signed and _uniform() > 0.5:
                v = -v
            kw = {}
            if geometric:
                name = self.interpolation
                if name == "random":
                    name = ("bilinear", "bicubic")[int(torch.randint(2, ()).item())]
                kw = {"resample": RESAMPLE[name], "fillcolor": self.fill}
            img = op(img, v, kw)
        return img

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"magnitude_std={self.magnitude_std}, prob={self.prob}, fill={self.fill}, "
                f"interpolation={self.interpolation!r})")
