import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS, make_volume
from PRISMRTLib.errors import InvalidImageError
from PRISMRTLib.imaging import check_volume


def _image(arr, **geometry):
    image = sitk.GetImageFromArray(arr)
    for key, value in geometry.items():
        getattr(image, f"Set{key}")(value)
    return image


@pytest.mark.parametrize(
    "image, message",
    [
        (sitk.Image(64, 64, sitk.sitkInt16), "2D"),
        (sitk.Image([8, 8, 8, 3], sitk.sitkInt16), "4D"),
        (sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), "components per voxel"),
        (sitk.Image([8, 8, 8], sitk.sitkComplexFloat32), "not supported"),
        (sitk.Image([8, 8, 1], sitk.sitkInt16), "single slice"),
        (sitk.Image([8, 8, 8], sitk.sitkInt16), "constant"),
    ],
    ids=["2d", "4d", "rgb", "complex", "one-slice", "constant"],
)
def test_unusable_images_are_refused_with_a_reason(image, message):
    with pytest.raises(InvalidImageError, match=message):
        check_volume(image)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused(bad):
    arr = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    arr[2, 3, 4] = bad
    with pytest.raises(InvalidImageError, match="1 voxels are NaN or infinite"):
        check_volume(_image(arr))


def test_sheared_direction_is_refused():
    image = make_volume(np.eye(3))
    image.SetDirection((1, 0.3, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InvalidImageError, match="not a rotation"):
        check_volume(image)


def test_good_ct_summary(sample_ct):
    s = check_volume(sample_ct)
    assert s.size == (128, 128, 128) and s.warnings == []
    assert s.orientation == "i: R->L, j: A->P, k: S->I"
    assert s.modality.startswith("CT")
    text = s.to_text()
    assert "3.91 x 3.91 x 2.5 mm" in text and "500 x 500 x 320 mm" in text
    assert s.to_dict()["size_ijk"] == [128, 128, 128]


def test_mr_and_oblique_volumes_get_warnings(shared_data):
    mr = sitk.ReadImage(str(shared_data / "samples" / "mr_brain_tumor_pair" / "MRBrainTumor1.nii.gz"))
    s = check_volume(mr)
    assert any("does not look like CT" in w for w in s.warnings)
    assert check_volume(mr, expect_ct=False).warnings == []
    oblique = make_volume(DIRECTIONS["oblique"]) - 1024
    assert any("oblique" in w for w in check_volume(oblique).warnings)


def test_dicom_modality_other_than_ct_is_named():
    image = make_volume(np.eye(3))
    image.SetMetaData("0008|0060", "MR")
    assert any("modality is MR" in w for w in check_volume(image).warnings)


def test_an_all_nan_volume_is_not_called_constant():
    arr = np.full((6, 7, 8), np.nan, np.float32)
    with pytest.raises(InvalidImageError, match="all 336 voxels are NaN or infinite: the file holds no image"):
        check_volume(_image(arr))
