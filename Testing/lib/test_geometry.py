import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS, make_volume
from PRISMRTLib.errors import GeometryError, InvalidImageError
from PRISMRTLib.imaging import Geometry, lps_to_ras, parse_point, ras_to_lps


def test_lps_ras_flip_x_and_y_only():
    p = np.array([[10.0, -20.0, 30.0], [0.5, 0.25, -7.0]])
    np.testing.assert_array_equal(lps_to_ras(p), [[-10.0, 20.0, 30.0], [-0.5, -0.25, -7.0]])
    np.testing.assert_array_equal(ras_to_lps(lps_to_ras(p)), p)


def test_index_physical_matches_simpleitk_for_every_direction(direction_case):
    _, direction = direction_case
    image = make_volume(direction)
    g = Geometry.from_image(image)
    rng = np.random.default_rng(0)
    idx = rng.uniform(-0.5, 30, size=(20, 3))
    ours = g.index_to_physical(idx)
    theirs = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(v)) for v in idx])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    np.testing.assert_allclose(g.physical_to_index(ours), idx, atol=1e-9)
    h = g.index_to_physical_matrix
    np.testing.assert_allclose((h @ np.c_[idx, np.ones(len(idx))].T).T[:, :3], ours, atol=1e-9)


def test_physical_to_voxel_picks_the_containing_voxel_and_refuses_outside():
    image = make_volume(DIRECTIONS["openkbp"], size=(10, 8, 6), spacing=(2.0, 3.0, 4.0), origin=(0, 0, 0))
    g = Geometry.from_image(image)
    # voxel (3, 2, 1) centre is at x=6, y=6, z=-4 (k runs towards -z); 0.9 mm away is still that voxel
    assert g.physical_to_voxel([6.9, 6.0, -4.0]) == (3, 2, 1)
    assert g.physical_to_voxel([6.0, 6.0, -5.9]) == (3, 2, 1)
    assert g.physical_to_voxel([6.0, 6.0, -6.1]) == (3, 2, 2)
    # the outer half voxel belongs to the volume; beyond it does not
    assert g.physical_to_voxel([-0.99, 0, 0]) == (0, 0, 0)
    with pytest.raises(GeometryError, match="outside the volume"):
        g.physical_to_voxel([-1.01, 0, 0])
    with pytest.raises(GeometryError, match="outside the volume"):
        g.physical_to_voxel([0, 0, 2.01])  # superior of slice 0


def test_anatomical_axes_and_orientation_text():
    assert Geometry.from_image(make_volume(DIRECTIONS["openkbp"])).orientation_text() == "i: R->L, j: A->P, k: S->I"
    assert Geometry.from_image(make_volume(DIRECTIONS["ras-stored"])).orientation_text() == "i: L->R, j: P->A, k: I->S"
    coronal = Geometry.from_image(make_volume(DIRECTIONS["coronal-acq"]))
    assert coronal.anatomical_axes() == (0, 2, 1)
    assert coronal.orientation_text() == "i: R->L, j: S->I, k: A->P"
    oblique = Geometry.from_image(make_volume(DIRECTIONS["oblique"]))
    assert oblique.anatomical_axes() == (0, 1, 2)
    assert 11.0 < oblique.obliquity_degrees() < 15.0


def test_bounds_cover_voxel_extents():
    g = Geometry.from_image(make_volume(DIRECTIONS["openkbp"], size=(10, 8, 6), spacing=(2.0, 3.0, 4.0), origin=(0, 0, 0)))
    lo, hi = g.bounds()
    np.testing.assert_allclose(lo, [-1.0, -1.5, -22.0])
    np.testing.assert_allclose(hi, [19.0, 22.5, 2.0])


def test_geometry_refuses_2d():
    with pytest.raises(InvalidImageError, match="3D"):
        Geometry.from_image(sitk.Image(4, 4, sitk.sitkInt16))


@pytest.mark.parametrize("text", ["1,2", "a,b,c", "1,2,3,4", "", "1,nan,3"])
def test_parse_point_rejects_bad_text(text):
    with pytest.raises(GeometryError, match="three numbers"):
        parse_point(text)


def test_parse_point():
    np.testing.assert_array_equal(parse_point("12.5, -40,101"), [12.5, -40.0, 101.0])
