"""Pictures of results, for people who would rather look than read: the confusion matrix of an
evaluation and the curves of a training run, as PNG. Drawn with Pillow, which the plain install
already has (a plotting library would add tens of megabytes for a grid of cells and a few
lines)."""

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


WIDTH, PANEL, MARGIN = 560, 200, 56  # a line chart's width, each panel's height, its margins
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def line_chart_png(
    title: str, x: list[int], panels: list[tuple[str, dict[str, list[float]], str]]
) -> bytes:
    """Lines over `x` as PNG bytes, one panel under another: each panel (its axis label, its
    lines by name, a format for its tick labels such as "{:.2f}"), its y axis spanning what its
    lines hold, the first and last x labelled."""
    font = ImageFont.load_default()
    height = PAD * 6 + len(panels) * (PANEL + MARGIN)
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD), title, fill="black", font=font)
    for index, (label, lines, ticks) in enumerate(panels):
        top = PAD * 6 + index * (PANEL + MARGIN)
        box = (MARGIN, top, WIDTH - PAD * 2, top + PANEL)
        _panel(draw, font, box, x, label, lines, ticks)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _panel(draw, font, box, x, label, lines, ticks) -> None:
    left, top, right, bottom = box
    values = [v for series in lines.values() for v in series]
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 0.5, high + 0.5
    span = max(x[-1] - x[0], 1)

    def point(epoch: int, value: float) -> tuple[float, float]:
        return (
            left + (epoch - x[0]) / span * (right - left),
            bottom - (value - low) / (high - low) * (bottom - top),
        )

    draw.rectangle(box, outline=(160, 160, 160))
    draw.text((left, top - 2), label, fill="black", font=font, anchor="lb")
    draw.text((left - 4, top), ticks.format(high), fill="black", font=font, anchor="ra")
    draw.text((left - 4, bottom), ticks.format(low), fill="black", font=font, anchor="rs")
    draw.text((left, bottom + 4), f"epoch {x[0]}", fill="black", font=font, anchor="la")
    draw.text((right, bottom + 4), f"epoch {x[-1]}", fill="black", font=font, anchor="ra")
    for number, (name, series) in enumerate(lines.items()):
        colour = _COLOURS[number % len(_COLOURS)]
        points = [point(epoch, value) for epoch, value in zip(x, series, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
        legend = (right - 150, top + 6 + number * 14)
        draw.line((legend[0], legend[1] + 5, legend[0] + 16, legend[1] + 5), fill=colour, width=2)
        draw.text((legend[0] + 20, legend[1]), name, fill="black", font=font)
