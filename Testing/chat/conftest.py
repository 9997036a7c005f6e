"""Synthetic CTs with known geometry for the chat's exact engines: a body of soft tissue in air, centred on x = 0
(so the patient's midline is x = 0 whatever the direction matrix), and boxes placed in physical (LPS) space."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

# direction matrices (columns = index axes in LPS)
IDENTITY = np.eye(3)
FLIP_X = np.diag([-1.0, 1.0, 1.0])  # i runs L->R: the patient's left at low i
OPENKBP = np.diag([1.0, 1.0, -1.0])  # k runs S->I
RAS_STORED = np.diag([-1.0, -1.0, 1.0])  # as NIfTI written in RAS (TotalSegmentator)
CORONAL_ACQ = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # j runs S->I, k runs A->P


class Synthetic:
    IDENTITY, FLIP_X, OPENKBP, RAS_STORED, CORONAL_ACQ = IDENTITY, FLIP_X, OPENKBP, RAS_STORED, CORONAL_ACQ

    @staticmethod
    def ct(direction=IDENTITY, size=(40, 36, 24), spacing=(4.0, 4.0, 2.5), body_mm=(70.0, 50.0)) -> sitk.Image:
        """int16 HU: air (-1000) with an elliptic cylinder of 40 HU (semi-axes ``body_mm`` in x, y) along z, the
        volume centred on the origin of LPS."""
        direction = np.asarray(direction, float)
        spacing = np.asarray(spacing, float)
        size = np.asarray(size)
        image = sitk.Image([int(s) for s in size], sitk.sitkInt16)
        image.SetSpacing(spacing.tolist())
        image.SetDirection(direction.ravel().tolist())
        image.SetOrigin((-(direction @ (spacing * (size - 1) / 2.0))).tolist())
        p = Synthetic.points(image)
        inside = (p[..., 0] / body_mm[0]) ** 2 + (p[..., 1] / body_mm[1]) ** 2 <= 1.0
        array = np.where(inside, 40, -1000).astype(np.int16)
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        return out

    @staticmethod
    def points(image: sitk.Image) -> np.ndarray:
        """LPS points (k, j, i, 3) of every voxel centre."""
        size = np.array(image.GetSize())
        k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
        index = np.stack([i, j, k], axis=-1).astype(float)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        return np.array(image.GetOrigin()) + (index * np.array(image.GetSpacing())) @ direction.T

    @staticmethod
    def box(image: sitk.Image, lo_mm, hi_mm) -> np.ndarray:
        """A bool mask (k, j, i) of the voxel centres inside an LPS box."""
        p = Synthetic.points(image)
        return np.all((p >= np.asarray(lo_mm, float)) & (p <= np.asarray(hi_mm, float)), axis=-1)

    @staticmethod
    def mask_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
        image = sitk.GetImageFromArray(np.asarray(array).astype(np.uint8))
        image.CopyInformation(reference)
        return image


@pytest.fixture
def synth():
    return Synthetic
