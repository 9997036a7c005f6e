"""Quality assurance of a deformable registration, checked against AAPM TG-132 tolerances.

Every check takes the registration's displacement field (see the package docstring: on the fixed grid, LPS mm,
``p_moving = p + u(p)``) and what the user has to judge it by:

- the **Jacobian determinant** of ``p -> p + u(p)`` (always): folding (det <= 0) and its range, inside an optional
  mask (body);
- **inverse consistency** when a backward field (moving -> fixed, on the moving grid) is given:
  ``|u_f(p) + u_b(p + u_f(p))|`` at fixed voxels;
- **contour agreement** when segmentations of both images are given: each moving structure is warped into the fixed
  frame (nearest neighbour) and compared with the fixed structure of the same name (Dice, mean distance to agreement,
  HD95);
- **landmark TRE** when fiducials are given: ``|f_i + u(f_i) - m_i|``.

:func:`registration_qa` runs what the inputs allow and returns a :class:`QAReport`: PASS only if every check that
ran passes; checks that could not run are listed as "not checked", never counted as passes.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field as dc_field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .. import metrics
from ..errors import GeometryError, InvalidImageError, PrismRTError
from ..imaging.geometry import Geometry, ras_to_lps

PASS, FAIL, NOT_CHECKED, INFO = "pass", "fail", "not checked", "info"

REFERENCES = {
    "TG-132": "Brock KK, Mutic S, McNutt TR, Li H, Kessler ML. Use of image registration and fusion algorithms and "
              "techniques in radiotherapy: Report of the AAPM Radiation Therapy Committee Task Group No. 132. Med Phys "
              "44(7):e43-e76, 2017. doi:10.1002/mp.12256",
    "Latifi 2018": "Latifi K et al. Practical quantification of image registration accuracy following the AAPM TG-132 "
                   "report framework. J Appl Clin Med Phys 19(4):125-133, 2018. doi:10.1002/acm2.12348 (quotes "
                   "TG-132's deformable TRE recommendation: 2 mm mean, 5 mm maximum)",
    "Learn2Reg": "Learn2Reg challenge evaluation code: SDlogJ = std(log(clip(det + 3, 1e-9, 1e9)))",
}
TG132 = "TG-132"
TG132_TRE = "TG-132, as quoted by Latifi 2018"
LEARN2REG = "Learn2Reg"


# ---- tolerances -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerances:
    """What each check is held to. Defaults follow TG-132 where it gives a number; where it gives none (the Jacobian's
    range, inverse consistency) the value is PRISM-RT's and :meth:`table` says so."""

    max_folding_percent: float = 0.0  # TG-132: "no negative values" of the Jacobian determinant
    jacobian_range: tuple[float, float] = (0.2, 5.0)  # local volume change a patient's anatomy plausibly shows
    min_dice: float = 0.80  # TG-132: 0.8-0.9 (within contour uncertainty); the lower end
    max_mda_mm: float | None = None  # None: max(3 mm, the largest voxel dimension) (TG-132: 2-3 mm, voxel size)
    max_mean_tre_mm: float = 2.0
    max_max_tre_mm: float = 5.0
    max_mean_ice_mm: float = 2.0  # borrowed from the TRE tolerances: a round trip should return within them
    max_p95_ice_mm: float = 5.0

    def mda_limit(self, spacing) -> float:
        return float(self.max_mda_mm) if self.max_mda_mm is not None else max(3.0, float(np.max(spacing)))

    def table(self, spacing=(1.0, 1.0, 1.0)) -> list[dict]:
        """The tolerance of each check and where it comes from (for the code's readers and the report)."""
        lo, hi = self.jacobian_range
        return [
            {"check": "Jacobian: folding", "tolerance": f"folding voxels (det <= 0) <= {self.max_folding_percent:g} %",
             "source": 'TG-132: "no negative values" of the Jacobian determinant'},
            {"check": "Jacobian: range", "tolerance": f"{lo:g} <= det <= {hi:g} everywhere checked",
             "source": "PRISM-RT: TG-132 asks for values consistent with the expected anatomical change, without a "
                       "number; shrinking below a fifth or growing over fivefold is not anatomy"},
            {"check": "Contours: Dice", "tolerance": f">= {self.min_dice:.2f} per structure",
             "source": "TG-132: 0.8-0.9 (within contour uncertainty); the lower end"},
            {"check": "Contours: mean distance to agreement",
             "tolerance": f"<= {self.mda_limit(spacing):.1f} mm per structure"
                          + ("" if self.max_mda_mm is not None else " (3 mm or the largest voxel dimension)"),
             "source": "TG-132: 2-3 mm (within the voxel size)"},
            {"check": "Contours: HD95", "tolerance": "reported, not judged", "source": "TG-132 gives no tolerance"},
            {"check": "Landmarks: mean TRE", "tolerance": f"<= {self.max_mean_tre_mm:g} mm", "source": TG132_TRE},
            {"check": "Landmarks: max TRE", "tolerance": f"<= {self.max_max_tre_mm:g} mm", "source": TG132_TRE},
            {"check": "Inverse consistency", "tolerance": f"mean <= {self.max_mean_ice_mm:g} mm, 95th percentile <= "
                                                          f"{self.max_p95_ice_mm:g} mm",
             "source": "PRISM-RT: TG-132 recommends consistency checks without a number; the TRE tolerances, with "
                       "the 95th percentile for the max (the round trip is ill-defined at the overlap's edge)"},
            {"check": "Jacobian: SDlogJ", "tolerance": "reported, not judged",
             "source": "std(log det), det clipped at 1e-9; Learn2Reg's std(log(det + 3)) beside it"},
        ]


