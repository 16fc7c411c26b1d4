"""Predicting one scene: sliding windows -> frozen-UNet features -> head -> blended class map.

For each row of windows (``size`` px, ``overlap`` px shared with neighbours): windowed reads of
the scene, normalisation with the checkpoint's band statistics, one UNet pass per selected
timestep that stops after the deepest selected block, features for the head's exact
(timestep, block) selection built chunk by chunk (``FeatureExtractor.dense_rows``), the head's
class probabilities, and ramp-weighted blending (:mod:`rsdiff.prediction.blend`). Finished rows go
straight to the GeoTIFF writer, so memory does not grow with the scene's height.

With uncertainty, each window also carries its per-pixel mutual information (and, for
suggestions, tile descriptors) as extra channels blended with the same weights; the entropy is
computed from the blended class distribution, the one the map is drawn from.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from rsdiff import storage
from rsdiff.data.scenes import SceneReader, SceneRef
from rsdiff.data.tiling import axis_origins
from rsdiff.errors import DataError
from rsdiff.features.extractor import FeatureExtractor
from rsdiff.heads.artifact import TrainedHead
from rsdiff.prediction.blend import RowBlender
from rsdiff.prediction.config import Measure
from rsdiff.prediction.tiles import TileOptions, TileScorer
from rsdiff.prediction.uncertainty import BAND_NAMES, PixelOutputs, entropy
from rsdiff.prediction.writer import PredictionWriter, quicklook

log = logging.getLogger(__name__)

CHUNK_VALUES = 1 << 23  # feature values (B x D x rows x W) built at once: 32 MiB of float32


@dataclass(frozen=True)
class WindowPlan:
    """Sliding-window geometry in px: ``size`` (multiple of the UNet's downsampling), ``overlap``
    and ``border`` (the degraded band at each window edge that blending gives almost no weight)."""

    size: int
    overlap: int
    border: int = 0

    @property
    def stride(self) -> int:
        return self.size - self.overlap


@dataclass(frozen=True)
class SceneOutputs:
    """Where one scene's products go."""

    class_map: str
    probabilities: str | None
    quicklook: str | None
    run_id: str = ""  # the prediction run's id, tagged into each map (evaluate checks it)
    uncertainty: str | None = None  # the float32 uncertainty raster (with UncertaintyOptions)


def check_scene(reader: SceneReader, head: TrainedHead, extractor: FeatureExtractor | PixelInputs) -> None:
    """Fail with one message when a scene cannot feed the model (band count, dtype).

    Raises:
        DataError: the scene's bands or dtype differ from what the checkpoint was trained on.
    """
    meta = extractor.ddpm.meta
    name = storage.display(reader.ref.image)
    if reader.bands != extractor.in_channels:
        raise DataError(
            f"{name} has {reader.bands} band(s) but the model behind the head ({head.checkpoint}) was "
            "pretrained on "
            f"{extractor.in_channels} {meta['bands']}; predict scenes of the same sensor and band order"
        )
    if meta.get("dtype") and reader.dtype != meta["dtype"]:
        raise DataError(
            f"{name} is {reader.dtype} but the model was pretrained on {meta['dtype']} imagery; its band "
            "statistics would not apply"
        )


def _read_window(reader: SceneReader, row: int, col: int, size: int) -> np.ndarray:
    """``(C, size, size)`` source pixels, edge-padded where the scene (or region) is smaller than the
    window."""
    h, w = min(size, reader.height - row), min(size, reader.width - col)
    pixels, _ = reader.read(row, col, h, w, mask=False)
    if (h, w) != (size, size):
        pixels = np.pad(pixels, ((0, 0), (0, size - h), (0, size - w)), mode="edge")
    return pixels


class PixelInputs:
    """What a pixel head (see :class:`TrainedHead`) predicts from in place of a
    :class:`FeatureExtractor`: the checkpoint (band statistics, band checks) and the device, with
    no UNet pass; normalised windows go to the head as they are."""

    def __init__(self, ddpm: Any, precision: str = "auto") -> None:
        from rsdiff.devices import autocast_dtype, tf32_allowed

        self.ddpm = ddpm
        self.in_channels = int(ddpm.meta["in_channels"])
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.tf32 = tf32_allowed(precision)

    @property
    def device(self) -> torch.device:
        return next(self.ddpm.model.parameters()).device


def make_extractor(ddpm: Any, head: TrainedHead, precision: str = "auto") -> FeatureExtractor | PixelInputs:
    """The head's inputs: frozen-UNet features of its timesteps/blocks, or pixels for a pixel head."""
    if head.on_pixels:
        return PixelInputs(ddpm, precision)
    return FeatureExtractor(ddpm, head.timesteps, head.blocks, head.noise_seed, precision)


@torch.no_grad()
def window_probabilities(
    extractor: FeatureExtractor | PixelInputs,
    head: TrainedHead,
    x: torch.Tensor,
    outputs: PixelOutputs | None = None,
    origins: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """``(B, C_in, S, S)`` normalised windows -> ``(B, channels, S, S)`` float32: the class
    probabilities, then whatever else ``outputs`` computes per pixel (mutual information,
    descriptors; see :class:`PixelOutputs`; None: probabilities only). ``origins``: the windows'
    ``(row, col)`` px in their scene, so a feature head sees each pixel under the same diffusion
    noise in every window (:func:`rsdiff.features.extractor.window_noise`).

    Computed on the extractor's device, a chunk of rows at a time (memory bounded by
    ``CHUNK_VALUES``); the result stays on that device. TF32 as the extractor's precision allows
    (see :func:`rsdiff.devices.tf32_allowed`), the UNet's pass and the head's alike.
    """
    from rsdiff.devices import autocast, tf32

    with tf32(extractor.tf32):
        outputs = outputs or PixelOutputs(head)
        b, _, s, _ = x.shape
        if head.on_pixels:
            if outputs.channels != head.num_classes:
                raise ValueError("a pixel head gives class probabilities only (no members, no descriptors)")
            head.module.eval()
            with autocast(extractor.device, extractor.amp_dtype):
                logits = head.module(x.to(extractor.device, torch.float32))
            return torch.softmax(logits.float(), 1)
        acts = extractor.activations(x, origins)
        rows = max(1, min(s, CHUNK_VALUES // max(1, b * extractor.dim * s)))
        out = torch.empty((b, outputs.channels, s, s), dtype=torch.float32, device=extractor.device)
        for start in range(0, s, rows):
            stop = min(s, start + rows)
            feats = extractor.dense_rows(acts, (s, s), start, stop)  # (B, D, r, S)
            flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
            values = outputs(flat)
            out[:, :, start:stop] = values.view(b, stop - start, s, -1).permute(0, 3, 1, 2)
        return out


@dataclass(frozen=True)
class UncertaintyOptions:
    """Whether and how a scene's uncertainty is computed (``jobs/predict.py uncertainty=true``, or a
    suggestion run).

    ``mutual_information``: also the members' disagreement (ensemble, or ``mc_samples`` dropout
    samples of a residual head).
    """

    mutual_information: bool = False
    mc_samples: int = 0
    seed: int = 0

    @property
    def bands(self) -> list[str]:
        """Band names of the uncertainty raster."""
        names = [BAND_NAMES[Measure.entropy]]
        return [*names, BAND_NAMES[Measure.mutual_information]] if self.mutual_information else names


def predict_scene(
    ref: SceneRef,
    head: TrainedHead,
    extractor: FeatureExtractor | PixelInputs,
    plan: WindowPlan,
    outputs: SceneOutputs,
    batch_size: int = 4,
    quicklook_size: int = 1024,
    on_windows: Any = None,
    region: list[int] | None = None,
    uncertainty: UncertaintyOptions | None = None,
    tiles: TileOptions | None = None,
) -> dict[str, Any]:
    """Predict ``ref`` and publish its class map (COG), optional probabilities, uncertainty raster
    and quicklook PNG.

    Args:
        on_windows: called with the number of windows done after each batch (progress).
        region: ``[row, col, height, width]`` px of the scene to predict (an area of interest;
            only the windows covering it are read); None: the whole scene.
        uncertainty: compute per-pixel uncertainty (written to ``outputs.uncertainty`` when set,
            and shown in the quicklook); None: none.
        tiles: also summarise the uncertainty per candidate tile (suggestions); needs
            ``uncertainty`` with mutual information when ``tiles.measure`` is mutual information.

    Returns:
        A JSON-able record: scene id, image, outputs, size, CRS, georeferenced, class pixel counts,
        windows, seconds; with ``tiles`` also ``tiles``: the :class:`TileStats` of the scene (not
        JSON-able; the caller turns them into candidates).
    """
    t0 = time.perf_counter()
    head.module.to(extractor.device)
    unc = uncertainty or (UncertaintyOptions() if tiles else None)
    if tiles and tiles.measure is Measure.mutual_information and not (unc and unc.mutual_information):
        raise ValueError("tiles scored by mutual information need mutual_information=True uncertainty")
    pixel_outputs = PixelOutputs(
        head,
        mutual_information=bool(unc and unc.mutual_information),
        mc_samples=unc.mc_samples if unc else 0,
        descriptor_dims=tiles.descriptor_dims if tiles else 0,
        seed=unc.seed if unc else 0,
    )
    with SceneReader(ref, region=region) as reader:
        check_scene(reader, head, extractor)
        if reader.crs is None:
            log.warning(
                "%s has no georeference (CRS/transform): writing an un-georeferenced GeoTIFF",
                storage.display(ref.image),
            )
        writer = _open_writer(reader, ref, head, outputs, unc)
        scorer = (
            TileScorer(reader.height, reader.width, tiles.size, tiles.quantile, tiles.descriptor_dims)
            if tiles
            else None
        )
        try:
            sink = functools.partial(_write_band, pixel_outputs=pixel_outputs, writer=writer, scorer=scorer,
                                     tiles=tiles)  # fmt: skip
            windows = _blend_windows(
                reader, head, extractor, plan, pixel_outputs, sink, batch_size, on_windows
            )
            writer.publish(outputs.class_map, outputs.probabilities, outputs.uncertainty)
            class_pixels = writer.class_pixels.tolist()
            if outputs.quicklook:
                _save_quicklook(reader, writer, head, extractor, outputs.quicklook, quicklook_size)
        finally:
            writer.close()
        record = _scene_record(ref, outputs, reader)
    record.update(
        quicklook=outputs.quicklook,
        class_pixels=dict(zip(head.class_names, class_pixels)),
        windows=windows,
        seconds=time.perf_counter() - t0,
    )
    if scorer is not None:
        record["tiles"] = scorer.finish()
    return record


def _open_writer(
    reader: SceneReader, ref: SceneRef, head: TrainedHead, outputs: SceneOutputs, unc: Any
) -> PredictionWriter:
    """The GeoTIFF writer of the scene's maps, tagged with what made them."""
    georef = reader.crs is not None
    return PredictionWriter(
        reader.height,
        reader.width,
        reader.ds.crs if georef else None,
        reader.transform if georef else None,
        head.classes,
        outputs.probabilities is not None,
        {
            "rsdiff_head": storage.display(head.uri),
            "rsdiff_timesteps": ",".join(map(str, head.timesteps)),
            "rsdiff_blocks": ",".join(head.blocks),
            "rsdiff_checkpoint": storage.display(head.checkpoint),
            "rsdiff_class_names": ",".join(head.class_names),
            "rsdiff_scene": ref.id,
            "rsdiff_prediction_run": outputs.run_id,
        },
        uncertainty=unc.bands if unc and outputs.uncertainty else None,
    )


def _blend_windows(
    reader: SceneReader,
    head: TrainedHead,
    extractor: FeatureExtractor | PixelInputs,
    plan: WindowPlan,
    pixel_outputs: PixelOutputs,
    sink: Callable[[int, np.ndarray, np.ndarray], None],
    batch_size: int,
    on_windows: Any,
) -> int:
    """Predict every window, row of windows by row, ``batch_size`` windows at a time, blending them;
    hands each finished band of rows to ``sink(first_row, blended (K, h, W), valid (h, W))``.
    Returns the number of windows."""
    blender = RowBlender(
        reader.height, reader.width, pixel_outputs.channels, plan.size, plan.overlap, plan.border
    )
    top, left = reader.region[:2] if reader.region else (0, 0)
    rows = axis_origins(reader.height, plan.size, plan.stride)
    cols = axis_origins(reader.width, plan.size, plan.stride)
    windows = 0
    for i, r in enumerate(rows):
        for j in range(0, len(cols), batch_size):
            batch_cols = cols[j : j + batch_size]
            pixels = np.stack([_read_window(reader, r, c, plan.size) for c in batch_cols])
            x = extractor.ddpm.normalizer.torch(
                torch.from_numpy(pixels.astype(np.float32)).to(extractor.device)
            )
            origins = [(top + r, left + c) for c in batch_cols]  # in the whole scene
            probs = window_probabilities(extractor, head, x, pixel_outputs, origins).cpu().numpy()
            for c, p in zip(batch_cols, probs):
                blender.add(r, c, p)
            windows += len(batch_cols)
            if on_windows is not None:
                on_windows(len(batch_cols))
        upto = rows[i + 1] if i + 1 < len(rows) else reader.height
        for first, blended in blender.release(upto):
            sink(first, blended, reader.valid(first, blended.shape[1]))
    return windows


def _save_quicklook(
    reader: SceneReader, writer: PredictionWriter, head: TrainedHead, extractor: Any, path: str, size: int
) -> None:
    """The scene's quicklook PNG (image, map, legend; uncertainty when written) at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        picture = quicklook(
            reader.ds,
            writer.folder / "cog-class.tif",
            head.classes,
            extractor.ddpm.bands,
            size,
            window=reader.region,
            uncertainty_path=writer.folder / "cog-uncertainty.tif" if writer.unc else None,
        )
    with storage.atomic_local_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")


def _scene_record(ref: SceneRef, outputs: SceneOutputs, reader: SceneReader) -> dict[str, Any]:
    """What was predicted where: the scene, its outputs, size, bands and georeference."""
    georef = reader.crs is not None
    return {
        "scene": ref.id,
        "image": ref.image,
        "mask": ref.mask,
        "class_map": outputs.class_map,
        "probabilities": outputs.probabilities,
        "uncertainty": outputs.uncertainty,
        "width": reader.width,
        "height": reader.height,
        "bands": reader.bands,
        "crs": reader.crs,
        "transform": list(reader.transform)[:6] if georef else None,
        "georeferenced": georef,
        "region": reader.region,
    }


def _write_band(
    first: int,
    blended: np.ndarray,
    valid: np.ndarray,
    pixel_outputs: PixelOutputs,
    writer: PredictionWriter,
    scorer: TileScorer | None,
    tiles: TileOptions | None,
) -> None:
    """Hand one band of blended rows ``(channels, rows, width)`` to the writer and the tile scorer."""
    c = pixel_outputs.head.num_classes
    probs = blended[:c]
    bands = None
    if writer.unc is not None or scorer is not None:
        ent = entropy(torch.from_numpy(probs), dim=0).numpy()
        mi_at = pixel_outputs.mi_channel
        bands = np.stack([ent] + ([blended[mi_at]] if mi_at is not None else []))
    writer.write_rows(first, probs, valid, bands if writer.unc is not None else None)
    if scorer is not None and tiles is not None and bands is not None:
        measure = bands[1] if tiles.measure is Measure.mutual_information else bands[0]
        desc = blended[pixel_outputs.descriptor_slice] if tiles.descriptor_dims else None
        scorer.add_rows(first, measure, valid, desc)
