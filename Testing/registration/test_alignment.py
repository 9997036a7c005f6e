"""Initial alignment: a known rigid transform of a real CT is recovered from far away; runs repeat exactly."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.errors import InvalidImageError
from PRISMRTLib.registration.alignment import AlignmentError, align, body_mask, transform_matrix


@pytest.fixture(scope="module")
def small_ct(sample_dir):
    """The shipped OpenKBP CT at 64 x 64 x 64 (7.8 x 7.8 x 5 mm), direction diag(1, 1, -1)."""
    ct = sitk.ReadImage(str(sample_dir / "ct.nii.gz"))
    spacing = [s * n / 64 for s, n in zip(ct.GetSpacing(), ct.GetSize())]
    return sitk.Resample(ct, [64, 64, 64], sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing,
                         ct.GetDirection(), -1024.0, ct.GetPixelID())


def _known_rigid(fixed):
    """S: moving(q) = fixed(S(q)); 8 deg about z, 5 deg about x, about the body centre, and a shift."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(body_mask(fixed))
    truth = sitk.Euler3DTransform()
    truth.SetCenter(stats.GetCentroid(1))
    truth.SetRotation(np.radians(5.0), 0.0, np.radians(8.0))
    truth.SetTranslation((12.0, -9.0, 10.0))
    return truth


def _moved(fixed, truth, far=(0.0, 0.0, 0.0)):
    """fixed seen through ``truth``, on a grid moved ``far`` mm away (so the two need not overlap at all)."""
    grid = sitk.Image(fixed.GetSize(), sitk.sitkInt16)
    grid.CopyInformation(fixed)
    grid.SetOrigin(tuple(np.array(fixed.GetOrigin()) + far))
    shift = sitk.TranslationTransform(3, tuple(-np.asarray(far, float)))
    composite = sitk.CompositeTransform([truth, shift])  # q -> truth(q - far)
    return sitk.Resample(fixed, grid, composite, sitk.sitkLinear, -1024.0)


def _body_points(image, count=400, seed=0):
    idx = np.argwhere(sitk.GetArrayViewFromImage(body_mask(image)) > 0)[:, ::-1]
    idx = idx[np.random.default_rng(seed).choice(len(idx), count, replace=False)]
    return np.array([image.TransformIndexToPhysicalPoint(tuple(int(v) for v in i)) for i in idx])


def test_a_known_rigid_transform_is_recovered_from_250_mm_away(small_ct):
    truth = _known_rigid(small_ct)
    far = np.array([250.0, -120.0, 300.0])
    moving = _moved(small_ct, truth, far)
    result = align(small_ct, moving, stages=("moments", "translation", "rigid"))
    # the mapping fixed -> moving is q = truth^-1(p) + far
    inverse = truth.GetInverse()
    errors = [np.linalg.norm(np.array(result.transform.TransformPoint(tuple(p)))
                             - (np.array(inverse.TransformPoint(tuple(p))) + far)) for p in _body_points(small_ct)]
    assert np.mean(errors) < 1.5 and np.max(errors) < 3.0, (np.mean(errors), np.max(errors))
    names = [s.name for s in result.stages]
    assert names == ["moments", "translation", "rigid"]
    assert result.body_dice > 0.9 and result.stages[0].body_dice < result.body_dice
    summary = result.to_dict()
    assert summary["stages"][-1]["iterations"] > 0 and summary["seconds"] > 0
    assert np.allclose(summary["matrix_fixed_to_moving"], transform_matrix(result.transform), atol=1e-5)


def test_affine_stage_and_repeatability(small_ct):
    moving = _moved(small_ct, _known_rigid(small_ct), far=(40.0, 0.0, 0.0))
    first = align(small_ct, moving, seed=3)
    second = align(small_ct, moving, seed=3)
    assert isinstance(first.transform, sitk.AffineTransform)
    np.testing.assert_array_equal(first.matrix(), second.matrix())
    assert [s.name for s in first.stages] == ["moments", "translation", "rigid", "affine"]
    assert first.stages[-1].metric_final <= first.stages[-1].metric_start  # Mattes MI is negated: lower is better
    assert first.body_dice > 0.85


def test_no_stages_is_the_identity_and_bad_requests_are_refused(small_ct):
    result = align(small_ct, small_ct, stages=())
    np.testing.assert_allclose(result.matrix(), np.eye(4), atol=1e-12)
    with pytest.raises(ValueError, match="unknown alignment stage"):
        align(small_ct, small_ct, stages=("moments", "bspline"))
    with pytest.raises(ValueError, match="order"):
        align(small_ct, small_ct, stages=("rigid", "moments"))
    with pytest.raises(ValueError, match="metric"):
        align(small_ct, small_ct, metric="ncc")
    with pytest.raises(InvalidImageError, match="2D"):
        align(small_ct[:, :, 10], small_ct)
    other = sitk.Image([10, 10, 10], sitk.sitkUInt8) + 1
    with pytest.raises(InvalidImageError, match="grid"):
        align(small_ct, small_ct, fixed_mask=other)
    empty = sitk.Image(small_ct.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(small_ct)
    with pytest.raises(InvalidImageError, match="empty"):
        align(small_ct, small_ct, fixed_mask=empty)


def test_body_mask_is_the_largest_component_and_air_alone_is_refused(small_ct):
    body = body_mask(small_ct)
    values = sitk.GetArrayFromImage(small_ct)
    mask = sitk.GetArrayFromImage(body) > 0
    assert mask.any() and np.median(values[mask]) > -300
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.ConnectedComponent(body))
    assert stats.GetNumberOfLabels() == 1
    air = sitk.Image(small_ct.GetSize(), sitk.sitkInt16) - 1000
    air.CopyInformation(small_ct)
    with pytest.raises(AlignmentError, match="no body"):
        body_mask(air)


def test_progress_is_reported_and_raising_in_it_cancels(small_ct):
    moving = _moved(small_ct, _known_rigid(small_ct))
    seen = []

    class Cancelled(Exception):
        pass

    def progress(fraction, text):
        seen.append((fraction, text))
        if "rigid, level 2" in text:
            raise Cancelled()

    with pytest.raises(Cancelled):
        align(small_ct, moving, progress=progress)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and 0.0 <= fractions[0] and fractions[-1] < 0.5
    assert not any("affine" in t for _, t in seen)
