"""Registration from two volumes to one displacement field: initial alignment, then ConvexAdam on features.

Steps of :func:`register`:

1. :func:`.alignment.align` (body centroids, global translation search, rigid, affine): ``T``, fixed -> moving.
2. A **working grid**: the fixed image's extent and direction, isotropic voxels (default: the fixed image's finest
   spacing, refined to ``MAX_WORKING_SPACING_MM`` if coarser (within ``MAX_REFINED_VOXELS``), coarsened until the grid
   holds at most ``MAX_WORKING_VOXELS``), so the smoothness penalty means the same along every axis. The fixed image
   and the moving image resampled through ``T`` are put on it.
3. Features of both on the working grid: ``"mind"`` (MIND-SSC, :mod:`.mind`), ``"features"`` (a callable, e.g. the
   backbone's dense features), or ``"both"`` (concatenated, each normalised to equal weight).
4. :func:`.convex_adam.convex_adam`: a deformable displacement on the working grid (voxels).
5. Fields: the deformable part in mm, composed with ``T`` into one displacement field on the fixed grid,
   ``u(p) = T(p + u_def(p)) - p``; the warped moving image. With inverse consistency also the inverse on the moving
   grid.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from ..errors import InvalidImageError
from .alignment import STAGES, AlignmentError, AlignmentResult, align, body_mask, looks_like_ct
from .convex_adam import ConvexAdamSettings, combine_features, convex_adam
from .field import compose, same_grid, voxel_grid_to_field, warp_image

METHODS = ("mind", "features", "both")
ALIGNMENTS = ("none",) + STAGES  # "affine" runs every stage up to and including it
MAX_WORKING_VOXELS = 2_500_000
# The deformable settings (MIND offsets and patches, convex cells and search, Adam cells, box smoothing, step size)
# are in working-grid voxels, tuned on CT working grids of 1.1-3.4 mm. On a 5 mm grid they become 10 mm MIND offsets,
# 20 mm convex cells searching +-80 mm and ~14 mm smoothing over a 31-slice volume (8 cells deep): the 48 x 48 x 31
# MR pair lost similarity to its affine start (NCC in the head 0.43 vs 0.57) and a synthetic deformation of it was
# recovered to 1.7 / 5.6 mm TRE (mean / max; 0.86 / 3.7 at 2.5 mm). Rule: a grid coarser than MAX_WORKING_SPACING_MM
# is refined towards it, as far as the refined grid holds MAX_REFINED_VOXELS (a few CPU seconds; refining adds no
# detail, only keeps the settings' physical size). Images with a voxel axis of 2.5 mm or finer keep their grid.
MAX_WORKING_SPACING_MM = 2.5
MAX_REFINED_VOXELS = 1_000_000
MIN_BODY_OVERLAP = 0.3
# Off by default: limiting the data terms to both bodies (15 mm margin) lowered organ Dice on OpenKBP pairs
# (0.48 and 0.45 against 0.50 and 0.52 on two pairs): the skin-air outline is a useful cue.
BODY_MARGIN_MM = None  # below this after alignment the images do not show the same region


@dataclass
class RegistrationResult:
    """What :func:`register` found.

    ``displacement``: the total field on the fixed grid (ITK convention, LPS mm, ``p_moving = p + u(p)``);
    ``affine``: the initial alignment alone (fixed -> moving points); ``warped``: the moving image on the fixed grid;
    ``inverse_displacement`` (inverse consistency only): the inverse on the moving grid (``p_fixed = q + v(q)``).
    """

    displacement: sitk.Image
    affine: sitk.Transform
    warped: sitk.Image
    alignment: AlignmentResult | None = None
    inverse_displacement: sitk.Image | None = None
    timings: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    device: str = "cpu"
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "device": self.device,
                "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
                "losses": {k: round(v, 6) for k, v in self.losses.items()},
                "alignment": None if self.alignment is None else self.alignment.to_dict(),
                "warnings": list(self.warnings)}


def _check_input(image, role: str, dimension_only: bool = False) -> None:
    from ..imaging.validation import check_volume

    if not isinstance(image, sitk.Image):
        raise InvalidImageError(f"the {role} image must be a SimpleITK image, got {type(image).__name__}")
    if dimension_only:
        return
    check_volume(image, expect_ct=False)  # 2D/4D, empty, constant, NaN, vector: clear errors


def working_grid(fixed: sitk.Image, spacing: float | None = None, max_voxels: int = MAX_WORKING_VOXELS) -> sitk.Image:
    """An empty float image on the isotropic working grid over the fixed image (same direction, same extent).

    ``spacing`` None: the fixed image's finest spacing; refined to at most ``MAX_WORKING_SPACING_MM`` where that is
    coarser and the refined grid stays within ``MAX_REFINED_VOXELS``; then coarsened to at most ``max_voxels``."""
    fixed_spacing = np.asarray(fixed.GetSpacing(), float)
    size = np.asarray(fixed.GetSize(), float)
    extent = fixed_spacing * size  # from the first voxel's outer face to the last one's
    if spacing is None:
        spacing = float(fixed_spacing.min())
        if spacing > MAX_WORKING_SPACING_MM:  # coarse: refine (see MAX_WORKING_SPACING_MM), never coarsen here
            spacing = min(spacing, max(MAX_WORKING_SPACING_MM, float(np.cbrt(np.prod(extent) / MAX_REFINED_VOXELS))))
        spacing = max(spacing, float(np.cbrt(np.prod(extent) / max_voxels)))
    spacing = float(spacing)
    if not (math.isfinite(spacing) and spacing > 0):
        raise ValueError(f"the working spacing must be a positive number of mm, got {spacing}")
    count = np.maximum(2, np.ceil(extent / spacing - 1e-6)).astype(int)
    direction = np.asarray(fixed.GetDirection(), float).reshape(3, 3)
    # centre the working grid on the fixed extent
    first = (extent - count * spacing) / 2.0 + spacing / 2.0 - fixed_spacing / 2.0
    grid = sitk.Image([int(n) for n in count], sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(fixed.GetDirection())
    grid.SetOrigin(tuple(np.asarray(fixed.GetOrigin(), float) + direction @ first))
    return grid


def _resample(image, grid, transform=None, interpolator=sitk.sitkLinear, default=None):
    default = float(np.min(sitk.GetArrayViewFromImage(image))) if default is None else float(default)
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, transform or sitk.Transform(3, sitk.sitkIdentity),
                         interpolator, default, sitk.sitkFloat32)


def _dilate(mask: sitk.Image, margin_mm: float) -> sitk.Image:
    radius = [max(1, int(round(margin_mm / s))) for s in mask.GetSpacing()]
    return sitk.BinaryDilate(sitk.Cast(mask, sitk.sitkUInt8), radius, sitk.sitkBall)


def no_signal_mask(image: sitk.Image) -> sitk.Image | None:
    """Where a scan that is not CT holds no signal, as a uint8 mask on its grid: the voxels of exactly its lowest
    value that are connected (through such voxels) to the volume's border, i.e. zero-filled bands outside the
    reconstructed field of view and background masked to one value. None on CT, where the lowest value is clipped air,
    real air whose outline with the skin is a cue; None when there is no such region."""
    from scipy import ndimage

    if looks_like_ct(image):
        return None
    values = sitk.GetArrayViewFromImage(image)
    flat = values == values.min()
    labels, count = ndimage.label(flat)
    if count == 0:
        return None
    border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(),
                                       labels[:, :, [0, -1]].ravel()]))
    border = border[border > 0]
    if border.size == 0:
        return None
    mask = sitk.GetImageFromArray(np.isin(labels, border).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def _with_signal(image: sitk.Image) -> sitk.Image | None:
    """Where the scan holds signal (the complement of :func:`no_signal_mask`), or None: everywhere."""
    blank = no_signal_mask(image)
    return None if blank is None else sitk.Cast(blank == 0, sitk.sitkUInt8)


def _both(a: sitk.Image | None, b: sitk.Image | None) -> sitk.Image | None:
    """The intersection of two optional masks on one grid; None stands for everywhere."""
    if a is None or b is None:
        return b if a is None else a
    return sitk.And(a, b)


def _feature_volume(features, image: sitk.Image, device: str, progress=None):
    """Call the user's feature extractor and bring its output to (1, C, Z, Y, X) on the working grid. An extractor
    with ``reports_progress`` gets ``progress(text)``."""
    import torch
    import torch.nn.functional as F

    out = features(image, progress=progress) if getattr(features, "reports_progress", False) else features(image)
    if isinstance(out, sitk.Image):
        out = sitk.GetArrayFromImage(out)  # (Z, Y, X, C) for vector images
        out = np.moveaxis(out, -1, 0) if out.ndim == 4 else out[None]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
    if not isinstance(out, torch.Tensor):
        raise InvalidImageError(f"the feature extractor returned {type(out).__name__}: it must return an array or "
                                "tensor (C, Z, Y, X) over the image it is given")
    out = out.float()
    if out.dim() == 3:
        out = out[None]
    if out.dim() == 4:
        out = out[None]
    if out.dim() != 5 or out.shape[0] != 1:
        raise InvalidImageError(f"the feature extractor returned shape {tuple(out.shape)}: expected (C, Z, Y, X)")
    shape = tuple(image.GetSize())[::-1]
    out = out.to(device)
    if tuple(out.shape[2:]) != shape:  # coarser features over the same extent
        out = F.interpolate(out, size=shape, mode="trilinear", align_corners=False)
    if not bool(torch.isfinite(out).all()):
        raise InvalidImageError("the feature extractor returned NaN or infinite values")
    return out


def register(fixed: sitk.Image, moving: sitk.Image, method: str = "mind", smoothness: float = 1.0,
             fixed_mask: sitk.Image | None = None, inverse_consistency: bool = False, device: str = "auto",
             progress=None, features=None, alignment: str = "affine", settings: ConvexAdamSettings | None = None,
             working_spacing: float | None = None, mind_radius: int = 1, mind_dilation: int = 2, seed: int = 0,
             body_margin_mm: float | None = BODY_MARGIN_MM, alignment_threads: int | None = 1) -> RegistrationResult:
    """Register ``moving`` to ``fixed``: initial alignment, then ConvexAdam on MIND-SSC and/or supplied features.

    ``method``: "mind", "features" (needs ``features``) or "both". ``features``: a callable taking a SimpleITK image
    on the working grid and returning a feature volume (C, Z', Y', X') over the same extent (resized if coarser);
    one with a ``fit(fixed, moving, progress)`` method (:class:`.backbone.BackboneFeatures`) is fitted on both images
    first.
    ``smoothness``: 0 .. 10, 1 default (see :mod:`.convex_adam`). ``fixed_mask``: region of interest on the fixed
    grid (used by the alignment metric and to weight the deformable data terms). ``alignment``: last initial stage
    to run ("none", "moments", "translation", "rigid", "affine"). ``settings``: ConvexAdam settings (its smoothness
    and inverse consistency are replaced by the arguments here). ``device``: "auto", "cpu", "cuda[:N]", "mps"; out of
    GPU memory falls back to the CPU with a warning. ``body_margin_mm``: the data terms count only inside both
    bodies dilated by this margin (None or 0, the default: wherever the moving image has data).
    ``progress(fraction, text)``: whatever it raises propagates (cancel). Same inputs and seed on the CPU give the
    same field.
    """
    import torch

    from ..device import resolve_device
    from .mind import mind_ssc

    clock = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown registration method '{method}': use {', '.join(METHODS)}")
    if method in ("features", "both") and features is None:
        raise ValueError(f"method '{method}' needs a feature extractor: pass features=callable(image) -> (C, Z, Y, X)")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"unknown alignment '{alignment}': use {', '.join(ALIGNMENTS)}")
    _check_input(fixed, "fixed")
    _check_input(moving, "moving")
    mask = None
    if fixed_mask is not None:
        _check_input(fixed_mask, "fixed mask", dimension_only=True)
        if fixed_mask.GetDimension() != 3 or not same_grid(fixed_mask, fixed):
            raise InvalidImageError("the fixed mask does not lie on the fixed image's grid (size, spacing, origin and "
                                    "direction must match): resample it onto the fixed image first")
        mask = sitk.Cast(sitk.NotEqual(fixed_mask, 0), sitk.sitkUInt8)
        if not np.any(sitk.GetArrayViewFromImage(mask)):
            raise InvalidImageError("the fixed mask is empty: give a mask with the region to register, or none")
    settings = replace(settings or ConvexAdamSettings(), smoothness=float(smoothness),
                       inverse_consistency=bool(inverse_consistency), seed=int(seed))
    device = resolve_device(device)
    warnings = []
    if looks_like_ct(fixed) != looks_like_ct(moving):
        warnings.append("one image looks like CT and the other does not: MIND-SSC and mutual information cope with "
                        "different modalities, but check the result closely")

    def report(lo, hi):
        if progress is None:
            return None
        return lambda fraction, text: progress(lo + (hi - lo) * float(fraction), text)

    timings = {}
    # 1. initial alignment
    stages = () if alignment == "none" else STAGES[:STAGES.index(alignment) + 1]
    aligned = align(fixed, moving, stages=stages, fixed_mask=mask, seed=seed, threads=alignment_threads,
                    progress=report(0.0, 0.3))
    timings["alignment_s"] = aligned.seconds
    if stages and aligned.body_overlap is not None and aligned.body_overlap < MIN_BODY_OVERLAP:
        raise AlignmentError(
            f"after alignment the two bodies barely overlap ({aligned.body_overlap:.0%} of the smaller one): "
            "the images do not seem to show the same body region; check the pair, or crop both to a common region"
        )
    transform = aligned.transform

    # 2. working grid
    begin = time.perf_counter()
    grid = working_grid(fixed, working_spacing)
    fixed_w = _resample(fixed, grid)
    moving_w = _resample(moving, grid, transform)
    # Data-term weights on each side; elsewhere the field follows the smoothness penalty alone. The moving side is
    # where the moving image has data once aligned; with body_margin_mm, both sides are also limited to their body
    # dilated by the margin, so anatomy one scan lacks (shoulders cut off by a small field of view, or removed by
    # masking) is not squeezed into the other scan's air.
    # On MR, neither side counts where its scan holds no signal (no_signal_mask): zero-filled bands stay put in index
    # space, so once aligned they pulled the field towards re-aligning them (the 5 mm MR pair: NCC in the head 0.52
    # with them, below the affine start's 0.57).
    inside = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(moving)
    fixed_region = _both(mask, _with_signal(fixed))
    moving_region = _both(inside, _with_signal(moving))
    if body_margin_mm:
        fixed_region = _both(fixed_region, _dilate(body_mask(fixed), body_margin_mm))
        moving_region = _both(moving_region, _dilate(body_mask(moving), body_margin_mm))
    weight = None if fixed_region is None else torch.from_numpy(
        sitk.GetArrayFromImage(_resample(fixed_region, grid, default=0.0)))
    moving_valid = torch.from_numpy(sitk.GetArrayFromImage(_resample(moving_region, grid, transform, default=0.0)))

    timings["resample_s"] = time.perf_counter() - begin

    # 3. features
    begin = time.perf_counter()
    if progress is not None:
        progress(0.3, f"features: {method}")
    pairs = []
    if method in ("mind", "both"):
        pairs.append((mind_ssc(fixed_w, mind_radius, mind_dilation, device=device),
                      mind_ssc(moving_w, mind_radius, mind_dilation, device=device)))
    if method in ("features", "both"):
        def stage(fraction):
            return None if progress is None else (lambda text: progress(fraction, text))

        if hasattr(features, "fit"):  # e.g. BackboneFeatures: one PCA basis for both images
            features.fit(fixed_w, moving_w, progress=stage(0.3))
        pairs.append((_feature_volume(features, fixed_w, device, stage(0.35)),
                      _feature_volume(features, moving_w, device, stage(0.5))))
        if pairs[-1][0].shape != pairs[-1][1].shape:
            raise InvalidImageError("the feature extractor returned different channel counts for the two images")
    feat_f, feat_m = pairs[0] if len(pairs) == 1 else combine_features(pairs)
    timings["features_s"] = time.perf_counter() - begin

    # 4. deformable
    begin = time.perf_counter()
    try:
        found = convex_adam(feat_f, feat_m, settings, mask=weight, moving_mask=moving_valid, device=device,
                            progress=report(0.4, 0.95))
    except torch.cuda.OutOfMemoryError:
        warnings.append(f"out of GPU memory on {device}: the deformable step ran on the CPU")
        device = "cpu"
        torch.cuda.empty_cache()
        found = convex_adam(feat_f.cpu(), feat_m.cpu(), settings, mask=weight, moving_mask=moving_valid,
                            device="cpu", progress=report(0.4, 0.95))
    timings["deformable_s"] = time.perf_counter() - begin
    timings.update({f"deformable_{k}": v for k, v in found.timings.items()})

    # 5. fields on the fixed grid
    begin = time.perf_counter()
    if progress is not None:
        progress(0.95, "fields: composing and warping")
    deformable = voxel_grid_to_field(found.forward, grid)
    total = compose(transform, deformable, fixed)
    warped = warp_image(moving, total)
    inverse = None
    if found.backward is not None:
        inverse = compose(transform.GetInverse(), voxel_grid_to_field(found.backward, grid), moving, field_first=False)
    timings["fields_s"] = time.perf_counter() - begin
    timings["total_s"] = time.perf_counter() - clock
    if progress is not None:
        progress(1.0, "registration done")
    summary = {"method": method, "smoothness": float(smoothness), "inverse_consistency": bool(inverse_consistency),
               "alignment": alignment, "working_spacing_mm": float(grid.GetSpacing()[0]),
               "working_size": list(grid.GetSize()), "mind_radius": mind_radius, "mind_dilation": mind_dilation,
               "fixed_mask": mask is not None, "body_margin_mm": body_margin_mm, "convex_adam": settings.to_dict(),
               "seed": seed,
               "feature_channels": int(feat_f.shape[1]),
               "features": features.settings() if method != "mind" and hasattr(features, "settings") else None}
    return RegistrationResult(displacement=total, affine=transform, warped=warped, alignment=aligned,
                              inverse_displacement=inverse, timings=timings, settings=summary, losses=found.losses,
                              device=device, warnings=warnings)
