"""The registration QA report: ``qa.json``, ``qa.md`` (one printable page: verdict first, then a table per check)
and three PNGs (checkerboard of fixed vs warped moving, difference, Jacobian determinant), each with three orthogonal
slices through one point in physical proportions, as the volume overview draws them."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import PrismRTError
from ..imaging.geometry import Geometry
from ..imaging.intensity import WINDOW_PRESETS, Window
from ..imaging.slicing import DISPLAY_EDGES, Orientation, SlicePlane
from ..report.overview import _crop, default_point, foreground_threshold
from .qa import FAIL, INFO, NOT_CHECKED, PASS, REFERENCES, QAReport, _on_grid, jacobian_determinant, warp_image

WARPED_TINT = np.array([0.78, 0.9, 1.0])  # multiplies grey: a cool tint
FOLDING_COLOUR = "#39ff14"  # lime: not in the Jacobian's red-white-blue map
FILES = ("qa.json", "qa.md", "checkerboard.png", "difference.png", "jacobian.png")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PrismRTError("the QA images need matplotlib: pip install matplotlib (or prismrt[report])") from None
    return plt


def is_ct(image: sitk.Image) -> bool:
    return float(sitk.GetArrayViewFromImage(image).min()) < -500  # air near -1000 HU


def default_window(image: sitk.Image) -> tuple[Window, str]:
    """Soft-tissue window on CT; elsewhere the 1st-99th percentile of the body (MR has no absolute scale)."""
    if is_ct(image):
        return WINDOW_PRESETS["soft-tissue"], "soft-tissue"
    array = sitk.GetArrayViewFromImage(image)
    sample = array[:: max(1, array.shape[0] // 16)]
    sample = sample[sample > foreground_threshold(array)]
    lo, hi = np.percentile(sample if sample.size else array, [1, 99])
    hi = hi if hi > lo else lo + 1.0
    return Window((lo + hi) / 2.0, hi - lo), "1st-99th percentile"


class _Views:
    """Three orthogonal slices of the fixed grid through a point, cropped to the body, in millimetres."""

    def __init__(self, fixed: sitk.Image, point_lps=None, masks=()):
        self.geometry = Geometry.from_image(fixed)
        array = sitk.GetArrayViewFromImage(fixed)
        self.point = default_point(fixed, list(masks)) if point_lps is None else np.asarray(point_lps, float)
        threshold = foreground_threshold(array)
        self.panels = []
        for orientation in Orientation:
            plane = SlicePlane.create(self.geometry, orientation)
            index, row, col = plane.locate(self.point)
            rs, cs = _crop(plane.extract(array, index) > threshold)
            sr, sc = plane.pixel_spacing
            extent = (cs.start * sc, cs.stop * sc, rs.stop * sr, rs.start * sr)  # mm, pixel edges
            self.panels.append(dict(plane=plane, index=index, row=row, col=col, rs=rs, cs=cs, extent=extent))

    def cut(self, panel, volume: np.ndarray) -> np.ndarray:
        return panel["plane"].extract(volume, panel["index"])[panel["rs"], panel["cs"]]

    def centres_mm(self, panel):
        sr, sc = panel["plane"].pixel_spacing
        rs, cs = panel["rs"], panel["cs"]
        return (np.arange(rs.start, rs.stop) + 0.5) * sr, (np.arange(cs.start, cs.stop) + 0.5) * sc

    def figure(self, plt, bottom: float = 0.16):
        widths = [p["extent"][1] - p["extent"][0] for p in self.panels]
        heights = [p["extent"][2] - p["extent"][3] for p in self.panels]
        aspect = sum(widths) / max(heights)
        fig, axes = plt.subplots(1, 3, figsize=(min(15.0, 4.6 * aspect + 0.5), 6.2),
                                 gridspec_kw={"width_ratios": widths}, facecolor="black")
        fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=bottom, wspace=0.04)
        return fig, axes

    def decorate(self, ax, panel):
        plane = panel["plane"]
        sr, sc = plane.pixel_spacing
        ax.axhline((panel["row"] + 0.5) * sr, color="#ffff00", lw=0.5, alpha=0.5)
        ax.axvline((panel["col"] + 0.5) * sc, color="#ffff00", lw=0.5, alpha=0.5)
        e = panel["extent"]
        ax.set_xlim(e[0], e[1])
        ax.set_ylim(e[2], e[3])
        top, bottom, left, right = DISPLAY_EDGES[plane.orientation]
        style = dict(color="#ffcc00", fontsize=12, fontweight="bold", ha="center", va="center")
        ax.text(0.5, 0.97, top, transform=ax.transAxes, **style)
        ax.text(0.5, 0.03, bottom, transform=ax.transAxes, **style)
        ax.text(0.03, 0.5, left, transform=ax.transAxes, **style)
        ax.text(0.97, 0.5, right, transform=ax.transAxes, **style)
        ax.set_title(f"{plane.orientation.value}  {'ijk'[plane.normal_axis]} = {panel['index']}", color="white",
                     fontsize=11)
        ax.set_axis_off()

    def title(self, fig, text: str):
        fig.suptitle(text + "\nslices through ({:.1f}, {:.1f}, {:.1f}) mm LPS".format(*self.point), color="white",
                     fontsize=12)

    def shown(self) -> dict:
        return {"point_lps_mm": [round(float(v), 2) for v in self.point],
                "slices": {p["plane"].orientation.value: {"index_axis": "ijk"[p["plane"].normal_axis],
                                                          "slice_index": p["index"]} for p in self.panels}}


def _colorbar(fig, plt, mappable, label: str, ticks=None, ticklabels=None):
    cax = fig.add_axes((0.3, 0.075, 0.4, 0.025))
    bar = fig.colorbar(mappable, cax=cax, orientation="horizontal", ticks=ticks)
    if ticklabels is not None:
        bar.ax.set_xticklabels(ticklabels)
    bar.set_label(label, color="white", fontsize=10)
    bar.ax.tick_params(colors="white", labelsize=9)
    bar.outline.set_edgecolor("white")
    return bar


def _save(fig, plt, out_png):
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, facecolor="black")
    plt.close(fig)


def render_checkerboard(fixed: sitk.Image, warped: sitk.Image, out_png, *, window: Window, window_name: str = "",
                        point_lps=None, tile_mm: float = 20.0, views: _Views | None = None) -> dict:
    """Alternating square tiles of the fixed and the warped moving image: where the registration is right,
    edges run on unbroken across tile borders."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    views = views or _Views(fixed, point_lps)
    f, w = sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(warped)
    fig, axes = views.figure(plt, bottom=0.12)
    for ax, panel in zip(axes, views.panels):
        ys, xs = views.centres_mm(panel)
        tiles = ((np.floor(ys / tile_mm)[:, None] + np.floor(xs / tile_mm)[None, :]) % 2).astype(bool)
        grey = np.where(tiles, window.apply(views.cut(panel, w)), window.apply(views.cut(panel, f)))
        # the warped tiles a little blue, so either tile is known at a glance without hiding an edge
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        rgb[tiles] *= WARPED_TINT
        ax.imshow(rgb, extent=panel["extent"], interpolation="nearest")
        views.decorate(ax, panel)
    fig.legend(handles=[Patch(facecolor="#b0b0b0", label="fixed"),
                        Patch(facecolor=np.array([0.69, 0.69, 0.69]) * WARPED_TINT, label="warped moving"),
                        Patch(facecolor="none", edgecolor="none",
                              label=f"({tile_mm:g} mm tiles: edges should run on unbroken across tile borders)")],
               loc="lower center", ncol=3, frameon=False, labelcolor="white", fontsize=10)
    views.title(fig, f"Checkerboard: fixed vs warped moving   window {window_name} L {window.level:g} / W "
                     f"{window.width:g}")
    _save(fig, plt, out_png)
    return views.shown()


