"""Overview figure: three orthogonal slices through a point, in physical proportions, with mask contours.

Slices come from :class:`SlicePlane` (the same cut the models see), shown in millimetres so anisotropic voxels keep
their true shape, with the anatomical direction at each edge and a crosshair at the chosen point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import PrismRTError
from ..imaging.geometry import Geometry
from ..imaging.intensity import Window
from ..imaging.slicing import DISPLAY_EDGES, Orientation, SlicePlane

_COLOURS = ("#ff4040", "#40c0ff", "#ffd040", "#60ff60", "#ff60ff", "#ff9040", "#a0a0ff", "#ffffff")


@dataclass(frozen=True)
class Overlay:
    name: str
    mask: sitk.Image


def foreground_threshold(array: np.ndarray) -> float:
    """Where the body starts: -500 HU for CT (which has air near -1000), else the 10th percentile of every 16th
    slice (a sample: no copy of the whole volume)."""
    return -500.0 if array.min() < -500 else float(np.percentile(array[:: max(1, array.shape[0] // 16)], 10))


def foreground(array: np.ndarray) -> np.ndarray:
    """The body: above -500 HU for CT (which has air near -1000), else above the 10th percentile."""
    return array > foreground_threshold(array)


def _above(array: np.ndarray, threshold: float):
    """The (j, i) slabs of ``array > threshold`` along k, made one at a time."""
    return (array[k] > threshold for k in range(array.shape[0]))


def _centre_index(slabs) -> "tuple[int, np.ndarray]":
    """Voxel count and mean (k, j, i) index of a region given as its boolean (j, i) slabs along k.

    The same result as ``np.argwhere(region).mean(axis=0)`` (the sums are of integers, exact either way), without
    argwhere's 24 bytes per voxel (3 GB, twice over, for the body of a 1024 x 1024 x 600 CT) or a whole-volume
    boolean array."""
    count, sums = 0, np.zeros(3, np.int64)
    for k, slab in enumerate(slabs):
        rows, cols = slab.sum(axis=1, dtype=np.int64), slab.sum(axis=0, dtype=np.int64)
        n = int(rows.sum())
        count += n
        sums += (k * n, int(rows @ np.arange(len(rows))), int(cols @ np.arange(len(cols))))
    return count, sums / max(count, 1)


def default_point(image: sitk.Image, masks: "list[np.ndarray] | None" = None) -> np.ndarray:
    """LPS mm: the centre of the first non-empty mask, else of the body, else of the volume. ``masks`` are (k, j, i)
    arrays, above 0 (or True) inside; views of mask images will do: they are read slab by slab."""
    geometry = Geometry.from_image(image)
    array = sitk.GetArrayViewFromImage(image)
    regions = [(_above(m, 0), m.size) for m in masks or []]
    regions.append((_above(array, foreground_threshold(array)), array.size))
    for slabs, size in regions:
        count, centre = _centre_index(slabs)
        if 0 < count < size:
            return geometry.index_to_physical(centre[::-1])
    return geometry.index_to_physical((np.array(array.shape[::-1]) - 1) / 2.0)


def _crop(body_slice: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    """Rows and columns of the body in a displayed slice, plus a margin of pixels (the whole slice if none)."""
    rows, cols = np.flatnonzero(body_slice.any(axis=1)), np.flatnonzero(body_slice.any(axis=0))
    if len(rows) == 0:
        return slice(0, body_slice.shape[0]), slice(0, body_slice.shape[1])
    return (
        slice(max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, body_slice.shape[0])),
        slice(max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, body_slice.shape[1])),
    )


def render_overview(
    image: sitk.Image,
    out_png: "str | os.PathLike",
    *,
    window: Window,
    point_lps=None,
    overlays: "list[Overlay] | None" = None,
    title: str = "",
) -> dict:
    """Write the PNG; return what was shown (slice index per orientation, the point) for the report."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PrismRTError("the overview needs matplotlib: pip install matplotlib") from None

    geometry = Geometry.from_image(image)
    array = sitk.GetArrayViewFromImage(image)
    overlays = overlays or []
    for ov in overlays:
        if Geometry.from_image(ov.mask).shape != geometry.shape or not np.allclose(
            Geometry.from_image(ov.mask).index_to_physical_matrix, geometry.index_to_physical_matrix, atol=1e-3
        ):
            raise PrismRTError(f"the mask '{ov.name}' is not on the image's voxel grid: resample it to the image first")
    # views, not arrays: only the three displayed slices are thresholded (a whole-volume boolean of the body or of
    # a mask is a byte per voxel: 0.6 GB each for a 1024 x 1024 x 600 CT)
    masks = [(ov.name, sitk.GetArrayViewFromImage(ov.mask)) for ov in overlays]
    point = default_point(image, [m for _, m in masks]) if point_lps is None else np.asarray(point_lps, float)

    planes = [SlicePlane.create(geometry, o) for o in Orientation]
    threshold = foreground_threshold(array)
    located = [p.locate(point) for p in planes]
    crops = [_crop(p.extract(array, loc[0]) > threshold) for p, loc in zip(planes, located)]
    widths = [(c.stop - c.start) * p.pixel_spacing[1] for p, (_, c) in zip(planes, crops)]
    fig, axes = plt.subplots(
        1, 3, figsize=(15, 5.6), gridspec_kw={"width_ratios": widths}, facecolor="black"
    )
    shown = {}
    for ax, plane, (rs, cs), (index, row, col) in zip(axes, planes, crops, located):
        sr, sc = plane.pixel_spacing
        extent = (cs.start * sc, cs.stop * sc, rs.stop * sr, rs.start * sr)  # mm, pixel edges
        ax.imshow(window.apply(plane.extract(array, index)[rs, cs]), cmap="gray", vmin=0, vmax=1, extent=extent,
                  interpolation="nearest")
        ys, xs = (np.arange(rs.start, rs.stop) + 0.5) * sr, (np.arange(cs.start, cs.stop) + 0.5) * sc  # centres
        for colour, (name, mask) in zip(_COLOURS, masks):
            m = plane.extract(mask, index)[rs, cs] > 0
            if m.any():
                ax.contour(xs, ys, m.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
        # crosshair at the point (pixel centre coordinates -> mm)
        ax.axhline((row + 0.5) * sr, color="#ffff00", lw=0.5, alpha=0.6)
        ax.axvline((col + 0.5) * sc, color="#ffff00", lw=0.5, alpha=0.6)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        top, bottom, left, right = DISPLAY_EDGES[plane.orientation]
        style = dict(color="#ffcc00", fontsize=13, fontweight="bold", ha="center", va="center")
        ax.text(0.5, 0.97, top, transform=ax.transAxes, **style)
        ax.text(0.5, 0.03, bottom, transform=ax.transAxes, **style)
        ax.text(0.03, 0.5, left, transform=ax.transAxes, **style)
        ax.text(0.97, 0.5, right, transform=ax.transAxes, **style)
        axis_name = "ijk"[plane.normal_axis]
        ax.set_title(f"{plane.orientation.value}  {axis_name} = {index}", color="white", fontsize=11)
        ax.set_axis_off()
        shown[plane.orientation.value] = {"index_axis": axis_name, "slice_index": index}

    handles = [plt.Line2D([], [], color=c, lw=2, label=name) for c, (name, _) in zip(_COLOURS, masks)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white")
    fig.suptitle(
        (title + "\n" if title else "")
        + "point ({:.1f}, {:.1f}, {:.1f}) mm LPS   window L {:g} / W {:g} HU".format(*point, window.level, window.width),
        color="white",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 0.93))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, facecolor="black")
    plt.close(fig)
    return {"point_lps_mm": [round(float(v), 2) for v in point], "slices": shown}


