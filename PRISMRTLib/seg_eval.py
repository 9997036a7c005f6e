"""Evaluation of interactive delineation with simulated clicks, as a clinician would click.

Protocol (per case and structure):

1. The first click is a positive point at the voxel of the structure farthest from its boundary (in mm), on that
   voxel's slice of the chosen orientation; the mask is propagated into 3D (bounded by the orthogonal views through
   the clicked slice's mask unless ``cross_views`` is off).
2. Each further click goes to the largest 3D error region (missed voxels: positive click; extra voxels: negative),
   at its voxel farthest from the region's boundary; that slice is corrected and propagation is re-run from it.
3. After every click: Dice, IoU and HD95 (mm, true spacing) of the 3D mask against the reference.

With ``first="box"`` the first prompt is instead the structure's bounding box on the slice of that most interior
voxel (as a user draws a box around a target; MedSAM's own prompt), and it counts as the first of the prompts.

Results are per case and click count; :func:`summarise` gives mean +/- std and :func:`wilcoxon` a paired test
between two backends.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .metrics import dice, hd95, iou
from .segmentation import SegmentationSession


@dataclass
class ClickResult:
    case: str
    structure: str
    backend: str
    clicks: int
    dice: float
    iou: float
    hd95_mm: float


def _interior_voxel(region: np.ndarray, spacing_zyx) -> tuple[int, int, int]:
    """(k, j, i) of the region voxel farthest from its boundary, in mm."""
    image = sitk.GetImageFromArray(np.pad(region.astype(np.uint8), 1))
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=True, squaredDistance=False, useImageSpacing=True))[1:-1, 1:-1, 1:-1]
    distance[~region] = -np.inf
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(distance)), region.shape))


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    if not mask.any():
        return mask, 0
    labels = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(
        sitk.GetImageFromArray(mask.astype(np.uint8)), False)))
    largest = labels == 1
    return largest, int(np.count_nonzero(largest))


FIRST_PROMPTS = ("click", "box")


def _box_corners(session: SegmentationSession, reference: np.ndarray, kji) -> tuple[np.ndarray, np.ndarray]:
    """LPS corners of the reference's bounding box on the session's slice through voxel ``kji``."""
    plane = session.plane
    index = int(round(float(plane.index_to_slice_coords(np.array(kji[::-1], float))[0])))
    rows, cols = np.nonzero(plane.extract(reference, index))
    return (plane.slice_coords_to_point([index, rows.min(), cols.min()]),
            plane.slice_coords_to_point([index, rows.max(), cols.max()]))


def simulate_clicks(session: SegmentationSession, reference: np.ndarray, max_clicks: int = 3,
                    propagate: bool = True, cross_views: bool = True,
                    first: str = "click") -> list[tuple[float, float, float]]:
    """Run the click protocol on a fresh session (``first="box"``: a box, then clicks); returns (dice, iou, hd95)
    after each prompt."""
    if first not in FIRST_PROMPTS:
        raise ValueError(f"first must be one of {FIRST_PROMPTS}, not {first!r}")
    reference = np.asarray(reference, bool)
    if not reference.any():
        raise ValueError("the reference structure is empty")
    spacing = session.image.GetSpacing()[::-1]
    geometry = session.geometry
    scores = []
    for click in range(max_clicks):
        if click == 0:
            kji, positive = _interior_voxel(reference, spacing), True
        else:
            current = session.mask.astype(bool)
            missed, missed_n = _largest_component(reference & ~current)
            extra, extra_n = _largest_component(current & ~reference)
            if missed_n == 0 and extra_n == 0:
                scores.append(scores[-1])
                continue
            positive = missed_n >= extra_n
            kji = _interior_voxel(missed if positive else extra, spacing)
        if click == 0 and first == "box":
            result = session.set_box(*_box_corners(session, reference, kji))
        else:
            result = session.add_point(geometry.index_to_physical(np.array(kji[::-1], float)), positive=positive)
        if propagate:
            if result.mask.any():
                session.propagate(from_index=result.index, cross_views=cross_views)
            elif session.mask.any():  # the click emptied its slice: the structure ends there
                session.propagate(cross_views=cross_views)
        mask = session.mask.astype(bool)
        scores.append((dice(mask, reference), iou(mask, reference), hd95(mask, reference, spacing)))
    return scores


def evaluate_case(backend, image: sitk.Image, reference: np.ndarray, *, case: str, structure: str,
                  max_clicks: int = 3, orientation: str = "axial", window: str = "head-and-neck",
                  cross_views: bool = True, first: str = "click") -> list[ClickResult]:
    session = SegmentationSession(backend, image, orientation, window=window)
    scores = simulate_clicks(session, reference, max_clicks, cross_views=cross_views, first=first)
    return [ClickResult(case, structure, backend.name, n + 1, d, j, h) for n, (d, j, h) in enumerate(scores)]


def find_cases(folder: "str | Path", structure: str) -> list[tuple[str, Path, Path]]:
    """Cases laid out as ``FOLDER/CASE/ct.nii.gz`` + ``FOLDER/CASE/STRUCTURE.nii.gz`` (the OpenKBP layout)."""
    folder = Path(folder)
    cases = []
    for case in sorted(p for p in folder.iterdir() if p.is_dir()):
        ct, mask = case / "ct.nii.gz", case / f"{structure}.nii.gz"
        if ct.is_file() and mask.is_file():
            cases.append((case.name, ct, mask))
    return cases


def summarise(results: list[ClickResult]) -> list[dict]:
    """Mean and std per (backend, structure, clicks); HD95 over cases where it is finite, with the count."""
    groups: dict[tuple, list[ClickResult]] = {}
    for r in results:
        groups.setdefault((r.backend, r.structure, r.clicks), []).append(r)
    rows = []
    for (backend, structure, clicks), rs in sorted(groups.items()):
        d = np.array([r.dice for r in rs])
        h = np.array([r.hd95_mm for r in rs if math.isfinite(r.hd95_mm)])
        rows.append({
            "backend": backend, "structure": structure, "clicks": clicks, "cases": len(rs),
            "dice_mean": float(d.mean()), "dice_std": float(d.std()),
            "iou_mean": float(np.mean([r.iou for r in rs])),
            "hd95_mean": float(h.mean()) if len(h) else float("nan"), "hd95_std": float(h.std()) if len(h) else float("nan"),
            "hd95_cases": int(len(h)),
        })
    return rows


def wilcoxon(results: list[ClickResult], backend_a: str, backend_b: str, clicks: int, metric: str = "dice") -> dict:
    """Paired Wilcoxon signed-rank test of a metric between two backends over the same cases."""
    from scipy.stats import wilcoxon as scipy_wilcoxon

    a = {(r.case, r.structure): getattr(r, metric) for r in results if r.backend == backend_a and r.clicks == clicks}
    b = {(r.case, r.structure): getattr(r, metric) for r in results if r.backend == backend_b and r.clicks == clicks}
    keys = sorted(k for k in set(a) & set(b) if math.isfinite(a[k]) and math.isfinite(b[k]))
    if len(keys) < 2:
        return {"n": len(keys), "statistic": float("nan"), "p_value": float("nan")}
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    if np.allclose(x, y):
        return {"n": len(keys), "statistic": 0.0, "p_value": 1.0}
    res = scipy_wilcoxon(x, y)
    return {"n": len(keys), "statistic": float(res.statistic), "p_value": float(res.pvalue)}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| backend | structure | clicks | cases | DSC | IoU | HD95 (mm) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        hd = f"{r['hd95_mean']:.2f} ± {r['hd95_std']:.2f}" if r["hd95_cases"] else "n/a"
        if r["hd95_cases"] and r["hd95_cases"] < r["cases"]:
            hd += f" ({r['hd95_cases']} cases)"
        lines.append(f"| {r['backend']} | {r['structure']} | {r['clicks']} | {r['cases']} | "
                     f"{r['dice_mean']:.3f} ± {r['dice_std']:.3f} | {r['iou_mean']:.3f} | {hd} |")
    return "\n".join(lines)


def to_records(results: list[ClickResult]) -> list[dict]:
    return [asdict(r) for r in results]
