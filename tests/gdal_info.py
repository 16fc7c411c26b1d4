"""What GDAL itself reports about a raster's classes (category names, raster attribute table), read
through the GDAL library rasterio ships, as ``gdalinfo`` would: rasterio has no API for either."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from pathlib import Path

import rasterio


def _gdal() -> ctypes.CDLL:
    libs = Path(rasterio.__file__).resolve().parent.parent / "rasterio.libs"
    found = glob.glob(str(libs / "libgdal-*.so*")) or glob.glob(str(libs / "libgdal*"))
    if not found:  # a rasterio built against a system GDAL
        name = ctypes.util.find_library("gdal")
        if name is None:
            raise OSError("no GDAL library found beside rasterio or on the system")
        found = [name]
    lib = ctypes.CDLL(found[0])
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for fn, res, args in [
        ("GDALOpen", vp, [cp, ctypes.c_int]),
        ("GDALClose", None, [vp]),
        ("GDALGetMetadata", ctypes.POINTER(cp), [vp, cp]),
        ("GDALGetRasterBand", vp, [vp, ctypes.c_int]),
        ("GDALGetRasterCategoryNames", ctypes.POINTER(cp), [vp]),
        ("GDALGetDefaultRAT", vp, [vp]),
        ("GDALRATGetRowCount", ctypes.c_int, [vp]),
        ("GDALRATGetColumnCount", ctypes.c_int, [vp]),
        ("GDALRATGetNameOfCol", cp, [vp, ctypes.c_int]),
        ("GDALRATGetValueAsString", cp, [vp, ctypes.c_int, ctypes.c_int]),
    ]:
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = args
    lib.GDALAllRegister()
    return lib


def classes(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """``(category names, attribute table rows as {column: value})`` of band 1 of ``path``."""
    lib = _gdal()
    ds = lib.GDALOpen(str(path).encode(), 0)
    if not ds:
        raise OSError(f"GDAL cannot open {path}")
    try:
        lib.GDALGetMetadata(ds, None)  # as gdalinfo does first: GTiff loads its .aux.xml lazily
        band = lib.GDALGetRasterBand(ds, 1)
        raw = lib.GDALGetRasterCategoryNames(band)
        names = []
        while raw and raw[len(names)]:
            names.append(raw[len(names)].decode())
        rows = []
        rat = lib.GDALGetDefaultRAT(band)
        if rat:
            cols = [lib.GDALRATGetNameOfCol(rat, c).decode() for c in range(lib.GDALRATGetColumnCount(rat))]
            for r in range(lib.GDALRATGetRowCount(rat)):
                rows.append({c: lib.GDALRATGetValueAsString(rat, r, i).decode() for i, c in enumerate(cols)})
        return names, rows
    finally:
        lib.GDALClose(ds)