# ---- results --------------------------------------------------------------------------------------------------------
@dataclass
class Check:
    """One judged (or reported) quantity."""

    group: str  # "Jacobian", "Inverse consistency", "Contours", "Landmarks"
    name: str
    status: str  # pass | fail | not checked | info
    value: float | None
    value_text: str
    tolerance: str
    reason: str  # one sentence, for the report and the verdict
    source: str = ""


@dataclass
class JacobianStats:
    region: str  # "whole field" or the mask's description
    voxels: int
    folding_voxels: int
    folding_percent: float
    min: float
    max: float
    mean: float
    p1: float
    p99: float
    sdlogj: float  # std(log(max(det, 1e-9)))
    sdlogj_learn2reg: float  # std(log(clip(det + 3, 1e-9, 1e9))), as Learn2Reg's evaluation computes it
    min_at_lps: list[float]
    max_at_lps: list[float]


@dataclass
class InverseConsistency:
    mean_mm: float
    p95_mm: float
    max_mm: float
    points: int  # fixed voxels where the round trip could be evaluated
    outside_percent: float  # share of the region whose forward image fell outside the backward field's grid


@dataclass
class ContourAgreement:
    name: str
    dice: float
    mda_mm: float  # mean of all surface-to-surface distances, both directions (mean distance to agreement)
    hd95_mm: float
    fixed_cc: float
    warped_cc: float


@dataclass
class LandmarkResult:
    label: str
    fixed_lps: list[float]
    moving_lps: list[float]
    before_mm: float  # |f - m|: with no registration
    tre_mm: float  # |f + u(f) - m|


@dataclass
class LandmarkTRE:
    mean_mm: float
    max_mm: float
    mean_before_mm: float
    max_before_mm: float
    landmarks: list[LandmarkResult]


@dataclass
class QAReport:
    verdict: str  # PASS | FAIL
    reasons: list[str]  # why it failed (empty on PASS)
    not_checked: list[str]  # what could not be judged, and why
    checks: list[Check]
    jacobian: JacobianStats
    inverse_consistency: InverseConsistency | None = None
    contours: list[ContourAgreement] = dc_field(default_factory=list)
    landmarks: LandmarkTRE | None = None
    tolerances: list[dict] = dc_field(default_factory=list)
    grid: dict = dc_field(default_factory=dict)
    inputs: dict = dc_field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: numpy scalars become floats, infinities and NaN become None (JSON has neither)."""
        return _jsonable(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @property
    def summary(self) -> str:
        judged = [c for c in self.checks if c.status in (PASS, FAIL)]
        failed = [c for c in judged if c.status == FAIL]
        text = f"{self.verdict}: {len(judged) - len(failed)} of {len(judged)} checks pass"
        if self.not_checked:
            text += f"; not checked: {len(self.not_checked)}"
        return text


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


# ---- inputs ---------------------------------------------------------------------------------------------------------
def check_field(field: sitk.Image, reference: sitk.Image | None = None) -> sitk.Image:
    """The field as sitkVectorFloat64 (what DisplacementFieldTransform takes); a clear error if it is not a 3D
    3-vector field, holds NaN, or is not on ``reference``'s grid."""
    if not isinstance(field, sitk.Image):
        raise InvalidImageError("the displacement field must be a SimpleITK image")
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise InvalidImageError(
            f"a displacement field is a 3D image of 3-vectors (mm, LPS); got a {field.GetDimension()}D image with "
            f"{field.GetNumberOfComponentsPerPixel()} component(s)")
    if min(field.GetSize()) < 2:
        raise InvalidImageError(f"the displacement field is {field.GetSize()} voxels: every axis needs at least 2")
    if field.GetPixelID() != sitk.sitkVectorFloat64:
        field = sitk.Cast(field, sitk.sitkVectorFloat64)
    if not np.isfinite(sitk.GetArrayViewFromImage(field)).all():
        raise InvalidImageError("the displacement field holds NaN or infinite values: the registration failed")
    if reference is not None and not _same_grid(field, reference):
        raise GeometryError("the displacement field is not on the fixed image's grid (size, spacing, origin and "
                            "direction must match): pass the field the registration wrote for this fixed image")
    return field


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * max(1.0, np.abs(a.GetOrigin()).max()))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def _on_grid(mask: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """A mask (>0 inside) as a (k, j, i) bool array on ``reference``'s grid, resampled (nearest) if it is elsewhere."""
    if mask.GetDimension() != 3:
        raise InvalidImageError(f"a mask must be 3D, got {mask.GetDimension()}D")
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidImageError("a mask must have one component per voxel")
    if not _same_grid(mask, reference):
        mask = sitk.Resample(mask, reference.GetSize(), sitk.Transform(), sitk.sitkNearestNeighbor,
                             reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection(), 0,
                             mask.GetPixelID())
    return sitk.GetArrayViewFromImage(mask) > 0


def _transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    # the transform takes the image's buffer and leaves its argument empty: give it a copy
    return sitk.DisplacementFieldTransform(sitk.Image(field))


# ---- Jacobian -------------------------------------------------------------------------------------------------------
def jacobian_determinant(field: sitk.Image, *, chunk_voxels: int = 1_000_000) -> sitk.Image:
    """det(I + du/dx) of ``p -> p + u(p)`` at every voxel (float32, on the field's grid).

    Derivatives are central differences in index space (one-sided at the edges) mapped to physical space through the
    direction and spacing, so oblique and flipped grids are right (SimpleITK's DisplacementFieldJacobianDeterminant
    ignores the direction). Computed slab by slab to bound memory on large grids."""
    field = check_field(field)
    geometry = Geometry.from_image(field)
    # d(index)/dx: the inverse of index -> physical
    to_index = np.linalg.inv(geometry.direction * geometry.spacing[None, :])
    u = sitk.GetArrayViewFromImage(field)  # (k, j, i, 3)
    nk = u.shape[0]
    step = max(1, chunk_voxels // (u.shape[1] * u.shape[2]))
    out = np.empty(u.shape[:3], np.float32)
    for k0 in range(0, nk, step):
        k1 = min(k0 + step, nk)
        lo, hi = max(k0 - 1, 0), min(k1 + 1, nk)
        keep = slice(k0 - lo, k1 - lo)
        jac = [[None] * 3 for _ in range(3)]
        for c in range(3):
            # du_c/d(k, j, i) on the slab with its halo (array axes are k, j, i), then the rows of du/dx
            d_dk, d_dj, d_di = (g[keep] for g in np.gradient(np.asarray(u[lo:hi, ..., c], np.float64)))
            for b in range(3):
                jac[c][b] = d_di * to_index[0, b] + d_dj * to_index[1, b] + d_dk * to_index[2, b] + (c == b)
        out[k0:k1] = (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
                      - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
                      + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]))
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(field)
    return image


