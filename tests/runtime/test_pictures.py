"""The confusion matrix as a picture: one cell per (true, predicted) pair, shaded by its share of
the row, so the eye finds the diagonal and the confusions at once."""

import io

from PIL import Image

from lossx.runtime.evaluation import EvalResult
from lossx.runtime.pictures import cell_box, confusion_png


def _result(confusion: list[list[int]]) -> EvalResult:
    names = [f"class{i}" for i in range(len(confusion))]
    total = sum(map(sum, confusion))
    right = sum(confusion[i][i] for i in range(len(confusion)))
    return EvalResult("art", "w", "fp32", "data", total, 1, right / total, {}, {}, 1.0, 1.0, 1.0,
                      ["cpu"], names, confusion)  # fmt: skip


def _corner(image: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int, int]:
    return image.getpixel((box[0] + 3, box[1] + 3))  # clear of the count drawn in the middle


def test_cells_are_shaded_by_their_share_of_the_row():
    result = _result([[10, 0, 0], [5, 5, 0], [0, 0, 0]])
    image = Image.open(io.BytesIO(confusion_png(result)))
    assert image.format == "PNG" and image.mode == "RGB"
    all_of_row = _corner(image, cell_box(result, 0, 0))
    half = _corner(image, cell_box(result, 1, 1))
    none = _corner(image, cell_box(result, 0, 1))
    empty_row = _corner(image, cell_box(result, 2, 2))
    assert none == empty_row == (255, 255, 255)
    assert sum(all_of_row) < sum(half) < sum(none)
    assert all_of_row == (8, 48, 107)


def test_the_picture_grows_with_the_classes():
    small = Image.open(io.BytesIO(confusion_png(_result([[1, 0], [0, 1]]))))
    large = Image.open(io.BytesIO(confusion_png(_result([[1] * 12 for _ in range(12)]))))
    assert large.width > small.width and large.height > small.height
    box = cell_box(_result([[1] * 12 for _ in range(12)]), 11, 11)
    assert box[2] <= large.width and box[3] <= large.height
