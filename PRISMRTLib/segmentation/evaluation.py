"""Evaluation of interactive delineation with simulated prompts, as a clinician would click (``prismrt eval-seg``).

Protocols, per case, structure and method (the prompt rules are :mod:`.prompts`', shared with training):

- **2D** (``mode="2d"``): on the structure's *central slice*, the slice of the session's orientation through its
  deepest voxel (in mm), the first prompt is a positive click at the slice mask's deepest point, or the slice mask's
  tight box (``first="box"``); each further click goes to the larger error on that slice. Scored on that slice.
- **3D** (``mode="3d"``): the first click at the structure's deepest voxel (or the box on the central slice), the
  mask propagated into 3D; each further click goes to the larger 3D error (missed or extra, by depth), that slice is
  corrected and propagation re-run from it. Scored on the volume.

After every prompt: Dice, IoU and HD95 (mm, true spacing). The **box-filled** baseline (the tight box, filled; in
3D the central slice's box over every slice the structure spans) is what a box prompt has to beat.
:func:`summarise` gives mean and standard deviation, :func:`wilcoxon` a paired test between two methods.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..features import FeatureBackend
from ..metrics import dice, hd95, iou
from .prompts import box_filled, corrective_click, deepest_point
from .session import SegmentationSession

FIRST_PROMPTS = ("click", "box")
MODES = ("2d", "3d")
BOX_FILLED = "box-filled"


@dataclass
class PromptResult:
    case: str
    structure: str
    method: str
    mode: str  # "2d" (central slice) or "3d"
    first: str  # "click" or "box"
    prompts: int  # prompts so far, the first included
    dice: float
    iou: float
    hd95_mm: float
    group: str = ""


class BaselineBackend(FeatureBackend):
    """No model at all: the box-filled baseline needs only a session's geometry."""

    name = BOX_FILLED

    def __init__(self):
        super().__init__("cpu")

    def modules(self):
        return {}

    def encode(self, *args, **kwargs):
        raise RuntimeError("the box-filled baseline computes no features")


def prompt_label(first: str, prompts: int) -> str:
    if first == "box":
        return "box" if prompts == 1 else f"box + {prompts - 1} click{'s' if prompts > 2 else ''}"
    return f"{prompts} click{'s' if prompts > 1 else ''}"


def central_slice(session: SegmentationSession, reference: np.ndarray) -> tuple[int, tuple[int, int, int]]:
    """The session's slice through the structure's deepest voxel (mm), and that voxel (k, j, i)."""
    spacing = session.image.GetSpacing()[::-1]
    kji = deepest_point(reference, spacing)
    index = int(round(float(session.plane.index_to_slice_coords(np.array(kji[::-1], float))[0])))
    return index, kji


def _box_corners(session: SegmentationSession, reference: np.ndarray, index: int):
    """LPS corners of the reference's bounding box on slice ``index`` of the session's orientation."""
    plane = session.plane
    rows, cols = np.nonzero(plane.extract(reference, index))
    return (plane.slice_coords_to_point([index, rows.min(), cols.min()]),
            plane.slice_coords_to_point([index, rows.max(), cols.max()]))


def _point(session: SegmentationSession, index: int, row: float, col: float):
    return session.plane.slice_coords_to_point([index, row, col])


def simulate_2d(session: SegmentationSession, reference: np.ndarray, max_prompts: int = 3,
                first: str = "click") -> list[tuple[float, float, float]]:
    """The 2D protocol on a fresh session: (dice, iou, hd95) on the central slice after each prompt."""
    _check(reference, first)
    plane = session.plane
    index, _ = central_slice(session, reference)
    target = plane.extract(reference, index).astype(bool)
    spacing = plane.pixel_spacing
    scores = []
    for n in range(max_prompts):
        if n == 0 and first == "box":
            session.set_box(*_box_corners(session, reference, index))
        else:
            current = plane.extract(session.mask, index).astype(bool)
            click = (*deepest_point(target, spacing), 1) if n == 0 else corrective_click(current, target,
                                                                                          spacing=spacing)
            if click is None:  # exact already
                scores.append(scores[-1])
                continue
            r, c, label = click
            session.add_point(_point(session, index, r, c), positive=bool(label))
        mask = plane.extract(session.mask, index).astype(bool)
        scores.append((dice(mask, target), iou(mask, target), hd95(mask, target, spacing)))
    return scores