def jacobian_stats(jacobian: sitk.Image, mask: sitk.Image | None = None, *, region: str | None = None) -> JacobianStats:
    """Folding share, range and spread of a Jacobian determinant map, inside ``mask`` (>0) if given."""
    det = sitk.GetArrayViewFromImage(jacobian)
    geometry = Geometry.from_image(jacobian)
    if mask is not None:
        inside = _on_grid(mask, jacobian)
        if not inside.any():
            raise InvalidImageError("the mask for the Jacobian statistics is empty on the field's grid: give the "
                                    "body mask of the fixed image")
        values, where = det[inside].astype(np.float64), np.flatnonzero(inside.ravel())
    else:
        values, where = det.ravel().astype(np.float64), None
    folding = int(np.count_nonzero(values <= 0))
    i_min, i_max = int(np.argmin(values)), int(np.argmax(values))

    def _lps(i):
        flat = where[i] if where is not None else i
        kji = np.unravel_index(flat, det.shape)
        return [round(float(v), 2) for v in geometry.index_to_physical(np.array(kji[::-1], float))]

    return JacobianStats(
        region=region or ("mask" if mask is not None else "whole field"),
        voxels=int(values.size),
        folding_voxels=folding,
        folding_percent=100.0 * folding / values.size,
        min=float(values[i_min]),
        max=float(values[i_max]),
        mean=float(values.mean()),
        p1=float(np.percentile(values, 1)),
        p99=float(np.percentile(values, 99)),
        sdlogj=float(np.log(np.maximum(values, 1e-9)).std()),
        sdlogj_learn2reg=float(np.log(np.clip(values + 3.0, 1e-9, 1e9)).std()),
        min_at_lps=_lps(i_min),
        max_at_lps=_lps(i_max),
    )


def _lands_inside(field: sitk.Image, target: sitk.Image, slab: int = 8) -> np.ndarray:
    """Where p + u(p) lies between the outer voxel centres of ``target``'s grid, so linear interpolation there needs
    no extrapolation ((k, j, i) bool on the field's grid; slab by slab to bound memory)."""
    fg, tg = Geometry.from_image(field), Geometry.from_image(target)
    u = sitk.GetArrayViewFromImage(field)
    upper = np.array(tg.size, float) - 1.0
    out = np.empty(u.shape[:3], bool)
    j, i = np.meshgrid(np.arange(u.shape[1]), np.arange(u.shape[2]), indexing="ij")
    for k0 in range(0, u.shape[0], slab):
        k1 = min(k0 + slab, u.shape[0])
        k = np.arange(k0, k1)[:, None, None] * np.ones_like(j)[None]
        index = np.stack([np.broadcast_to(i, k.shape), np.broadcast_to(j, k.shape), k], axis=-1).astype(float)
        landed = tg.physical_to_index((fg.index_to_physical(index) + u[k0:k1]).reshape(-1, 3)).reshape(index.shape)
        out[k0:k1] = np.all((landed >= -1e-6) & (landed <= upper + 1e-6), axis=-1)
    return out


