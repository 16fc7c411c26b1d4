"""Where a map is wrong, as a picture: for one scored scene, image | truth | prediction | errors,
in the class colours and legend of the prediction quicklooks (``jobs/evaluate.py`` writes one per
scene, up to ``error_figures``).

The errors panel shows every labeled pixel the map gets wrong in the colour of the class it was
*called* (so a building that takes land's pixels shows as building colour on land), correct pixels
pale grey, and unlabeled pixels as the image, dimmed. Scenes are read decimated (nearest
neighbour) to at most ``max_side`` px, so the figure costs an overview's bytes, not the scene's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from rsdiff import storage
from rsdiff.data import remote
from rsdiff.data.classmap import IGNORE_INDEX, ClassMap
from rsdiff.data.scenes import SceneReader, SceneRef, decimated
from rsdiff.viz import class_colours, display_rgb, labelled, legend, side_by_side, stack

CORRECT = np.array([232, 232, 232], np.uint8)  # pale grey: right


def error_panels(
    ref: SceneRef,
    class_map: str,
    classmap: ClassMap,
    lut: np.ndarray,
    classes: list[dict[str, Any]],
    band_names: list[str],
    region: list[int] | None = None,
    max_side: int = 512,
) -> dict[str, Any]:
    """The four ``(h, w, 3)`` uint8 panels of one scene (``image``, ``truth``, ``prediction``,
    ``errors``) and ``wrong``, the share of labeled pixels the map gets wrong. ``lut`` maps the
    mask's class ids to the head's (as :func:`rsdiff.evaluate.evaluate_scene` does); ``class_map``
    is the predicted map."""
    with SceneReader(ref, classmap, region=region) as reader, contextlib.ExitStack() as stack_:
        scale = min(1.0, max_side / max(reader.height, reader.width))
        shape = (max(1, round(reader.height * scale)), max(1, round(reader.width * scale)))
        pixels, valid = reader.read(0, 0, reader.height, reader.width, out_shape=shape)
        labels, _ = reader.read_labels(0, 0, reader.height, reader.width, out_shape=shape)
        pred_ds = remote.open_dataset(class_map, stack_)
        pred = remote.retrying_read(lambda: pred_ds.read(1, **decimated(None, shape)), class_map, "overview")
    truth = lut[labels]
    image = display_rgb(pixels, valid, band_names)
    labeled = truth != IGNORE_INDEX
    wrong = labeled & (pred != truth)
    dimmed = (image * 0.45 + 140).astype(np.uint8)
    errors = np.where(labeled[..., None], CORRECT, dimmed)
    errors[wrong] = class_colours(pred, classes, under=image)[wrong]
    return {
        "image": image,
        "truth": class_colours(truth, classes, under=dimmed),
        "prediction": class_colours(pred, classes, under=dimmed),
        "errors": errors,
        "wrong": float(wrong.sum() / max(int(labeled.sum()), 1)),
    }


def error_figure(panels: dict[str, Any], scene: str, classes: list[dict[str, Any]]) -> np.ndarray:
    """``(H, W, 3)`` uint8 picture of :func:`error_panels`: the four panels side by side under a
    title (the share of labeled pixels wrong), the class legend below."""
    row = side_by_side([panels[k] for k in ("image", "truth", "prediction", "errors")])
    cols = ["image", "truth", "prediction", "errors (in the class called)"]
    title = f"{scene}: {panels['wrong']:.1%} of labeled pixels wrong"
    return stack([labelled(row, title, cols), legend(classes)])


def write_png(picture: np.ndarray, uri: str) -> None:
    """Write ``picture`` as a PNG at ``uri`` (atomically)."""
    from PIL import Image

    with storage.atomic_local_path(uri) as path:
        Image.fromarray(picture).save(path, format="PNG")
