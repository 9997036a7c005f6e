"""`prismrt eval-ask`'s ground truth and scoring, on a synthetic case whose answers are known by hand, with fake
sessions (the chat's own parser and engines are not needed: the evaluation must check them, not lean on them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.chat import evaluation as E
from PRISMRTLib.chat.types import Answer

SIZE = (40, 30, 20)  # i, j, k
SPACING = (2.0, 2.0, 3.0)
FLIPPED_X = np.diag([-1.0, 1.0, 1.0])  # i runs towards the patient's right: high i is low x


def _image(array, direction):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin((100.0, -40.0, -30.0))
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    return image


def _masks():
    """(k, j, i) arrays: a 'PTV70' at high i, a left parotid at low i, a cord on the body's centre line."""
    shape = SIZE[::-1]
    m = {name: np.zeros(shape, np.uint8) for name in ("PTV70", "LeftParotid", "SpinalCord")}
    m["PTV70"][8:13, 10:15, 26:32] = 1  # 5 x 5 x 6 voxels
    m["LeftParotid"][12:16, 10:14, 8:12] = 1
    m["SpinalCord"][:, 18:21, 19:21] = 1
    return m


def _ct():
    ct = np.full(SIZE[::-1], -1000, np.int16)
    ct[:, 5:25, 5:35] = 0  # the body: i 5..34, centred on i = 19.5
    return ct


def _write_case(folder, direction):
    (folder / "masks").mkdir(parents=True)
    sitk.WriteImage(_image(_ct(), direction), str(folder / "ct.nii.gz"))
    for name, array in _masks().items():
        sitk.WriteImage(_image(array, direction), str(folder / "masks" / f"{name}.nii.gz"))
    return folder


@pytest.fixture
def flipped_case(tmp_path):
    return _write_case(tmp_path / "synthetic" / "flipped", FLIPPED_X)


# ---- ground truth ----------------------------------------------------------------------------------------------------

def test_left_and_right_follow_physical_space_not_array_order(flipped_case, tmp_path):
    case = E.CaseData(flipped_case)
    s = case.structures
    # i = 26..31 with x = 100 - 2 i: the patient's right; the parotid at i = 8..11: the patient's left
    assert case.side(case.points(s["PTV70"])) == "right"
    assert case.side(case.points(s["LeftParotid"])) == "left"
    assert case.side(case.points(s["SpinalCord"])) == "midline"
    # the same arrays with an identity direction: the sides swap, because physical space did
    same_arrays = E.CaseData(_write_case(tmp_path / "synthetic" / "identity", np.eye(3)))
    assert same_arrays.side(same_arrays.points(same_arrays.structures["PTV70"])) == "left"

    items = E.questions_for_case(case)
    ptv = [i for i in items if i["kind"] == "laterality" and i["structures"] == ["ptv70"] and i["answerable"]]
    assert ptv, "the synthetic case must yield laterality items on PTV70"
    for item in ptv:
        if item["wording"].startswith("la"):
            assert item["truth"] == "right"
        elif item["slots"].get("frame") == "screen":  # radiological: the patient's right on the screen's left
            assert item["truth"] == (item["slots"]["side"] == "left")
        else:
            assert item["truth"] == (item["slots"]["side"] == "right")
    sagittal = [i for i in items if i["slice"] and i["slice"].startswith("sagittal") and i["kind"] == "laterality"]
    assert sagittal and all(not i["answerable"] for i in sagittal)


