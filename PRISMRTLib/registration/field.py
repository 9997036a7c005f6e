"""Displacement fields: torch voxel grids <-> ITK-convention SimpleITK fields, composition, warping, files.

Two representations meet here:

- **voxel grids** (what the optimiser uses): an array or tensor of shape (3, Z, Y, X) (or (1, 3, Z, Y, X)) on a
  reference image's grid, arrays in SimpleITK order (k, j, i), whose three components are the displacement along
  the index axes **(i, j, k)** in voxels. Component 0 therefore moves along the last array axis, as the last entry of
  a ``torch.nn.functional.grid_sample`` grid does. Normalised units (``grid_sample``, ``align_corners=True``) are
  voxels times ``2 / (n - 1)`` per axis: :func:`voxel_to_normalized` / :func:`normalized_to_voxel`.
- **fields** (what users and QA get): a 3-component ``sitkVectorFloat64`` image with the reference's geometry whose
  value at a fixed point ``p`` is ``u(p)`` in LPS millimetres, ``p_moving = p + u(p)`` (ITK's
  DisplacementFieldTransform). A voxel displacement ``d`` becomes ``u = direction @ (spacing * d)``, so flipped
  (OpenKBP's z = -1) and rotated directions are handled by the matrix, not by sign tweaks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import GeometryError, ImageWriteError, InvalidImageError
from ..imaging.geometry import same_grid  # noqa: F401  (registration's modules import it from here)

FIELD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt")
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def _index_matrix(image: sitk.Image) -> np.ndarray:
    """direction @ diag(spacing): index steps (i, j, k) -> LPS millimetres."""
    if image.GetDimension() != 3:
        raise InvalidImageError(f"expected a 3D image, got {image.GetDimension()}D")
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    return direction * np.asarray(image.GetSpacing(), float)[None, :]


def _to_numpy(disp) -> np.ndarray:
    if hasattr(disp, "detach"):
        disp = disp.detach().to("cpu").double().numpy()
    disp = np.asarray(disp, dtype=np.float64)
    if disp.ndim == 5:
        if disp.shape[0] != 1:
            raise InvalidImageError(f"expected one displacement grid, got a batch of {disp.shape[0]}")
        disp = disp[0]
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise InvalidImageError(f"a displacement grid has shape (3, Z, Y, X), got {tuple(disp.shape)}")
    return disp


def check_field(field: sitk.Image) -> sitk.Image:
    """Raise unless ``field`` is a 3D image of 3-vectors; return it as sitkVectorFloat64."""
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise InvalidImageError(
            f"a displacement field is a 3D image of 3-vectors, got a {field.GetDimension()}D image with "
            f"{field.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    if field.GetPixelID() != sitk.sitkVectorFloat64:
        field = sitk.Cast(field, sitk.sitkVectorFloat64)
    return field


def voxel_to_normalized(disp, shape_zyx):
    """Voxel displacements (components i, j, k) -> grid_sample units (align_corners=True) on a (Z, Y, X) grid."""
    factors = [2.0 / max(n - 1, 1) for n in tuple(shape_zyx)[::-1]]
    return _scale_components(disp, factors)


def normalized_to_voxel(disp, shape_zyx):
    """grid_sample units (align_corners=True) -> voxel displacements on a (Z, Y, X) grid."""
    factors = [max(n - 1, 1) / 2.0 for n in tuple(shape_zyx)[::-1]]
    return _scale_components(disp, factors)


def _scale_components(disp, factors):
    axis = 1 if disp.ndim == 5 else 0
    shape = [1] * disp.ndim
    shape[axis] = 3
    if hasattr(disp, "new_tensor"):
        return disp * disp.new_tensor(factors).view(shape)
    return disp * np.asarray(factors).reshape(shape)


def voxel_grid_to_field(disp, reference: sitk.Image) -> sitk.Image:
    """A voxel displacement grid (3, Z, Y, X) on ``reference``'s grid -> ITK displacement field in LPS mm."""
    disp = _to_numpy(disp)
    if disp.shape[1:] != tuple(reference.GetSize())[::-1]:
        raise GeometryError(
            f"the displacement grid {disp.shape[1:]} (z, y, x) does not match the reference grid "
            f"{tuple(reference.GetSize())[::-1]}"
        )
    mm = np.einsum("ab,bzyx->zyxa", _index_matrix(reference), disp)
    field = sitk.GetImageFromArray(np.ascontiguousarray(mm), isVector=True)
    field.CopyInformation(reference)
    return field


def field_to_voxel_grid(field: sitk.Image) -> np.ndarray:
    """ITK displacement field (LPS mm) -> voxel displacement grid (3, Z, Y, X), components (i, j, k)."""
    field = check_field(field)
    mm = sitk.GetArrayViewFromImage(field)
    return np.einsum("ab,zyxb->azyx", np.linalg.inv(_index_matrix(field)), mm)


def zero_field(reference: sitk.Image) -> sitk.Image:
    """The identity as a displacement field on ``reference``'s grid."""
    size = tuple(reference.GetSize())[::-1]
    field = sitk.GetImageFromArray(np.zeros(size + (3,)), isVector=True)
    field.CopyInformation(reference)
    return field


