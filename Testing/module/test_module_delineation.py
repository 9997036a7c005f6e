"""Delineation from the Slicer module's logic against slicer-core: a click given in RAS (as Slicer's markups give it)
lands on the right voxel of the volume node, and the mask comes back as a segment on exactly the volume's grid.

The volume is the real PTV70 of OpenKBP pt_226 as a bright object on the real CT grid (direction z = -1); the backend
is the oracle of prismrt_testing, which finds the object only when the click is on it, so a RAS/LPS mix-up, a wrong
slice or a shifted segment fails here whatever the weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from prismrt_testing import OracleBackend, ptv_phantom, slicer_core_or_skip

slicer = slicer_core_or_skip()

import vtk  # noqa: E402  (comes with slicer-core)
from vtk.util import numpy_support  # noqa: E402

from PRISMRTLib.errors import GeometryError, PrismRTError  # noqa: E402
from PRISMRTLib.segmentation import interior_point  # noqa: E402
from PRISMRTModule import conversions  # noqa: E402
from PRISMRTModule.delineation import GTV_TERMINOLOGY, DelineationLogic  # noqa: E402


@pytest.fixture(scope="module")
def phantom():
    return ptv_phantom()


@pytest.fixture
def logic():
    return DelineationLogic()


@pytest.fixture
def delineation(phantom, scene, logic):
    """A volume node of the phantom, a delineation started on it into a new segmentation node, and a click point on
    the target's largest axial slice: (volume, segmentation node, k, RAS point of its most interior voxel)."""
    image, ptv = phantom
    volume = conversions.imageToVolumeNode(image, name="CT", scene=scene)
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "PRISM-RT")
    logic.start(volume, segmentation_node, "GTV", backend=OracleBackend(), window="soft-tissue")
    k = int(np.argmax(ptv.sum(axis=(1, 2))))
    j, i = interior_point(ptv[k])
    ras = _ijk_to_ras(volume) @ np.array([i, j, k, 1.0])
    return volume, segmentation_node, k, ras[:3]


def _segment_array(segmentation_node, segment_id, shape_kji, ijk_to_ras) -> np.ndarray:
    """The segment's binary labelmap on the volume's grid (checked to be that grid), as a (k, j, i) bool array."""
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    m = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(m)
    np.testing.assert_allclose([[m.GetElement(r, c) for c in range(4)] for r in range(4)], ijk_to_ras, atol=1e-6)
    i0, i1, j0, j1, k0, k1 = labelmap.GetExtent()
    out = np.zeros(shape_kji, bool)
    if i1 >= i0:
        values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        out[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = values.reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1) != 0
    return out


def _ijk_to_ras(volume) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_a_ras_click_gives_the_target_slice_as_a_segment_on_the_volume_grid(phantom, delineation, scene, logic):
    _, ptv = phantom
    volume, segmentation_node, k, ras = delineation
    clicks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")  # where a click in a slice view goes
    clicks.AddControlPoint(vtk.vtkVector3d(*ras))
    result = logic.addPoint(clicks.GetNthControlPointPosition(0), positive=True)
    assert result.index == k and result.mask.any()
    segment_id = logic.writeSegment("positive click")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "GTV"
    assert segmentation_node.GetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole()) == \
        volume.GetID()
    mask = _segment_array(segmentation_node, segment_id, ptv.shape, _ijk_to_ras(volume))
    np.testing.assert_array_equal(mask, logic.session.mask.astype(bool))
    assert _dice(mask[k], ptv[k]) > 0.97
    assert not np.delete(mask, k, axis=0).any()
    # the segment says what it is: SNOMED CT "Gross tumor volume", and its colour
    tag = vtk.reference("")
    assert segment.GetTag(segment.GetTerminologyEntryTagName(), tag) and str(tag) == GTV_TERMINOLOGY
    assert "SCT^228791009^Gross Tumor Volume" in str(tag)