def render_difference(fixed: sitk.Image, warped: sitk.Image, out_png, *, limit: float, units: str = "HU",
                      point_lps=None, views: _Views | None = None) -> dict:
    """fixed - warped moving, on a diverging scale of +-``limit``: a good registration leaves noise and real change."""
    plt = _pyplot()
    import matplotlib as mpl

    views = views or _Views(fixed, point_lps)
    diff_f, diff_w = sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(warped)
    fig, axes = views.figure(plt)
    norm = mpl.colors.Normalize(-limit, limit)
    cmap = "PuOr_r"
    threshold = foreground_threshold(diff_f)
    for ax, panel in zip(axes, views.panels):
        fixed_cut = views.cut(panel, diff_f).astype(np.float32)
        diff = fixed_cut - views.cut(panel, diff_w).astype(np.float32)
        ax.imshow(diff, cmap=cmap, norm=norm, extent=panel["extent"], interpolation="nearest")
        # the body's outline, so a near-white (good) difference still shows where it is
        ys, xs = views.centres_mm(panel)
        if (fixed_cut > threshold).any():
            ax.contour(xs, ys, (fixed_cut > threshold).astype(float), levels=[0.5], colors="#707070",
                       linewidths=0.6)
        views.decorate(ax, panel)
    _colorbar(fig, plt, mpl.cm.ScalarMappable(norm=norm, cmap=cmap),
              f"fixed − warped moving ({units}); clipped at ±{limit:g}; grey line: body outline")
    mad = _mean_abs_difference(diff_f, diff_w, threshold)
    views.title(fig, f"Difference: fixed − warped moving   mean |difference| in the body {mad:.1f} {units}")
    _save(fig, plt, out_png)
    return views.shown()


