"""The confusion matrix as a picture: one cell per (true, predicted) pair, shaded by its share of
the row, so the eye finds the diagonal and the confusions at once."""

import io

from PIL import Image

from lossx.runtime.evaluation import EvalResult
from lossx.runtime.pictures import (
    MARGIN,
    PAD,
    PANEL,
    WIDTH,
    cell_box,
    confusion_png,
    line_chart_png,
)


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


def test_a_line_chart_puts_each_point_where_its_value_is():
    """Two panels; in each the first line runs from its lowest value at the first epoch to its
    highest at the last, so those points sit at the panel's corners."""
    image = Image.open(io.BytesIO(line_chart_png(
        "curve", [1, 2, 3],
        [("loss", {"train": [2.0, 1.5, 1.0], "eval": [1.9, 1.6, 1.4]}, "{:.2f}"),
         ("accuracy", {"eval": [10.0, 20.0, 40.0]}, "{:.1f}")],
    )))  # fmt: skip
    blue, orange = (31, 119, 180), (255, 127, 14)
    for panel in range(2):
        top = PAD * 6 + panel * (PANEL + MARGIN)
        left, right, bottom = MARGIN, WIDTH - PAD * 2, top + PANEL
        first, last = (left, bottom), (right, top)
        if panel == 0:  # the train loss falls: highest at the first epoch
            first, last = (left, top), (right, bottom)
        assert image.getpixel(first) == image.getpixel(last) == blue
    top = PAD * 6
    eval_last = (WIDTH - PAD * 2, round(top + PANEL - (1.4 - 1.0) / 1.0 * PANEL))
    assert image.getpixel(eval_last) == orange
    assert image.height == PAD * 6 + 2 * (PANEL + MARGIN)
