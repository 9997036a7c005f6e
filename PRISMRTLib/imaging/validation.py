"""Checks that a volume can be used, with a summary for people (CLI report, Slicer module)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..errors import InvalidImageError
from .geometry import Geometry
from .intensity import ct_likelihood_problems
from .io import image_modality, nonfinite_message

# Pixel types a CT/MR volume can have; label, complex and vector types are refused.
_SCALAR_TYPES = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
    sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}
LARGE_VOXEL_COUNT = 512 * 512 * 1000  # above this, warn about memory and time
OBLIQUE_WARNING_DEGREES = 1.0


@dataclass
class VolumeSummary:
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: str
    obliquity_degrees: float
    extent_mm: tuple[float, float, float]
    pixel_type: str
    modality: str  # from DICOM, or "CT"/"not CT" from the intensities
    intensity_range: tuple[float, float]
    intensity_percentiles: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    @property
    def is_ct(self) -> bool:
        """CT by its DICOM modality, or (without one) by intensities that look like HU."""
        return self.modality.startswith("CT")

    def to_dict(self) -> dict:
        return {
            "size_ijk": list(self.size),
            "spacing_mm": [round(s, 4) for s in self.spacing],
            "origin_lps_mm": [round(o, 3) for o in self.origin],
            "orientation": self.orientation,
            "obliquity_degrees": round(self.obliquity_degrees, 3),
            "extent_mm": [round(e, 1) for e in self.extent_mm],
            "pixel_type": self.pixel_type,
            "modality": self.modality,
            "intensity_range": [float(v) for v in self.intensity_range],
            "intensity_percentiles": {k: round(float(v), 2) for k, v in self.intensity_percentiles.items()},
            "warnings": list(self.warnings),
        }

    def to_text(self) -> str:
        lines = [
            "Size:        {} x {} x {} voxels (i, j, k)".format(*self.size),
            "Spacing:     {:.3g} x {:.3g} x {:.3g} mm".format(*self.spacing),
            "Extent:      {:.0f} x {:.0f} x {:.0f} mm".format(*self.extent_mm),
            "Origin:      ({:.1f}, {:.1f}, {:.1f}) mm LPS".format(*self.origin),
            f"Orientation: {self.orientation}" + (
                f" (oblique by {self.obliquity_degrees:.1f} deg)" if self.obliquity_degrees > OBLIQUE_WARNING_DEGREES else ""
            ),
            f"Pixel type:  {self.pixel_type}",
            f"Modality:    {self.modality}",
            "Intensities: {:g} .. {:g} (1st-99th percentile {:g} .. {:g})".format(
                *self.intensity_range, self.intensity_percentiles["p1"], self.intensity_percentiles["p99"]
            ),
        ]
        lines += [f"Warning:     {w}" for w in self.warnings]
        return "\n".join(lines)


def check_volume(image: sitk.Image, expect_ct: bool = True) -> VolumeSummary:
    """Raise :class:`InvalidImageError` if the image cannot be used as a 3D volume; else summarise it.

    Problems that do not stop the work (oblique axes, an image that does not look like CT, a very large
    volume) are returned as warnings.
    """
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidImageError(
            f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector data): "
            "load the greyscale CT/MR volume instead"
        )
    if dim == 2:
        raise InvalidImageError(
            "the image is 2D (a single slice): load the whole series as a 3D volume"
        )
    if dim == 4:
        raise InvalidImageError(
            "the image is 4D (a time series or several volumes in one file): extract one 3D volume first "
            "(in Slicer: Sequences module; or save one frame as its own file)"
        )
    if dim != 3:
        raise InvalidImageError(f"the image is {dim}D: PRISM-RT needs a 3D volume")
    if image.GetPixelID() not in _SCALAR_TYPES:
        raise InvalidImageError(
            f"pixel type '{image.GetPixelIDTypeAsString()}' is not supported: "
            "convert the image to an integer or floating-point scalar volume"
        )
    size = tuple(int(s) for s in image.GetSize())
    if min(size) == 0:
        raise InvalidImageError(f"the image is empty (size {size}): the file holds no voxels")
    if min(size) == 1:
        raise InvalidImageError(
            f"the image has a single slice along one axis (size {size}): load the whole series as a 3D volume"
        )
    geometry = Geometry.from_image(image)
    if not np.all(geometry.spacing > 0) or not np.all(np.isfinite(geometry.spacing)):
        raise InvalidImageError(f"the voxel spacing {tuple(geometry.spacing)} is not valid: fix the image header")
    if abs(np.linalg.det(geometry.direction)) < 1e-6 or not geometry.is_orthonormal(1e-3):
        raise InvalidImageError(
            "the image's direction matrix is not a rotation (sheared or degenerate axes): fix the image header "
            "or resample the image"
        )

    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == "f":  # slab by slab: a full-size mask would cost a byte per voxel on huge volumes
        bad = sum(int(slab.size - np.count_nonzero(np.isfinite(slab))) for slab in values)
        if bad:
            raise InvalidImageError(nonfinite_message(bad, int(values.size)))
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        raise InvalidImageError(f"the volume is constant ({lo:g} everywhere): it holds no image; check the file")

    warnings = []
    modality = image_modality(image)
    if expect_ct:
        problems = ct_likelihood_problems(values)
        if modality and modality != "CT":
            warnings.append(f"the DICOM modality is {modality}, not CT: results of the CT models will not be meaningful")
        elif problems and not modality:
            warnings.append("this does not look like CT in Hounsfield units (" + "; ".join(problems) + ")")
        if not modality:
            modality = "not CT (guessed from intensities)" if problems else "CT (guessed from intensities)"
    modality = modality or "unknown"
    obliquity = geometry.obliquity_degrees()
    if obliquity > OBLIQUE_WARNING_DEGREES:
        warnings.append(
            f"the volume axes are oblique by {obliquity:.1f} degrees: slices follow the volume's own axes"
        )
    if values.size > LARGE_VOXEL_COUNT:
        warnings.append(
            f"the volume is large ({values.size / 1e6:.0f} million voxels): consider cropping it to the region of interest"
        )

    sample = values.ravel()[:: max(1, values.size // 1_000_000)]
    p = np.percentile(sample, [1, 50, 99])
    return VolumeSummary(
        size=size,
        spacing=tuple(float(s) for s in geometry.spacing),
        origin=tuple(float(o) for o in geometry.origin),
        orientation=geometry.orientation_text(),
        obliquity_degrees=obliquity,
        extent_mm=tuple(float(s) * float(n) for s, n in zip(geometry.spacing, size)),
        pixel_type=image.GetPixelIDTypeAsString(),
        modality=modality,
        intensity_range=(lo, hi),
        intensity_percentiles={"p1": float(p[0]), "p50": float(p[1]), "p99": float(p[2])},
        warnings=warnings,
    )
