"""Simulated prompts: where a user clicks, and which box they draw, given the true structure. One module for the
evaluation (``prismrt eval-seg``) and for training the prompt heads (``training/``), in 2D and in 3D.

The rules are the interactive-segmentation benchmarks' (RITM, SAM):

- the **first click** is a positive point at the structure's deepest point, the one farthest from its boundary
  (:func:`first_click`; in training a random point at least half as deep);
- each **next click** goes to the current error: false negatives (missed) and false positives (extra) are
  compared by their deepest points, and the click goes to the deeper one, positive in a miss and negative in an
  extra (:func:`corrective_click`); 2D on a slice, or 3D in the volume;
- a **box** is the structure's tight bounding box on a slice (:func:`bounding_box`; in training jittered).

Distances are in millimetres when ``spacing`` (per array axis) is given, else in pixels. Ties go to the first point
in raster order, so the evaluation is deterministic.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def inside_distance(mask: np.ndarray, spacing=None) -> np.ndarray:
    """Euclidean distance from each point of ``mask`` to the nearest point outside it (the array border counts as
    outside), in ``spacing`` units per array axis (default: pixels); 0 outside the mask. 2D or 3D."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    outside = sitk.GetImageFromArray(np.pad(~mask, 1, constant_values=True).astype(np.uint8))
    if spacing is not None:
        outside.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    f = sitk.SignedMaurerDistanceMapImageFilter()
    f.SetInsideIsPositive(False)  # the mask is outside the "object" (its complement): positive distances there
    f.SetSquaredDistance(False)
    f.SetUseImageSpacing(spacing is not None)
    f.SetNumberOfThreads(1)  # these maps are small, and ITK's threads would fight torch's for the cores
    d = sitk.GetArrayFromImage(f.Execute(outside))[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return np.where(mask, d, 0).astype(np.float32)


def _pick(distance: np.ndarray, rng: np.random.Generator | None, interior: float) -> tuple[int, ...]:
    """The point farthest from the boundary (``rng`` None; first in raster order on ties), or a random point at least
    ``interior`` times that far."""
    if rng is None:
        return tuple(int(v) for v in np.unravel_index(int(np.argmax(distance)), distance.shape))
    points = np.nonzero(distance >= interior * float(distance.max()))
    k = int(rng.integers(len(points[0])))
    return tuple(int(p[k]) for p in points)


def deepest_point(mask: np.ndarray, spacing=None) -> tuple[int, ...] | None:
    """Index of the point of ``mask`` farthest from its boundary, or None for an empty mask."""
    d = inside_distance(mask, spacing)
    return None if d.max() <= 0 else _pick(d, None, 1.0)


def first_click(mask: np.ndarray, rng: np.random.Generator | None = None, interior: float = 0.5,
                spacing=None) -> tuple[int, ...]:
    """Index of a first positive click: the deepest point (deterministic), or with ``rng`` a random point at least
    ``interior`` times as deep (training)."""
    d = inside_distance(mask, spacing)
    if d.max() <= 0:
        raise ValueError("cannot click in an empty mask")
    return _pick(d, rng, interior)


def corrective_click(pred: np.ndarray, target: np.ndarray, rng: np.random.Generator | None = None,
                     interior: float = 0.5, spacing=None) -> tuple[int, ...] | None:
    """The next click from the current error: ``(*index, label)``, label 1 (positive) in a false negative, 0
    (negative) in a false positive, at the deeper error's deepest point (or with ``rng`` a random point of it at
    least ``interior`` times as deep); None when the prediction is exact."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    d_fn, d_fp = inside_distance(target & ~pred, spacing), inside_distance(pred & ~target, spacing)
    if d_fn.max() <= 0 and d_fp.max() <= 0:
        return None
    positive = d_fn.max() >= d_fp.max()
    return (*_pick(d_fn if positive else d_fp, rng, interior), int(positive))


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(row0, col0, row1, col1), inclusive pixel indices, of a 2D mask; None when empty."""
    rows, cols = np.flatnonzero(np.any(mask, axis=1)), np.flatnonzero(np.any(mask, axis=0))
    if len(rows) == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): a 2D mask's bounding box in inclusive pixel indices (SAM's XYXY)."""
    r0, c0, r1, c1 = bounding_box(mask)
    return c0, r0, c1, r1


def jittered_box(mask: np.ndarray, rng: np.random.Generator, fraction: float = 0.1, max_px: int = 4):
    """SAM's XYXY bounding box with each side moved by N(0, fraction * side) pixels, at most ``max_px``, kept in the
    image (training: a user's box is never exactly tight)."""
    x0, y0, x1, y1 = tight_box(mask)
    h, w = mask.shape
    sx, sy = fraction * (x1 - x0 + 1), fraction * (y1 - y0 + 1)
    j = np.clip(np.rint(rng.normal(0, 1, 4) * [sx, sy, sx, sy]), -max_px, max_px).astype(int)
    x0, x1 = sorted((int(np.clip(x0 + j[0], 0, w - 1)), int(np.clip(x1 + j[2], 0, w - 1))))
    y0, y1 = sorted((int(np.clip(y0 + j[1], 0, h - 1)), int(np.clip(y1 + j[3], 0, h - 1))))
    return x0, y0, x1, y1


def box_filled(mask: np.ndarray) -> np.ndarray:
    """The baseline a box prompt must beat: the mask's tight bounding box, filled (2D)."""
    out = np.zeros(np.shape(mask), bool)
    box = bounding_box(mask)
    if box is not None:
        r0, c0, r1, c1 = box
        out[r0:r1 + 1, c0:c1 + 1] = True
    return out