def simulate_clicks(session: SegmentationSession, reference: np.ndarray, max_clicks: int = 3,
                    propagate: bool = True, cross_views: bool = True,
                    first: str = "click") -> list[tuple[float, float, float]]:
    """The 3D protocol on a fresh session (``first="box"``: a box, then clicks): (dice, iou, hd95) of the volume
    after each prompt."""
    _check(reference, first)
    reference = np.asarray(reference, bool)
    spacing = session.image.GetSpacing()[::-1]
    geometry = session.geometry
    scores = []
    for n in range(max_clicks):
        if n == 0:
            index, kji = central_slice(session, reference)
            if first == "box":
                result = session.set_box(*_box_corners(session, reference, index))
            else:
                result = session.add_point(geometry.index_to_physical(np.array(kji[::-1], float)), positive=True)
        else:
            click = corrective_click(session.mask.astype(bool), reference, spacing=spacing)
            if click is None:
                scores.append(scores[-1])
                continue
            *kji, label = click
            result = session.add_point(geometry.index_to_physical(np.array(kji[::-1], float)), positive=bool(label))
        if propagate:
            if result.mask.any():
                session.propagate(from_index=result.index, cross_views=cross_views)
            elif session.mask.any():  # the click emptied its slice: the structure ends there
                session.propagate(cross_views=cross_views)
        mask = session.mask.astype(bool)
        scores.append((dice(mask, reference), iou(mask, reference), hd95(mask, reference, spacing)))
    return scores


def _check(reference, first):
    if first not in FIRST_PROMPTS:
        raise ValueError(f"first must be one of {FIRST_PROMPTS}, not {first!r}")
    if not np.asarray(reference).any():
        raise ValueError("the reference structure is empty")


def box_filled_scores(session: SegmentationSession, reference: np.ndarray, mode: str) -> tuple[float, float, float]:
    """The box-filled baseline's (dice, iou, hd95): the central slice's tight box, filled (3D: over every slice the
    structure spans, its true extent)."""
    plane = session.plane
    reference = np.asarray(reference, bool)
    index, _ = central_slice(session, reference)
    box2d = box_filled(plane.extract(reference, index))
    if mode == "2d":
        target = plane.extract(reference, index)
        return dice(box2d, target), iou(box2d, target), hd95(box2d, target, plane.pixel_spacing)
    occupied = np.flatnonzero(plane.stack_view(reference).any(axis=(1, 2)))
    volume = np.zeros(reference.shape, np.uint8)
    for i in range(int(occupied.min()), int(occupied.max()) + 1):
        plane.insert(volume, i, box2d.astype(np.uint8))
    spacing = session.image.GetSpacing()[::-1]
    return dice(volume, reference), iou(volume, reference), hd95(volume.astype(bool), reference, spacing)


def evaluate_case(backend, image, reference: np.ndarray, *, case: str, structure: str, method: str | None = None,
                  modes=("3d",), firsts=("click",), max_prompts: int = 3, orientation: str = "axial",
                  window=None, cross_views: bool = True, group: str = "", baseline: bool = False,
                  features=None) -> list[PromptResult]:
    """Every protocol asked for, on one case and structure, with one method (a backend, or the box-filled
    baseline when ``baseline``). ``features``: a shared feature cache of this volume (sessions are fresh; the
    features need not be)."""
    results = []
    name = BOX_FILLED if baseline else (method or backend.name)
    for mode in modes:
        for first in firsts:
            if baseline:
                if first != "box":
                    continue
                session = SegmentationSession(backend, image, orientation, window=window, features=features)
                scores = [box_filled_scores(session, reference, mode)]
            else:
                session = SegmentationSession(backend, image, orientation, window=window, features=features)
                if mode == "2d":
                    scores = simulate_2d(session, reference, max_prompts, first)
                else:
                    scores = simulate_clicks(session, reference, max_prompts, cross_views=cross_views, first=first)
            results += [PromptResult(case, structure, name, mode, first, n + 1, d, j, h, group)
                        for n, (d, j, h) in enumerate(scores)]
    return results