# ---- inverse consistency --------------------------------------------------------------------------------------------
def inverse_consistency(forward: sitk.Image, backward: sitk.Image,
                        mask: sitk.Image | None = None) -> InverseConsistency:
    """|u_f(p) + u_b(p + u_f(p))| (mm) at the fixed voxels (inside ``mask`` if given): how far a round trip fixed ->
    moving -> fixed lands from where it started. ``backward`` is the moving -> fixed field on the moving grid; voxels
    whose forward image falls outside it are left out (their share is reported)."""
    forward, backward = check_field(forward), check_field(backward)
    transform = _transform(forward)
    # u_b sampled at p + u_f(p) for every fixed voxel (linear interpolation of each component)
    u_b = sitk.Resample(backward, forward, transform, sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    valid = _lands_inside(forward, backward)
    region = _on_grid(mask, forward) if mask is not None else np.ones(valid.shape, bool)
    if not region.any():
        raise InvalidImageError("the mask for inverse consistency is empty on the field's grid")
    use = region & valid
    if not use.any():
        raise GeometryError("the forward field maps every fixed voxel outside the backward field's grid: the two "
                            "fields do not belong to the same pair of images")
    error = np.linalg.norm(sitk.GetArrayViewFromImage(forward)[use] + sitk.GetArrayViewFromImage(u_b)[use], axis=-1)
    return InverseConsistency(
        mean_mm=float(error.mean()), p95_mm=float(np.percentile(error, 95)), max_mm=float(error.max()),
        points=int(error.size), outside_percent=100.0 * (1.0 - use.sum() / region.sum()))


# ---- warping --------------------------------------------------------------------------------------------------------
def _resample_onto_field(image: sitk.Image, field: sitk.Image, transform, interpolator, default, pixel_id):
    return sitk.Resample(image, field.GetSize(), transform, interpolator, field.GetOrigin(), field.GetSpacing(),
                         field.GetDirection(), default, pixel_id)


def warp_image(moving: sitk.Image, field: sitk.Image, *, default: float | None = None,
               interpolator=sitk.sitkLinear) -> sitk.Image:
    """The moving image sampled at p + u(p) for every fixed voxel p (float32 on the field's grid). Outside the moving
    image: ``default`` (its minimum if None: air on CT)."""
    field = check_field(field)
    if default is None:
        default = float(sitk.GetArrayViewFromImage(moving).min())
    return _resample_onto_field(sitk.Cast(moving, sitk.sitkFloat32), field, _transform(field), interpolator,
                                float(default), sitk.sitkFloat32)


def warp_mask(mask: sitk.Image, field: sitk.Image) -> sitk.Image:
    """A moving mask (>0 inside) carried into the fixed frame: nearest neighbour at p + u(p), uint8 on the field's
    grid."""
    field = check_field(field)
    return _warp_mask(mask, field, _transform(field))


def _warp_mask(mask, field, transform) -> sitk.Image:
    binary = sitk.Cast(mask > 0, sitk.sitkUInt8)
    return _resample_onto_field(binary, field, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def _bbox(mask: np.ndarray, margin: int = 1):
    where = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(slice(max(int(w[0]) - margin, 0), min(int(w[-1]) + 1 + margin, n))
                 for w, n in zip(where, mask.shape))


def compare_masks(fixed: np.ndarray, warped: np.ndarray, spacing_zyx, name: str = "") -> ContourAgreement:
    """Dice, mean distance to agreement and HD95 of two (k, j, i) masks on one grid, with the metrics module's
    definitions (surfaces of face-connected boundary voxels, exact distance transforms)."""
    fixed, warped = np.asarray(fixed, bool), np.asarray(warped, bool)
    voxel_cc = float(np.prod(spacing_zyx)) / 1000.0
    fixed_cc, warped_cc = fixed.sum() * voxel_cc, warped.sum() * voxel_cc
    if not fixed.any() or not warped.any():
        inf = 0.0 if not fixed.any() and not warped.any() else float("inf")
        return ContourAgreement(name, metrics.dice(fixed, warped), inf, inf, fixed_cc, warped_cc)
    # surfaces and distances lie inside the union's bounding box: cropping to it (plus a margin) changes nothing
    box = _bbox(fixed | warped)
    a, b = fixed[box], warped[box]
    d_ab, d_ba = metrics.surface_distances(a, b, spacing_zyx)
    hd95 = float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))  # as metrics.hd95
    mda = float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size))
    return ContourAgreement(name, metrics.dice(a, b), mda, hd95, fixed_cc, warped_cc)


def contour_agreement(fixed_structures: Mapping[str, sitk.Image], moving_structures: Mapping[str, sitk.Image],
                      field: sitk.Image) -> tuple[list[ContourAgreement], list[str]]:
    """Each moving structure warped into the fixed frame and compared with the fixed structure of the same name.
    Returns the agreements and, for names found on one side only, a sentence each."""
    field = check_field(field)
    transform = _transform(field)
    spacing_zyx = field.GetSpacing()[::-1]
    results, unmatched = [], []
    for name in fixed_structures:
        if name not in moving_structures:
            unmatched.append(f"'{name}' is in the fixed segmentation only")
            continue
        fixed = _on_grid(fixed_structures[name], field)
        warped = sitk.GetArrayFromImage(_warp_mask(moving_structures[name], field, transform)) > 0  # a copy: see above
        results.append(compare_masks(fixed, warped, spacing_zyx, name))
    unmatched += [f"'{name}' is in the moving segmentation only" for name in moving_structures
                  if name not in fixed_structures]
    return results, unmatched


def masks_from_labels(labels: sitk.Image, names: Mapping[int, str]) -> dict[str, sitk.Image]:
    """A label map split into one mask per named label value."""
    out = {}
    for value, name in names.items():
        out[name] = sitk.Cast(labels == int(value), sitk.sitkUInt8)
    return out


