"""Pictures of results, for people who would rather look than read: the confusion matrix of an
evaluation as a PNG. Drawn with Pillow, which the plain install already has (a plotting
library would add tens of megabytes for a grid of coloured cells)."""

import io

from PIL import Image, ImageDraw, ImageFont

from lossx.runtime.evaluation import EvalResult

CELL = 40  # pixels per cell
PAD = 8
_LOW, _HIGH = (255, 255, 255), (8, 48, 107)  # white for none of a row, dark blue for all of it


def _shade(share: float) -> tuple[int, int, int]:
    return tuple(round(lo + (hi - lo) * share) for lo, hi in zip(_LOW, _HIGH, strict=True))


def _layout(result: EvalResult) -> tuple[int, int]:
    """Where the grid starts: (left, top) in pixels."""
    font = ImageFont.load_default()
    labels = [f"{i} {name}" for i, name in enumerate(result.class_names)]
    widest = max(font.getbbox(label)[2] for label in labels)
    return PAD * 3 + widest, PAD * 6 + 24


def cell_box(result: EvalResult, true: int, predicted: int) -> tuple[int, int, int, int]:
    """The pixel box of the cell of images of class `true` taken for `predicted`."""
    left, top = _layout(result)
    x, y = left + predicted * CELL, top + true * CELL
    return x, y, x + CELL, y + CELL


def confusion_png(result: EvalResult) -> bytes:
    """The confusion matrix of `result` as PNG bytes: a row per true class, a column per
    predicted class, each cell its count, shaded by the share of its row (white: none, dark
    blue: all), the diagonal being what the model got right."""
    font = ImageFont.load_default()
    classes = len(result.class_names)
    left, top = _layout(result)
    width, height = left + classes * CELL + PAD * 2, top + classes * CELL + PAD * 2
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title = (
        f"confusion matrix: top-1 {result.top1_accuracy:.2%} on {result.images:,} images "
        f"({result.precision})"
    )
    draw.text((PAD, PAD), title, fill="black", font=font)
    draw.text((left, top - PAD * 2 - 12), "predicted class", fill="black", font=font)
    draw.text((PAD, top - PAD * 2 - 12), "true class", fill="black", font=font)
    for index, name in enumerate(result.class_names):
        x, y, _, _ = cell_box(result, index, index)
        draw.text((x + CELL // 2, top - PAD), str(index), fill="black", font=font, anchor="ms")
        draw.text((PAD, y + CELL // 2), f"{index} {name}", fill="black", font=font, anchor="lm")
    for true, row in enumerate(result.confusion):
        total = sum(row)
        for predicted, count in enumerate(row):
            share = count / total if total else 0.0
            box = cell_box(result, true, predicted)
            draw.rectangle(box, fill=_shade(share), outline=(200, 200, 200))
            if count:
                colour = "white" if share >= 0.5 else "black"
                centre = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
                draw.text(centre, f"{count:,}", fill=colour, font=font, anchor="mm")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
