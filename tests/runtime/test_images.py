"""Image files become the model's uint8 [32,32,3] RGB input, or a one-line DataError."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lossx.errors import DataError
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.images import as_jpeg, jpeg_copies, load_image


@pytest.fixture
def cat(test_split):
    return test_split.images[0]


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tiff"])
def test_lossless_32x32_files_come_back_unchanged(tmp_path, cat, suffix):
    Image.fromarray(cat).save(tmp_path / f"cat{suffix}")
    np.testing.assert_array_equal(load_image(tmp_path / f"cat{suffix}", CONTRACT), cat)


def test_jpeg_and_other_sizes_are_resized_to_32x32(tmp_path, cat):
    Image.fromarray(cat).resize((100, 80)).save(tmp_path / "cat.jpg", quality=95)
    image = load_image(tmp_path / "cat.jpg", CONTRACT)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - cat.astype(int)).mean() < 12  # close to the original


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "I", "1"])
def test_other_modes_become_rgb(tmp_path, cat, mode):
    if mode.startswith("I"):
        grey = np.asarray(Image.fromarray(cat).convert("L"), dtype=np.uint16) * 257  # 16-bit
        image = Image.fromarray(grey if mode == "I;16" else grey.astype(np.int32))
        assert image.mode == mode
        expected = np.repeat(np.asarray(Image.fromarray(cat).convert("L"))[..., None], 3, axis=2)
    else:
        image = Image.fromarray(cat).convert(mode)
        expected = np.asarray(image.convert("RGB"))
    suffix = ".tiff" if mode in ("CMYK", "I") else ".png"
    image.save(tmp_path / f"x{suffix}")
    loaded = load_image(tmp_path / f"x{suffix}", CONTRACT)
    assert loaded.shape == (32, 32, 3)
    np.testing.assert_array_equal(loaded, expected)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, not an image", r"notes.png: not an image lossx can read"),
        (b"", r"notes.png: not an image lossx can read"),
        (None, r"image \S*notes.png does not exist"),
    ],
)
def test_unreadable_files_are_refused(tmp_path, content, message):
    if content is not None:
        (tmp_path / "notes.png").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_image(tmp_path / "notes.png", CONTRACT)


def test_a_truncated_png_is_refused(tmp_path, cat):
    Image.fromarray(cat).save(tmp_path / "cat.png")
    data = (tmp_path / "cat.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.png: cannot read the image"):
        load_image(tmp_path / "cut.png", CONTRACT)


def test_a_zero_by_zero_png_is_refused(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)  # width 0, height 0, 8-bit RGB
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    (tmp_path / "empty.png").write_bytes(png)
    with pytest.raises(DataError, match=r"empty.png: "):
        load_image(tmp_path / "empty.png", CONTRACT)


def test_jpeg_copies_are_what_pillow_decodes_from_the_jpeg_file(tmp_path, test_split):
    images = test_split.images[:8]
    copies = jpeg_copies(images, 75)
    assert copies.shape == images.shape and copies.dtype == np.uint8
    for image, copy in zip(images, copies, strict=True):
        Image.fromarray(image).save(tmp_path / "photo.jpg", quality=75)
        np.testing.assert_array_equal(copy, np.asarray(Image.open(tmp_path / "photo.jpg")))
    error = np.abs(copies.astype(int) - images.astype(int)).mean()
    assert 1 < error < 12  # lossy, but the same pictures
    better = np.abs(jpeg_copies(images, 95).astype(int) - images.astype(int)).mean()
    assert better < error


def test_as_jpeg_names_the_compression_in_the_source(test_split):
    split = as_jpeg(test_split.head(4), 40)
    assert split.source.endswith(", as JPEG quality 40 (Pillow)")
    np.testing.assert_array_equal(split.labels, test_split.labels[:4])
    with pytest.raises(DataError, match=r"JPEG quality must be 1\.\.95"):
        jpeg_copies(test_split.images[:1], 0)
