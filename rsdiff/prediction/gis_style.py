"""What a GIS needs beside a class-map GeoTIFF to show class names, in the map's own colours:

- ``{map}.tif.aux.xml``: GDAL's PAM sidecar with the band's category names and a thematic raster
  attribute table (value, class name, red, green, blue). GDAL reads it with the GeoTIFF, so
  ``gdalinfo`` lists the categories and QGIS/ArcGIS show the names;
- ``{map}.qml``: a QGIS style (paletted renderer: value, colour, label) that QGIS loads as the
  layer's default style when it opens ``{map}.tif``.

Both are written from the head's classes (``{"id", "name", "colour"}``), the colour table's source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from rsdiff.data.classmap import colour_hex, parse_colour

# GDAL's GDALRATFieldType and GDALRATFieldUsage values (gdal.h)
_INTEGER, _STRING = 0, 2
_GENERIC, _NAME, _MINMAX, _RED, _GREEN, _BLUE = 0, 2, 5, 6, 7, 8


def _by_id(classes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(classes, key=lambda c: int(c["id"]))


def pam_xml(classes: Sequence[dict[str, Any]]) -> str:
    """The ``.aux.xml`` text: band 1's category names (index = pixel value; ids without a class
    get "") and its raster attribute table."""
    ordered = _by_id(classes)
    names = {int(c["id"]): str(c["name"]) for c in ordered}
    categories = "".join(
        f"      <Category>{escape(names.get(i, ''))}</Category>\n" for i in range(max(names) + 1)
    )
    fields = [("Value", _INTEGER, _MINMAX), ("Class", _STRING, _NAME), ("Red", _INTEGER, _RED),
              ("Green", _INTEGER, _GREEN), ("Blue", _INTEGER, _BLUE)]  # fmt: skip
    defs = "".join(
        f'      <FieldDefn index="{i}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage></FieldDefn>\n'
        for i, (n, t, u) in enumerate(fields)
    )
    rows = ""
    for row, c in enumerate(ordered):
        r, g, b = parse_colour(c["colour"])
        cells = "".join(f"<F>{escape(str(v))}</F>" for v in (int(c["id"]), c["name"], r, g, b))
        rows += f'      <Row index="{row}">{cells}</Row>\n'
    return (
        "<PAMDataset>\n"
        '  <PAMRasterBand band="1">\n'
        "    <CategoryNames>\n"
        f"{categories}"
        "    </CategoryNames>\n"
        '    <GDALRasterAttributeTable tableType="thematic">\n'
        f"{defs}{rows}"
        "    </GDALRasterAttributeTable>\n"
        "  </PAMRasterBand>\n"
        "</PAMDataset>\n"
    )


def qgis_style(classes: Sequence[dict[str, Any]], nodata: int) -> str:
    """The ``.qml`` text: QGIS's paletted renderer with each class's value, colour and name;
    ``nodata`` pixels stay transparent."""
    entries = ""
    for c in _by_id(classes):
        colour = quoteattr(colour_hex(parse_colour(c["colour"])).lower())
        label = quoteattr(str(c["name"]))
        value = int(c["id"])
        entries += f'        <paletteEntry value="{value}" color={colour} alpha="255" label={label}/>\n'
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28.0" styleCategories="Symbology">\n'
        "  <pipe>\n"
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">\n'
        "      <rasterTransparency>\n"
        "        <singleValuePixelList>"
        f'<pixelListEntry min="{nodata}" max="{nodata}" percentTransparent="100"/></singleValuePixelList>\n'
        "      </rasterTransparency>\n"
        "      <colorPalette>\n"
        f"{entries}"
        "      </colorPalette>\n"
        "    </rasterrenderer>\n"
        "  </pipe>\n"
        "</qgis>\n"
    )


def sidecar_uris(class_map_uri: str) -> tuple[str, str]:
    """``({map}.tif.aux.xml, {map}.qml)`` beside the class map at ``class_map_uri``."""
    stem = class_map_uri[: -len(".tif")] if class_map_uri.endswith(".tif") else class_map_uri
    return f"{class_map_uri}.aux.xml", f"{stem}.qml"