def test_propagation_and_undo_replace_the_segment_in_place(phantom, delineation, scene, logic):
    _, ptv = phantom
    volume, segmentation_node, k, ras = delineation
    logic.addPoint(ras)
    segment_id = logic.writeSegment("positive click")
    segmentation = segmentation_node.GetSegmentation()
    color = segmentation.GetSegment(segment_id).GetColor()
    other = segmentation.AddEmptySegment("", "Parotid")  # the user's own segment, after ours
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.GetDisplayNode().SetSegmentOpacity3D(segment_id, 0.4)
    logic.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    assert logic.writeSegment("propagate") == segment_id
    # updated in place: same place in the list, colour and display settings; the other segment untouched
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == [segment_id, other]
    assert segmentation.GetSegment(segment_id).GetColor() == color
    assert segmentation_node.GetDisplayNode().GetSegmentOpacity3D(segment_id) == pytest.approx(0.4)
    grid = _ijk_to_ras(volume)
    assert _dice(_segment_array(segmentation_node, segment_id, ptv.shape, grid), ptv) > 0.95
    assert logic.undo() == "propagate"
    one_slice = _segment_array(segmentation_node, segment_id, ptv.shape, grid)
    assert np.flatnonzero(one_slice.any(axis=(1, 2))).tolist() == [k]
    np.testing.assert_array_equal(logic.session.mask.astype(bool), one_slice)
    assert logic.redo() == "propagate"
    assert _dice(_segment_array(segmentation_node, segment_id, ptv.shape, grid), ptv) > 0.95
    assert logic.undo() == "propagate" and logic.undo() == "positive click"
    assert segmentation.GetSegment(segment_id) is None  # there was no GTV before the first click
    assert segmentation.GetSegment(other) is not None


def test_clear_errors_without_a_delineation_and_outside_the_volume(delineation, logic):
    volume, segmentation_node, k, ras = delineation
    with pytest.raises(GeometryError, match="outside the volume"):
        logic.addPoint(ras + np.array([0.0, 0.0, 1000.0]))
    fresh = DelineationLogic()
    with pytest.raises(PrismRTError, match="start a delineation first"):
        fresh.addPoint(ras)
    with pytest.raises(PrismRTError, match="start a delineation first"):
        fresh.propagate()


def test_a_transformed_volume_is_refused_with_what_to_do(phantom, scene, logic):
    image, _ = phantom
    volume = conversions.imageToVolumeNode(image, name="CT", scene=scene)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "PRISM-RT")
    with pytest.raises(PrismRTError, match="under a transform: harden it"):
        logic.start(volume, segmentation_node, backend=OracleBackend())
    assert logic.session is None


def test_idle_prefetch_computes_the_viewed_slice_and_its_neighbours_one_at_a_time(delineation, logic):
    volume, segmentation_node, k, ras = delineation
    backend = logic.session.backend
    computed = []
    while (index := logic.prefetch(ras, radius=2)) is not None:
        computed.append(index)
        assert backend.calls == len(computed)  # one slice per call: a cancelled prefetch stops between slices
    assert computed == [k, k - 1, k + 1, k - 2, k + 2]  # the RAS point's slice first, then nearest first
    logic.addPoint(ras)
    assert backend.calls == 5  # the click ran the decoder only
    # outside the volume, or with no delineation: nothing to do, and no error (it is only ever ahead of time)
    assert logic.prefetch(ras + np.array([0.0, 0.0, 1000.0])) is None
    assert DelineationLogic().prefetch(ras) is None