def structure_volume_cc(mask: sitk.Image) -> float:
    """Volume of a binary mask in cm^3 (voxel count x voxel volume)."""
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    return count * float(np.prod(mask.GetSpacing())) / 1000.0


def write_overview_report(
    image: sitk.Image,
    out_dir: "str | os.PathLike",
    *,
    window: Window,
    window_name: str,
    source: str,
    point_lps=None,
    overlays: "list[Overlay] | None" = None,
    overwrite: bool = False,
) -> dict:
    """The main job's first step: ``overview.png`` plus ``report.md`` and ``report.json`` in ``out_dir``."""
    import json

    from .. import __version__
    from ..imaging.validation import check_volume

    summary = check_volume(image)
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in ("overview.png", "report.md", "report.json")}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise PrismRTError(f"{existing[0]} already exists: choose another --out folder or pass --overwrite")
    overlays = overlays or []
    shown = render_overview(
        image, paths["overview.png"], window=window, point_lps=point_lps, overlays=overlays, title=Path(source).name
    )
    structures = {ov.name: round(structure_volume_cc(ov.mask), 2) for ov in overlays}
    report = {
        "prismrt_version": __version__,
        "source": str(source),
        "volume": summary.to_dict(),
        "window": {"name": window_name, "level": window.level, "width": window.width},
        "overview": shown,
        "structures_cc": structures,
        "files": {k: str(v) for k, v in paths.items()},
    }
    lines = [
        "# PRISM-RT volume report",
        "",
        f"Source: `{source}`  ",
        f"PRISM-RT {__version__}",
        "",
        "## Volume",
        "```",
        summary.to_text(),
        "```",
        "",
        "## Overview",
        "![overview](overview.png)",
        "",
        "Window {} (L {:g} / W {:g} HU); slices through ({:.1f}, {:.1f}, {:.1f}) mm LPS: {}.".format(
            window_name, window.level, window.width, *shown["point_lps_mm"],
            ", ".join(f"{o} {v['index_axis']}={v['slice_index']}" for o, v in shown["slices"].items()),
        ),
    ]
    if structures:
        lines += ["", "## Structures", "", "| structure | volume (cm³) |", "|---|---|"]
        lines += [f"| {name} | {cc:.1f} |" for name, cc in structures.items()]
    paths["report.md"].write_text("\n".join(lines) + "\n")
    paths["report.json"].write_text(json.dumps(report, indent=2) + "\n")
    return report