def _mean_abs_difference(fixed: np.ndarray, warped: np.ndarray, threshold: float, slab: int = 16) -> float:
    """Mean |fixed - warped| over the fixed body, slab by slab (no whole-volume float copy)."""
    total, count = 0.0, 0
    for k in range(0, fixed.shape[0], slab):
        f = fixed[k:k + slab].astype(np.float32)
        body = f > threshold
        total += float(np.abs(f[body] - warped[k:k + slab][body].astype(np.float32)).sum())
        count += int(body.sum())
    return total / max(count, 1)


def render_jacobian(jacobian: sitk.Image, out_png, *, background: sitk.Image, window: Window, mask=None,
                    point_lps=None, views: _Views | None = None, subtitle: str = "") -> dict:
    """The Jacobian determinant on a log scale centred at 1 (white): red where tissue expands, blue where it
    shrinks, folding (det <= 0) in lime; over the fixed image in grey, outside ``mask`` only the image."""
    plt = _pyplot()
    import matplotlib as mpl
    from matplotlib.patches import Patch

    views = views or _Views(background, point_lps)
    det = sitk.GetArrayViewFromImage(jacobian)
    bg = sitk.GetArrayViewFromImage(background)
    inside = _on_grid(mask, jacobian) if mask is not None else None
    # a symmetric log2 range wide enough for the 1st-99th percentile, between x/1.25 and x4
    sample = det[inside] if inside is not None else det[:: max(1, det.shape[0] // 32)]
    positive = sample[sample > 0]
    span = float(np.max(np.abs(np.log2(np.percentile(positive, [1, 99]))))) if positive.size else 1.0
    span = float(np.clip(span, np.log2(1.25), 2.0))
    norm = mpl.colors.Normalize(-span, span)
    cmap = mpl.colormaps["RdBu_r"]
    fig, axes = views.figure(plt)
    folds = 0
    for ax, panel in zip(axes, views.panels):
        d = views.cut(panel, det).astype(np.float64)
        rgba = cmap(norm(np.log2(np.maximum(d, 1e-6))))
        folded = d <= 0
        rgba[folded] = mpl.colors.to_rgba(FOLDING_COLOUR)
        folds += int(folded.sum())
        grey = window.apply(views.cut(panel, bg))
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, extent=panel["extent"], interpolation="nearest")
        alpha = np.full(d.shape, 0.85)
        if inside is not None:
            alpha[~views.cut(panel, inside)] = 0.0
        rgba[..., 3] = alpha
        ax.imshow(rgba, extent=panel["extent"], interpolation="nearest")
        views.decorate(ax, panel)
    ticks = np.linspace(-span, span, 5)
    _colorbar(fig, plt, mpl.cm.ScalarMappable(norm=norm, cmap=cmap),
              "Jacobian determinant (log scale; < 1 shrinks, > 1 expands)", ticks=ticks,
              ticklabels=[f"{2 ** t:.2f}" for t in ticks])
    fig.legend(handles=[Patch(facecolor=FOLDING_COLOUR, label=f"folding (det ≤ 0): {folds} pixels in these slices")],
               loc="lower right", frameon=False, labelcolor="white", fontsize=10)
    views.title(fig, "Jacobian determinant" + (f"   {subtitle}" if subtitle else ""))
    _save(fig, plt, out_png)
    return views.shown()


# ---- markdown -------------------------------------------------------------------------------------------------------
_MARK = {PASS: "pass", FAIL: "**FAIL**", NOT_CHECKED: "not checked", INFO: "(reported)"}


def _table(rows, header) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return out


def qa_markdown(report: QAReport, images: dict | None = None) -> str:
    from .. import __version__

    images = images or {}
    judged = [c for c in report.checks if c.status in (PASS, FAIL)]
    failed = [c for c in judged if c.status == FAIL]
    lines = ["# PRISM-RT registration QA", "",
             f"## Verdict: {'**FAIL**' if report.verdict == 'FAIL' else '**PASS**'}", "",
             f"{len(judged) - len(failed)} of {len(judged)} checks against tolerance pass"
             + (f"; {len(report.not_checked)} not checked (not counted as passes)." if report.not_checked else "."),
             ""]
    if failed:
        lines += ["Fails because:", ""] + [f"- {c.reason}" for c in failed] + [""]
    if report.not_checked:
        lines += ["Not checked:", ""] + [f"- {t}" for t in report.not_checked] + [""]

    grid = report.grid
    rows = [[k, f"`{v}`" if isinstance(v, (str, os.PathLike)) else v] for k, v in report.inputs.items()]
    if grid:
        rows += [["field grid", "{} voxels, {} mm".format(" x ".join(map(str, grid["size"])),
                                                          " x ".join(f"{s:g}" for s in grid["spacing_mm"]))],
                 ["largest displacement", f"{grid['max_displacement_mm']:.1f} mm"]]
    rows += [["date", _dt.datetime.now().strftime("%Y-%m-%d %H:%M")], ["PRISM-RT", __version__]]
    lines += ["## Inputs", ""] + _table(rows, ["", ""]) + [""]

    groups = {}
    for c in report.checks:
        groups.setdefault(c.group, []).append(c)
    titles = {"Jacobian": f"Jacobian determinant ({report.jacobian.region}, {report.jacobian.voxels} voxels)",
              "Inverse consistency": "Inverse consistency (fixed -> moving -> fixed)",
              "Contours": "Propagated contours (moving warped onto fixed)",
              "Landmarks": "Landmark target registration error"}
    for group, checks in groups.items():
        lines += [f"## {titles.get(group, group)}", ""]
        lines += _table([[c.name, c.value_text, c.tolerance, _MARK[c.status]] for c in checks],
                        ["check", "value", "tolerance", "result"]) + [""]
        if group == "Landmarks" and report.landmarks is not None:
            lines += _table([[r.label, f"{r.before_mm:.2f}", f"{r.tre_mm:.2f}"] for r in report.landmarks.landmarks],
                            ["landmark", "before (mm)", "TRE (mm)"]) + [""]
    lines += ["## Tolerances and sources", ""]
    lines += _table([[t["check"], t["tolerance"], t["source"]] for t in report.tolerances],
                    ["check", "tolerance", "source"]) + [""]
    lines += ["References: " + "; ".join(f"**{k}**: {v}" for k, v in REFERENCES.items()), ""]
    lines += ["TG-132's contour tolerances are for intra-patient registration (contour propagation between scans of "
              "one patient); between patients they are rarely met.", ""]
    if images:
        lines += ["## Images", ""]
        captions = {"checkerboard.png": "Checkerboard of fixed and warped moving",
                    "difference.png": "Difference fixed − warped moving",
                    "jacobian.png": "Jacobian determinant (folding in lime)"}
        for name in images:
            lines += [f"![{captions.get(name, name)}]({name})", ""]
    return "\n".join(lines)


def write_qa_report(
    report: QAReport,
    out_dir: "str | os.PathLike",
    *,
    fixed: sitk.Image,
    field: sitk.Image,
    moving: sitk.Image | None = None,
    warped: sitk.Image | None = None,
    jacobian: sitk.Image | None = None,
    mask: sitk.Image | None = None,
    window: Window | None = None,
    window_name: str | None = None,
    point_lps=None,
    images: bool = True,
    overwrite: bool = False,
) -> dict:
    """``qa.json``, ``qa.md`` and (``images``) the three PNGs in ``out_dir``; returns name -> path. ``warped`` is the
    moving image warped onto the fixed grid (made from ``moving`` and ``field`` if not given); ``jacobian`` the map
    :func:`registration_qa` was given (computed again if not); ``mask`` the region the statistics were taken in;
    ``point_lps`` where the three slices cross (default: the centre of ``mask``, else of the body)."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in FILES if images or not name.endswith(".png")}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise PrismRTError(f"{existing[0]} already exists: choose another --out folder or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = None
    if images:
        if warped is None:
            if moving is None:
                raise PrismRTError("the QA images need the moving image (or the warped moving image)")
            warped = warp_image(moving, field)
        if window is None:
            window, window_name = default_window(fixed)
        ct = is_ct(fixed)
        views = _Views(fixed, point_lps, [sitk.GetArrayViewFromImage(mask)] if mask is not None else ())
        shown = render_checkerboard(fixed, warped, paths["checkerboard.png"], window=window,
                                    window_name=window_name or "", views=views)
        render_difference(fixed, warped, paths["difference.png"], limit=window.width / 2.0,
                          units="HU" if ct else "image units", views=views)
        j = report.jacobian
        render_jacobian(jacobian if jacobian is not None else jacobian_determinant(field), paths["jacobian.png"],
                        background=fixed, window=window, mask=mask, views=views,
                        subtitle=f"{j.region}: folding {j.folding_percent:.3f} %, {j.min:.2f}..{j.max:.2f}")
    data = report.to_dict()
    data["files"] = {k: str(v) for k, v in paths.items()}
    if shown:
        data["images"] = shown
    import json

    paths["qa.json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["qa.md"].write_text(qa_markdown(report, {k: v for k, v in paths.items() if k.endswith(".png")}) + "\n")
    return paths