def test_the_viewed_slice_is_found_from_the_slice_view_plane(phantom, delineation, logic):
    """The panel prefetches around the slice an axial view shows: the CT's centre projected onto the view's plane
    (its SliceToRAS), whatever the view's in-plane origin, lies in that slice; a plane outside the CT gives none."""
    volume, segmentation_node, k, ras = delineation
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    centre = np.array(bounds).reshape(3, 2).mean(axis=1)
    slice_to_ras = vtk.vtkMatrix4x4()  # an axial view (normal S) showing the plane through the click, panned aside
    for row, value in enumerate((ras[0] + 250.0, ras[1] - 90.0, ras[2])):
        slice_to_ras.SetElement(row, 3, value)
    point = conversions.projectOntoSlicePlane(slice_to_ras, centre)
    np.testing.assert_allclose(point, [centre[0], centre[1], ras[2]])
    assert logic.sliceIndex(point) == k and logic.sliceIndex(ras) == k
    tilted = vtk.vtkMatrix4x4()  # a plane tilted about R: its normal (column 2) is (0, -sin, cos)
    angle = np.radians(20.0)
    for row, value in enumerate((0.0, -np.sin(angle), np.cos(angle))):
        tilted.SetElement(row, 2, value)
    for row, value in enumerate(ras):
        tilted.SetElement(row, 3, value)
    projected = conversions.projectOntoSlicePlane(tilted, centre)
    assert abs(np.dot(projected - ras, [0.0, -np.sin(angle), np.cos(angle)])) < 1e-9  # on the plane
    below = conversions.projectOntoSlicePlane(slice_to_ras, centre) - np.array([0.0, 0.0, 1000.0])
    assert logic.sliceIndex(below) is None


def test_a_box_from_two_ras_corners_gives_the_slice_mask(phantom, delineation, logic):
    """The panel's Box mode: two clicks at opposite corners (RAS, as markups give them) of the target's bounding box on
    one slice; corners on two slices are refused with what to do."""
    _, ptv = phantom
    volume, segmentation_node, k, _ = delineation
    m = _ijk_to_ras(volume)
    j, i = np.nonzero(ptv[k])
    corner_a = (m @ np.array([i.max() + 1, j.min() - 1, k, 1.0]))[:3]  # the box's corners in two different orders
    corner_b = (m @ np.array([i.min() - 1, j.max() + 1, k, 1.0]))[:3]
    result = logic.setBox(corner_a, corner_b)
    assert result.index == k
    mask = logic.session.mask.astype(bool)
    assert _dice(mask[k], ptv[k]) > 0.97 and not np.delete(mask, k, axis=0).any()
    with pytest.raises(GeometryError, match="different axial slices"):
        logic.setBox(corner_a, (m @ np.array([i.min() - 1, j.max() + 1, k + 2, 1.0]))[:3])


def test_a_segment_drawn_before_is_where_the_delineation_starts(phantom, scene, logic):
    """A segment of the chosen name that exists (drawn by hand, or by an earlier delineation) is the session's
    starting mask, not a step to undo; its name, colour and terminology stay the user's."""
    import SimpleITK as sitk

    image, ptv = phantom
    volume = conversions.imageToVolumeNode(image, name="CT", scene=scene)
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    drawn = np.zeros(ptv.shape, np.uint8)
    k = int(np.argmax(ptv.sum(axis=(1, 2))))
    drawn[k - 1:k + 2] = ptv[k - 1:k + 2]
    mask_image = sitk.GetImageFromArray(drawn)
    mask_image.CopyInformation(image)
    segment_id = conversions.maskToSegment(mask_image, segmentation_node, "GTV", (0.1, 0.2, 0.9))
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    segment.SetTag(segment.GetTerminologyEntryTagName(), "the user's own")
    logic.start(volume, segmentation_node, "GTV", backend=OracleBackend(), window="soft-tissue")
    np.testing.assert_array_equal(logic.session.mask, drawn)
    assert not logic.canUndo()
    assert logic.syncFromSegment() == []  # unchanged since: nothing read, nothing adopted
    j, i = interior_point(ptv[k + 4])
    logic.addPoint(_ijk_to_ras(volume) @ np.array([i, j, k + 4, 1.0]))
    assert logic.writeSegment("positive click") == segment_id
    tag = vtk.reference("")
    segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
    assert str(tag) == "the user's own" and segment.GetColor() == pytest.approx((0.1, 0.2, 0.9))
    assert logic.undo() == "positive click"
    np.testing.assert_array_equal(conversions.segmentToMask(segmentation_node, "GTV", volume), drawn)
    assert not logic.canUndo() and segmentation_node.GetSegmentation().GetSegment(segment_id) is not None
