"""Label config: where masks are and how they encode classes, and the class map it describes.

Shared by ingest (which encodes masks into shards), evaluate (which scores maps against masks) and
the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from rsdiff.config import bounded
from rsdiff.data.classmap import ClassMap, MaskKind, UnknownPolicy, default_colour, parse_colour
from rsdiff.errors import ConfigError


@dataclass
class ClassConfig:
    """One class: its name and its mask colour (colour masks) or value (index masks).

    ``colour`` is also the class's colour in maps, quicklooks and legends: for index masks it is
    optional (unset: the land-cover convention its name suggests, e.g. water blue, see
    :func:`~rsdiff.data.classmap.conventional_colour`).
    """

    name: str = MISSING
    colour: str | None = None  # '#RRGGBB' or 'R,G,B'
    value: int | None = None


@dataclass
class LabelConfig:
    """Where label masks are and how they encode classes. No ``mask_template`` = unlabeled imagery."""

    mask_template: str | None = None  # e.g. "{dir}/../masks/{stem}.png"
    kind: MaskKind = MaskKind.colour
    classes: list[ClassConfig] = field(default_factory=list)
    ignore_colours: list[str] = field(default_factory=list)
    ignore_values: list[int] = field(default_factory=list)
    unknown: UnknownPolicy = UnknownPolicy.ignore
    # Above this fraction of label pixels matching no class, ingest warns loudly (a JPEG-compressed
    # colour mask, wrong colours or values); none matching at all is an error.
    warn_unknown_fraction: float = bounded(0.05, ge=0, le=1)


def build_classmap(labels: LabelConfig) -> ClassMap | None:
    """The class map a label config describes (None for unlabeled imagery)."""
    if not labels.mask_template:
        return None
    kind = MaskKind(labels.kind)
    names, colours, values = [], [], []
    for i, c in enumerate(labels.classes):
        names.append(c.name)
        if kind is MaskKind.colour:
            if c.colour is None:
                raise ConfigError(f"labels.classes[{i}] ({c.name}) needs a colour for kind=colour masks")
            colours.append(parse_colour(c.colour))
            values.append(i)
        else:
            if c.value is None:
                raise ConfigError(f"labels.classes[{i}] ({c.name}) needs a value for kind=index masks")
            # the configured colour, else the land-cover convention its name suggests
            colours.append(parse_colour(c.colour) if c.colour else default_colour(i, c.name, colours))
            values.append(int(c.value))
    return ClassMap(
        names=tuple(names),
        colours=tuple(colours),
        values=tuple(values),
        kind=kind,
        ignore_colours=tuple(parse_colour(c) for c in labels.ignore_colours),
        ignore_values=tuple(int(v) for v in labels.ignore_values),
        unknown=UnknownPolicy(labels.unknown),
    )