def test_slice_truths_index_the_right_array_axis(flipped_case):
    case = E.CaseData(flipped_case)
    masks = _masks()
    items = E.questions_for_case(case)
    checked = 0
    for item in items:
        if item["kind"] != "presence" or not item["structures"] or not item["answerable"]:
            continue
        name = {"ptv70": "PTV70", "parotid_left": "LeftParotid", "parotid": "LeftParotid",
                "spinal_cord": "SpinalCord"}[item["structures"][0]]
        axis, index = item["slice"].split(":")
        index = int(index)
        mask = masks[name]
        # axial k, coronal j, sagittal i: numpy axes 0, 1, 2 of the (k, j, i) array
        on = np.take(mask, index, axis={"axial": 0, "coronal": 1, "sagittal": 2}[axis]).any()
        assert item["truth"] == bool(on), item
        checked += 1
    assert checked >= 4
    # a coronal slice shows rows along k (3 mm) and columns along i (2 mm), 20 rows of 40 columns
    coronal = {i["kind"]: i["truth"] for i in items if i["slice"] and i["slice"].startswith("coronal")
               and i["kind"] in ("pixel_size", "field_of_view", "slice_count")}
    sagittal = {i["kind"]: i["truth"] for i in items if i["slice"] and i["slice"].startswith("sagittal")
                and i["kind"] in ("pixel_size", "field_of_view", "slice_count")}
    for got, want in ((coronal, {"pixel_size": [3.0, 2.0], "field_of_view": [80.0, 60.0], "slice_count": 30}),
                      (sagittal, {"pixel_size": [3.0, 2.0], "field_of_view": [60.0, 60.0], "slice_count": 40})):
        for kind, value in got.items():
            assert value == want[kind], (kind, value)
    header = {i["kind"]: i["truth"] for i in items if i["slice"] is None and i["needs"] == "header"}
    assert header["slice_thickness"] == 3.0 and header["dimensions"] == [40, 30, 20]
    assert header["scan_length"] == 60.0


def test_volume_extent_and_distance_by_hand(flipped_case):
    case = E.CaseData(flipped_case)
    s = case.structures
    assert case.volume_cc(s["PTV70"]) == pytest.approx(150 * 12.0 / 1000)
    assert case.z_extent(s["PTV70"]) == pytest.approx(5 * 3.0)
    # parotid i <= 11 and PTV i >= 26 share rows j and slice k = 12: 15 voxels of 2 mm apart along x
    assert case.min_distance(s["LeftParotid"], s["PTV70"]) == pytest.approx(30.0)
    # the cord (i 19..20, j 18..20) to the PTV (i 26.., j ..14): 6 voxels along i, 4 along j
    assert case.min_distance(s["SpinalCord"], s["PTV70"]) == pytest.approx(np.hypot(12.0, 8.0))
    assert case.overlap_voxels(s["SpinalCord"], s["PTV70"]) == 0


# ---- scoring ---------------------------------------------------------------------------------------------------------

def _item(truth, **kw):
    base = {"answerable": truth is not None, "truth": truth, "tolerance": None, "unit": None}
    base.update(kw)
    return base


def test_scoring_rules():
    tol = {"rel": 0.02, "abs": 0.5}
    ok = Answer("", 0.9, "structures", 101.5, "cm3")
    assert E.is_correct(_item(100.0, tolerance=tol, unit="cm3"), ok)  # within 2 %
    assert not E.is_correct(_item(100.0, tolerance=tol, unit="cm3"), Answer("", 0.9, "s", 103.0, "cm3"))
    assert E.is_correct(_item(0.2, tolerance=tol, unit="cm3"), Answer("", 0.9, "s", 0.6, "cm3"))  # abs wins
    # the answer's unit is converted to the truth's: 2.5 cm is 25 mm
    assert E.is_correct(_item(25.0, tolerance={"rel": 0.0, "abs": 0.1}, unit="mm"), Answer("", 1, "s", 2.5, "cm"))
    assert E.is_correct(_item(25.0, tolerance={"rel": 0.0, "abs": 0.1}, unit="mm"), Answer("", 1, "s", 25.0, "mm"))
    # lists of names as sets; lists of numbers in order
    assert E.is_correct(_item(["mandible", "ptv70"]), Answer("", 1, "s", ["ptv70", "mandible"]))
    assert not E.is_correct(_item(["mandible", "ptv70"]), Answer("", 1, "s", ["ptv70"]))
    assert not E.is_correct(_item([3.0, 2.0], tolerance={"rel": 0.01, "abs": 0.01}), Answer("", 1, "s", [2.0, 3.0]))
    # bools are bools (1 is not yes), strings case-insensitive
    assert E.is_correct(_item(True), Answer("", 1, "s", True))
    assert not E.is_correct(_item(True), Answer("", 1, "s", 1))
    assert E.is_correct(_item("left"), Answer("", 1, "s", "Left"))
    # not answerable: right only when the chat says it cannot tell
    assert E.is_correct(_item(None), Answer.cannot_tell("no liver contour is loaded", source="structures"))
    assert not E.is_correct(_item(None), Answer("", 1, "s", 12.0, "cm3"))
    # answerable: cannot tell, or a clarifying question, is wrong even with the right value attached
    assert not E.is_correct(_item(True), Answer("", 0.5, "parser", True, status="clarify"))
    assert not E.is_correct(_item(True), Answer.cannot_tell("I did not understand", source="parser"))


