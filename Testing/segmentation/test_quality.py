"""Poor results are said: empty masks, doubtful masks, masks that fill their box, clicks on air, a propagation that
found nothing; MR is scaled by percentiles, never windowed; one feature cache serves several sessions."""

import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.features import VolumeFeatures
from PRISMRTLib.imaging import slice_intensity
from PRISMRTLib.segmentation import SegmentationSession
from PRISMRTLib.segmentation.quality import propagation_warnings, slice_warnings, stability_score
from prismrt_testing import OracleBackend, ptv_phantom


def _disc(shape=(64, 64), centre=(30, 30), radius=8):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_stability_is_the_iou_of_the_masks_at_plus_and_minus_one_logit():
    logits = np.full((8, 8), -9.0, np.float32)
    logits[:4] = 5.0  # 32 pixels sure
    assert stability_score(logits) == 1.0
    logits[4:6] = 0.5  # 16 more above -1 but not above +1
    assert stability_score(logits) == pytest.approx(32 / 48)
    assert stability_score(logits, offset=0.25) == 1.0  # 0.5 is above +0.25 too
    assert stability_score(np.full((4, 4), -9.0)) == 1.0  # an empty mask has nothing to be unstable about


def test_slice_warnings_by_hand():
    disc = _disc()
    assert slice_warnings(disc, 0.9, index=3, orientation="axial", clicks=[(30, 30, 1)], values_at_clicks=[40.0]) == []
    (empty,) = slice_warnings(np.zeros_like(disc), 0.9, index=3, orientation="axial")
    assert "empty" in empty and "axial slice 3" in empty
    assert any("unsure" in w and "0.31" in w for w in slice_warnings(disc, 0.31, index=3, orientation="axial"))
    box = np.zeros_like(disc)
    box[10:30, 10:40] = True
    assert any("fills the box" in w for w in slice_warnings(box, 0.9, index=3, orientation="axial",
                                                             box=(10, 10, 29, 39)))
    air = slice_warnings(disc, 0.9, index=3, orientation="axial", clicks=[(5, 5, 1)], values_at_clicks=[-1000.0])
    assert any("on air (-1000 HU)" in w for w in air)
    outside = slice_warnings(disc, 0.9, index=3, orientation="axial", clicks=[(5, 5, 1)], values_at_clicks=[40.0])
    assert any("leaves out your positive click at pixel (5, 5)" in w for w in outside)
    assert slice_warnings(disc, 0.9, index=3, orientation="axial", clicks=[(5, 5, 0)], values_at_clicks=[-1000.0]) \
        == []  # a negative click outside the mask is what it should be
    huge = np.ones_like(disc)
    assert any("covers 100%" in w for w in slice_warnings(huge, 0.9, index=3, orientation="axial"))
    (stopped,) = propagation_warnings([7], 7, "axial", {1: "at slice 8: predicted IoU 0.20 < 0.5", -1: ""})
    assert "found the structure on no other slice" in stopped and "predicted IoU 0.20" in stopped
    assert propagation_warnings([6, 7, 8], 7, "axial", {}) == []


def test_session_results_carry_the_warnings():
    image, ptv = ptv_phantom()
    session = SegmentationSession(OracleBackend(), image, "axial", window="soft-tissue")
    plane = session.plane
    index = int(np.argmax(plane.stack_view(ptv).sum(axis=(1, 2))))
    rows, cols = np.nonzero(plane.extract(ptv, index))
    good = session.add_point(plane.slice_coords_to_point([index, rows.mean(), cols.mean()]))
    assert good.warnings == []
    session.undo()
    miss = session.add_point(plane.slice_coords_to_point([index, 2, 2]))  # on the dark background (-1000 HU)
    assert any("empty" in w for w in miss.warnings)


def test_a_propagation_that_finds_nothing_says_so():
    vol = np.zeros((6, 64, 64), bool)
    vol[3] = _disc()  # one slice only
    image = sitk.GetImageFromArray(np.where(vol, 200, -1000).astype(np.int16))
    session = SegmentationSession(OracleBackend(), image, "axial", window="soft-tissue")
    session.add_point(session.plane.slice_coords_to_point([3, 30, 30]))
    session.propagate(cross_views=False)
    report = session.last_propagation
    assert report.slices == [3] and report.seed == 3
    assert len(report.warnings) == 1 and "no other slice" in report.warnings[0]
    assert "area 0 mm2" in report.stops[1] or "predicted IoU" in report.stops[1]


def test_mr_is_scaled_by_percentiles_never_windowed():
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 150.0, size=(8, 32, 32)).astype(np.float32)  # positive, no air: not CT in HU
    image = sitk.GetImageFromArray(mr)
    session = SegmentationSession(OracleBackend(), image, "axial", window="soft-tissue")
    assert not session.summary.is_ct and session.intensity.kind == "percentiles"
    lo, hi = np.percentile(mr[mr > np.percentile(mr, 1)], [0.5, 99.5])
    assert session.intensity.lower == pytest.approx(lo, rel=1e-3) and session.intensity.upper == pytest.approx(hi,
                                                                                                              rel=1e-3)
    assert "percentiles" in session.intensity.describe()
    ct, _ = ptv_phantom()
    assert SegmentationSession(OracleBackend(), ct, "axial").intensity.describe() == \
        "CT window soft-tissue L40/W400 HU"  # the backend's default window


def test_one_feature_cache_serves_several_sessions():
    image, ptv = ptv_phantom()
    backend = OracleBackend()
    features = VolumeFeatures(backend, image, slice_intensity(sitk.GetArrayViewFromImage(image), "soft-tissue", True))
    a = SegmentationSession(backend, image, "axial", features=features)
    index = int(np.argmax(a.plane.stack_view(ptv).sum(axis=(1, 2))))
    a.features(index)
    b = SegmentationSession(backend, image, "axial", features=features)
    b.features(index)
    assert backend.calls == 1 and features.computed == 1
    with pytest.raises(ValueError, match="another backend or volume"):
        SegmentationSession(OracleBackend(), image, "axial", features=features)
