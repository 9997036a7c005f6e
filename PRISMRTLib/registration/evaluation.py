"""`prismrt eval-reg`: PRISM-RT's registration and its peer, side by side on the same pairs.

Three kinds of case:

- **Inter-patient pairs** (OpenKBP ``validation-pats``, consecutive patients sorted by name: fixed pt_A, moving
  pt_B): the moving patient's organs are warped (nearest neighbour) and compared with the fixed patient's (Dice,
  HD95, mean distance to agreement, :func:`.qa.compare_masks`), for the organs both have.
- **Synthetic deformations of real CTs** (OpenKBP and ``clinical/``): a smooth known field ``u_true`` (Gaussian bumps
  of displacement placed in the body, :func:`synthetic_field`) makes ``fixed(p) = ct(p + u_true(p))``; registering
  ``fixed`` to ``ct`` must find ``u_true``. TRE at 500 random points in the fixed body: ``|u(p) - u_true(p)|``, mean
  and max, against TG-132's deformable tolerances (2 mm mean, 5 mm max).
- **The MR pair** (``samples/mr_brain_tumor_pair``, one patient at two time points, no labels): normalised
  cross-correlation inside the head before and after, and the Jacobian.

Every method gets the same pair: PRISM-RT with ``mind``, ``features`` or ``both`` (:func:`.pipeline.register`), its
initial alignment alone (``affine``), and the peer, itk-elastix (``elastix-affine``: its default affine map
with centre-of-gravity initialisation; ``elastix-bspline``: the same then its default B-spline map, final grid
spacing 10 mm; mutual information, 4 resolutions, as elastix's defaults are; ``elastix-bspline-from-affine``: its
B-spline map alone, started from PRISM-RT's initial alignment, which compares the deformable steps on the same
start; ``elastix-bspline-tuned``: the preset tuned for inter-patient CT, on that start too: body mask with sparse-mask
sampling, 20 mm grid over 3 levels, bending energy at 5x). For each: folding (% of fixed-body voxels with
det J <= 0), SDlogJ and CPU time (process time, the elastix child included; elastix runs on ``--threads``, default 1).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import PrismRTError
from .alignment import body_mask, looks_like_ct
from .field import compose, voxel_grid_to_field, warp_label
from .qa import compare_masks, jacobian_determinant, jacobian_stats

ORGANS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
PRISMRT_METHODS = ("mind", "features", "both")
PEER_METHODS = ("elastix-affine", "elastix-bspline", "elastix-bspline-from-affine", "elastix-bspline-tuned")
ON_PRISMRT_ALIGNMENT = ("elastix-bspline-from-affine", "elastix-bspline-tuned")  # elastix starts from align()
METHODS = PRISMRT_METHODS + ("affine",) + PEER_METHODS
TG132_MEAN_MM, TG132_MAX_MM = 2.0, 5.0
TRE_POINTS = 500


@dataclass
class Case:
    kind: str  # "pair", "synthetic", "mr"
    name: str
    fixed: Path
    moving: Path | None = None
    fixed_organs: dict = field(default_factory=dict)  # name -> path
    moving_organs: dict = field(default_factory=dict)


# ---- cases ---------------------------------------------------------------------------------------------------------

def _organs(folder: Path) -> dict:
    out = {}
    for organ in ORGANS:
        for path in (folder / f"{organ}.nii.gz", folder / "masks" / f"{organ}.nii.gz"):
            if path.is_file():
                out[organ] = path
                break
    return out


def openkbp_pairs(folder: Path, limit: int) -> list[Case]:
    patients = sorted(p for p in Path(folder).iterdir() if (p / "ct.nii.gz").is_file())
    if len(patients) < 2:
        raise PrismRTError(f"{folder} holds fewer than two patients (PATIENT/ct.nii.gz): give OpenKBP's validation-pats")
    cases = []
    for a, b in zip(patients[0::2], patients[1::2]):
        if len(cases) >= limit:
            break
        cases.append(Case("pair", f"{a.name}<-{b.name}", a / "ct.nii.gz", b / "ct.nii.gz", _organs(a), _organs(b)))
    return cases


def synthetic_cases(paths) -> list[Case]:
    cases = []
    for path in paths:
        path = Path(path)
        ct = path / "ct.nii.gz" if path.is_dir() else path
        if not ct.is_file():
            raise PrismRTError(f"no CT at {ct}: give a CT file or a folder holding ct.nii.gz")
        cases.append(Case("synthetic", ct.parent.name if ct.name == "ct.nii.gz" else ct.name, ct))
    return cases


# ---- the known deformation -----------------------------------------------------------------------------------------

def synthetic_field(reference: sitk.Image, *, amplitude_mm: float = 10.0, bumps: int = 5, width_mm: float = 40.0,
                    seed: int = 0) -> sitk.Image:
    """A smooth displacement field on ``reference``'s grid (LPS mm): ``bumps`` Gaussian bumps (sigma ``width_mm``)
    centred at random points of the body, each a random direction, peak ``amplitude_mm``. Smooth and invertible
    for amplitude < width / 1.65 (the steepest slope of a Gaussian bump is 0.61 amplitude / sigma)."""
    rng = np.random.default_rng(seed)
    body = sitk.GetArrayFromImage(body_mask(reference)) > 0
    inside = np.argwhere(body)  # (k, j, i)
    size = reference.GetSize()
    ii, jj, kk = [np.arange(n, dtype=np.float64) for n in size]
    m = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())[None]
    origin = np.asarray(reference.GetOrigin())
    # physical coordinates of every voxel, separably: p = origin + m @ (i, j, k)
    p = (origin[:, None, None, None] + m[:, 0, None, None, None] * ii[None, None, None, :]
         + m[:, 1, None, None, None] * jj[None, None, :, None] + m[:, 2, None, None, None] * kk[None, :, None, None])
    u = np.zeros((3,) + tuple(size)[::-1], np.float64)
    for _ in range(bumps):
        k, j, i = inside[rng.integers(len(inside))]
        centre = origin + m @ np.array([i, j, k], float)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        r2 = ((p - centre[:, None, None, None]) ** 2).sum(0)
        u += direction[:, None, None, None] * amplitude_mm * np.exp(-r2 / (2 * width_mm ** 2))
    return voxel_grid_to_field(np.einsum("ab,bzyx->azyx", np.linalg.inv(m), u), reference)


def tre_points(fixed: sitk.Image, count: int = TRE_POINTS, seed: int = 1) -> np.ndarray:
    """``count`` random LPS points in the fixed body (eroded by 5 mm, away from the skin's edge)."""
    body = body_mask(fixed)
    radius = [max(1, int(round(5.0 / s))) for s in fixed.GetSpacing()]
    inside = np.argwhere(sitk.GetArrayFromImage(sitk.BinaryErode(body, radius)) > 0)
    if len(inside) == 0:
        inside = np.argwhere(sitk.GetArrayFromImage(body) > 0)
    picks = inside[np.random.default_rng(seed).choice(len(inside), min(count, len(inside)), replace=False)]
    return np.array([fixed.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)])
                     for k, j, i in picks])


