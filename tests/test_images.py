"""utils.images.load_image: every PIL mode to 8 bits by its real range, EXIF orientation, one-line errors."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from utils.images import ImageError, convert, load_image

RAMP = np.tile(np.arange(10, 250, 15, dtype=np.uint8), (16, 1))  # (16, 16), 10 .. 235: not the full 0 .. 255


def write_png(path, a: np.ndarray, color_type: int) -> None:
    """A PNG written by hand (PIL cannot write 16-bit RGB): a (H, W[, C]) uint16 array, 16 bits per sample."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a.reshape(a.shape[0], -1))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.int64)


def test_sixteen_bit_grayscale_equals_eight_bit(tmp_path):
    Image.fromarray(RAMP).save(tmp_path / "8.png")
    Image.fromarray(RAMP.astype(np.uint16) * 257).save(tmp_path / "16.png")  # what a 16-bit scan of it writes
    assert Image.open(tmp_path / "16.png").mode.startswith("I;16")
    eight, sixteen = gray(load_image(tmp_path / "8.png")), gray(load_image(tmp_path / "16.png"))
    np.testing.assert_array_equal(sixteen, eight)
    assert sixteen.mean() == RAMP.mean()


def test_twelve_bit_data_fills_eight_bits_and_eight_bit_data_in_sixteen_stays():
    twelve = Image.fromarray((RAMP.astype(np.int64) * 4095 // 255).astype(np.uint16))
    assert np.abs(gray(convert(twelve)) - RAMP).max() <= 1
    np.testing.assert_array_equal(gray(convert(Image.fromarray(RAMP.astype(np.uint16)))), RAMP)


def test_int32_and_float_images():
    as_int = Image.fromarray(RAMP.astype(np.int32) * 257)
    assert as_int.mode == "I"
    np.testing.assert_array_equal(gray(convert(as_int)), RAMP)
    unit = Image.fromarray(RAMP.astype(np.float32) / 255)
    assert unit.mode == "F"
    np.testing.assert_array_equal(gray(convert(unit)), RAMP)
    wide = gray(convert(Image.fromarray(RAMP.astype(np.float32) * 100 - 7)))  # any other range: min -> 0, max -> 255
    assert wide.min() == 0 and wide.max() == 255


def test_sixteen_bit_rgb_and_gray_alpha(tmp_path):
    rgb = np.stack([RAMP, RAMP[::-1], np.full_like(RAMP, 128)], -1)
    write_png(tmp_path / "48.png", rgb.astype(np.uint16) * 257, color_type=2)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "48.png")), rgb)
    la = np.stack([RAMP, np.full_like(RAMP, 255)], -1)
    write_png(tmp_path / "la16.png", la.astype(np.uint16) * 257, color_type=4)
    np.testing.assert_array_equal(gray(load_image(tmp_path / "la16.png")), RAMP)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK"])
def test_every_eight_bit_mode_decodes_as_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.stack([RAMP, RAMP, RAMP], -1))
    path = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    rgb.convert(mode).save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (16, 16)
    expected = gray(rgb.convert(mode).convert("RGB"))
    assert np.abs(gray(out) - expected).max() <= (4 if mode == "CMYK" else 0)


def test_palette_transparency_kept_as_alpha(tmp_path):
    image = Image.fromarray(RAMP).convert("P")
    image.info["transparency"] = int(np.asarray(image)[0, 0])
    image.save(tmp_path / "p.png", transparency=image.info["transparency"])
    rgba = np.asarray(load_image(tmp_path / "p.png", "RGBA"))
    assert rgba[0, 0, 3] == 0 and rgba[0, -1, 3] == 255
    assert load_image(tmp_path / "p.png").mode == "RGB"
    assert load_image(tmp_path / "p.png", "L").mode == "L"


def test_exif_orientation_applied(tmp_path):
    upright = np.zeros((20, 12), np.uint8)
    upright[2:8, 3:5] = 255  # a mark near the top
    Image.fromarray(upright).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the stored pixels are the upright picture turned 90 degrees CCW
    Image.fromarray(np.rot90(upright)).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    a, b = gray(load_image(tmp_path / "upright.png")), gray(load_image(tmp_path / "phone.jpg"))
    assert a.shape == b.shape and np.abs(a - b).max() < 40


def test_errors_are_one_sentence_naming_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible: a cut loses pixels
    Image.fromarray(noise).save(tmp_path / "good.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:6000])
    Image.fromarray(np.stack([RAMP] * 3, -1)).resize((256, 256)).save(tmp_path / "good.jpg", quality=90)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "good.jpg").read_bytes()[:400])
    cases = {"missing.png": "does not exist", ".": "is a folder", "empty.png": r"is empty \(0 bytes\)",
             "notes.png": "cannot be decoded", "cut.png": "cannot be decoded", "cut.jpg": "cannot be decoded"}
    for name, words in cases.items():
        with pytest.raises(ImageError, match=words) as info:
            load_image(tmp_path / name)
        assert "\n" not in str(info.value) and str(tmp_path / name).rstrip("/.") in str(info.value)
    with pytest.raises(ValueError, match="mode 'HSV'"):
        load_image(tmp_path / "good.png", "HSV")
