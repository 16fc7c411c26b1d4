"""Pictures a person would rather look at: display RGB from imagery, class maps in their own colours,
legends, titled panels, heat maps and grids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rsdiff.data.classmap import IGNORE_INDEX, colour_lut


def rgb_bands(band_names: Sequence[str], count: int) -> list[int]:
    """The three band indexes (0-based) to show as red, green, blue: the bands named red/green/blue
    when all three are present, else the first three (one band is shown as grey)."""
    names = [n.lower() for n in band_names]
    if {"red", "green", "blue"} <= set(names):
        return [names.index("red"), names.index("green"), names.index("blue")]
    return [0, 1, 2] if count >= 3 else [0, 0, 0]


def display_rgb(pixels: np.ndarray, valid: np.ndarray, band_names: Sequence[str]) -> np.ndarray:
    """``(C, H, W)`` source pixels -> ``(H, W, 3)`` uint8 with a 2-98 % stretch per band over the
    ``(H, W)`` bool ``valid`` pixels (see :func:`rgb_bands` for which bands)."""
    out = np.zeros((*pixels.shape[1:], 3), np.uint8)
    for k, b in enumerate(rgb_bands(band_names, pixels.shape[0])):
        band = pixels[b].astype(np.float32)
        vals = band[valid] if valid.any() else band.ravel()
        lo, hi = np.percentile(vals, [2, 98]) if vals.size else (0.0, 1.0)
        out[..., k] = (np.clip((band - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    return out


def model_rgb(x: Any, band_names: Sequence[str] = ()) -> np.ndarray:
    """``(B, C, H, W)`` model-space tensor or array in [-1, 1] -> ``(B, H, W, 3)`` uint8 display
    images, no stretch (the model's normalisation already spans [-1, 1])."""
    x = np.asarray(x.float().cpu().numpy() if hasattr(x, "cpu") else x, np.float32)
    x = x[:, rgb_bands(band_names, x.shape[1])]
    return ((x.transpose(0, 2, 3, 1) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def class_colours(labels: np.ndarray, classes: Sequence[dict[str, Any]], under: np.ndarray) -> np.ndarray:
    """``(H, W)`` class ids in exactly their classes' colours (the class map's colour table, no
    blending), as ``(H, W, 3)`` uint8; pixels without a class (ignore/nodata) show ``under``."""
    out = colour_lut(classes)[labels]
    missing = labels == IGNORE_INDEX
    out[missing] = under[missing]
    return out


# Stops of a dark-to-bright heat ramp (black, purple, red, orange, pale yellow): perceptually
# ordered, readable in greyscale, and distinct from the class colours.
HEAT_STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


def heat(values: np.ndarray, valid: np.ndarray, vmax: float) -> np.ndarray:
    """``(H, W)`` values in ``[0, vmax]`` -> ``(H, W, 3)`` uint8 heat colours; invalid pixels white."""
    t = np.clip(np.nan_to_num(values.astype(np.float32) / max(vmax, 1e-12)), 0, 1) * (len(HEAT_STOPS) - 1)
    lo = np.minimum(t.astype(int), len(HEAT_STOPS) - 2)
    frac = (t - lo)[..., None]
    out = HEAT_STOPS[lo] * (1 - frac) + HEAT_STOPS[lo + 1] * frac
    out[~valid] = 255
    return out.round().astype(np.uint8)


def side_by_side(images: Sequence[np.ndarray], pad: int = 4) -> np.ndarray:
    """Join ``(H, W, 3)`` uint8 pictures left to right with white gaps."""
    h = max(i.shape[0] for i in images)
    parts = []
    for i, img in enumerate(images):
        canvas = np.full((h, img.shape[1], 3), 255, np.uint8)
        canvas[: img.shape[0]] = img
        parts.append(canvas)
        if i < len(images) - 1:
            parts.append(np.full((h, pad, 3), 255, np.uint8))
    return np.concatenate(parts, 1)


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``(B, H, W, 3)`` uint8 images into one ``(rows*(H+pad)+pad, cols*(W+pad)+pad, 3)`` picture."""
    b, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y : y + h, x : x + w] = img
    return out


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (FreeType)
    except (TypeError, OSError, ImportError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def enlarge(picture: np.ndarray, min_height: int) -> np.ndarray:
    """``picture`` scaled up by a whole factor (nearest neighbour) until at least ``min_height`` px
    tall, so that small tiles stay readable beside their labels."""
    k = max(1, -(-min_height // picture.shape[0]))
    return np.kron(picture, np.ones((k, k, 1), np.uint8)) if k > 1 else picture


def label_height(font_size: int) -> int:
    """Height in px of one line of titles or column labels :func:`labelled` adds."""
    return font_size + 6


def labelled(
    picture: np.ndarray,
    title: str,
    col_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    font_size: int = 13,
) -> np.ndarray:
    """``(H, W, 3)`` uint8 ``picture`` with a title above it (none for ""), ``col_labels`` centred
    over equal-width columns and ``row_labels`` left of equal-height rows (white margins, black text)."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    line = label_height(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = (max(probe.textlength(r, font=font) for r in row_labels) + 10) if row_labels else 0
    head = line if title else 0
    top = head + (line if col_labels else 0)
    h, w = picture.shape[:2]
    width = max(int(left) + w, int(probe.textlength(title, font=font)) + 8)
    canvas = Image.new("RGB", (width, top + h), "white")
    canvas.paste(Image.fromarray(picture), (int(left), top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black", font=font)
    for i, text in enumerate(col_labels):
        centre = left + (i + 0.5) * w / len(col_labels)
        x = centre - probe.textlength(text, font=font) / 2
        draw.text((x, head + 2), text, fill="black", font=font)
    for i, text in enumerate(row_labels):
        middle = top + (i + 0.5) * h / len(row_labels)
        draw.text((4, middle - font_size / 2), text, fill="black", font=font)
    return np.asarray(canvas)


def legend(classes: Sequence[dict[str, Any]], font_size: int = 13, max_width: int = 1024) -> np.ndarray:
    """A key of ``classes`` (``{"name", "colour"}`` as in the head and predictions.json): a swatch
    in exactly the colour a class map uses, then its name; entries wrap to rows ``max_width`` px wide."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lut = colour_lut(classes)
    swatch, gap, line = font_size + 2, 14, font_size + 10
    entries, x, rows = [], 6, 0
    for k, c in enumerate(classes):
        size = swatch + 6 + int(probe.textlength(str(c["name"]), font=font))
        if x + size > max_width and x > 6:
            x, rows = 6, rows + 1
        entries.append((x, rows, c.get("id", k), str(c["name"])))
        x += size + gap
    width = max(e[0] + swatch + 6 + int(probe.textlength(e[3], font=font)) for e in entries) + 6
    canvas = Image.new("RGB", (min(max_width, width), (rows + 1) * line + 6), "white")
    draw = ImageDraw.Draw(canvas)
    for x, row, c_id, name in entries:
        y = 5 + row * line
        draw.rectangle(
            [x, y, x + swatch, y + swatch], fill=tuple(int(v) for v in lut[int(c_id)]), outline="black"
        )
        draw.text((x + swatch + 6, y), name, fill="black", font=font)
    return np.asarray(canvas)


def stack(images: Sequence[np.ndarray], pad: int = 4) -> np.ndarray:
    """Join ``(H, W, 3)`` uint8 pictures top to bottom with white gaps (left-aligned)."""
    w = max(i.shape[1] for i in images)
    parts = []
    for i, img in enumerate(images):
        canvas = np.full((img.shape[0], w, 3), 255, np.uint8)
        canvas[:, : img.shape[1]] = img
        parts.append(canvas)
        if i < len(images) - 1:
            parts.append(np.full((pad, w, 3), 255, np.uint8))
    return np.concatenate(parts, 0)