def summarise(results: list[PromptResult], by: str = "structure") -> list[dict]:
    """Mean and std per (method, structure or group, mode, first prompt, prompts); HD95 over finite cases."""
    groups: dict[tuple, list[PromptResult]] = {}
    for r in results:
        groups.setdefault((r.method, getattr(r, by) or r.structure, r.mode, r.first, r.prompts), []).append(r)
    rows = []
    for (method, structure, mode, first, prompts), rs in sorted(groups.items()):
        d = np.array([r.dice for r in rs])
        h = np.array([r.hd95_mm for r in rs if math.isfinite(r.hd95_mm)])
        rows.append({
            "method": method, "structure": structure, "mode": mode, "first": first, "prompts": prompts,
            "label": prompt_label(first, prompts), "cases": len(rs),
            "dice_mean": float(d.mean()), "dice_std": float(d.std()),
            "iou_mean": float(np.mean([r.iou for r in rs])),
            "hd95_mean": float(h.mean()) if len(h) else float("nan"),
            "hd95_std": float(h.std()) if len(h) else float("nan"), "hd95_cases": int(len(h)),
        })
    return rows


def wilcoxon(results: list[PromptResult], method_a: str, method_b: str, *, mode: str = "3d", first: str = "click",
             prompts: int = 1, metric: str = "dice") -> dict:
    """Paired Wilcoxon signed-rank test of a metric between two methods over the same cases and structures."""
    from scipy.stats import wilcoxon as scipy_wilcoxon

    def pick(method):
        return {(r.case, r.structure): getattr(r, metric) for r in results
                if r.method == method and r.mode == mode and r.first == first and r.prompts == prompts}

    a, b = pick(method_a), pick(method_b)
    keys = sorted(k for k in set(a) & set(b) if math.isfinite(a[k]) and math.isfinite(b[k]))
    if len(keys) < 2:
        return {"n": len(keys), "statistic": float("nan"), "p_value": float("nan")}
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    if np.allclose(x, y):
        return {"n": len(keys), "statistic": 0.0, "p_value": 1.0}
    res = scipy_wilcoxon(x, y)
    return {"n": len(keys), "statistic": float(res.statistic), "p_value": float(res.pvalue)}


def markdown_tables(rows: list[dict], methods: list[str]) -> str:
    """One table per metric: rows = structure x mode x prompts, columns = methods (DSC mean ± std; HD95 mean)."""
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cells.setdefault((r["structure"], r["mode"], r["first"], r["prompts"]), {})[r["method"]] = r
    keys = sorted(cells, key=lambda k: (k[0], k[1], FIRST_PROMPTS.index(k[2]), k[3]))
    out = []
    for metric, title in (("dice", "DSC (mean ± std)"), ("hd95", "HD95 in mm (mean ± std over cases where finite)")):
        lines = [f"**{title}**", "", "| structure | mode | prompts | cases | " + " | ".join(methods) + " |",
                 "|---|---|---|---|" + "---|" * len(methods)]
        for key in keys:
            by = cells[key]
            n = max(r["cases"] for r in by.values())
            values = []
            for m in methods:
                r = by.get(m)
                if r is None:
                    values.append("")
                elif metric == "dice":
                    values.append(f"{r['dice_mean']:.3f} ± {r['dice_std']:.3f}")
                else:
                    values.append("n/a" if not r["hd95_cases"] else f"{r['hd95_mean']:.1f} ± {r['hd95_std']:.1f}"
                                  + (f" ({r['hd95_cases']})" if r["hd95_cases"] < r["cases"] else ""))
            mode = "2D central slice" if key[1] == "2d" else "3D"
            lines.append(f"| {key[0]} | {mode} | {prompt_label(key[2], key[3])} | {n} | " + " | ".join(values) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def to_records(results: list[PromptResult]) -> list[dict]:
    return [asdict(r) for r in results]


def write_results(out: Path, payload: dict, text: str) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(text + "\n")