def test_expected_calibration_error_by_hand():
    # bin 0.9-1.0: two answers at 0.95, one right (|0.5 - 0.95|); bin 0.1-0.2: two at 0.15, none right
    ece = E.expected_calibration_error([0.95, 0.95, 0.15, 0.15], [True, False, False, False])
    assert ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.15)
    assert E.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0  # 1.0 falls in the last bin
    table = E.reliability([0.05, 0.55, 0.56], [False, True, False])
    assert [b["n"] for b in table["bins"]] == [1, 2]


# ---- the question set ------------------------------------------------------------------------------------------------

def test_question_set_is_deterministic_balanced_and_well_formed(flipped_case, tmp_path):
    second = _write_case(tmp_path / "synthetic" / "second", np.eye(3))
    a = E.build_question_set([flipped_case, second], seed=0)
    b = E.build_question_set([flipped_case, second], seed=0)
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(E.build_question_set([flipped_case, second], seed=1)) != json.dumps(a)
    # a case's questions depend on that case and the seed only
    assert json.dumps(E.questions_for_case(E.CaseData(flipped_case))) == json.dumps(
        E.questions_for_case(E.CaseData(flipped_case)))
    assert len({i["id"] for i in a}) == len(a)
    from PRISMRTLib.chat.types import KINDS

    for item in a:
        assert item["kind"] in KINDS and item["category"] in E.CATEGORIES and item["needs"] in E.NEEDS
        assert item["slice"] is None or item["slice"].split(":")[0] in ("axial", "coronal", "sagittal")
        assert item["answerable"] or item["truth"] is None
    balance = {}
    for item in a:
        if item["closed"] and item["answerable"]:
            balance.setdefault((item["category"], item["needs"]), []).append(item["truth"])
    for group, truths in balance.items():
        assert truths.count(True) == truths.count(False), group
    assert {i["needs"] for i in a} == {"header", "structures", "image"}
    capped = E.build_question_set([flipped_case, second], seed=0, max_per_case=15)
    assert max(sum(i["case"] == c for i in capped) for c in {i["case"] for i in capped}) <= 15


def test_the_wordings_are_varied():
    from PRISMRTLib.chat.data import eval_wordings as W

    by_kind = {}
    for group, templates in W.TEMPLATES.items():
        assert len({t for _, t in templates}) == len(templates)
        by_kind.setdefault(group.split("_")[0], []).extend(templates)
    for group, templates in W.TEMPLATES.items():
        if group not in ("extent_long", "closer_paired"):
            assert len(templates) >= 5, group
    ids = [i for templates in W.TEMPLATES.values() for i, _ in templates]
    assert len(ids) == len(set(ids))


# ---- evaluate and report with fake sessions --------------------------------------------------------------------------

