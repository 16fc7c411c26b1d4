"""Generated sample scenes: small georeferenced rasters with a learnable land-cover pattern.

Used by the demo when no data is given and by the tests. Each scene has water bodies, vegetation
patches, a road grid and buildings on bare land, each with its own spectral signature (and a
bright NIR for vegetation when there are 4 bands), plus sensor noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_CLASSES = ("water", "land", "road", "building", "vegetation")
# Mean reflectance-like signature per class for bands (R, G, B, NIR), in [0, 1].
_SIGNATURES = np.array(
    [
        [0.10, 0.18, 0.30, 0.05],  # water
        [0.55, 0.45, 0.35, 0.40],  # land
        [0.35, 0.35, 0.37, 0.30],  # road
        [0.75, 0.30, 0.25, 0.35],  # building
        [0.20, 0.45, 0.15, 0.80],  # vegetation
    ]
)
SAMPLE_CRS = "EPSG:32640"  # UTM 40N (Dubai)


@dataclass(frozen=True)
class SampleScene:
    """Paths of one generated scene."""

    image: Path
    labels: Path


def _smooth_noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Value noise in [0, 1] with features of about ``scale`` px."""
    gh, gw = h // scale + 2, w // scale + 2
    grid = rng.random((gh, gw))
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx


def sample_labels(height: int, width: int, seed: int) -> np.ndarray:
    """A ``(H, W)`` uint8 class map over :data:`SAMPLE_CLASSES`."""
    rng = np.random.default_rng(seed)
    labels = np.full((height, width), 1, np.uint8)  # land
    veg = _smooth_noise(rng, height, width, 24)
    labels[veg > 0.68] = 4
    water = _smooth_noise(rng, height, width, 40)
    labels[water > 0.78] = 0
    spacing = int(rng.integers(40, 64))
    for r in range(int(rng.integers(8, spacing)), height, spacing):
        labels[r : r + 4, :] = 2
    for c in range(int(rng.integers(8, spacing)), width, spacing):
        labels[:, c : c + 4] = 2
    for _ in range(max(4, height * width // 2500)):
        h, w = (int(v) for v in rng.integers(6, 16, size=2))
        r, c = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        if (labels[r : r + h, c : c + w] == 1).all():
            labels[r : r + h, c : c + w] = 3
    return labels


def sample_pixels(labels: np.ndarray, bands: int, dtype: str, seed: int) -> np.ndarray:
    """``(bands, H, W)`` pixels for a class map: class signature + texture + noise, scaled to ``dtype``."""
    rng = np.random.default_rng(seed + 1)
    sig = _SIGNATURES[:, :bands] if bands <= 4 else np.pad(_SIGNATURES, ((0, 0), (0, bands - 4)), mode="wrap")
    x = sig[labels].transpose(2, 0, 1)
    x = x * (0.85 + 0.3 * _smooth_noise(rng, *labels.shape, 8))[None]
    x = x + rng.normal(0.0, 0.02, x.shape)
    top = 255 if dtype == "uint8" else 10000
    return np.clip(x * top, 1, top).astype(dtype)


def write_scene(
    folder: Path,
    name: str,
    height: int = 160,
    width: int = 192,
    bands: int = 4,
    dtype: str = "uint16",
    seed: int = 0,
    nodata_border: int = 0,
    crs: str | None = SAMPLE_CRS,
    origin: tuple[float, float] = (300000.0, 2800000.0),
    pixel_size: float = 0.5,
) -> SampleScene:
    """Write ``{folder}/images/{name}.tif`` and its index-mask ``{folder}/labels/{name}.tif``.

    ``nodata_border`` px on the left and top are set to nodata (0) in the image and 255 in the
    labels. Without ``crs`` the rasters carry no georeference.
    """
    import rasterio
    from rasterio.transform import from_origin

    labels = sample_labels(height, width, seed)
    pixels = sample_pixels(labels, bands, dtype, seed)
    if nodata_border:
        pixels[:, :nodata_border, :] = 0
        pixels[:, :, :nodata_border] = 0
        labels[:nodata_border, :] = 255
        labels[:, :nodata_border] = 255
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    geo = {"crs": crs, "transform": from_origin(*origin, pixel_size, pixel_size)} if crs else {}
    image = folder / "images" / f"{name}.tif"
    with rasterio.open(
        image, "w", driver="GTiff", height=height, width=width, count=bands, dtype=dtype, nodata=0, **geo
    ) as dst:
        dst.write(pixels)
    label_path = folder / "labels" / f"{name}.tif"
    with rasterio.open(
        label_path, "w", driver="GTiff", height=height, width=width, count=1, dtype="uint8", nodata=255, **geo
    ) as dst:
        dst.write(labels[None])
    return SampleScene(image, label_path)


def write_sample_dataset(folder: Path, scenes: int = 6, **kwargs: object) -> list[SampleScene]:
    """A folder of ``scenes`` generated scenes with distinct seeds (see :func:`write_scene`)."""
    return [write_scene(folder, f"scene_{i:02d}", seed=1000 + i, **kwargs) for i in range(scenes)]  # type: ignore[arg-type]