def _field_at(field_image: sitk.Image, points) -> np.ndarray:
    from .qa import displace_points

    return displace_points(field_image, points) - np.asarray(points)


# ---- the peer --------------------------------------------------------------------------------------------------------

def elastix_available() -> bool:
    """itk-elastix importable (checked in a child process: see :func:`elastix_register`)."""
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.version("itk-elastix")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("itk") is not None


def elastix_register(fixed: sitk.Image, moving: sitk.Image, kind: str, threads: int | None = None) -> sitk.Image:
    """itk-elastix with its default parameter maps, in a child process (:mod:`.elastix_peer`: itk's own ITK and
    SimpleITK's in one process crashed after a SimpleITK registration), on ``threads`` threads (default 1: its
    B-spline registration crashed (SIGSEGV) with 2 threads here, itk-elastix 0.25.4). Returns the displacement field on the fixed
    grid in PRISM-RT's convention (elastix's is ITK's: ``p_moving = p + u(p)``, LPS mm); the child's CPU time is
    counted in this process's ``resource.RUSAGE_CHILDREN``."""
    import subprocess
    import sys
    import tempfile

    if not elastix_available():
        raise PrismRTError("the peer needs itk-elastix: pip install itk-elastix (evaluation only)")
    with tempfile.TemporaryDirectory(prefix="prismrt-elastix-") as folder:
        folder = Path(folder)
        sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), str(folder / "fixed.nii.gz"))
        sitk.WriteImage(sitk.Cast(moving, sitk.sitkFloat32), str(folder / "moving.nii.gz"))
        done = subprocess.run([sys.executable, "-m", "PRISMRTLib.registration.elastix_peer", kind,
                               str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"),
                               str(folder / "field.nii.gz"), str(int(threads or 1))],
                              cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise PrismRTError(f"elastix ({kind}) failed: {done.stderr.strip()[-500:]}")
        out = sitk.ReadImage(str(folder / "field.nii.gz"), sitk.sitkVectorFloat64)
    out.CopyInformation(fixed)
    return out


def _cpu_seconds() -> float:
    """This process's CPU time plus that of its finished children (the elastix peer)."""
    import resource

    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


# ---- one method on one case ------------------------------------------------------------------------------------------

def run_method(method: str, fixed: sitk.Image, moving: sitk.Image, *, features=None, smoothness: float = 1.0,
               device: str = "cpu", threads: int | None = None) -> tuple[sitk.Image, float]:
    """(displacement field on the fixed grid, CPU seconds)."""
    from .alignment import align
    from .field import transform_to_field
    from .pipeline import register

    start = _cpu_seconds()
    if method in ON_PRISMRT_ALIGNMENT:
        transform = align(fixed, moving).transform
        aligned = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1024.0 if looks_like_ct(moving) else 0.0,
                                sitk.sitkFloat32)
        out = compose(transform, elastix_register(fixed, aligned, method, threads), fixed)
    elif method in PEER_METHODS:
        out = elastix_register(fixed, moving, method, threads)
    elif method == "affine":  # PRISM-RT's initial alignment alone (what the deformable step starts from)
        out = transform_to_field(align(fixed, moving).transform, fixed)
    else:
        out = register(fixed, moving, method=method, smoothness=smoothness, device=device,
                       features=features).displacement
    return out, _cpu_seconds() - start