class _Oracle:
    """Answers every item with its truth (cannot tell where unanswerable), at a fixed confidence."""

    def __init__(self, table, confidence=1.0, lie_on=()):
        self.table, self.confidence, self.lie_on = table, confidence, set(lie_on)

    def ask(self, question, slice=None):
        item = self.table[(question, slice)]
        if not item["answerable"]:
            return Answer.cannot_tell("it is not in this CT", source="fake", confidence=self.confidence)
        truth = item["truth"]
        if item["kind"] in self.lie_on:
            truth = (not truth) if isinstance(truth, bool) else "wrong"
        return Answer("fake", self.confidence, "fake", truth, item["unit"])


def _factory(items, **kw):
    calls = []

    def factory(case, with_structures):
        calls.append((case, with_structures))
        table = {(i["question"], i["slice"]): i for i in items if i["case"] == case
                 and (i["needs"] == "structures") == with_structures}
        return _Oracle(table, **kw)

    return factory, calls


def test_evaluate_scores_an_oracle_perfectly_and_reports(flipped_case, tmp_path):
    items = E.build_question_set([flipped_case])
    factory, calls = _factory(items)
    seen = []
    results = E.evaluate(items, factory, progress=lambda done, total: seen.append((done, total)))
    assert sorted(set(calls)) == [(str(flipped_case), False), (str(flipped_case), True)]  # once per setting
    assert seen[-1] == (len(items), len(items))
    assert results["metrics"]["accuracy"]["overall"]["accuracy"] == 1.0
    assert results["metrics"]["calibration"]["overall"]["ece"] == 0.0
    always_yes = results["baselines"]["always yes"]["closed (yes/no)"]["accuracy"]
    assert 0.3 < always_yes < 0.6  # balanced yes/no (unanswerable closed items are never "yes")
    assert all(r["correct"] for r in results["rows"])
    results["command"] = "prismrt eval-ask synthetic/flipped --out out"
    E.write_report(results, tmp_path / "out")
    text = (tmp_path / "out" / "results.md").read_text()
    assert text.splitlines()[2:4] == ["```bash", "prismrt eval-ask synthetic/flipped --out out"]
    assert "always yes" in text and "question only" in text and "ECE" in text
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(data["rows"]) == len(items) and data["command"].startswith("prismrt eval-ask")
    assert {"question", "truth", "answer", "value", "confidence", "source", "correct"} <= set(data["rows"][0])


def test_evaluate_counts_lies_crashes_and_overconfidence(flipped_case):
    items = E.build_question_set([flipped_case])
    factory, _ = _factory(items, confidence=0.9, lie_on=("laterality",))
    results = E.evaluate(items, factory)
    by_kind = results["metrics"]["by_kind"]
    assert by_kind["laterality"]["accuracy"] < 1.0 and by_kind["volume"]["accuracy"] == 1.0
    assert results["metrics"]["accuracy"]["left/right items"]["accuracy"] < 1.0
    checks = {c: ok for c, _, _, ok in E.must_show(results)}
    assert not checks["left/right items"]

    def broken(case, with_structures):
        raise RuntimeError("no session")

    crashed = E.evaluate(items[:3], broken)
    assert crashed["metrics"]["coverage"]["errors"] == 3
    assert not any(r["correct"] for r in crashed["rows"])


def test_baselines_vote_leave_one_case_out():
    rows = []
    for case, truth in (("a", True), ("b", True), ("c", False)):
        rows.append({"case_name": case, "kind": "presence", "wording": "pr1", "slots": {}, "truth": truth,
                     "answerable": True, "closed": True, "tolerance": None, "unit": None, "needs": "structures",
                     "left_right": False, "category": "organ", "correct": True})
    b = E.baselines(rows)
    # a and b: the other two vote yes and no, a tie, broken towards yes; c: both others say yes, wrong. Voting
    # in-sample would have scored c's own "no" too.
    assert b["always yes"]["overall"]["accuracy"] == pytest.approx(2 / 3)
    assert b["question only"]["overall"]["accuracy"] == pytest.approx(2 / 3)
    assert b["majority per kind"]["overall"]["accuracy"] == pytest.approx(2 / 3)
