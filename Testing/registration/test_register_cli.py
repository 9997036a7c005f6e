"""`prismrt register` end to end on a small real CT and a known shift of it: the files the README names, a QA verdict,
the warped structures; and bad input refused before any work, with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.cli import main


@pytest.fixture(scope="module")
def pair(tmp_path_factory, sample_dir):
    """The shipped OpenKBP CT (downsampled to 64 x 64 x 64) and the same CT shifted 6 mm to the patient's left."""
    folder = tmp_path_factory.mktemp("pair")
    ct = sitk.ReadImage(str(sample_dir / "ct.nii.gz"))
    small = sitk.Resample(ct, [64, 64, 64], sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(),
                          [s * n / 64 for s, n in zip(ct.GetSpacing(), ct.GetSize())], ct.GetDirection(), -1024.0,
                          ct.GetPixelID())
    shift = sitk.TranslationTransform(3, (-6.0, 0.0, 0.0))  # moving(p) = fixed(p - 6 mm L): moved 6 mm to the left
    moved = sitk.Resample(small, small, shift, sitk.sitkLinear, -1024.0)
    ptv = sitk.ReadImage(str(sample_dir / "PTV70.nii.gz"))
    ptv_small = sitk.Resample(ptv, small, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    ptv_moved = sitk.Resample(ptv_small, small, shift, sitk.sitkNearestNeighbor, 0)
    for name, image in (("fixed.nii.gz", small), ("moving.nii.gz", moved)):
        sitk.WriteImage(image, str(folder / name))
    (folder / "fixed_masks").mkdir()
    (folder / "moving_masks").mkdir()
    sitk.WriteImage(ptv_small, str(folder / "fixed_masks" / "PTV70.nii.gz"))
    sitk.WriteImage(ptv_moved, str(folder / "moving_masks" / "PTV70.nii.gz"))
    return folder


def test_register_writes_the_field_the_warped_image_and_a_qa_report(pair, tmp_path, capsys):
    out = tmp_path / "reg"
    code = main(["register", str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz"), "--out", str(out),
                 "--fixed-segmentation", str(pair / "fixed_masks"), "--moving-segmentation", str(pair / "moving_masks"),
                 "--device", "cpu"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    for name in ("displacement.nii.gz", "transform.h5", "warped.nii.gz", "qa.md", "qa.json", "checkerboard.png",
                 "difference.png", "jacobian.png", "warped_segmentations/PTV70.nii.gz"):
        assert (out / name).is_file(), name
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    u = sitk.GetArrayFromImage(field)  # (k, j, i, 3), LPS mm
    body = sitk.GetArrayFromImage(sitk.ReadImage(str(pair / "fixed.nii.gz"))) > -300
    # p_moving = p + u(p): the moving CT is the fixed one moved 6 mm towards +L (LPS x), so u is about +6 mm in x
    assert np.median(u[body][:, 0]) == pytest.approx(6.0, abs=1.0)
    assert abs(np.median(u[body][:, 1])) < 1.0 and abs(np.median(u[body][:, 2])) < 1.0
    qa = json.loads((out / "qa.json").read_text())
    assert qa["verdict"] in ("PASS", "FAIL") and "QA:" in printed.out
    dice = {c["name"]: c["dice"] for c in qa["contours"]}
    assert dice["PTV70"] > 0.85


def test_bad_register_input_is_refused_before_any_work(pair, tmp_path, capsys):
    fixed, moving = str(pair / "fixed.nii.gz"), str(pair / "moving.nii.gz")
    cases = [
        (["--fixed-landmarks", fixed], "give both --fixed-landmarks and --moving-landmarks"),
        (["--smoothness", "50"], "--smoothness must be between 0 and 10"),
        (["--moving-segmentation", fixed], "is not a mask"),
    ]
    for extra, message in cases:
        out = tmp_path / f"out{len(extra)}{extra[0]}"
        assert main(["register", fixed, moving, "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
    # an image that is not CT against a CT, without --multimodal
    mr = sitk.Cast(sitk.ReadImage(moving) + 1024, sitk.sitkUInt16)
    sitk.WriteImage(mr * 0 + sitk.Cast(sitk.RescaleIntensity(mr, 0, 800), sitk.sitkUInt16), str(tmp_path / "mr.nii.gz"))
    assert main(["register", fixed, str(tmp_path / "mr.nii.gz"), "--out", str(tmp_path / "mr_out")]) == 2
    assert "--multimodal" in capsys.readouterr().err
