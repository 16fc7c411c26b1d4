"""What a suggestion run hands to people: tile footprints as GeoJSON and a ranked contact sheet.

GeoJSON: one ``FeatureCollection`` of tile polygons per CRS, in that CRS (the scenes' own
coordinates, with the collection's ``crs`` member naming it, which QGIS and GDAL read), so a
footprint lies exactly on the scene's pixel grid. Scenes without a georeference have no
footprint there (their pixel windows are in ``suggestions.json``).

Contact sheet: the first ``n`` tiles in rank order, each as the scene's pixels next to its
uncertainty (heat colours), captioned with rank, scene and score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

CELL = 128  # px of each picture in a contact-sheet cell
CAPTION = 14  # px of caption text above a cell


def footprint(transform: Sequence[float], row: int, col: int, height: int, width: int) -> list[list[float]]:
    """The closed ring ``[[x, y], ...]`` (5 points, clockwise from top-left) of a pixel window, in
    the CRS of the affine ``transform`` ``(a, b, c, d, e, f)``: ``x = a*col + b*row + c``,
    ``y = d*col + e*row + f`` at pixel corners."""
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    corners = [(col, row), (col + width, row), (col + width, row + height), (col, row + height), (col, row)]
    return [[a * x + b * y + c, d * x + e * y + f] for x, y in corners]


def crs_name(crs: str) -> str:
    """A name for the GeoJSON ``crs`` member: ``urn:ogc:def:crs:EPSG::<code>`` where the CRS has an
    EPSG code, else its WKT."""
    from rasterio.crs import CRS

    parsed = CRS.from_user_input(crs)
    code = parsed.to_epsg()
    return f"urn:ogc:def:crs:EPSG::{code}" if code else parsed.to_wkt()


def feature_collections(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{crs: FeatureCollection}`` of the georeferenced entries (``crs``, ``transform``,
    ``window`` ``[row, col, height, width]`` and properties), one polygon per entry in rank order."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        if not e.get("crs") or not e.get("transform"):
            continue
        fc = out.setdefault(
            e["crs"],
            {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs_name(e["crs"])}},
             "features": []},
        )  # fmt: skip
        row, col, h, w = e["window"]
        props = {k: e[k] for k in ("rank", "scene", "score", "mean", "quantile", "valid_fraction", "relaxed")}
        props.update(image=e["image"], row=row, col=col, height=h, width=w)
        fc["features"].append(
            {
                "type": "Feature",
                "properties": props,
                "geometry": {"type": "Polygon", "coordinates": [footprint(e["transform"], row, col, h, w)]},
            }
        )
    return out


def _cell(rgb: np.ndarray, heat: np.ndarray, caption: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    pics = [np.asarray(Image.fromarray(p).resize((CELL, CELL), Image.NEAREST)) for p in (rgb, heat)]
    cell = Image.new("RGB", (2 * CELL + 4, CELL + CAPTION), "white")
    cell.paste(Image.fromarray(pics[0]), (0, CAPTION))
    cell.paste(Image.fromarray(pics[1]), (CELL + 4, CAPTION))
    ImageDraw.Draw(cell).text((2, 1), caption[:44], fill=(0, 0, 0))
    return np.asarray(cell)


def contact_sheet(cells: Sequence[tuple[np.ndarray, np.ndarray, str]], cols: int = 4) -> np.ndarray:
    """``(H, W, 3)`` uint8 sheet of ``(rgb (h, w, 3), heat (h, w, 3), caption)`` cells in rank
    order, left to right then top to bottom."""
    from rsdiff.viz import grid

    if not cells:
        raise ValueError("no tiles to show")
    pictures = np.stack([_cell(*c) for c in cells])
    return grid(pictures, cols=min(cols, len(cells)), pad=6)
