"""Scenes: discovering image (+ label mask) files and reading them window by window.

A scene is one raster: a GeoTIFF (any band count, uint8/uint16, with CRS/transform/nodata) or a
plain JPG/PNG (no georeference), optionally paired with a label mask of the same size found
through a template such as ``{dir}/../masks/{stem}.png``. Reads are windowed, also in S3 (through
GDAL, see :mod:`rsdiff.data.remote`): a scene is never loaded or downloaded whole.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rsdiff import storage
from rsdiff.data import remote
from rsdiff.data.classmap import IGNORE_INDEX, ClassMap, MaskKind
from rsdiff.errors import DataError

IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".jp2")
SUPPORTED_DTYPES = ("uint8", "uint16")


@dataclass(frozen=True)
class SceneRef:
    """Where a scene lives: a stable id, its image URI and optional mask URI."""

    id: str
    image: str
    mask: str | None = None


def scene_id(image_uri: str, root: str) -> str:
    """A key-safe id from the image path relative to ``root``: ``tile_1/images/a.jpg`` -> ``tile_1-images-a``.

    Ids contain only ``[A-Za-z0-9_-]`` (WebDataset splits keys at the first ``.``).
    """
    rel = image_uri[len(root) :].lstrip("/") if image_uri.startswith(root) else storage.name(image_uri)
    stem = rel.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem.replace("/", "-")).strip("-") or "scene"


def mask_uri(image_uri: str, template: str) -> str:
    """Fill a mask template: ``{dir}`` (image folder), ``{stem}`` (name sans suffix), ``{name}``."""
    folder, _, fname = image_uri.rpartition("/")
    stem = fname.rsplit(".", 1)[0]
    filled = template.format(dir=folder, stem=stem, name=fname)
    if storage.is_s3(filled):
        bucket_part, key = filled[len("s3://") :].split("/", 1)
        return f"s3://{bucket_part}/{posixpath.normpath(key)}"
    return posixpath.normpath(filled)


def discover(inputs: Sequence[str], mask_template: str | None = None) -> list[SceneRef]:
    """Expand globs/folders/prefixes/files into scenes, sorted and de-duplicated.

    A pattern with wildcards may match nothing (others may); an explicit file, folder or prefix
    must hold at least one image.

    Raises:
        DataError: an explicit input that does not exist or holds no image, or inputs that
            together match no image file.
    """
    images: list[str] = []
    for pattern in inputs:
        matched = [u for u in storage.glob(str(pattern)) if u.lower().endswith(IMAGE_SUFFIXES)]
        if not matched and not any(ch in str(pattern) for ch in "*?["):
            raise DataError(
                f"input {storage.display(str(pattern))} "
                + ("is not an image file" if storage.glob(str(pattern)) else "does not exist")
                + f" ({', '.join(IMAGE_SUFFIXES)}); fix or remove it from the inputs"
            )
        images += matched
    images = sorted({storage.absolute(u) for u in images})
    if mask_template:
        masks = {mask_uri(u, mask_template) for u in images}
        images = [u for u in images if u not in masks]
    if not images:
        raise DataError(
            f"inputs {list(inputs)} match no image file ({', '.join(IMAGE_SUFFIXES)}); "
            "check the glob/prefix (quote it so the shell does not expand it)"
        )
    root = _common_prefix([u.rsplit("/", 1)[0] for u in images])
    refs = [
        SceneRef(scene_id(u, root), u, mask_uri(u, mask_template) if mask_template else None) for u in images
    ]
    ids = [r.id for r in refs]
    if len(set(ids)) != len(ids):
        dupe = sorted(i for i in ids if ids.count(i) > 1)[0]
        files = [storage.display(r.image) for r in refs if r.id == dupe]
        raise DataError(
            f"the files {files[:4]} all map to the scene id {dupe!r} (ids keep only ASCII letters, digits, "
            "'-' and '_'); rename them so they differ in those"
        )
    return refs


def _common_prefix(paths: Sequence[str]) -> str:
    """The longest common ``/``-separated prefix of paths or URIs."""
    parts = [p.split("/") for p in paths]
    out = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        out.append(column[0])
    return "/".join(out)


class SceneReader:
    """An open scene: header facts plus windowed reads of pixels, validity and labels.

    Use as a context manager. Scenes in S3 are read in place through GDAL
    (:mod:`rsdiff.data.remote`): opening one reads its header only, and each window read fetches
    the byte ranges under that window.
    """

    def __init__(
        self, ref: SceneRef, classmap: ClassMap | None = None, region: Sequence[int] | None = None
    ) -> None:
        """``region``: ``[row, col, height, width]`` px of the scene to expose (clipped to the scene);
        sizes, reads and transforms are then relative to it. None: the whole scene."""
        self.ref = ref
        self.classmap = classmap
        self.region = None if region is None else [int(v) for v in region]
        self._stack = contextlib.ExitStack()
        self.row0 = self.col0 = 0

    def __enter__(self) -> SceneReader:
        from rasterio.errors import RasterioIOError

        try:
            self.ds = remote.open_dataset(self.ref.image, self._stack)
        except RasterioIOError as exc:
            self._stack.close()
            raise DataError(
                f"{storage.display(self.ref.image)} is not a readable raster (GeoTIFF/JPG/PNG): {exc}"
            ) from exc
        except BaseException:
            self._stack.close()
            raise
        if self.ds.count < 1 or self.ds.width < 1 or self.ds.height < 1:
            self._stack.close()
            raise DataError(
                f"{storage.display(self.ref.image)} is empty ({self.ds.width}x{self.ds.height} px)"
            )
        dtypes = set(self.ds.dtypes)
        if len(dtypes) != 1 or self.dtype not in SUPPORTED_DTYPES:
            self._stack.close()
            raise DataError(
                f"{storage.display(self.ref.image)} has band dtype(s) {sorted(dtypes)}; rsdiff ingests "
                f"{'/'.join(SUPPORTED_DTYPES)} imagery (convert with gdal_translate -ot UInt16)"
            )
        self.mask_ds = None
        if self.ref.mask is not None:
            try:
                self.mask_ds = remote.open_dataset(self.ref.mask, self._stack)
            except storage.NotFoundError as exc:
                self._stack.close()
                raise DataError(
                    f"no label mask for {storage.display(self.ref.image)}: expected "
                    f"{storage.display(self.ref.mask)} (check labels.mask_template)"
                ) from exc
            except RasterioIOError as exc:
                self._stack.close()
                raise DataError(
                    f"mask {storage.display(self.ref.mask)} is not a readable image: {exc}"
                ) from exc
            if (self.mask_ds.width, self.mask_ds.height) != (self.ds.width, self.ds.height):
                self._stack.close()
                raise DataError(
                    f"mask {storage.display(self.ref.mask)} is {self.mask_ds.width}x{self.mask_ds.height} px "
                    f"but its image {storage.display(self.ref.image)} is {self.ds.width}x{self.ds.height} px"
                )
        if self.region is not None:
            self._clip_region()
        return self

    def _clip_region(self) -> None:
        assert self.region is not None
        if len(self.region) != 4 or self.region[2] < 1 or self.region[3] < 1:
            self._stack.close()
            raise DataError(
                f"region {self.region} must be [row, col, height, width] px, height and width >= 1"
            )
        row, col, h, w = self.region
        r0, c0 = max(0, row), max(0, col)
        r1, c1 = min(self.ds.height, row + h), min(self.ds.width, col + w)
        if r1 <= r0 or c1 <= c0:
            self._stack.close()
            raise DataError(
                f"region {self.region} lies outside {storage.display(self.ref.image)} "
                f"({self.ds.width}x{self.ds.height} px); give [row, col, height, width] inside it"
            )
        self.region = [r0, c0, r1 - r0, c1 - c0]
        self.row0, self.col0 = r0, c0

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def width(self) -> int:
        """Width in px (of the region, if one was given)."""
        return int(self.region[3] if self.region else self.ds.width)

    @property
    def height(self) -> int:
        """Height in px (of the region, if one was given)."""
        return int(self.region[2] if self.region else self.ds.height)

    @property
    def transform(self) -> Any:
        """The affine transform of the exposed area (the region's, if one was given)."""
        from rasterio.windows import Window, transform

        if not self.region:
            return self.ds.transform
        return transform(Window(self.col0, self.row0, self.width, self.height), self.ds.transform)

    def _window(self, row: int, col: int, height: int, width: int) -> Any:
        from rasterio.windows import Window

        return Window(self.col0 + col, self.row0 + row, width, height)

    @property
    def bands(self) -> int:
        return int(self.ds.count)

    @property
    def dtype(self) -> str:
        return str(self.ds.dtypes[0])

    @property
    def band_names(self) -> list[str]:
        """A name per band: its description if the file has one, else its colour interpretation
        (``red``, ``green``, ``blue``, ``gray``, ...), else ``band_{i}`` (1-based)."""
        names = []
        for i, (desc, interp) in enumerate(zip(self.ds.descriptions, self.ds.colorinterp), start=1):
            kind = interp.name.lower()
            if desc:
                names.append(str(desc))
            elif kind in {"red", "green", "blue", "alpha", "gray"}:
                names.append(kind)
            else:
                names.append(f"band_{i}")
        return names if len(set(names)) == len(names) else [f"band_{i}" for i in range(1, len(names) + 1)]

    @property
    def crs(self) -> str | None:
        """CRS as WKT (None when not georeferenced)."""
        return self.ds.crs.to_wkt() if self.ds.crs else None

    def window_transform(self, row: int, col: int, size: int) -> list[float] | None:
        """The affine transform of a window as 6 GDAL-order numbers ``(a, b, c, d, e, f)``."""
        if not self.ds.crs:
            return None
        from rasterio.windows import transform

        t = transform(self._window(row, col, size, size), self.ds.transform)
        return [t.a, t.b, t.c, t.d, t.e, t.f]

    def _reopen(self) -> None:
        """Open the scene's datasets again (after :func:`~rsdiff.data.remote.renew_credentials`:
        an open dataset keeps the keys it was opened with)."""
        self.ds = remote.open_dataset(self.ref.image, self._stack)
        if self.mask_ds is not None and self.ref.mask is not None:
            self.mask_ds = remote.open_dataset(self.ref.mask, self._stack)

    def read(
        self,
        row: int,
        col: int,
        size: int,
        width: int | None = None,
        mask: bool = True,
        out_shape: tuple[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels and validity of one ``size`` x ``width`` (default square) window, at
        ``out_shape = (h, w)`` px instead when given (nearest-neighbour decimation, for overviews).

        Returns:
            ``(pixels, valid)``: ``(C, size, width)`` in the source dtype, ``(size, width)`` bool
            (False where nodata, alpha=0 or outside the dataset mask; None without ``mask``).
        """
        w = self._window(row, col, size, width or size)
        where = f"window (row={self.row0 + row}, col={self.col0 + col}, {size} px)"
        shape = decimated(self.ds.count, out_shape)
        pixels = remote.retrying_read(
            lambda: self.ds.read(window=w, **shape), self.ref.image, where, self._reopen
        )
        if not mask:
            return pixels, None
        mask_shape = decimated(None, out_shape)
        valid = remote.retrying_read(
            lambda: self.ds.dataset_mask(window=w, **mask_shape), self.ref.image, where, self._reopen
        )
        return pixels, valid > 0

    def valid(self, row: int, height: int) -> np.ndarray:
        """``(height, width)`` bool validity of whole rows ``row .. row + height``."""
        w = self._window(row, 0, height, self.width)
        where = f"rows {self.row0 + row}..{self.row0 + row + height}"
        return (
            remote.retrying_read(lambda: self.ds.dataset_mask(window=w), self.ref.image, where, self._reopen)
            > 0
        )

    def read_labels(
        self,
        row: int,
        col: int,
        size: int,
        width: int | None = None,
        out_shape: tuple[int, int] | None = None,
    ) -> tuple[np.ndarray, int]:
        """Class ids of a ``size`` x ``width`` (default square) window (at ``out_shape`` px when
        given, nearest neighbour): uint8 (IGNORE_INDEX = no label), and the count of pixels with an
        unknown colour/value."""
        assert self.mask_ds is not None and self.classmap is not None
        w = self._window(row, col, size, width or size)
        shape = decimated(self.mask_ds.count, out_shape)
        raw = remote.retrying_read(
            lambda: self.mask_ds.read(window=w, **shape),
            self.ref.mask or "",
            f"window (row={row}, col={col})",
            self._reopen,
        )
        where = f"mask {storage.display(self.ref.mask or '')} window (row={row}, col={col})"
        if self.classmap.kind is MaskKind.index:
            ids, unknown = self.classmap.encode(raw[0], where)
            if self.mask_ds.nodata is not None:
                ids[raw[0] == self.mask_ds.nodata] = IGNORE_INDEX
            return ids, unknown
        return self.classmap.encode(self.mask_rgb(raw, where), where)

    def mask_rgb(self, raw: np.ndarray | None = None, where: str | None = None) -> np.ndarray:
        """``(H, W, 3)`` uint8 colours of a colour mask: the ``(bands, H, W)`` ``raw`` read from it
        (default: the whole mask), its palette applied when it has one band and a colour table.

        Raises:
            DataError: a one-band mask without a colour table (a class-id mask: ``labels.kind=index``).
        """
        assert self.mask_ds is not None
        raw = self.mask_ds.read() if raw is None else raw
        if raw.shape[0] > 1:
            return np.moveaxis(raw[:3], 0, -1)
        try:
            cmap = self.mask_ds.colormap(1)
        except ValueError as exc:
            what = where or f"mask {storage.display(self.ref.mask or '')}"
            raise DataError(
                f"{what} has one band and no colour table; use labels.kind=index for class-id masks"
            ) from exc
        lut = np.zeros((256, 3), np.uint8)
        for k, rgba in cmap.items():
            if k < 256:
                lut[k] = rgba[:3]
        return lut[raw[0]]


def decimated(count: int | None, out_shape: tuple[int, int] | None) -> dict[str, Any]:
    """rasterio read arguments for a nearest-neighbour read at ``out_shape`` (none: full size)."""
    if out_shape is None:
        return {}
    from rasterio.enums import Resampling

    shape = tuple(out_shape) if count is None else (count, *out_shape)
    return {"out_shape": shape, "resampling": Resampling.nearest}
