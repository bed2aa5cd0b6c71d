"""Image files as the model's uint8 [H,W,C] input, fitted to an artifact's image contract,
with a clear error for anything else.

Files become the contract's colour mode, RGB or greyscale "L" (alpha dropped, 16-bit scaled to
8-bit, CMYK and palettes converted by Pillow; a GIF gives its first frame), and are fitted to
its height and width with Pillow's bilinear filter by the contract's resize policy: stretched
(the aspect ratio not kept) or cropped (the shorter side fitted, the centre cut out). Arrays of
another size (CIFAR-10's 32x32 RGB for a 64x64 model) go through the same steps.
"""

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lossx.errors import DataError
from lossx.files import regular_file
from lossx.runtime.contract import COLORS, ImageContract
from lossx.runtime.image_set import ImageSet

# The most pixels lossx decodes from one file: Pillow's own decompression-bomb limit (about
# 9,459 x 9,459), beyond which it warns and then decodes anyway. A larger file is refused from
# its header, before it is decoded.
MAX_IMAGE_PIXELS = 89_478_485


def load_image(path: Path, contract: ImageContract) -> np.ndarray:
    """The image in `path` as uint8 [H,W,C] for `contract`."""
    if contract.channels not in COLORS:
        raise DataError(
            f"{path}: image files give 1 or 3 channels; this model takes {contract.channels} "
            "(feed it arrays)"
        )
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
                converted = _to_mode(image, COLORS[contract.channels])
    except Image.DecompressionBombError:  # over twice the cap: Pillow refuses it on opening
        raise DataError(
            f"{path}: more than the {MAX_IMAGE_PIXELS:,} pixels lossx decodes; downscale it first"
        ) from None
    except UnidentifiedImageError as e:
        raise DataError(f"{path}: not an image lossx can read ({type(e).__name__})") from None
    except (OSError, ValueError, SyntaxError) as e:  # missing, truncated or corrupt files
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise DataError(f"{path}: cannot read the image ({reason})") from None
    return _as_array(_fitted(converted, contract), contract)


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode.startswith("I"):  # 16-bit grey (Pillow's "I;16" or "I"): keep the top 8 bits
        grey = np.clip(np.asarray(image, dtype=np.int64) >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert(mode)
    if image.mode == "F":
        raise DataError(f"{image.filename}: floating-point images are not supported")
    return image.convert(mode)


def _fitted(image: Image.Image, contract: ImageContract) -> Image.Image:
    """`image` at the contract's height and width, by its resize policy (Pillow bilinear)."""
    size = (contract.width, contract.height)  # Pillow's (width, height)
    if image.size == size:
        return image
    if contract.resize == "stretch":
        return image.resize(size, Image.Resampling.BILINEAR)
    factor = max(contract.width / image.width, contract.height / image.height)
    scaled = (max(contract.width, round(image.width * factor)),
              max(contract.height, round(image.height * factor)))  # fmt: skip
    left, top = (scaled[0] - contract.width) // 2, (scaled[1] - contract.height) // 2
    box = (left, top, left + contract.width, top + contract.height)
    return image.resize(scaled, Image.Resampling.BILINEAR).crop(box)


def _as_array(image: Image.Image, contract: ImageContract) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8).reshape(contract.hwc)


def fit(images: np.ndarray, contract: ImageContract) -> np.ndarray:
    """uint8 images [N,H,W,C] of another size or channel count (1 or 3) as the contract's,
    each through the steps an image file takes; as they are where they already fit."""
    if images.shape[1:] == contract.hwc:
        return images
    if contract.channels not in COLORS or images.shape[3] not in COLORS:
        raise DataError(
            f"images of {images.shape[3]} channels cannot become this model's "
            f"{contract.channels}; give images of {contract.channels} channels"
        )
    fitted = np.empty((len(images), *contract.hwc), np.uint8)
    mode = COLORS[contract.channels]
    for index, image in enumerate(images):
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        fitted[index] = _as_array(_fitted(pil.convert(mode), contract), contract)
    return fitted


def jpeg_copies(images: np.ndarray, quality: int) -> np.ndarray:
    """uint8 [N,H,W,C] images (C 1 or 3) saved as JPEG at `quality` by Pillow (its default 4:2:0
    chroma subsampling) and decoded again: what the model sees of a JPEG photo."""
    if not 1 <= quality <= 95:
        raise DataError(f"JPEG quality must be 1..95 (Pillow's useful range), got {quality}")
    copies = np.empty_like(images)
    for index, image in enumerate(images):
        copies[index] = jpeg_copy(image, quality)
    return copies


def jpeg_copy(image: np.ndarray, quality: int) -> np.ndarray:
    """One uint8 [H,W,C] image (C 1 or 3) through Pillow's JPEG encoder and decoder."""
    grey = image.shape[2] == 1
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if grey else image).save(
        buffer, format="JPEG", quality=int(quality)
    )
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L" if grey else "RGB")).reshape(image.shape)


def as_jpeg(split: ImageSet, quality: int) -> ImageSet:
    """`split` with every image replaced by its JPEG copy (jpeg_copies)."""
    whole = split.in_memory()
    source = f"{split.source}, as JPEG quality {quality} (Pillow)"
    return ImageSet(jpeg_copies(whole.images, quality), whole.labels, split.class_names, source,
                    split.skipped)  # fmt: skip
