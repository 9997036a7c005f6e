"""Slice <-> model input: resampling to square pixels and a model's square input size, with letterboxing.

A :class:`Letterbox` maps a slice of (H, W) pixels of size (row_mm, col_mm) onto an S x S model grid: the slice is
scaled so its pixels become square and its longer physical side fills S, then padded (at the bottom/right like SAM,
or centred). Coordinates follow the half-pixel convention (pixel centres at integers, ``align_corners=False``):

    out = (in + 0.5) * scale - 0.5 + pad          in = (out - pad + 0.5) / scale - 0.5

Points map exactly both ways; images and masks are resampled with SimpleITK on those same coordinates, so the
forward resize and the inverse (a model mask back onto the slice) agree pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk

from ..errors import GeometryError

_PLACEMENTS = ("top-left", "center")


@dataclass(frozen=True)
class Letterbox:
    """Geometry of a slice placed in a square model input. ``scale`` and ``pad`` are (row, col)."""

    in_shape: tuple[int, int]
    out_size: int
    scale: tuple[float, float]
    pad: tuple[float, float]

    @classmethod
    def fit(
        cls,
        in_shape: tuple[int, int],
        pixel_spacing: tuple[float, float] = (1.0, 1.0),
        out_size: int = 1024,
        placement: str = "top-left",
    ) -> "Letterbox":
        """Square pixels, longer physical side = ``out_size``; ``placement`` "top-left" (SAM) or "center"."""
        h, w = (int(v) for v in in_shape)
        sr, sc = (float(v) for v in pixel_spacing)
        if h < 1 or w < 1 or out_size < 1:
            raise GeometryError(f"cannot letterbox a {h}x{w} slice into {out_size} pixels")
        if not (sr > 0 and sc > 0):
            raise GeometryError(f"pixel spacing must be positive, got {pixel_spacing}")
        if placement not in _PLACEMENTS:
            raise GeometryError(f"placement must be one of {_PLACEMENTS}, got '{placement}'")
        mm_per_out_pixel = max(h * sr, w * sc) / out_size
        new_h = min(out_size, max(1, int(round(h * sr / mm_per_out_pixel))))
        new_w = min(out_size, max(1, int(round(w * sc / mm_per_out_pixel))))
        if placement == "center":
            pad = (float((out_size - new_h) // 2), float((out_size - new_w) // 2))
        else:
            pad = (0.0, 0.0)
        return cls((h, w), int(out_size), (new_h / h, new_w / w), pad)

    def at_size(self, out_size: int) -> "Letterbox":
        """The same field of view on another square grid (e.g. SAM's 256 px low-resolution masks of a 1024 input)."""
        f = out_size / self.out_size
        return replace(
            self,
            out_size=int(out_size),
            scale=(self.scale[0] * f, self.scale[1] * f),
            pad=(self.pad[0] * f, self.pad[1] * f),
        )

    # ---- points --------------------------------------------------------------------------------------------------
    def to_model(self, rc) -> np.ndarray:
        """Slice (row, col) (..., 2) -> model (row, col)."""
        rc = np.asarray(rc, dtype=float)
        return (rc + 0.5) * np.array(self.scale) - 0.5 + np.array(self.pad)

    def to_slice(self, rc) -> np.ndarray:
        """Model (row, col) (..., 2) -> slice (row, col); exact inverse of :meth:`to_model`."""
        rc = np.asarray(rc, dtype=float)
        return (rc - np.array(self.pad) + 0.5) / np.array(self.scale) - 0.5

    @property
    def content_box(self) -> tuple[int, int, int, int]:
        """(row0, col0, row1, col1), end-exclusive: the model pixels covered by the slice."""
        r0, c0 = self.pad
        r1 = r0 + self.in_shape[0] * self.scale[0]
        c1 = c0 + self.in_shape[1] * self.scale[1]
        return int(round(r0)), int(round(c0)), int(round(r1)), int(round(c1))

    # ---- images --------------------------------------------------------------------------------------------------
    def _slice_image(self, array: np.ndarray) -> sitk.Image:
        """A 2D image in slice-pixel units (x = column, y = row)."""
        return sitk.GetImageFromArray(array)

    def _model_image(self, array: np.ndarray) -> sitk.Image:
        """A 2D image in slice-pixel units placed where the model grid lies on the slice."""
        image = sitk.GetImageFromArray(array)
        sr, sc = self.scale
        pr, pc = self.pad
        image.SetSpacing((1.0 / sc, 1.0 / sr))
        image.SetOrigin(((0.5 - pc) / sc - 0.5, (0.5 - pr) / sr - 0.5))
        return image

    def resize_to_model(
        self, slice_array: np.ndarray, *, order: int = 1, pad_value: float = 0.0, antialias: bool = True
    ) -> np.ndarray:
        """Slice (H, W) -> model input (S, S). ``order`` 1 = linear (images), 0 = nearest (labels).

        When shrinking, images are smoothed first (Gaussian, sigma = (factor - 1) / 2 pixels) to avoid aliasing.
        """
        slice_array = np.asarray(slice_array)
        if slice_array.shape != tuple(self.in_shape):
            raise GeometryError(f"slice of shape {slice_array.shape} does not match the letterbox {self.in_shape}")
        dtype = np.float32 if order else slice_array.dtype
        source = self._slice_image(slice_array.astype(np.float32) if order else slice_array)
        if order and antialias:
            sigma = [max(0.0, (1.0 / s - 1.0) / 2.0) for s in self.scale[::-1]]  # (x, y)
            if max(sigma) > 0:
                source = sitk.DiscreteGaussian(source, [s * s for s in sigma], 32, 0.01, False)
        reference = self._model_image(np.zeros((self.out_size, self.out_size), dtype=np.uint8))
        out = sitk.Resample(
            source,
            reference,
            sitk.Transform(),
            sitk.sitkLinear if order else sitk.sitkNearestNeighbor,
            float(pad_value),
            sitk.sitkFloat32 if order else source.GetPixelID(),
        )
        return sitk.GetArrayFromImage(out).astype(dtype, copy=False)

    def resize_to_slice(self, model_array: np.ndarray, *, order: int = 1) -> np.ndarray:
        """Model grid (S', S') -> slice (H, W); the inverse of :meth:`resize_to_model`.

        The model array may be at another size than ``out_size`` (low-resolution mask logits); it is taken to cover
        the same field of view. Use order 1 for logits or probabilities (then threshold), 0 for labels.
        """
        model_array = np.asarray(model_array)
        if model_array.ndim != 2 or model_array.shape[0] != model_array.shape[1]:
            raise GeometryError(f"expected a square 2D model array, got shape {model_array.shape}")
        box = self.at_size(model_array.shape[0])
        source = box._model_image(model_array.astype(np.float32) if order else model_array)
        reference = self._slice_image(np.zeros(self.in_shape, dtype=np.uint8))
        out = sitk.Resample(
            source,
            reference,
            sitk.Transform(),
            sitk.sitkLinear if order else sitk.sitkNearestNeighbor,
            0.0,
            sitk.sitkFloat32 if order else source.GetPixelID(),
        )
        return sitk.GetArrayFromImage(out)


def crop_with_padding(array: np.ndarray, row0: float, col0: float, shape: tuple[int, int], fill) -> np.ndarray:
    """The ``shape`` sub-array of a 2D array starting at pixel (``row0``, ``col0``) (rounded to whole pixels), with
    ``fill`` where it reaches outside. A zoomed view of a slice is this crop, letterboxed; slice coordinates are crop
    coordinates plus the rounded origin."""
    r0, c0 = int(round(row0)), int(round(col0))
    h, w = (int(v) for v in shape)
    out = np.full((h, w), fill, dtype=array.dtype)
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + h, array.shape[0]), min(c0 + w, array.shape[1])
    if re > rs and ce > cs:
        out[rs - r0:re - r0, cs - c0:ce - c0] = array[rs:re, cs:ce]
    return out
