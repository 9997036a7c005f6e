import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS, make_volume
from PRISMRTLib.errors import ImageReadError, ImageWriteError
from PRISMRTLib.imaging import (
    Geometry, check_volume, image_modality, list_dicom_series, read_image, write_image,
)


def _same_geometry(a: sitk.Image, b: sitk.Image):
    ga, gb = Geometry.from_image(a), Geometry.from_image(b)
    assert ga.size == gb.size
    np.testing.assert_allclose(ga.index_to_physical_matrix, gb.index_to_physical_matrix, atol=1e-4)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_then_read_keeps_values_and_geometry(tmp_path, suffix):
    image = make_volume(DIRECTIONS["oblique"])
    path = write_image(image, tmp_path / f"vol{suffix}")
    back = read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    _same_geometry(image, back)
    assert [p.name for p in tmp_path.iterdir()] == [f"vol{suffix}"]  # no temporary files left


def test_write_refuses_to_replace_or_guess(tmp_path):
    image = make_volume(DIRECTIONS["openkbp"], size=(4, 4, 4))
    target = tmp_path / "mask.nii.gz"
    write_image(image, target)
    before = target.read_bytes()
    with pytest.raises(ImageWriteError, match="already exists"):
        write_image(make_volume(DIRECTIONS["ras-stored"], size=(4, 4, 4)), target)
    assert target.read_bytes() == before  # the user's file is untouched
    write_image(image, target, overwrite=True)
    with pytest.raises(ImageWriteError, match="use one of"):
        write_image(image, tmp_path / "mask.png")


def test_read_errors_say_what_to_do(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "missing.nii.gz")
    garbage = tmp_path / "scan.nii.gz"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ImageReadError, match="NIfTI"):
        read_image(garbage)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="no DICOM image series"):
        read_image(tmp_path / "empty")


@pytest.fixture(scope="module")
def dicom_dir(shared_data):
    return shared_data / "samples" / "ts_ct_dicom" / "dicom"


def test_jpeg2000_dicom_series_reads_with_its_geometry(dicom_dir):
    series = list_dicom_series(dicom_dir)
    assert len(series) == 1 and len(series[0].files) == 20 and series[0].modality == "CT"
    ct = read_image(dicom_dir)
    assert ct.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(ct.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    assert image_modality(ct) == "CT"
    summary = check_volume(ct)
    assert summary.warnings == [] and summary.intensity_range[0] == -1024
    # a single file of the series reads the whole series
    one = read_image(sorted(dicom_dir.iterdir())[5])
    assert one.GetSize() == ct.GetSize()


def test_dicom_pixels_match_an_independent_jpeg2000_decoder(dicom_dir):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg (test extra) cross-checks the decoder")
    ct = read_image(dicom_dir)
    g = Geometry.from_image(ct)
    arr = sitk.GetArrayViewFromImage(ct)
    for path in sorted(dicom_dir.iterdir())[::6]:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        # find this file's slice by its position, so a reversed slice order would fail
        i, j, k = g.physical_to_voxel([float(v) for v in ds.ImagePositionPatient])
        assert (i, j) == (0, 0)
        np.testing.assert_array_equal(arr[k], hu)


def test_dicom_series_and_its_label_map_agree_in_geometry(shared_data, dicom_dir):
    ct = read_image(dicom_dir)
    labels = read_image(shared_data / "samples" / "ts_ct_dicom" / "example_seg_dicom.nii.gz")
    gc, gl = Geometry.from_image(ct), Geometry.from_image(labels)
    # stored differently (the label map runs posterior->anterior) but on the same physical voxel grid
    assert gl.orientation_text() != gc.orientation_text()
    np.testing.assert_allclose(gc.bounds(), gl.bounds(), atol=1e-3)
    idx = gc.physical_to_index(gl.index_to_physical(np.array([[0, 0, 0], [511, 511, 19], [100, 30, 7]])))
    np.testing.assert_allclose(idx, [[0, 511, 0], [511, 0, 19], [100, 481, 7]], atol=1e-4)
    # and the anatomy agrees: labels resampled onto the CT sit on tissue of the right density and side
    on_ct = sitk.GetArrayFromImage(sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor))
    hu = sitk.GetArrayViewFromImage(ct)
    classes = json.loads((shared_data / "samples" / "ts_abdomen_ct" / "totalsegmentator_total_classmap.json").read_text())
    ids = {name: int(k) for k, name in classes.items()}

    def centroid_lps(name):
        kji = np.argwhere(on_ct == ids[name]).mean(axis=0)
        return gc.index_to_physical(kji[::-1])

    assert hu[on_ct == ids["vertebrae_T12"]].mean() > 200  # bone
    assert 30 < hu[on_ct == ids["liver"]].mean() < 150  # soft tissue
    assert centroid_lps("liver")[0] < centroid_lps("spleen")[0]  # liver on the patient's right (smaller x in LPS)
    assert centroid_lps("vertebrae_T12")[1] > centroid_lps("aorta")[1]  # spine posterior of the aorta


def test_openkbp_ct_and_masks_share_a_grid(sample_dir):
    ct = read_image(sample_dir / "ct.nii.gz")
    for path in sample_dir.glob("*.nii.gz"):
        _same_geometry(ct, read_image(path))
    assert os.path.getsize(sample_dir / "ct.nii.gz") < 1_000_000
