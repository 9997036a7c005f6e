"""Answer engines. Each has ``answer(intent, ctx) -> Answer | None`` and names itself in ``Answer.source``:
:mod:`.header` (the image header and geometry, and the view for the plane), :mod:`.structures` (the loaded masks),
and the image model (``.image``, imported only when needed: it loads torch). None means "not mine to answer"; an
``Answer.cannot_tell`` means "mine, but this data cannot settle it", and the session may then ask the next engine.

The helpers here are the geometry both exact engines share: which anatomical plane an index axis cuts, how a slice
is named (``"axial:63"`` = k 63, ``"coronal:N"`` = j, ``"sagittal:N"`` = i), and how patient-frame directions look
on screen in each plane (radiological display, :data:`..imaging.slicing.DISPLAY_EDGES`).
"""

from __future__ import annotations

import numpy as np

from ...imaging.geometry import Geometry
from ...imaging.slicing import DISPLAY_EDGES, Orientation
from ..types import AXES

EXACT = 0.99  # confidence of an answer read or computed exactly from the data

PLANE_OF_LPS_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}  # the plane whose normal is x (R-L), y (A-P), z (S-I)
AXIS_LETTERS = "ijk"
# LPS unit vector of each patient-frame direction
DIRECTION_VECTORS = {
    "left": (1.0, 0.0, 0.0), "right": (-1.0, 0.0, 0.0),
    "posterior": (0.0, 1.0, 0.0), "anterior": (0.0, -1.0, 0.0),
    "superior": (0.0, 0.0, 1.0), "inferior": (0.0, 0.0, -1.0),
}
_EDGE_WORD = {"A": "anterior", "P": "posterior", "R": "right", "L": "left", "S": "superior", "I": "inferior"}


def plane_of_index_axis(geometry: Geometry, itk_axis: int) -> str:
    """The anatomical plane that slices along an index axis (0=i, 1=j, 2=k) show."""
    return PLANE_OF_LPS_AXIS[geometry.anatomical_axes()[itk_axis]]


def si_axis(geometry: Geometry) -> int:
    """The index axis closest to superior-inferior: the one axial slices are counted along."""
    return geometry.anatomical_axes().index(2)


def slice_name(geometry: Geometry, itk_axis: int, index: int) -> str | None:
    """``"axial:K"`` etc. for a slice along an index axis, or None when the CLI's AXIS:INDEX cannot name it (the
    image's axis is not the one that AXIS counts along, e.g. k of a coronal-acquired image)."""
    plane = plane_of_index_axis(geometry, itk_axis)
    return f"{plane}:{int(index)}" if AXES[plane] == itk_axis else None


def screen_words(plane: str) -> dict[str, str]:
    """Patient-frame direction -> screen direction ("left", "right", "up", "down") in a displayed slice of ``plane``;
    directions along the plane's normal are not on screen and are absent."""
    top, bottom, left, right = DISPLAY_EDGES[Orientation(plane)]
    return {_EDGE_WORD[top]: "up", _EDGE_WORD[bottom]: "down", _EDGE_WORD[left]: "left", _EDGE_WORD[right]: "right"}


def patient_word(screen: str, plane: str) -> str:
    """The patient-frame direction a screen direction shows in ``plane`` (inverse of :func:`screen_words`)."""
    return {v: k for k, v in screen_words(plane).items()}[screen]


def fmt_mm(value: float) -> str:
    """Millimetres as a physicist writes them: 0.1 mm resolution, trailing zeros kept to one decimal."""
    return f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"


def fmt_num(value: float, digits: int = 3) -> str:
    """A number to ``digits`` significant figures without scientific notation for everyday sizes."""
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - int(np.floor(np.log10(abs(value)))))
    text = f"{value:.{decimals}f}"
    if "." in text:  # 3.00 -> 3.0, 2.50 -> 2.5: the digits that carry information, one decimal at least
        text = text.rstrip("0")
        text += "0" if text.endswith(".") else ""
    return text
