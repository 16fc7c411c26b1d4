"""Class maps: class names, their mask colours or values, and the ignore index.

Labels are stored as ``uint8`` class ids ``0..C-1``; :data:`IGNORE_INDEX` marks pixels without a
label (unlabeled, border, unknown colour under the ``ignore`` policy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from rsdiff.errors import ConfigError, DataError

IGNORE_INDEX = 255


class MaskKind(Enum):
    """How a label raster encodes classes."""

    colour = "colour"  # RGB(A) or palette image, one colour per class
    index = "index"  # single band of class values


class UnknownPolicy(Enum):
    """What to do with a mask colour/value that no class claims."""

    ignore = "ignore"  # label it IGNORE_INDEX and count it
    error = "error"  # fail, naming the colour and the scene


def parse_colour(text: str) -> tuple[int, int, int]:
    """``"#3C1098"`` or ``"60,16,152"`` -> ``(60, 16, 152)``."""
    s = str(text).strip()
    try:
        if s.startswith("#") and len(s) == 7:
            return int(s[1:3], 16), int(s[3:5], 16), int(s[5:7], 16)
        parts = [int(p) for p in s.split(",")]
        if len(parts) == 3 and all(0 <= p <= 255 for p in parts):
            return parts[0], parts[1], parts[2]
    except ValueError:
        pass
    raise ConfigError(f"bad colour {text!r}: use '#RRGGBB' or 'R,G,B'")


def colour_hex(rgb: Sequence[int]) -> str:
    """``(60, 16, 152)`` -> ``"#3C1098"``."""
    return "#{:02X}{:02X}{:02X}".format(*rgb)


# Land-cover display conventions (close to Dynamic World's and CORINE's palettes), by words a class
# name may hold; the first rule whose word starts a word of the name wins (words in
# WHOLE_WORDS must be the whole word: "land" is not "landuse", "park" is not "parking").
CONVENTIONAL_COLOURS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("water", "sea", "river", "lake", "ocean", "pond", "reservoir", "canal", "wetland"), "#419BDF"),
    (("tree", "forest", "wood", "mangrove"), "#397D49"),
    (("crop", "farm", "agri", "cultivat", "orchard"), "#E49635"),
    (("veg", "grass", "shrub", "scrub", "park", "meadow", "lawn", "green", "plant"), "#88B053"),
    (("building", "built", "urban", "house", "roof", "settlement", "impervious", "city"), "#C4281B"),
    (("road", "street", "highway", "pavement", "paved", "parking", "runway", "rail"), "#8C8C8C"),
    (("bare", "soil", "sand", "desert", "land", "rock", "barren", "dirt", "dune"), "#D2B48C"),
    (("snow", "ice", "glacier"), "#E8F4FA"),
    (("cloud",), "#F5F5F5"),
    (("shadow",), "#303030"),
    (("unlabeled", "unlabelled", "unknown", "background", "other", "void", "nodata"), "#5A5A5A"),
)

WHOLE_WORDS = frozenset({"land", "sea", "ice", "city", "rail", "park", "green", "other"})


def conventional_colour(name: str) -> tuple[int, int, int] | None:
    """The land-cover convention's colour for a class ``name`` (water blue, vegetation green,
    building red, road grey, bare land tan, ...), or None when the name suggests none."""
    words = [w for w in "".join(ch if ch.isalpha() else " " for ch in name.lower()).split() if w]
    for keys, colour in CONVENTIONAL_COLOURS:
        if any(w == k or (k not in WHOLE_WORDS and w.startswith(k)) for w in words for k in keys):
            return parse_colour(colour)
    return None


def default_colour(
    i: int, name: str = "", taken: Sequence[tuple[int, int, int]] = ()
) -> tuple[int, int, int]:
    """The display colour of class ``i`` when the config gives none (index masks): the land-cover
    convention its ``name`` suggests, else the first of matplotlib's ``tab10`` colours (from the
    ``i``-th on) not already ``taken`` by another class."""
    import matplotlib

    found = conventional_colour(name) if name else None
    if found is not None and found not in taken:
        return found
    for k in range(10):
        r, g, b, _ = matplotlib.colormaps["tab10"]((i + k) % 10)
        colour = (int(r * 255), int(g * 255), int(b * 255))
        if colour not in taken:
            return colour
    return colour


def colour_lut(classes: Sequence[dict]) -> np.ndarray:
    """``(256, 3)`` uint8 display colour per class id from a class list as stored in manifests and
    head artifacts (``[{"id", "name", "colour"}, ...]``); ignore and unused ids stay black."""
    lut = np.zeros((256, 3), np.uint8)
    for c in classes:
        lut[int(c["id"])] = parse_colour(c["colour"])
    return lut


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) int32 key ``r<<16 | g<<8 | b``."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@dataclass(frozen=True)
class ClassMap:
    """Classes ``0..C-1`` with their mask colours (colour masks) or values (index masks)."""

    names: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...]
    values: tuple[int, ...]
    kind: MaskKind = MaskKind.colour
    ignore_colours: tuple[tuple[int, int, int], ...] = ()
    ignore_values: tuple[int, ...] = ()
    unknown: UnknownPolicy = UnknownPolicy.ignore

    def __post_init__(self) -> None:
        if not self.names:
            raise ConfigError("labels.classes is empty: list the classes (name and colour/value)")
        if len(self.names) >= IGNORE_INDEX:
            raise ConfigError(f"at most {IGNORE_INDEX - 1} classes are supported, got {len(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"labels.classes has duplicate names: {list(self.names)}")
        keys = self.colours if self.kind is MaskKind.colour else self.values
        if len(set(keys)) != len(keys):
            raise ConfigError(f"labels.classes has duplicate {self.kind.value}s: {list(keys)}")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def encode(self, mask: np.ndarray, where: str = "mask") -> tuple[np.ndarray, int]:
        """Map a mask to class ids.

        Args:
            mask: ``(H, W, 3)`` uint8 colours for colour masks, ``(H, W)`` integers for index masks.
            where: what the mask is (for error messages).

        Returns:
            ``(ids, n_unknown)``: ``(H, W)`` uint8 ids with IGNORE_INDEX where unlabeled, and how
            many pixels had a colour/value no class claims.
        """
        if self.kind is MaskKind.colour:
            keys = _pack(mask)
            known = [_pack(np.array(c, dtype=np.uint8)) for c in self.colours]
            ignored = [_pack(np.array(c, dtype=np.uint8)) for c in self.ignore_colours]
        else:
            keys = mask.astype(np.int64)
            known, ignored = list(self.values), list(self.ignore_values)
        uniq, inverse = np.unique(keys, return_inverse=True)
        lut = np.full(len(uniq), IGNORE_INDEX, dtype=np.uint8)
        unknown = []
        for i, key in enumerate(uniq.tolist()):
            if key in known:
                lut[i] = known.index(key)
            elif key not in ignored:
                unknown.append(key)
        if unknown and self.unknown is UnknownPolicy.error:
            shown = [
                colour_hex(((k >> 16) & 255, (k >> 8) & 255, k & 255)) if self.kind is MaskKind.colour else k
                for k in unknown[:8]
            ]
            raise DataError(
                f"{where} has {len(unknown)} {self.kind.value}(s) no class claims: {shown}. Add them to "
                "labels.classes or labels.ignore_colours/ignore_values, or set labels.unknown=ignore"
            )
        ids = lut[inverse.reshape(keys.shape)]
        n_unknown = int(np.isin(keys, unknown).sum()) if unknown else 0
        return ids, n_unknown

    def to_json(self) -> list[dict]:
        """Manifest form: ``[{"id": 0, "name": ..., "colour": "#RRGGBB", "value": ...}, ...]``."""
        return [
            {"id": i, "name": n, "colour": colour_hex(c), "value": v}
            for i, (n, c, v) in enumerate(zip(self.names, self.colours, self.values))
        ]
