"""The click-simulation evaluation: protocol on an oracle, statistics by hand, and the eval-seg command."""

import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.cli import main
from PRISMRTLib.seg_eval import ClickResult, markdown_table, simulate_clicks, summarise, wilcoxon
from PRISMRTLib.segmentation import SegmentationSession
from prismrt_testing import SAMPLE_DIR, OracleBackend, make_tiny_bundle


def test_protocol_on_an_oracle_recovers_the_target(tmp_path):
    ct = sitk.ReadImage(str(SAMPLE_DIR / "ct.nii.gz"))
    ptv = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_DIR / "PTV70.nii.gz"))) > 0
    image = sitk.GetImageFromArray(np.where(ptv, 200, -1000).astype(np.int16))
    image.CopyInformation(ct)
    session = SegmentationSession(OracleBackend(), image, "axial", window="soft-tissue")
    scores = simulate_clicks(session, ptv, max_clicks=2)
    assert len(scores) == 2
    assert scores[0][0] > 0.95 and scores[0][2] < 5.0  # Dice, HD95 in mm
    assert scores[1][0] >= scores[0][0] - 1e-9


@pytest.mark.parametrize("orientation", ["axial", "sagittal"])
def test_protocol_starting_from_a_box(orientation):
    """--first box: the target's bounding box on the slice of its most interior voxel, then clicks."""
    from prismrt_testing import ptv_phantom

    image, ptv = ptv_phantom()
    session = SegmentationSession(OracleBackend(), image, orientation, window="soft-tissue")
    scores = simulate_clicks(session, ptv, max_clicks=2, first="box")
    assert any(p.box is not None and not p.points for p in session.prompts.values())  # the user's box, alone
    assert scores[0][0] > 0.95 and scores[1][0] >= scores[0][0] - 1e-9
    with pytest.raises(ValueError, match="first must be one of"):
        simulate_clicks(session, ptv, first="lasso")


def test_eval_seg_offers_the_protocols_first_prompts():
    from PRISMRTLib.cli import build_parser
    from PRISMRTLib.seg_eval import FIRST_PROMPTS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    first = next(a for a in sub.choices["eval-seg"]._actions if a.dest == "first")
    assert tuple(first.choices) == FIRST_PROMPTS


def _r(case, backend, d, clicks=1):
    return ClickResult(case, "PTV70", backend, clicks, d, d / (2 - d), 3.0)


def test_summary_and_paired_test():
    results = [_r(f"c{i}", "teachers", 0.6 + 0.01 * i) for i in range(8)]
    results += [_r(f"c{i}", "prismrt", 0.7 + 0.01 * i) for i in range(8)]
    rows = summarise(results)
    by = {r["backend"]: r for r in rows}
    assert by["teachers"]["dice_mean"] == pytest.approx(0.635) and by["prismrt"]["cases"] == 8
    test = wilcoxon(results, "prismrt", "teachers", clicks=1)
    assert test["n"] == 8 and test["p_value"] < 0.01  # all eight pairs differ the same way
    assert "| prismrt | PTV70 | 1 | 8 |" in markdown_table(rows)
    infinite = summarise([ClickResult("a", "PTV70", "t", 1, 0.0, 0.0, math.inf)])
    assert infinite[0]["hd95_cases"] == 0 and "n/a" in markdown_table(infinite)


def test_eval_seg_command_runs_both_backends(tmp_path, capsys):
    cases = tmp_path / "cases"
    for name in ("pt_a", "pt_b"):
        (cases / name).mkdir(parents=True)
        for f in ("ct.nii.gz", "PTV70.nii.gz"):
            shutil.copy(SAMPLE_DIR / f, cases / name / f)
    make_tiny_bundle("teachers", tmp_path / "teachers")
    make_tiny_bundle("prismrt", tmp_path / "prismrt")
    out = tmp_path / "eval"
    args = ["eval-seg", str(cases), "--backend", "teachers", "--backend", "prismrt", "--clicks", "2",
            "--teachers-model", str(tmp_path / "teachers"), "--prismrt-model", str(tmp_path / "prismrt"),
            "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "results.json").read_text())
    assert len(report["cases"]) == 2 * 2 * 2  # backends x cases x clicks
    assert set(report["wilcoxon_dice"]) == {"PTV70/1", "PTV70/2"}
    assert "Paired Wilcoxon" in (out / "results.md").read_text()
    assert main(args) == 2 and "already holds results" in capsys.readouterr().err
    assert report["first_prompt"] == "click"
    assert main(args + ["--first", "box", "--overwrite", "--backend", "teachers"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["first_prompt"] == "box" and len(report["cases"]) == 2 * 2 * 2
    assert (out / "results.md").read_text().startswith("First prompt: the structure's bounding box")