def _jacobian_row(field_image: sitk.Image, body: sitk.Image) -> dict:
    stats = jacobian_stats(jacobian_determinant(field_image), body, region="fixed body")
    return {"folding_percent": stats.folding_percent, "sdlogj": stats.sdlogj, "det_min": stats.min}


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12))


def evaluate_case(case: Case, method: str, **kw) -> dict:
    from .field import warp_image

    row = {"case": case.name, "kind": case.kind, "method": method}
    if case.kind == "synthetic":
        ct = sitk.ReadImage(str(case.fixed), sitk.sitkFloat32)
        truth = synthetic_field(ct, seed=kw.pop("seed", 0))
        fixed, moving = warp_image(ct, truth), ct
    else:
        fixed = sitk.ReadImage(str(case.fixed), sitk.sitkFloat32)
        moving = sitk.ReadImage(str(case.moving), sitk.sitkFloat32)
    found, cpu = run_method(method, fixed, moving, **kw)
    body = body_mask(fixed)
    row.update(cpu_s=cpu, **_jacobian_row(found, body))
    if case.kind == "pair":
        scores = []
        for organ in sorted(set(case.fixed_organs) & set(case.moving_organs)):
            f = sitk.ReadImage(str(case.fixed_organs[organ]))
            warped = warp_label(sitk.ReadImage(str(case.moving_organs[organ])), found)
            a = compare_masks(sitk.GetArrayFromImage(f) > 0, sitk.GetArrayFromImage(warped) > 0,
                              f.GetSpacing()[::-1], organ)
            scores.append({"organ": organ, "dice": a.dice, "hd95_mm": a.hd95_mm, "mda_mm": a.mda_mm})
        row["organs"] = scores
        row["dice"] = float(np.mean([s["dice"] for s in scores])) if scores else float("nan")
        finite = [s["hd95_mm"] for s in scores if np.isfinite(s["hd95_mm"])]
        row["hd95_mm"] = float(np.mean(finite)) if finite else float("nan")
        row["organs_lost"] = len(scores) - len(finite)  # warped out of sight (no surface to measure)
    elif case.kind == "synthetic":
        points = tre_points(fixed)
        true_u, found_u = _field_at(truth, points), _field_at(found, points)
        tre = np.linalg.norm(found_u - true_u, axis=1)
        row.update(tre_mean_mm=float(tre.mean()), tre_max_mm=float(tre.max()),
                   tre_before_mean_mm=float(np.linalg.norm(true_u, axis=1).mean()),
                   truth_max_mm=float(np.linalg.norm(true_u, axis=1).max()),
                   tg132_pass=bool(tre.mean() < TG132_MEAN_MM and tre.max() < TG132_MAX_MM))
    else:  # MR: similarity inside the fixed head
        inside = sitk.GetArrayFromImage(body) > 0
        f = sitk.GetArrayFromImage(fixed)[inside]
        before = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0))[inside]
        after = sitk.GetArrayFromImage(warp_image(moving, found))[inside]
        row.update(ncc_before=_ncc(f, before), ncc_after=_ncc(f, after))
    return row


