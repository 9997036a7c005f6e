"""Slices along each index axis and their exact inverse, on real OpenKBP geometry and on harder directions.

These tests fail if an axis is flipped, rows and columns are swapped, or a slice index is off by one.
"""

import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS, make_volume
from PRISMRTLib.errors import GeometryError
from PRISMRTLib.imaging import Geometry, Letterbox, Orientation, SlicePlane

# An asymmetric voxel (i, j, k) so that any swap or flip moves it.
MARK_IJK = (7, 29, 17)
ORIENTATIONS = list(Orientation)


def _marked_volume(direction, size=(40, 36, 24), spacing=(3.9, 3.9, 2.5)):
    image = make_volume(direction, size=size, spacing=spacing)
    arr = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    arr[MARK_IJK[::-1]] = 1
    marked = sitk.GetImageFromArray(arr)
    marked.CopyInformation(image)
    point = np.array(image.TransformIndexToPhysicalPoint(MARK_IJK))
    return marked, arr, point


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_marked_voxel_found_at_its_point_in_every_orientation(direction_case, orientation):
    _, direction = direction_case
    image, arr, point = _marked_volume(direction)
    plane = SlicePlane.create(Geometry.from_image(image), orientation)
    index, row, col = plane.locate(point)
    # the point sits exactly on a pixel centre of exactly one slice
    assert row == pytest.approx(round(row), abs=1e-6) and col == pytest.approx(round(col), abs=1e-6)
    sl = plane.extract(arr, index)
    assert sl.shape == plane.slice_shape
    assert np.argwhere(sl).tolist() == [[round(row), round(col)]]
    for other in (index - 1, index + 1):
        if 0 <= other < plane.num_slices:
            assert not plane.extract(arr, other).any()
    # and back: a 2D mask inserted at that slice lands on the original voxel
    back = np.zeros_like(arr)
    plane.insert(back, index, sl)
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(plane.slice_coords_to_point([index, row, col]), point, atol=1e-9)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("out_size", [64, 256, 1024])
def test_point_and_mask_survive_letterbox_round_trip(direction_case, orientation, out_size):
    _, direction = direction_case
    image, arr, point = _marked_volume(direction)
    plane = SlicePlane.create(Geometry.from_image(image), orientation)
    index, row, col = plane.locate(point)
    box = Letterbox.fit(plane.slice_shape, plane.pixel_spacing, out_size)
    model_rc = box.to_model([row, col])
    np.testing.assert_allclose(box.to_slice(model_rc), [row, col], atol=1e-9)
    # the marked pixel, resized with nearest neighbour, covers the model pixel the point maps to
    resized = box.resize_to_model(plane.extract(arr, index), order=0)
    assert resized.shape == (out_size, out_size)
    mr, mc = np.floor(model_rc + 0.5).astype(int)
    assert resized[mr, mc] == 1
    hits = np.argwhere(resized)
    np.testing.assert_allclose(box.to_slice(hits.mean(axis=0)), [row, col], atol=0.5)
    # a model-space mask around that point comes back onto exactly the right slice pixel
    model_mask = np.zeros((out_size, out_size), np.float32)
    model_mask[mr, mc] = 1.0
    r = max(1, int(round(box.scale[0] / 2)))  # wide enough that linear interpolation at the point gives 1
    model_mask[max(mr - r, 0): mr + r + 1, max(mc - r, 0): mc + r + 1] = 1.0
    back = box.resize_to_slice(model_mask) > 0.5
    assert back[int(round(row)), int(round(col))]
    vol = np.zeros_like(arr)
    plane.insert(vol, index, back.astype(np.uint8))
    assert vol[MARK_IJK[::-1]] == 1


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_display_slices_do_not_depend_on_storage_order(orientation):
    """The same anatomy stored with another axis order/sign gives the same display slices (slice numbers follow
    each volume's own index axis, so the slices are matched by position)."""
    image = make_volume(DIRECTIONS["openkbp"])
    for code in ("LPS", "RAS", "PSL", "SLA"):
        reoriented = sitk.DICOMOrient(image, code)
        a, b = (SlicePlane.create(Geometry.from_image(im), orientation) for im in (image, reoriented))
        assert a.slice_shape == b.slice_shape and a.num_slices == b.num_slices
        arr_a, arr_b = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reoriented)
        for index in (0, a.num_slices // 2, a.num_slices - 1):
            point = a.slice_coords_to_point([index, 3, 5])
            index_b, row_b, col_b = b.locate(point)
            assert (round(row_b), round(col_b)) == (3, 5)
            np.testing.assert_array_equal(a.extract(arr_a, index), b.extract(arr_b, index_b))


def test_real_openkbp_ct_slices_are_the_right_way_up(sample_dir):
    """On a real head-and-neck CT (direction z = -1, 3.9 x 3.9 x 2.5 mm), anatomy lands where radiologists expect."""
    case = sample_dir  # OpenKBP validation patient pt_226
    ct = sitk.ReadImage(str(case / "ct.nii.gz"))
    masks = {n: sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{n}.nii.gz"))) > 0
             for n in ("LeftParotid", "RightParotid", "SpinalCord", "Mandible", "Brainstem")}
    g = Geometry.from_image(ct)
    assert np.allclose(g.direction, np.diag([1, 1, -1])) and np.allclose(g.spacing, [3.906, 3.906, 2.5], atol=1e-3)

    def centroid(plane, name):
        stack = plane.stack_view(masks[name])
        return np.argwhere(stack).mean(axis=0)  # (slice, row, col)

    axial = SlicePlane.create(g, "axial")
    # radiological convention: patient left on the image right; anterior at the top
    assert centroid(axial, "LeftParotid")[2] > centroid(axial, "RightParotid")[2] + 10
    assert centroid(axial, "Mandible")[1] < centroid(axial, "SpinalCord")[1] - 10
    coronal = SlicePlane.create(g, "coronal")
    assert centroid(coronal, "LeftParotid")[2] > centroid(coronal, "RightParotid")[2] + 10
    assert centroid(coronal, "Brainstem")[1] < centroid(coronal, "SpinalCord")[1]  # superior at the top
    sagittal = SlicePlane.create(g, "sagittal")
    assert centroid(sagittal, "Mandible")[2] < centroid(sagittal, "SpinalCord")[2] - 10  # anterior on the left
    assert centroid(sagittal, "Brainstem")[1] < centroid(sagittal, "Mandible")[1]
    # the axial slice of a structure's voxel is its k index (no off-by-one), and the point maps back to it
    k, j, i = np.argwhere(masks["SpinalCord"])[0]
    point = ct.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
    index, row, col = axial.locate(point)
    assert index == k
    assert axial.extract(masks["SpinalCord"].astype(np.uint8), index)[round(row), round(col)] == 1


def test_stack_round_trip_and_pixel_spacing():
    image = make_volume(DIRECTIONS["coronal-acq"], size=(20, 12, 16), spacing=(1.0, 2.0, 3.0))
    arr = sitk.GetArrayFromImage(image)
    g = Geometry.from_image(image)
    axial = SlicePlane.create(g, "axial")
    # the axial normal (S-I) is the j axis here, rows run along k (A->P), columns along i (R->L)
    assert (axial.normal_axis, axial.row_axis, axial.col_axis) == (1, 2, 0)
    assert axial.pixel_spacing == (3.0, 1.0) and axial.slice_thickness == 2.0
    for o in ORIENTATIONS:
        plane = SlicePlane.create(g, o)
        stack = np.array(plane.stack_view(arr))
        np.testing.assert_array_equal(plane.stack_to_volume(stack), arr)


def test_bad_slice_requests_get_clear_errors():
    image = make_volume(DIRECTIONS["openkbp"], size=(10, 8, 6))
    plane = SlicePlane.create(Geometry.from_image(image), "axial")
    arr = sitk.GetArrayFromImage(image)
    with pytest.raises(GeometryError, match=r"slices 0\.\.5"):
        plane.extract(arr, 6)
    with pytest.raises(GeometryError, match="does not match"):
        plane.insert(arr, 0, np.zeros((3, 3)))
    with pytest.raises(GeometryError, match="outside the volume"):
        plane.locate([1000.0, 0, 0])
    with pytest.raises(GeometryError, match="unknown orientation"):
        SlicePlane.create(Geometry.from_image(image), "oblique")


# For each orientation: the LPS direction of one step down the rows and one step across the columns.
EXPECTED_STEPS = {
    Orientation.AXIAL: ((0, 1, 0), (1, 0, 0)),  # down = posterior, right = patient left
    Orientation.CORONAL: ((0, 0, -1), (1, 0, 0)),  # down = inferior, right = patient left
    Orientation.SAGITTAL: ((0, 0, -1), (0, 1, 0)),  # down = inferior, right = posterior
}


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_rows_and_columns_run_in_the_radiological_directions(direction_case, orientation):
    name, direction = direction_case
    plane = SlicePlane.create(Geometry.from_image(make_volume(direction)), orientation)
    p0 = plane.slice_coords_to_point([2, 3, 4])
    down = plane.slice_coords_to_point([2, 4, 4]) - p0
    across = plane.slice_coords_to_point([2, 3, 5]) - p0
    want_down, want_across = (np.array(v, float) for v in EXPECTED_STEPS[orientation])
    tol = 0.8 if name == "oblique" else 0.999  # cosine of the angle to the ideal direction
    assert down @ want_down / np.linalg.norm(down) > tol
    assert across @ want_across / np.linalg.norm(across) > tol
