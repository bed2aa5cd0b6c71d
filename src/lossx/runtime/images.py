"""Image files as the model's uint8 [32,32,3] RGB input, with a clear error for anything else.

Files of another mode become RGB (alpha dropped, 16-bit scaled to 8-bit, CMYK and palettes
converted by Pillow); files of another size are resized to 32x32 with Pillow's bilinear filter,
without keeping the aspect ratio. PREPROCESSING["files"] records this in every manifest.
"""

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lossx.errors import DataError
from lossx.files import regular_file
from lossx.runtime.cifar10 import Cifar10Split
from lossx.runtime.graphs import IMAGE_SHAPE

_SIZE = (IMAGE_SHAPE[2], IMAGE_SHAPE[1])  # PIL's (width, height)


# The most pixels lossx decodes from one file: Pillow's own decompression-bomb limit (about
# 9,459 x 9,459), beyond which it warns and then decodes anyway. A larger file is refused from
# its header, before it is decoded.
MAX_IMAGE_PIXELS = 89_478_485


def load_image(path: Path) -> np.ndarray:
    """The image in `path` as uint8 [32, 32, 3] RGB."""
    path = regular_file(path, "image", DataError)  # a FIFO would block Pillow's read
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below
            with Image.open(path) as image:
                pixels = image.width * image.height
                if pixels > MAX_IMAGE_PIXELS:
                    raise DataError(
                        f"{path}: {image.width:,}x{image.height:,} is {pixels:,} pixels, more "
                        f"than the {MAX_IMAGE_PIXELS:,} lossx decodes; downscale it first"
                    )
                image.load()
                if image.width == 0 or image.height == 0:
                    raise DataError(f"{path}: an empty {image.width}x{image.height} image")
                rgb = _to_rgb(image)
    except Image.DecompressionBombError:  # over twice the cap: Pillow refuses it on opening
        raise DataError(
            f"{path}: more than the {MAX_IMAGE_PIXELS:,} pixels lossx decodes; downscale it first"
        ) from None
    except UnidentifiedImageError as e:
        raise DataError(f"{path}: not an image lossx can read ({type(e).__name__})") from None
    except (OSError, ValueError, SyntaxError) as e:  # missing, truncated or corrupt files
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise DataError(f"{path}: cannot read the image ({reason})") from None
    if rgb.size != _SIZE:
        rgb = rgb.resize(_SIZE, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # 16-bit grey (Pillow's "I;16" or "I"): keep the top 8 bits
        grey = np.clip(np.asarray(image, dtype=np.int64) >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        raise DataError(f"{image.filename}: floating-point images are not supported")
    return image.convert("RGB")


def jpeg_copies(images: np.ndarray, quality: int) -> np.ndarray:
    """uint8 [N,32,32,3] RGB images saved as JPEG at `quality` by Pillow (its default 4:2:0
    chroma subsampling) and decoded again: what the model sees of a JPEG photo."""
    if not 1 <= quality <= 95:
        raise DataError(f"JPEG quality must be 1..95 (Pillow's useful range), got {quality}")
    copies = np.empty_like(images)
    for index, image in enumerate(images):
        copies[index] = jpeg_copy(image, quality)
    return copies


def jpeg_copy(image: np.ndarray, quality: int) -> np.ndarray:
    """One uint8 [H,W,3] image through Pillow's JPEG encoder and decoder."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def as_jpeg(split: Cifar10Split, quality: int) -> Cifar10Split:
    """`split` with every image replaced by its JPEG copy (jpeg_copies)."""
    images = jpeg_copies(split.images[:], quality)  # an array, or streamed images read whole
    source = f"{split.source}, as JPEG quality {quality} (Pillow)"
    return Cifar10Split(images, split.labels, split.class_names, source)