# ---- the whole evaluation ------------------------------------------------------------------------------------------

def evaluate(cases: list[Case], methods, *, features_factory=None, smoothness: float = 1.0, device: str = "cpu",
             threads: int | None = None, progress=None) -> dict:
    """Every method on every case (methods that cannot run here are reported, not dropped silently)."""
    rows, skipped = [], {}
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}': use {', '.join(METHODS)}")
        if method in PEER_METHODS and not elastix_available():
            skipped[method] = "itk-elastix is not installed (pip install itk-elastix)"
    for case in cases:
        for method in methods:
            if method in skipped:
                continue
            features = features_factory() if method in ("features", "both") else None
            start = time.perf_counter()
            row = evaluate_case(case, method, features=features, smoothness=smoothness, device=device,
                                threads=threads)
            row["wall_s"] = time.perf_counter() - start
            if features is not None and hasattr(features, "settings"):
                row["features"] = features.settings()
            rows.append(row)
            if progress is not None:
                progress(row)
    return {"methods": list(methods), "skipped": skipped, "smoothness": smoothness, "device": device, "rows": rows}


def _mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


def _f(value, digits=3):
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def results_markdown(results: dict, command: str = "") -> str:
    rows, methods = results["rows"], [m for m in results["methods"] if m not in results["skipped"]]
    lines = ["# Registration evaluation", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    for method, why in results["skipped"].items():
        lines.append(f"- **{method}** not run: {why}")
    pairs = [r for r in rows if r["kind"] == "pair"]
    if pairs:
        cases = list(dict.fromkeys(r["case"] for r in pairs))
        lines += ["", f"## Inter-patient pairs (OpenKBP, {len(cases)} pairs): organs of the moving patient warped onto "
                  "the fixed patient", "",
                  "| method | mean organ Dice | HD95 mm | folding % (body) | SDlogJ | CPU s | " +
                  " | ".join(cases) + " |", "|---" * (6 + len(cases)) + "|"]
        for method in methods:
            mine = [r for r in pairs if r["method"] == method]
            if not mine:
                continue
            per = {r["case"]: r["dice"] for r in mine}
            lines.append(f"| {method} | {_f(_mean(mine, 'dice'))} | {_f(_mean(mine, 'hd95_mm'), 1)} | "
                         f"{_f(_mean(mine, 'folding_percent'))} | {_f(_mean(mine, 'sdlogj'))} | "
                         f"{_f(_mean(mine, 'cpu_s'), 0)} | " + " | ".join(_f(per.get(c)) for c in cases) + " |")
        organs = sorted({o["organ"] for r in pairs for o in r.get("organs", [])})
        lines += ["", "Per organ (mean Dice over the pairs):", "",
                  "| method | " + " | ".join(organs) + " |", "|---" * (1 + len(organs)) + "|"]
        for method in methods:
            mine = [o for r in pairs if r["method"] == method for o in r.get("organs", [])]
            if mine:
                lines.append(f"| {method} | " + " | ".join(
                    _f(np.mean([o["dice"] for o in mine if o["organ"] == name]) if any(
                        o["organ"] == name for o in mine) else None) for name in organs) + " |")
    synthetic = [r for r in rows if r["kind"] == "synthetic"]
    if synthetic:
        cases = list(dict.fromkeys(r["case"] for r in synthetic))
        lines += ["", f"## Synthetic deformations of real CTs ({len(cases)} CTs): TRE against the known field at "
                  f"{TRE_POINTS} points in the body", "",
                  f"TG-132 deformable tolerances: mean < {TG132_MEAN_MM:g} mm, max < {TG132_MAX_MM:g} mm. The fields "
                  "peak at 10 mm or more where bumps overlap (mean displacement at the points in the 'before' column).", "",
                  "| method | mean TRE mm | max TRE mm (worst case) | cases within TG-132 | folding % | CPU s | " +
                  " | ".join(f"{c} mean / max" for c in cases) + " |", "|---" * (6 + len(cases)) + "|"]
        before = {r["case"]: r["tre_before_mean_mm"] for r in synthetic}
        lines.append("| before (identity) | " + _f(float(np.mean(list(before.values()))), 2) +
                     " | | | | | " + " | ".join(_f(before[c], 2) for c in cases) + " |")
        for method in methods:
            mine = [r for r in synthetic if r["method"] == method]
            if not mine:
                continue
            per = {r["case"]: r for r in mine}
            lines.append(
                f"| {method} | {_f(_mean(mine, 'tre_mean_mm'), 2)} | "
                f"{_f(max(r['tre_max_mm'] for r in mine), 2)} | {sum(r['tg132_pass'] for r in mine)}/{len(mine)} | "
                f"{_f(_mean(mine, 'folding_percent'))} | {_f(_mean(mine, 'cpu_s'), 0)} | " + " | ".join(
                    f"{_f(per[c]['tre_mean_mm'], 2)} / {_f(per[c]['tre_max_mm'], 1)}" if c in per else "" for c in cases)
                + " |")
    mr = [r for r in rows if r["kind"] == "mr"]
    if mr:
        lines += ["", "## MR pair (one patient, two time points; no labels): NCC inside the head", "",
                  "| method | NCC before | NCC after | folding % | SDlogJ | CPU s |", "|---|---|---|---|---|---|"]
        for r in mr:
            lines.append(f"| {r['method']} | {_f(r['ncc_before'])} | {_f(r['ncc_after'])} | "
                         f"{_f(r['folding_percent'])} | {_f(r['sdlogj'])} | {_f(r['cpu_s'], 0)} |")
    features = next((r["features"] for r in rows if r.get("features")), None)
    if features:
        lines += ["", f"Backbone features: {features['backend']}, {features['role']} role, {features['channels']} PCA "
                  f"channels, {', '.join(features['orientations'])} slices fused, every {features['slice_step']} "
                  "slice(s)."]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path, command: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": command, **results}, indent=1, default=float))
    (out / "results.md").write_text(results_markdown(results, command))
