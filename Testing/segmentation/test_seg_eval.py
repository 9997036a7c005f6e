"""The prompt-simulation evaluation: protocols on an oracle, baselines and statistics by hand, case discovery, and
the eval-seg command."""

import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.cli import FIRST_CHOICES, MODES_CHOICES, main
from PRISMRTLib.segmentation import SegmentationSession
from PRISMRTLib.segmentation.cases import load_cases, select
from PRISMRTLib.segmentation.evaluation import (FIRST_PROMPTS, MODES, PromptResult, box_filled_scores, central_slice,
                                                markdown_tables, prompt_label, simulate_2d, simulate_clicks,
                                                summarise, wilcoxon)
from prismrt_testing import SAMPLE_DIR, OracleBackend, make_tiny_bundle, ptv_phantom


def test_3d_protocol_on_an_oracle_recovers_the_target():
    image, ptv = ptv_phantom()
    session = SegmentationSession(OracleBackend(), image, "axial", window="soft-tissue")
    scores = simulate_clicks(session, ptv, max_clicks=2)
    assert len(scores) == 2
    assert scores[0][0] > 0.95 and scores[0][2] < 5.0  # Dice, HD95 in mm
    assert scores[1][0] >= scores[0][0] - 1e-9


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_3d_protocol_starting_from_a_box(orientation):
    """first="box": the target's bounding box on the slice of its deepest voxel, then clicks."""
    image, ptv = ptv_phantom()
    session = SegmentationSession(OracleBackend(), image, orientation, window="soft-tissue")
    scores = simulate_clicks(session, ptv, max_clicks=2, first="box")
    assert any(p.box is not None and not p.points for p in session.prompts.values())  # the user's box, alone
    assert scores[0][0] > 0.95 and scores[1][0] >= scores[0][0] - 1e-9
    with pytest.raises(ValueError, match="first must be one of"):
        simulate_clicks(session, ptv, first="lasso")


@pytest.mark.parametrize("orientation", ["axial", "coronal"])
def test_2d_protocol_scores_the_central_slice_only(orientation):
    image, ptv = ptv_phantom()
    session = SegmentationSession(OracleBackend(), image, orientation, window="soft-tissue")
    index, kji = central_slice(session, ptv)
    assert ptv[kji]  # the deepest voxel is inside, and on that slice
    assert round(float(session.plane.index_to_slice_coords(np.array(kji[::-1], float))[0])) == index
    scores = simulate_2d(session, ptv, max_prompts=2)
    assert scores[0][0] > 0.98  # the oracle gives the slice's object (through its 128 px grid)
    drawn = np.flatnonzero(session.plane.stack_view(session.mask).any(axis=(1, 2)))
    assert drawn.tolist() == [index]  # nothing propagated
    box = simulate_2d(SegmentationSession(OracleBackend(), image, orientation, window="soft-tissue"), ptv, 1, "box")
    assert box[0][0] > 0.98


def test_box_filled_baseline_by_hand():
    """A disc of radius 10 px in a 64 x 64 slice: the filled box scores Dice 2 * area / (area + box)."""
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 30) ** 2 + (xx - 33) ** 2 <= 100)
    vol = np.zeros((5, 64, 64), bool)
    vol[1:4] = disc
    image = sitk.GetImageFromArray(np.where(vol, 200, -1000).astype(np.int16))
    session = SegmentationSession(OracleBackend(), image, "axial", window="soft-tissue")
    expected = 2 * disc.sum() / (disc.sum() + 21 * 21)
    d2, _, _ = box_filled_scores(session, vol, "2d")
    d3, _, _ = box_filled_scores(session, vol, "3d")  # the box over the three slices the disc spans
    assert d2 == pytest.approx(expected) and d3 == pytest.approx(expected)


def test_cli_choices_are_the_libraries():
    """The CLI keeps its own copies (parsing arguments must not import torch): they must stay the library's."""
    from PRISMRTLib import cli, features

    assert FIRST_CHOICES == FIRST_PROMPTS and MODES_CHOICES == MODES
    assert cli.BACKEND_CHOICES == features.BACKEND_CHOICES and cli.DEFAULT_HELP == features.DEFAULT_HELP


def _r(case, method, d, prompts=1, mode="3d"):
    return PromptResult(case, "PTV70", method, mode, "click", prompts, d, d / (2 - d), 3.0)


def test_summary_and_paired_test():
    results = [_r(f"c{i}", "teachers", 0.6 + 0.01 * i) for i in range(8)]
    results += [_r(f"c{i}", "prismrt", 0.7 + 0.01 * i) for i in range(8)]
    rows = summarise(results)
    by = {r["method"]: r for r in rows}
    assert by["teachers"]["dice_mean"] == pytest.approx(0.635) and by["prismrt"]["cases"] == 8
    test = wilcoxon(results, "prismrt", "teachers", prompts=1)
    assert test["n"] == 8 and test["p_value"] < 0.01  # all eight pairs differ the same way
    table = markdown_tables(rows, ["prismrt", "teachers"])
    assert "| PTV70 | 3D | 1 click | 8 | 0.735 ± 0.023 | 0.635 ± 0.023 |" in table
    infinite = summarise([PromptResult("a", "PTV70", "t", "2d", "click", 1, 0.0, 0.0, math.inf)])
    assert infinite[0]["hd95_cases"] == 0 and "n/a" in markdown_tables(infinite, ["t"])
    assert prompt_label("box", 1) == "box" and prompt_label("box", 3) == "box + 2 clicks"


