"""raydd.data.images: every odd file a crawl contains decodes right or becomes an
error row. All files are real encodings written by PIL inside the test."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from raydd.data.images import decode, decode_batch, load_rgb, to_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Incompressible pixels, so that cutting a file loses image data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


def test_rgb_png_is_exact():
    pixels = np.asarray(noise(7, 5))
    decoded, size = decode(encode(Image.fromarray(pixels), "PNG"))
    assert size == (5, 7)
    assert decoded.dtype == np.uint8 and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, pixels)


def test_grayscale_png_becomes_three_equal_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    decoded, size = decode(encode(Image.fromarray(gray, "L"), "PNG"))
    assert size == (3, 4) and decoded.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], gray)


def test_rgba_png_is_composited_onto_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 128)  # half-transparent red
    rgba[1, 0] = (0, 0, 0, 0)  # fully transparent, black underneath
    rgba[1, 1] = (0, 0, 255, 255)
    decoded, _ = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(decoded[0, 0]) == RED
    assert tuple(decoded[1, 0]) == WHITE
    assert tuple(decoded[1, 1]) == BLUE
    np.testing.assert_allclose(decoded[0, 1], (255, 127, 127), atol=1)


def test_gray_with_alpha_png_is_composited_onto_white():
    la = np.array([[[0, 255], [0, 0]]], np.uint8)  # black opaque, black transparent
    decoded, _ = decode(encode(Image.fromarray(la, "LA"), "PNG"))
    assert tuple(decoded[0, 0]) == (0, 0, 0)
    assert tuple(decoded[0, 1]) == WHITE


def test_palette_png_with_transparent_index():
    palette = Image.new("P", (4, 2))
    palette.putpalette([0, 0, 0, *BLUE] + [0] * (256 - 2) * 3)
    palette.putdata([0, 1, 1, 1, 0, 0, 1, 1])  # index 0 is transparent
    decoded, size = decode(encode(palette, "PNG", transparency=0))
    assert size == (2, 4)
    assert tuple(decoded[0, 0]) == WHITE and tuple(decoded[1, 1]) == WHITE
    assert tuple(decoded[0, 1]) == BLUE and tuple(decoded[1, 3]) == BLUE


def test_palette_png_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([*RED, *BLUE] + [0] * 254 * 3)
    palette.putdata([0, 1])
    decoded, _ = decode(encode(palette, "PNG"))
    assert tuple(decoded[0, 0]) == RED and tuple(decoded[0, 1]) == BLUE


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 40000, 65535]], np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit
    decoded, _ = decode(data)
    np.testing.assert_allclose(decoded[0, :, 0], values[0] / 257, atol=0.51)
    assert list(decoded[0, :, 0]) == [0, 100, 156, 255]


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded, size = decode(data)
    assert size == (16, 16) and decoded.shape == (16, 16, 3)
    np.testing.assert_allclose(decoded[8, 8], RED, atol=8)


def exif_rotated_jpeg(orientation: int) -> bytes:
    """Stored 40 wide x 20 tall, blue, with a red block in the stored top-left."""
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize(
    "orientation, red_corner",
    [(6, (0, -1)), (8, (-1, 0)), (3, (-1, -1)), (1, (0, 0))],  # (row, col) corner
)
def test_exif_orientation_rotates_as_a_viewer(orientation, red_corner):
    decoded, size = decode(exif_rotated_jpeg(orientation))
    expected = (40, 20) if orientation in (6, 8) else (20, 40)
    assert size == expected and decoded.shape == (*expected, 3)
    row, col = red_corner
    np.testing.assert_allclose(decoded[row * 3, col * 3], RED, atol=16)
    np.testing.assert_allclose(decoded[-1 - row * 3, -1 - col * 3], BLUE, atol=16)


def test_exif_rotation_and_downscale_report_the_rotated_original_size():
    decoded, size = decode(exif_rotated_jpeg(6), max_size=20)
    assert size == (40, 20)
    assert decoded.shape == (20, 10, 3)
    np.testing.assert_allclose(decoded[1, -2], RED, atol=24)


def test_small_image_is_never_enlarged():
    decoded, size = decode(encode(noise(30, 10), "PNG"), max_size=1333)
    assert size == (10, 30) and decoded.shape == (10, 30, 3)


def test_png_is_downscaled_to_max_size():
    decoded, size = decode(encode(noise(300, 100), "PNG"), max_size=150)
    assert size == (100, 300) and decoded.shape == (50, 150, 3)


def test_huge_jpeg_is_downscaled_early(monkeypatch):
    image = Image.new("RGB", (9000, 6000), BLUE)
    image.paste(RED, (0, 0, 4500, 6000))  # left half red
    data = encode(image, "JPEG", quality=80)
    del image
    loaded_at = []
    load = JpegImagePlugin.JpegImageFile.load

    def spy(self):
        loaded_at.append(self.size)
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", spy)
    start = time.perf_counter()
    decoded, size = decode(data, max_size=1333)
    seconds = time.perf_counter() - start
    assert size == (6000, 9000)
    assert decoded.shape == (889, 1333, 3)
    # libjpeg decoded at <= 1/4 scale: the full 9000x6000 never existed
    assert loaded_at and max(loaded_at[0]) <= 9000 // 4
    assert seconds < 2.0
    np.testing.assert_allclose(decoded[444, 100], RED, atol=8)
    np.testing.assert_allclose(decoded[444, 1200], BLUE, atol=8)


def broken_files() -> dict[str, bytes]:
    jpeg = encode(noise(64, 64), "JPEG", quality=90)
    png = encode(noise(64, 64), "PNG")
    return {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "empty.jpg": b"",
        "notes.txt": b"just some text\n",
        "page.html": b"<!DOCTYPE html><html><body>404</body></html>",
    }


@pytest.mark.parametrize("name", sorted(broken_files()))
def test_broken_files_raise(name):
    with pytest.raises(Exception) as info:  # noqa: B017 - each kind raises its own
        decode(broken_files()[name])
    assert str(info.value)


def test_decompression_bomb_raises(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x = the error limit
    with pytest.raises(Image.DecompressionBombError):
        decode(encode(noise(100, 100), "PNG"))


def test_decode_batch_keeps_every_row_in_order(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # bomb: > 8000
    good = encode(noise(30, 20), "PNG")
    files = {
        "a.png": good,
        **broken_files(),
        "bomb.png": encode(noise(100, 100), "PNG"),
    }
    files["z.png"] = good
    batch = {
        "path": np.asarray(list(files)),
        "bytes": np.asarray(list(files.values()), dtype=object),
    }
    out = decode_batch(batch, max_size=15)
    assert list(out["path"]) == list(files)
    errors = dict(zip(out["path"], out["error"], strict=True))
    assert errors["a.png"] == errors["z.png"] == ""
    assert errors["empty.jpg"].startswith("ValueError: empty file")
    assert errors["notes.txt"].startswith("UnidentifiedImageError: ")
    assert errors["bomb.png"].startswith("DecompressionBombError: ")
    assert errors["truncated.jpg"] and errors["truncated.png"]
    for i, path in enumerate(out["path"]):
        if errors[path]:
            assert out["image"][i].shape == (1, 1, 3) and out["image"][i].max() == 0
            assert out["height"][i] == out["width"][i] == 0
        else:
            assert out["image"][i].shape == (10, 15, 3)
            assert (out["height"][i], out["width"][i]) == (20, 30)


def test_load_rgb_and_to_rgb_agree_with_decode(tmp_path):
    data = exif_rotated_jpeg(6)
    (tmp_path / "r.jpg").write_bytes(data)
    expected, _ = decode(data)
    np.testing.assert_array_equal(load_rgb(str(tmp_path / "r.jpg")), expected)
    with Image.open(io.BytesIO(data)) as image:
        np.testing.assert_array_equal(to_rgb(image), expected)
