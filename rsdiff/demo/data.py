"""The demo's scenes: a folder of image/mask pairs with its classes, or the generated sample."""

from __future__ import annotations

from rsdiff import storage
from rsdiff.config import build, load_section, preset
from rsdiff.data.labels import LabelConfig
from rsdiff.demo.config import DemoConfig
from rsdiff.errors import DataError


def labels_for(cfg: DemoConfig) -> tuple[list[str], LabelConfig | None, str]:
    """``(inputs, labels, description)`` of the demo's data (no labels: the generated sample's)."""
    if cfg.data is None:
        return (
            [],
            None,
            (
                "generated sample (6 synthetic scenes, 4-band uint16 GeoTIFF, index masks: easy by design, "
                "a check that the chain works, not a measure of accuracy)"
            ),
        )
    root = storage.absolute(str(cfg.data))
    inputs = [storage.join(root, g) for g in cfg.images]
    labels = cfg.labels
    if cfg.labels_preset:
        labels = load_section(LabelConfig, preset("ingest", cfg.labels_preset), "labels")
    if not labels.mask_template:
        labels = build(LabelConfig, labels, {"mask_template": "{dir}/../masks/{stem}.png"})
    return inputs, labels, f"{storage.display(root)}"


def discover_colour_classes(inputs: list[str], labels: LabelConfig, limit: int = 24) -> list[dict[str, str]]:
    """Classes named after the colours found in the masks (for a folder with no class list).

    Raises:
        DataError: masks missing, or more than ``limit`` colours (not a class mask).
    """
    import numpy as np

    from rsdiff.data.classmap import ClassMap, colour_hex
    from rsdiff.data.scenes import SceneReader, discover

    refs = discover(inputs, labels.mask_template)
    counts: dict[str, int] = {}
    dummy = ClassMap(names=("x",), colours=((1, 2, 3),), values=(0,))
    for ref in refs:
        with SceneReader(ref, dummy) as reader:
            rgb = reader.mask_rgb()
            uniq, n = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
            for c, k in zip(uniq, n):
                counts[colour_hex(c)] = counts.get(colour_hex(c), 0) + int(k)
            if len(counts) > limit:
                raise DataError(
                    f"masks under {inputs} hold more than {limit} colours: not class masks? Give "
                    "labels.classes (or labels_preset=configs/ingest/<preset>.yaml)"
                )
    return [{"name": f"class_{h[1:].lower()}", "colour": h} for h in sorted(counts)]