def test_cases_from_folders_and_a_case_list(tmp_path):
    # OpenKBP layout and the clinical layout (masks/ subfolder, at depth 2; crops ignored)
    (tmp_path / "kbp" / "pt_1").mkdir(parents=True)
    for f in ("ct.nii.gz", "PTV70.nii.gz", "Brainstem.nii.gz"):
        shutil.copy(SAMPLE_DIR / f, tmp_path / "kbp" / "pt_1" / f)
    clinical = tmp_path / "clin" / "set" / "CASE-1"
    (clinical / "masks").mkdir(parents=True)
    (clinical / "crop").mkdir()
    shutil.copy(SAMPLE_DIR / "ct.nii.gz", clinical / "ct.nii.gz")
    shutil.copy(SAMPLE_DIR / "ct.nii.gz", clinical / "crop" / "ct.nii.gz")
    shutil.copy(SAMPLE_DIR / "PTV70.nii.gz", clinical / "masks" / "GTV-1.nii.gz")
    kbp = load_cases(tmp_path / "kbp")
    assert [c.id for c in kbp] == ["pt_1"] and sorted(kbp[0].structures) == ["Brainstem", "PTV70"]
    clin = load_cases(tmp_path / "clin")
    assert [c.id for c in clin] == ["set/CASE-1"] and list(clin[0].structures) == ["GTV-1"]
    assert [(c.id, s) for c, s in select(kbp, ["PTV70", "Larynx"])] == [("pt_1", "PTV70")]

    # a case list whose label map is stored with a flipped y axis: resampled onto the CT grid, the same voxels
    ct = sitk.ReadImage(str(SAMPLE_DIR / "ct.nii.gz"))
    ptv = sitk.ReadImage(str(SAMPLE_DIR / "PTV70.nii.gz"))
    labels = sitk.GetArrayFromImage(ptv).astype(np.uint8) * 7
    flipped = sitk.GetImageFromArray(labels[:, ::-1, :].copy())
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    origin = np.array(ct.GetOrigin()) + direction[:, 1] * ct.GetSpacing()[1] * (ct.GetSize()[1] - 1)
    flipped.SetSpacing(ct.GetSpacing())
    flipped.SetOrigin(tuple(origin))
    flipped.SetDirection(tuple((direction * [1, -1, 1]).ravel()))
    sitk.WriteImage(flipped, str(tmp_path / "labels.nii.gz"))
    shutil.copy(SAMPLE_DIR / "ct.nii.gz", tmp_path / "ct.nii.gz")
    (tmp_path / "list.json").write_text(json.dumps({"cases": [
        {"id": "x", "image": "ct.nii.gz", "structures": {"target": {"labels": "labels.nii.gz", "value": 7}},
         "group": "GTV"}]}))
    case = load_cases(tmp_path / "list.json")[0]
    assert case.group == "GTV"
    np.testing.assert_array_equal(case.reference("target", ct), sitk.GetArrayFromImage(ptv) > 0)
    (tmp_path / "bad.json").write_text(json.dumps({"cases": [{"id": "y"}]}))
    with pytest.raises(Exception, match="case 0 is malformed"):
        load_cases(tmp_path / "bad.json")


def test_eval_seg_command_runs_two_methods_and_the_baseline(tmp_path, capsys):
    cases = tmp_path / "cases"
    for name in ("pt_a", "pt_b"):
        (cases / name).mkdir(parents=True)
        for f in ("ct.nii.gz", "PTV70.nii.gz"):
            shutil.copy(SAMPLE_DIR / f, cases / name / f)
    make_tiny_bundle("teachers", tmp_path / "teachers")
    make_tiny_bundle("prismrt", tmp_path / "prismrt")
    out = tmp_path / "eval"
    args = ["eval-seg", str(cases), "--model", f"teachers={tmp_path / 'teachers'}",
            "--model", f"prismrt={tmp_path / 'prismrt'}", "--clicks", "2", "--mode", "2d", "--mode", "3d",
            "--first", "click", "--first", "box", "--baseline", "box-filled", "--structure", "PTV70",
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "results.json").read_text())
    methods = [str(tmp_path / "teachers"), str(tmp_path / "prismrt"), "box-filled"]
    assert report["methods"] == methods
    # 2 models x 2 cases x 2 modes x 2 first prompts x 2 prompts, and the baseline: 2 cases x 2 modes
    assert len(report["cases"]) == 2 * 2 * 2 * 2 * 2 + 2 * 2
    assert len(report["wilcoxon_dice"]) == 2 * 2 * 2
    text = (out / "results.md").read_text()
    assert "Paired Wilcoxon" in text and "| PTV70 | 2D central slice | box | 2 |" in text
    assert main(args) == 2 and "already holds results" in capsys.readouterr().err
    clicks_only = ["eval-seg", str(cases), "--model", f"teachers={tmp_path / 'teachers'}", "--baseline", "box-filled",
                   "--device", "cpu", "--out", str(tmp_path / "o2")]
    assert main(clicks_only) == 2 and "add --first box" in capsys.readouterr().err
