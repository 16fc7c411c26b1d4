"""Writing predictions as Cloud-Optimized GeoTIFFs (class map, optional probabilities) and quicklooks.

Rows arrive top to bottom in bands of any height; they are buffered to whole 256-px block rows
and written into a tiled, DEFLATE-compressed GeoTIFF in a temporary folder, then turned into a
COG (internal overviews, nearest resampling) and published to the output URI in one step. Until
``publish`` returns nothing exists at the output URIs, so a crash never leaves a partial map.

- Class map: 1 band uint8, class ids ``0..C-1``, 255 = nodata (source nodata pixels), a colour
  table from the class map, tags ``rsdiff_classes`` (JSON), ``rsdiff_class_names``, ``rsdiff_head``,
  ``rsdiff_timesteps``, ``rsdiff_blocks``, ``rsdiff_checkpoint``; beside it GDAL's ``.tif.aux.xml``
  (category names, raster attribute table) and a QGIS ``.qml`` style (:mod:`.gis_style`).
- Probabilities: C bands uint8, ``round(255 * p)``, band descriptions = class names.
- Uncertainty: float32 bands in nats (``entropy_nats``, then ``mutual_information_nats`` where the
  head has members), NaN = nodata, tag ``rsdiff_max_entropy`` (``log C``, the value of a uniform
  distribution) so a viewer can scale it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsdiff import storage
from rsdiff.data.classmap import IGNORE_INDEX, parse_colour
from rsdiff.tempfiles import task_tempdir

BLOCK = 256


class PredictionWriter:
    """Streams class ids (and optionally probabilities) of one scene into GeoTIFFs.

    Args:
        height, width: scene size (px).
        crs, transform: the source's georeference (``None`` = not georeferenced).
        classes: the head's classes (``id``, ``name``, ``colour``).
        probabilities: also write the per-class probability raster.
        tags: extra dataset tags (provenance).
        uncertainty: band names of the float32 uncertainty raster (None: no such raster).
    """

    def __init__(
        self,
        height: int,
        width: int,
        crs: Any,
        transform: Any,
        classes: Sequence[dict[str, Any]],
        probabilities: bool,
        tags: dict[str, str],
        uncertainty: Sequence[str] | None = None,
    ) -> None:
        import math

        import rasterio

        self.height, self.width = height, width
        self.classes = list(classes)
        self._tmp = task_tempdir("predict")
        self.folder = Path(self._tmp.name)
        geo = {"crs": crs, "transform": transform} if crs else {}
        common = dict(
            driver="GTiff",
            height=height,
            width=width,
            tiled=True,
            blockxsize=BLOCK,
            blockysize=BLOCK,
            compress="deflate",
            **geo,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self.cls = rasterio.open(
                self.folder / "class.tif", "w", count=1, dtype="uint8", nodata=IGNORE_INDEX, **common
            )
            self.prob = (
                rasterio.open(
                    self.folder / "proba.tif", "w", count=len(self.classes), dtype="uint8", **common
                )
                if probabilities
                else None
            )
            bands = len(uncertainty or [])
            nan = float("nan")
            self.unc = (
                rasterio.open(
                    self.folder / "uncertainty.tif", "w", count=bands, dtype="float32", nodata=nan, **common
                )
                if uncertainty
                else None
            )
        self.cls.set_band_description(1, "class")
        self.cls.write_colormap(
            1,
            {
                **{int(c["id"]): (*parse_colour(c["colour"]), 255) for c in self.classes},
                IGNORE_INDEX: (0, 0, 0, 0),
            },
        )
        self.cls.update_tags(rsdiff_classes=json.dumps(self.classes), **tags)
        if self.prob is not None:
            for i, c in enumerate(self.classes, start=1):
                self.prob.set_band_description(i, str(c["name"]))
            self.prob.update_tags(rsdiff_scale="probability = value / 255", **tags)
        if self.unc is not None:
            for i, band in enumerate(uncertainty or [], start=1):
                self.unc.set_band_description(i, band)
            self.unc.update_tags(
                rsdiff_units="nats", rsdiff_max_entropy=f"{math.log(len(self.classes)):.6f}", **tags
            )
        self._pending: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        self._pending_rows = 0
        self._next_row = 0
        self.class_pixels = np.zeros(len(self.classes), np.int64)

    def write_rows(
        self, first_row: int, probs: np.ndarray, valid: np.ndarray, uncertainty: np.ndarray | None = None
    ) -> None:
        """Add rows from ``first_row`` on: ``(C, rows, width)`` probabilities, ``(rows, width)`` validity
        and, with an uncertainty raster, its ``(U, rows, width)`` values."""
        if first_row != self._next_row + self._pending_rows:
            raise ValueError(f"rows must arrive in order: got {first_row}, expected {self._next_row}")
        ids = probs.argmax(0).astype(np.uint8)
        ids[~valid] = IGNORE_INDEX
        self.class_pixels += np.bincount(ids[valid], minlength=len(self.classes))[: len(self.classes)]
        p8 = None
        if self.prob is not None:
            p8 = np.rint(np.clip(probs, 0, 1) * 255).astype(np.uint8)
            p8[:, ~valid] = 0
        unc = None
        if self.unc is not None:
            if uncertainty is None:
                raise ValueError("this writer has an uncertainty raster: pass its rows")
            unc = uncertainty.astype(np.float32, copy=True)
            unc[:, ~valid] = np.nan
        self._pending.append((ids, p8, unc))
        self._pending_rows += ids.shape[0]
        if self._pending_rows >= BLOCK:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        from rasterio.windows import Window

        if not self._pending:
            return
        ids = np.concatenate([p[0] for p in self._pending], 0)
        probs = np.concatenate([p[1] for p in self._pending], 1) if self.prob is not None else None
        unc = np.concatenate([p[2] for p in self._pending], 1) if self.unc is not None else None
        n = ids.shape[0] if final else (ids.shape[0] // BLOCK) * BLOCK
        window = Window(0, self._next_row, self.width, n)
        self.cls.write(ids[None, :n], window=window)
        if self.prob is not None and probs is not None:
            self.prob.write(probs[:, :n], window=window)
        if self.unc is not None and unc is not None:
            self.unc.write(unc[:, :n], window=window)
        self._next_row += n
        rest_ids = ids[n:]
        self._pending = (
            [(rest_ids, probs[:, n:] if probs is not None else None, unc[:, n:] if unc is not None else None)]
            if len(rest_ids)
            else []
        )
        self._pending_rows = len(rest_ids)

    def publish(self, class_uri: str, proba_uri: str | None, uncertainty_uri: str | None = None) -> None:
        """Flush, convert to COG and publish atomically to the output URIs."""
        from rasterio.shutil import copy

        self._flush(final=True)
        if self._next_row != self.height:
            raise ValueError(f"wrote {self._next_row} of {self.height} rows")
        self.cls.close()
        for ds in (self.prob, self.unc):
            if ds is not None:
                ds.close()
        outputs = [("class.tif", class_uri)] + ([("proba.tif", proba_uri)] if self.prob and proba_uri else [])
        if self.unc is not None and uncertainty_uri:
            outputs.append(("uncertainty.tif", uncertainty_uri))
        for name, uri in outputs:
            cog = self.folder / f"cog-{name}"
            resampling = "NEAREST" if name == "class.tif" else "AVERAGE"
            copy(
                self.folder / name,
                cog,
                driver="COG",
                compress="DEFLATE",
                blocksize=BLOCK,
                overview_resampling=resampling,
            )
            if name == "class.tif":  # names and colours for GIS, beside the map, before it
                from rsdiff.prediction.gis_style import pam_xml, qgis_style, sidecar_uris

                aux, qml = sidecar_uris(uri)
                storage.write_text(aux, pam_xml(self.classes))
                storage.write_text(qml, qgis_style(self.classes, IGNORE_INDEX))
            storage.upload(cog, uri)

    def close(self) -> None:
        """Discard the temporary files (after ``publish`` or on failure)."""
        for ds in (self.cls, self.prob, self.unc):
            if ds is not None and not ds.closed:
                ds.close()
        self._tmp.cleanup()


def quicklook_font(panel_width: int) -> int:
    """Font size (px) of a quicklook's panel titles and legend, for panels ``panel_width`` px wide:
    the panel titles take :func:`rsdiff.viz.label_height` of it above the panels."""
    return max(13, min(26, panel_width // 40))


def quicklook(
    image: Any,
    class_path: str | Path,
    classes: Sequence[dict[str, Any]],
    band_names: Sequence[str],
    max_size: int = 1024,
    window: Sequence[int] | None = None,
    uncertainty_path: str | Path | None = None,
) -> np.ndarray:
    """``(h, w, 3)`` uint8 picture: the scene and its class map side by side (panels ``max_size`` px
    max), titled, with a legend of the class names below. The map panel shows each class in exactly
    its colour in the GeoTIFF's colour table (unblended; pixels without a class show the scene).
    With ``uncertainty_path``, a third panel: band 1 of that raster (entropy) as heat colours,
    black = certain, pale yellow = ``log C`` (uniform).

    ``image`` is the scene's open rasterio dataset (local or S3) or a path; ``window`` the
    ``[row, col, height, width]`` of it that the class map covers (None: all of it). Reads
    decimated views of the rasters (overviews where they exist), never the full scene.
    """
    import contextlib

    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from rsdiff.viz import class_colours, display_rgb, heat, labelled, legend, side_by_side
    from rsdiff.viz import stack as one_above_another

    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        src = image if hasattr(image, "read") else stack.enter_context(rasterio.open(image))
        cls = stack.enter_context(rasterio.open(class_path))
        row, col, height, width = window or (0, 0, src.height, src.width)
        win = Window(col, row, width, height)
        scale = min(1.0, max_size / max(height, width))
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        pixels = src.read(window=win, out_shape=(src.count, *shape), resampling=Resampling.bilinear)
        valid = src.dataset_mask(window=win, out_shape=shape, resampling=Resampling.nearest) > 0
        ids = cls.read(1, out_shape=shape, resampling=Resampling.nearest)
        unc = None
        if uncertainty_path is not None:
            unc = stack.enter_context(rasterio.open(uncertainty_path)).read(
                1, out_shape=shape, resampling=Resampling.average
            )
    rgb = display_rgb(pixels, valid, band_names)
    panels, titles = [rgb, class_colours(ids, classes, rgb)], ["image", "class map"]
    if unc is not None:
        import math

        top = math.log(max(2, len(classes)))
        panels.append(heat(unc, valid & np.isfinite(unc), top))
        titles.append(f"entropy: black 0 to yellow {top:.2f} nats")
    font = quicklook_font(shape[1])
    picture = labelled(side_by_side(panels), "", titles, font_size=font)
    return one_above_another([picture, legend(classes, font_size=font, max_width=picture.shape[1])])