# ---- landmarks ------------------------------------------------------------------------------------------------------
@dataclass
class Landmarks:
    points: np.ndarray  # (N, 3) LPS mm
    labels: list[str]
    source: str = ""
    coordinate_system: str = "LPS"  # what the file said (points are LPS regardless)


def _landmark_error(path, message: str) -> PrismRTError:
    return PrismRTError(f"cannot read landmarks from {path}: {message}")


def read_landmarks(path: "str | os.PathLike") -> Landmarks:
    """Fiducials from a Slicer markups JSON (``.mrk.json``/``.json``, RAS or LPS per its coordinateSystem, default
    LPS), a Slicer ``.fcsv`` (its CoordinateSystem header, default RAS as older Slicer wrote them) or a CSV of
    x,y,z in LPS mm (optionally a label column, optionally a header naming x, y, z). Points come back in LPS mm."""
    path = Path(path)
    if not path.is_file():
        raise _landmark_error(path, "no such file")
    name = path.name.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise _landmark_error(path, f"{exc}") from None
    if name.endswith(".json"):
        result = _read_markups_json(path, text)
    elif name.endswith(".fcsv"):
        result = _read_fcsv(path, text)
    elif name.endswith((".csv", ".txt")):
        result = _read_csv(path, text)
    else:
        raise _landmark_error(path, "unknown format: use a Slicer markups file (.mrk.json), a Slicer fiducial file "
                                    "(.fcsv) or a CSV of x,y,z in LPS mm (.csv)")
    if len(result.points) == 0:
        raise _landmark_error(path, "the file holds no points")
    if not np.isfinite(result.points).all():
        raise _landmark_error(path, "a coordinate is not a finite number")
    result.source = str(path)
    return result


def _read_markups_json(path, text) -> Landmarks:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _landmark_error(path, f"not valid JSON ({exc})") from None
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list) or not markups:
        raise _landmark_error(path, "no 'markups' list: is this a Slicer markups file?")
    points, labels, systems = [], [], set()
    for markup in markups:
        system = str(markup.get("coordinateSystem", "LPS")).upper()  # the schema's default
        if system not in ("LPS", "RAS"):
            raise _landmark_error(path, f"coordinateSystem '{system}' is neither LPS nor RAS")
        units = markup.get("coordinateUnits", "mm")
        units = units[0] if isinstance(units, list) and units else units
        scale = {"mm": 1.0, "um": 1e-3}.get(str(units))
        if scale is None:
            raise _landmark_error(path, f"coordinateUnits '{units}' is neither mm nor um")
        systems.add(system)
        for cp in markup.get("controlPoints") or []:
            label = str(cp.get("label") or cp.get("id") or f"{len(points) + 1}")
            if cp.get("positionStatus", "defined") != "defined" or "position" not in cp:
                raise _landmark_error(path, f"point '{label}' has no defined position: place it in Slicer or "
                                            "delete it")
            position = np.asarray(cp["position"], float) * scale
            if position.shape != (3,):
                raise _landmark_error(path, f"point '{label}' does not have 3 coordinates")
            points.append(ras_to_lps(position) if system == "RAS" else position)
            labels.append(label)
    return Landmarks(np.array(points, float).reshape(-1, 3), labels,
                     coordinate_system="+".join(sorted(systems)) or "LPS")


_FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID".split(",")


def _read_fcsv(path, text) -> Landmarks:
    system, columns, rows = "RAS", _FCSV_COLUMNS, []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            key, _, value = stripped.lstrip("#").partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                system = {"0": "RAS", "1": "LPS", "RAS": "RAS", "LPS": "LPS"}.get(value.upper(), value.upper())
                if system not in ("RAS", "LPS"):
                    raise _landmark_error(path, f"CoordinateSystem '{value}' is neither RAS nor LPS")
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
            continue
        rows.append(line)
    if not all(c in columns for c in "xyz"):
        raise _landmark_error(path, "its '# columns =' header names no x, y, z columns")
    ix, iy, iz = (columns.index(c) for c in "xyz")
    il = columns.index("label") if "label" in columns else None
    points, labels = [], []
    for n, row in enumerate(csv.reader(rows), start=1):
        try:
            p = np.array([float(row[ix]), float(row[iy]), float(row[iz])])
        except (IndexError, ValueError):
            raise _landmark_error(path, f"point {n} ({','.join(row)[:60]}) does not have numbers in the x, y, z "
                                        "columns") from None
        points.append(ras_to_lps(p) if system == "RAS" else p)
        labels.append(row[il].strip() if il is not None and il < len(row) and row[il].strip() else str(n))
    return Landmarks(np.array(points, float).reshape(-1, 3), labels, coordinate_system=system)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _read_csv(path, text) -> Landmarks:
    rows = [r for r in csv.reader(line for line in text.splitlines() if line.strip() and not line.lstrip()
                                  .startswith("#"))]
    rows = [[c.strip() for c in r] for r in rows if any(c.strip() for c in r)]
    if not rows:
        return Landmarks(np.zeros((0, 3)), [])
    numbers = [_is_number(c) for c in rows[0]]
    is_data = all(numbers) or (len(numbers) == 4 and all(numbers[1:]))  # x,y,z or label,x,y,z
    header = None if is_data else [c.lower() for c in rows[0]]
    body = rows[1:] if header is not None else rows
    if header is not None:
        if not all(c in header for c in "xyz"):
            raise _landmark_error(path, f"the header ({','.join(rows[0])}) names no x, y, z columns")
        ix, iy, iz = (header.index(c) for c in "xyz")
        il = next((header.index(c) for c in ("label", "name", "id") if c in header), None)
    elif len(rows[0]) == 3:
        ix, iy, iz, il = 0, 1, 2, None
    elif len(rows[0]) == 4:
        il, ix, iy, iz = 0, 1, 2, 3
    else:
        raise _landmark_error(path, f"expected 3 columns x,y,z (LPS mm), or label,x,y,z; found {len(rows[0])}")
    points, labels = [], []
    for n, row in enumerate(body, start=1):
        try:
            points.append([float(row[ix]), float(row[iy]), float(row[iz])])
        except (IndexError, ValueError):
            raise _landmark_error(path, f"row {n} ({','.join(row)[:60]}) is not three numbers x,y,z") from None
        labels.append(row[il] if il is not None and il < len(row) and row[il] else str(n))
    return Landmarks(np.array(points, float).reshape(-1, 3), labels, coordinate_system="LPS")