def transform_to_field(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """``u(p) = T(p) - p`` sampled on ``reference``'s grid (T maps fixed to moving points, as ITK resampling does)."""
    converter = sitk.TransformToDisplacementFieldFilter()
    converter.SetReferenceImage(reference)
    converter.SetOutputPixelType(sitk.sitkVectorFloat64)
    return converter.Execute(transform)


def field_to_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A DisplacementFieldTransform of a private copy of ``field`` (the transform consumes the image it is given)."""
    copy = sitk.Image(check_field(field))
    copy.MakeUnique()
    return sitk.DisplacementFieldTransform(copy)


def resample_field(field: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """The field's vectors linearly interpolated on another grid (zero outside the field's extent).

    The vectors are physical (LPS mm), so they are valid on any grid without rotation; only ``same_grid`` inputs
    come back unchanged.
    """
    field = check_field(field)
    if same_grid(field, reference):
        return field
    return sitk.Resample(field, reference, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0,
                         sitk.sitkVectorFloat64)


def compose(transform: sitk.Transform | None, field: sitk.Image | None, reference: sitk.Image,
            field_first: bool = True) -> sitk.Image:
    """One displacement field on ``reference``'s grid for two mappings applied one after the other.

    ``field_first`` (default): "first the field, then the transform", ``u(p) = T(p + u_f(p)) - p``: the deformable
    part (found on images already resampled through ``transform``) and the initial alignment (fixed -> moving) give
    the total mapping fixed -> moving. ``field_first=False``: ``u(p) = T(p) + u_f(T(p)) - p`` (used for the inverse:
    first the inverse alignment, then the backward field). Either part may be None.
    """
    parts = sitk.CompositeTransform(3)
    steps = [] if transform is None else [transform]
    if field is not None:
        steps = steps + [field_to_transform(field)] if field_first else [field_to_transform(field)] + steps
    for step in steps:
        parts.AddTransform(step)  # ITK applies the last transform added first
    return transform_to_field(parts, reference)


def _default_value(image: sitk.Image) -> float:
    """What lies outside the moving image: its minimum (air for CT, background for MR and masks)."""
    return float(np.min(sitk.GetArrayViewFromImage(image)))


def warp_image(image: sitk.Image, field: sitk.Image, interpolator: str = "linear",
               default_value: float | None = None) -> sitk.Image:
    """The moving ``image`` sampled at ``p + u(p)`` for every voxel ``p`` of the field's (fixed) grid.

    The result has the field's geometry and the image's pixel type. ``default_value`` fills points outside the
    moving image (default: the image's minimum).
    """
    if image.GetDimension() != 3:
        raise InvalidImageError(f"the image to warp is {image.GetDimension()}D: give a 3D volume")
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"unknown interpolator '{interpolator}': use one of {', '.join(_INTERPOLATORS)}")
    default = _default_value(image) if default_value is None else float(default_value)
    return sitk.Resample(image, check_field(field), field_to_transform(field), _INTERPOLATORS[interpolator],
                         default, image.GetPixelID())


def warp_label(label: sitk.Image, field: sitk.Image) -> sitk.Image:
    """A label map or mask warped like :func:`warp_image`, nearest neighbour (labels stay labels; 0 outside)."""
    return warp_image(label, field, interpolator="nearest", default_value=0.0)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def write_field(field: sitk.Image, path, overwrite: bool = True) -> Path:
    """Write the field as a vector image (``displacement.nii.gz``: LPS mm, ITK convention, float64)."""
    path = Path(path)
    if _suffix(path) not in FIELD_SUFFIXES:
        raise ImageWriteError(f"'{path.name}': write a displacement field as {', '.join(FIELD_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise ImageWriteError(f"'{path}' exists: choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(check_field(field), str(path), True)
    return path


def read_field(path) -> sitk.Image:
    """Read a displacement field written by :func:`write_field` (or any 3D 3-vector image)."""
    return check_field(sitk.ReadImage(str(path)))


def write_transform(field: sitk.Image, path, overwrite: bool = True) -> Path:
    """Write the field as an ITK displacement-field transform file (``.h5``; ``.tfm``/``.txt`` work but are large)."""
    path = Path(path)
    if _suffix(path) not in TRANSFORM_SUFFIXES:
        raise ImageWriteError(f"'{path.name}': write a transform as {', '.join(TRANSFORM_SUFFIXES)} (.h5 is compact)")
    if path.exists() and not overwrite:
        raise ImageWriteError(f"'{path}' exists: choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(field_to_transform(field), str(path))
    return path


def read_transform_field(path) -> sitk.Image:
    """The displacement field held by a transform file written by :func:`write_transform`."""
    transform = sitk.ReadTransform(str(path))
    if transform.GetName() == "CompositeTransform":  # HDF5 files may wrap a single transform in a composite
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() != 1:
            raise InvalidImageError(f"'{path}' holds {composite.GetNumberOfTransforms()} transforms, not one field")
        transform = composite.GetNthTransform(0)
    transform = transform.Downcast()
    if not isinstance(transform, sitk.DisplacementFieldTransform):
        raise InvalidImageError(f"'{path}' holds a {transform.GetName()}, not a displacement field transform")
    return check_field(transform.GetDisplacementField())
