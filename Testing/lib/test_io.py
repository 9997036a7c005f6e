import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS, make_volume
from PRISMRTLib.errors import ImageReadError, ImageWriteError, InvalidImageError
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


# ---- files that lie: truncated, damaged, NaN hidden by the reader --------------------------------------------------
def _float_ct(nan_at=None):
    arr = np.full((6, 10, 12), -1000.0, np.float32)
    arr[:, 2:8, 3:9] = 40.0
    if nan_at is not None:
        arr[nan_at] = np.nan
    return sitk.GetImageFromArray(arr)


@pytest.mark.parametrize("suffix, compress", [(".nii.gz", True), (".nii", False), (".nrrd", True), (".nrrd", False),
                                              (".mha", True), (".mha", False)])
def test_truncated_files_are_refused_not_zero_filled(tmp_path, suffix, compress):
    full = tmp_path / f"full{suffix}"
    sitk.WriteImage(_float_ct(), str(full), compress)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    with pytest.raises(ImageReadError, match="is truncated or damaged .*: copy or export the file again"):
        read_image(cut)


def test_a_damaged_gzip_stream_is_refused(tmp_path):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(_float_ct(), str(path), True)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="truncated or damaged"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_nan_voxels_are_never_read_as_zero(tmp_path, suffix):
    """SimpleITK's NIfTI reader sets NaN to 0; read_image refuses the file instead, as check_volume does for the
    formats whose readers keep the NaN."""
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(_float_ct(nan_at=(2, 3, 4)), str(path), True)
    with pytest.raises(InvalidImageError, match="1 voxels are NaN or infinite"):
        check_volume(read_image(path))


def _big_endian_copy(source, target):
    """The NIfTI-1 file ``source`` (little-endian, float32) rewritten big-endian: every header field and voxel."""
    import struct

    layout = "i10s18sihcc8h3f4h8f3fhcc4f2i80s24s2h6f12f16s4s"  # the 348-byte NIfTI-1 header, field by field
    data = source.read_bytes()
    header = struct.pack(">" + layout, *struct.unpack("<" + layout, data[:348]))
    offset = int(struct.unpack("<f", data[108:112])[0])
    voxels = np.frombuffer(data[offset:], "<f4").astype(">f4").tobytes()
    target.write_bytes(header + data[348:offset] + voxels)


def test_nan_is_found_in_big_endian_nifti(tmp_path):
    good, bad = tmp_path / "good.nii", tmp_path / "bad.nii"
    sitk.WriteImage(_float_ct(), str(good), False)
    sitk.WriteImage(_float_ct(nan_at=(1, 1, 1)), str(bad), False)
    _big_endian_copy(good, tmp_path / "good-be.nii")
    _big_endian_copy(bad, tmp_path / "bad-be.nii")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "good-be.nii")),
                                  sitk.GetArrayFromImage(_float_ct()))
    with pytest.raises(InvalidImageError, match="1 voxels are NaN"):
        read_image(tmp_path / "bad-be.nii")


def test_plain_nifti_named_nii_gz_still_reads(tmp_path):
    plain = tmp_path / "plain.nii"
    sitk.WriteImage(_float_ct(), str(plain), False)
    named = tmp_path / "named.nii.gz"
    named.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(named)), sitk.GetArrayFromImage(_float_ct()))


def test_empty_files_and_folders_without_dicom_say_so(tmp_path):
    empty = tmp_path / "ct.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"is empty \(0 bytes\)"):
        read_image(empty)
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    with pytest.raises(ImageReadError, match=r"none of its 1 file\(s\) is DICOM"):
        read_image(folder)


def test_library_noise_on_stderr_is_kept_off_the_terminal(capfd):
    from PRISMRTLib.imaging.io import _native_stderr

    with _native_stderr() as outer:
        os.write(2, b"ITK WARNING: noise\n")
        with _native_stderr():  # nested: the outer capture keeps it
            os.write(2, b"GDCM: more noise\n")
        assert "noise" in outer.text() and "more noise" in outer.text()
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def _rescaled_copy(source, target, slope: float, inter: float):
    """The uncompressed NIfTI-1 file ``source`` with its scl_slope and scl_inter fields set."""
    import struct

    data = bytearray(source.read_bytes())
    data[112:120] = struct.pack("<2f", slope, inter)
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["int16.nii.gz", "int16.nii", "float32.nii.gz", "rescaled.nii", "ras.nii.gz"])
def test_large_nifti_read_in_slabs_is_the_whole_read(tmp_path, monkeypatch, case):
    """A large NIfTI is read slab by slab (memory near one volume, not two): voxels, pixel type, geometry and header
    fields are exactly what SimpleITK's whole read gives, for a slab count that does not divide the slices."""
    import PRISMRTLib.imaging.io as io

    dtype = np.float32 if case.startswith("float32") else np.int16
    image = make_volume(DIRECTIONS["ras-stored" if case.startswith("ras") else "oblique"], size=(9, 7, 11),
                        dtype=dtype)
    path = tmp_path / case
    if case.startswith("rescaled"):
        sitk.WriteImage(image, str(tmp_path / "plain.nii"), False)
        _rescaled_copy(tmp_path / "plain.nii", path, 0.5, -1024.0)
    else:
        sitk.WriteImage(image, str(path), case.endswith(".gz"))
    whole = sitk.ReadImage(str(path))
    executes = []
    real_execute = sitk.ImageFileReader.Execute

    def counted(self):
        executes.append(self.GetExtractSize())
        return real_execute(self)

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", counted)
    monkeypatch.setattr(io, "_SLAB_READ_BYTES", 0)  # every volume is "large"
    monkeypatch.setattr(io, "_SLABS", 4)  # 11 slices: slabs of 3, 3, 3 and 2
    slabbed = read_image(path)
    assert [size[2] for size in executes] == [3, 3, 3, 2]
    assert slabbed.GetPixelID() == whole.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(slabbed), sitk.GetArrayViewFromImage(whole))
    assert (slabbed.GetSize(), slabbed.GetOrigin(), slabbed.GetSpacing(), slabbed.GetDirection()) == (
        whole.GetSize(), whole.GetOrigin(), whole.GetSpacing(), whole.GetDirection())
    assert {k: slabbed.GetMetaData(k) for k in slabbed.GetMetaDataKeys()} == {
        k: whole.GetMetaData(k) for k in whole.GetMetaDataKeys()}
    if case.startswith("rescaled"):  # the slope and intercept were applied to every slab
        np.testing.assert_allclose(sitk.GetArrayViewFromImage(slabbed),
                                   sitk.GetArrayViewFromImage(image) * 0.5 - 1024.0)


def test_small_nifti_is_read_whole(tmp_path, monkeypatch):
    path = write_image(make_volume(DIRECTIONS["openkbp"], size=(6, 5, 4)), tmp_path / "small.nii.gz")
    executes = []
    real_execute = sitk.ImageFileReader.Execute
    monkeypatch.setattr(sitk.ImageFileReader, "Execute",
                        lambda self: executes.append(self.GetExtractSize()) or real_execute(self))
    read_image(path)
    assert len(executes) == 1