def pair_landmarks(fixed: Landmarks, moving: Landmarks) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Corresponding (fixed, moving, labels): by label when both files have the same unique labels, else by order."""
    f_labels, m_labels = list(fixed.labels), list(moving.labels)
    if (len(set(f_labels)) == len(f_labels) and len(set(m_labels)) == len(m_labels)
            and set(f_labels) == set(m_labels)):
        order = [m_labels.index(label) for label in f_labels]
        return np.asarray(fixed.points, float), np.asarray(moving.points, float)[order], f_labels
    if len(fixed.points) != len(moving.points):
        raise PrismRTError(
            f"the fixed file has {len(fixed.points)} landmarks and the moving file {len(moving.points)}: give the "
            "same landmarks in both (matched by label, or else by order)")
    labels = [f if f == m else f"{f} / {m}" for f, m in zip(f_labels, m_labels)]
    return np.asarray(fixed.points, float), np.asarray(moving.points, float), labels


def displace_points(field: sitk.Image, points) -> np.ndarray:
    """p + u(p) for LPS points (N, 3), u linearly interpolated; a clear error for points outside the field's grid
    (most often landmarks given in RAS where LPS was meant)."""
    field = check_field(field)
    points = np.atleast_2d(np.asarray(points, float))
    geometry = Geometry.from_image(field)
    outside = ~geometry.contains_index(geometry.physical_to_index(points))
    if outside.any():
        lo, hi = geometry.bounds()
        bad = points[np.flatnonzero(outside)[0]]
        raise GeometryError(
            "{} fixed landmark(s) lie outside the fixed image, e.g. ({:.1f}, {:.1f}, {:.1f}) mm LPS; the image spans "
            "x {:.1f}..{:.1f}, y {:.1f}..{:.1f}, z {:.1f}..{:.1f}: check the file's coordinate system (RAS or LPS) "
            "and that the fixed and moving files are not swapped".format(int(outside.sum()), *bad, lo[0], hi[0],
                                                                          lo[1], hi[1], lo[2], hi[2]))
    transform = _transform(field)
    return np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in points])


def landmark_tre(field: sitk.Image, fixed_points, moving_points, labels: Sequence[str] | None = None) -> LandmarkTRE:
    """TRE_i = |f_i + u(f_i) - m_i| (mm) for corresponding LPS landmarks, and |f_i - m_i| before registration."""
    f = np.atleast_2d(np.asarray(fixed_points, float))
    m = np.atleast_2d(np.asarray(moving_points, float))
    if f.shape != m.shape or f.shape[1] != 3:
        raise PrismRTError(f"landmarks must be corresponding (N, 3) arrays, got {f.shape} and {m.shape}")
    labels = list(labels) if labels is not None else [str(i + 1) for i in range(len(f))]
    tre = np.linalg.norm(displace_points(field, f) - m, axis=1)
    before = np.linalg.norm(f - m, axis=1)
    return LandmarkTRE(
        mean_mm=float(tre.mean()), max_mm=float(tre.max()), mean_before_mm=float(before.mean()),
        max_before_mm=float(before.max()),
        landmarks=[LandmarkResult(lab, [float(v) for v in fp], [float(v) for v in mp], float(b), float(t))
                   for lab, fp, mp, b, t in zip(labels, f, m, before, tre)])


# ---- the report -----------------------------------------------------------------------------------------------------
def _fmt_mm(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.2f} mm"


def _jacobian_checks(stats: JacobianStats, tol: Tolerances) -> list[Check]:
    where = f"inside the {stats.region}" if stats.region != "whole field" else "over the whole field"
    fold_ok = stats.folding_percent <= tol.max_folding_percent
    checks = [Check(
        "Jacobian", "folding (det <= 0)", PASS if fold_ok else FAIL, stats.folding_percent,
        f"{stats.folding_percent:.3f} % ({stats.folding_voxels} of {stats.voxels} voxels)",
        f"<= {tol.max_folding_percent:g} %",
        (f"No folding {where}: the Jacobian determinant is positive at every voxel." if stats.folding_voxels == 0
         else f"{'Folding within tolerance' if fold_ok else 'Folding'}: {stats.folding_percent:.3f} % of the voxels "
              f"{where} ({stats.folding_voxels}) have det <= 0 (least {stats.min:.3f} at "
              f"({', '.join(f'{v:.1f}' for v in stats.min_at_lps)}) mm LPS)"
              + ("" if fold_ok else ": the deformation folds space there, which no anatomy does.")),
        TG132)]
    lo, hi = tol.jacobian_range
    range_ok = lo <= stats.min and stats.max <= hi
    if range_ok:
        why = f"The Jacobian determinant stays within {lo:g}..{hi:g} {where} ({stats.min:.3f}..{stats.max:.3f})."
    else:
        parts = []
        if stats.min < lo:
            parts.append(f"falls to {stats.min:.3f} at ({', '.join(f'{v:.1f}' for v in stats.min_at_lps)}) mm LPS")
        if stats.max > hi:
            parts.append(f"rises to {stats.max:.3f} at ({', '.join(f'{v:.1f}' for v in stats.max_at_lps)}) mm LPS")
        why = (f"The Jacobian determinant {' and '.join(parts)}, outside the plausible {lo:g}..{hi:g}: a local "
               "volume change the anatomy does not make.")
    checks.append(Check("Jacobian", "determinant range", PASS if range_ok else FAIL, None,
                        f"{stats.min:.3f} .. {stats.max:.3f} (1st-99th percentile {stats.p1:.3f} .. {stats.p99:.3f})",
                        f"{lo:g} .. {hi:g}", why, "PRISM-RT (TG-132 gives no number)"))
    checks.append(Check("Jacobian", "SDlogJ", INFO, stats.sdlogj,
                        f"{stats.sdlogj:.4f} (Learn2Reg's std log(det+3): {stats.sdlogj_learn2reg:.4f}); mean det "
                        f"{stats.mean:.4f}", "reported",
                        "Spread of the log Jacobian: how irregular the deformation is (0 for a rigid one).", LEARN2REG))
    return checks


def registration_qa(
    field: sitk.Image,
    *,
    fixed: sitk.Image | None = None,
    mask: sitk.Image | None = None,
    mask_name: str = "mask",
    backward_field: sitk.Image | None = None,
    fixed_structures: Mapping[str, sitk.Image] | None = None,
    moving_structures: Mapping[str, sitk.Image] | None = None,
    fixed_landmarks: "Landmarks | np.ndarray | str | os.PathLike | None" = None,
    moving_landmarks: "Landmarks | np.ndarray | str | os.PathLike | None" = None,
    tolerances: Tolerances | None = None,
    inputs: Mapping | None = None,
    jacobian: sitk.Image | None = None,
) -> QAReport:
    """Every check the inputs allow, each against its tolerance, and the verdict.

    ``field``: fixed -> moving displacement (fixed grid, LPS mm, ``p_moving = p + u(p)``). ``fixed``: the fixed image,
    only to check the field is on its grid. ``mask``: region (body) for the Jacobian and inverse-consistency
    statistics. ``backward_field``: moving -> fixed on the moving grid. ``fixed_structures`` / ``moving_structures``:
    name -> mask (>0 inside), matched by name. Landmarks: :class:`Landmarks`, an (N, 3) LPS array or a file for
    :func:`read_landmarks`; paired by label, else by order. ``inputs``: what to print under "Inputs" (paths,
    method). ``jacobian``: a determinant map already computed from ``field`` (else it is computed here)."""
    tol = tolerances or Tolerances()
    field = check_field(field, fixed)
    spacing = field.GetSpacing()
    checks: list[Check] = []
    not_checked: list[str] = []

    jac = jacobian if jacobian is not None else jacobian_determinant(field)
    stats = jacobian_stats(jac, mask, region=mask_name if mask is not None else None)
    checks += _jacobian_checks(stats, tol)

    ice = None
    if backward_field is None:
        not_checked.append("Inverse consistency: no backward (moving -> fixed) field was given")
        checks.append(Check("Inverse consistency", "round trip error", NOT_CHECKED, None, "-", "-",
                            "No backward field was given (run the registration both ways to check it).", ""))
    else:
        ice = inverse_consistency(field, backward_field, mask)
        outside = f"; {ice.outside_percent:.1f} % of the points left the backward field" if ice.outside_percent else ""
        for name, value, limit in (("mean round trip error", ice.mean_mm, tol.max_mean_ice_mm),
                                   ("95th percentile round trip error", ice.p95_mm, tol.max_p95_ice_mm)):
            ok = value <= limit
            checks.append(Check(
                "Inverse consistency", name, PASS if ok else FAIL, value, _fmt_mm(value) + outside, f"<= {limit:g} mm",
                f"Inverse consistency: the {name} is {value:.2f} mm "
                + (f"(within {limit:g} mm)." if ok else f"> {limit:g} mm: the forward and backward registrations "
                                                       "disagree about where tissue goes."),
                "PRISM-RT (TG-132 gives no number)"))

    contours: list[ContourAgreement] = []
    if not fixed_structures or not moving_structures:
        missing = [w for w, s in (("fixed", fixed_structures), ("moving", moving_structures)) if not s]
        not_checked.append(f"Contours: no {' or '.join(missing)} segmentation was given")
        checks.append(Check("Contours", "propagated contours", NOT_CHECKED, None, "-", "-",
                            f"No {' or '.join(missing)} segmentation was given.", ""))
    else:
        contours, unmatched = contour_agreement(fixed_structures, moving_structures, field)
        mda_limit = tol.mda_limit(spacing)
        for text in unmatched:
            not_checked.append(f"Contours: {text}")
            checks.append(Check("Contours", text.split("'")[1], NOT_CHECKED, None, "-", "-", text + ".", ""))
        if not contours:
            not_checked.append("Contours: the fixed and moving segmentations share no structure name")
        for c in contours:
            if c.fixed_cc == 0:
                text = f"'{c.name}' is empty in the fixed segmentation"
                not_checked.append(f"Contours: {text}")
                checks.append(Check("Contours", f"{c.name}", NOT_CHECKED, None, "-", "-", text + ".", ""))
                continue
            ok = c.dice >= tol.min_dice
            checks.append(Check(
                "Contours", f"{c.name}: Dice", PASS if ok else FAIL, c.dice, f"{c.dice:.3f}", f">= {tol.min_dice:.2f}",
                f"Contour '{c.name}': Dice {c.dice:.3f} "
                + ("meets" if ok else "is below") + f" {tol.min_dice:.2f}"
                + ("." if ok else (": the propagated contour is empty (warped out of the image)." if c.warped_cc == 0
                                   else ": the propagated contour does not overlap the fixed contour well enough.")),
                TG132))
            ok = c.mda_mm <= mda_limit
            checks.append(Check(
                "Contours", f"{c.name}: mean distance to agreement", PASS if ok else FAIL, c.mda_mm, _fmt_mm(c.mda_mm),
                f"<= {mda_limit:.1f} mm",
                f"Contour '{c.name}': mean distance to agreement {_fmt_mm(c.mda_mm)} "
                + (f"is within {mda_limit:.1f} mm." if ok else f"exceeds {mda_limit:.1f} mm: the surfaces are apart."),
                TG132))
            checks.append(Check("Contours", f"{c.name}: HD95", INFO, c.hd95_mm, _fmt_mm(c.hd95_mm), "reported",
                                f"Contour '{c.name}': 95th percentile surface distance {_fmt_mm(c.hd95_mm)}.",
                                "TG-132 gives no tolerance"))

    tre = None
    if fixed_landmarks is None or moving_landmarks is None:
        missing = [w for w, s in (("fixed", fixed_landmarks), ("moving", moving_landmarks)) if s is None]
        not_checked.append(f"Landmarks: no {' or '.join(missing)} landmarks were given")
        checks.append(Check("Landmarks", "TRE", NOT_CHECKED, None, "-", "-",
                            f"No {' or '.join(missing)} landmarks were given.", ""))
    else:
        fl, ml = (_as_landmarks(x) for x in (fixed_landmarks, moving_landmarks))
        f, m, labels = pair_landmarks(fl, ml)
        tre = landmark_tre(field, f, m, labels)
        worst = max(tre.landmarks, key=lambda r: r.tre_mm)
        for name, value, limit, before in (("mean TRE", tre.mean_mm, tol.max_mean_tre_mm, tre.mean_before_mm),
                                           ("max TRE", tre.max_mm, tol.max_max_tre_mm, tre.max_before_mm)):
            ok = value <= limit
            extra = f" (landmark '{worst.label}')" if name == "max TRE" else f" over {len(tre.landmarks)} landmarks"
            checks.append(Check(
                "Landmarks", name, PASS if ok else FAIL, value, _fmt_mm(value) + extra, f"<= {limit:g} mm",
                f"Landmarks: {name} {value:.2f} mm{extra} "
                + (f"is within {limit:g} mm." if ok else f"exceeds {limit:g} mm ({before:.2f} mm before "
                                                          "registration)."),
                TG132_TRE))

    failed = [c for c in checks if c.status == FAIL]
    geometry = Geometry.from_image(field)
    return QAReport(
        verdict=FAIL.upper() if failed else PASS.upper(),
        reasons=[c.reason for c in failed],
        not_checked=not_checked,
        checks=checks,
        jacobian=stats,
        inverse_consistency=ice,
        contours=contours,
        landmarks=tre,
        tolerances=tol.table(spacing),
        grid={"size": list(geometry.size), "spacing_mm": [float(s) for s in geometry.spacing],
              "origin_lps_mm": [float(o) for o in geometry.origin],
              "direction": [float(d) for d in geometry.direction.ravel()],
              "max_displacement_mm": _max_norm(sitk.GetArrayViewFromImage(field))},
        inputs=dict(inputs or {}),
    )


def _max_norm(u: np.ndarray, slab: int = 8) -> float:
    return max(float(np.sqrt((u[k:k + slab] ** 2).sum(-1)).max()) for k in range(0, u.shape[0], slab))


def _as_landmarks(value) -> Landmarks:
    if isinstance(value, Landmarks):
        return value
    if isinstance(value, (str, os.PathLike)):
        return read_landmarks(value)
    points = np.atleast_2d(np.asarray(value, float))
    if points.ndim != 2 or points.shape[1] != 3:
        raise PrismRTError(f"landmarks must be (N, 3) LPS points, got shape {points.shape}")
    return Landmarks(points, [str(i + 1) for i in range(len(points))])
