"""Registration QA: the Jacobian, inverse consistency, propagated contours and landmark TRE against hand-computed
values on small synthetic grids, the field's sign convention, the landmark readers, and the verdict on good and
deliberately bad registrations (folded, wrong pair, over-smooth)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS
from PRISMRTLib import metrics
from PRISMRTLib.errors import GeometryError, InvalidImageError, PrismRTError
from PRISMRTLib.imaging import Geometry
from PRISMRTLib.registration import qa


# ---- synthetic grids ------------------------------------------------------------------------------------------------
def grid(size=(20, 18, 14), spacing=(2.0, 2.5, 3.0), direction=np.eye(3), origin=(-20.0, -25.0, -20.0)):
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    ref.SetDirection(np.asarray(direction, float).ravel().tolist())
    return ref


def points_of(ref) -> np.ndarray:
    """LPS point of every voxel, (k, j, i, 3)."""
    g = Geometry.from_image(ref)
    kji = np.meshgrid(*[np.arange(n) for n in g.size[::-1]], indexing="ij")
    return g.index_to_physical(np.stack(kji[::-1], axis=-1).astype(float))


def field_from(fn, ref) -> sitk.Image:
    """The displacement field u(p) = fn(p) on ref's grid."""
    f = sitk.GetImageFromArray(np.asarray(fn(points_of(ref)), float), isVector=True)
    f.CopyInformation(ref)
    return f


def centre(ref) -> np.ndarray:
    g = Geometry.from_image(ref)
    return g.index_to_physical((np.array(g.size) - 1) / 2.0)


def box(ref, lo, hi) -> sitk.Image:
    """Mask of the voxels whose LPS point lies in the box [lo, hi] (mm)."""
    p = points_of(ref)
    inside = np.all((p >= np.asarray(lo)) & (p <= np.asarray(hi)), axis=-1)
    m = sitk.GetImageFromArray(inside.astype(np.uint8))
    m.CopyInformation(ref)
    return m


def ct(ref, shift=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A CT-like phantom: an ellipsoid of soft tissue in air with a bright block, moved by ``shift`` (mm)."""
    p = points_of(ref) - centre(ref) - np.asarray(shift)
    values = np.full(p.shape[:3], -1000.0)
    values[((p / [16.0, 18.0, 16.0]) ** 2).sum(-1) <= 1] = 40.0
    values[np.all(np.abs(p - [3.0, 2.0, 0.0]) <= [5.0, 4.0, 6.0], axis=-1)] = 400.0
    image = sitk.GetImageFromArray(values.astype(np.int16))
    image.CopyInformation(ref)
    return image


def affine_field(ref, a, t=(0.0, 0.0, 0.0)):
    """u(p) = (A - I)(p - c) + t: p_moving = A (p - c) + c + t."""
    c, a = centre(ref), np.asarray(a, float)
    return field_from(lambda p: (p - c) @ (a - np.eye(3)).T + np.asarray(t), ref)


A = np.array([[1.08, 0.04, -0.02], [0.03, 0.93, 0.06], [-0.01, -0.05, 1.15]])


# ---- Jacobian -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_jacobian_of_an_affine_field_is_det_a_everywhere(name):
    ref = grid(direction=DIRECTIONS[name])
    det = sitk.GetArrayFromImage(qa.jacobian_determinant(affine_field(ref, A, (3.0, -2.0, 1.0)), chunk_voxels=500))
    assert np.allclose(det, np.linalg.det(A), atol=1e-5)  # chunked (500 voxels: one slab at a time) and at the edges


def test_jacobian_respects_the_direction_matrix_where_simpleitk_does_not():
    # u_z = 0.1 z: det 1.1 whatever way the grid is stored; on direction diag(1, 1, -1) SimpleITK's filter says < 1
    ref = grid(direction=np.diag([1.0, 1.0, -1.0]))
    field = field_from(lambda p: np.stack([0 * p[..., 0], 0 * p[..., 0], 0.1 * p[..., 2]], -1), ref)
    assert np.allclose(sitk.GetArrayFromImage(qa.jacobian_determinant(field)), 1.1, atol=1e-6)
    assert sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field)).max() < 1.0


def test_jacobian_matches_simpleitk_inside_an_identity_direction_grid():
    ref = grid()
    field = field_from(lambda p: np.stack([2 * np.sin(p[..., 1] / 7), np.cos(p[..., 0] / 5) * p[..., 2] / 10,
                                           0.01 * p[..., 0] ** 2], -1), ref)
    ours = sitk.GetArrayFromImage(qa.jacobian_determinant(field))
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    assert np.abs(ours - theirs)[1:-1, 1:-1, 1:-1].max() < 1e-5
    assert ours.std() > 0.02  # the field is far from rigid: the comparison means something


def test_jacobian_stats_are_the_definitions_inside_the_mask():
    ref = grid(size=(4, 3, 2))
    values = np.array([-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.8, 1.2, 1.1, 0.9] * 2, np.float32).reshape(2, 3, 4)
    jac = sitk.GetImageFromArray(values)
    jac.CopyInformation(ref)
    s = qa.jacobian_stats(jac)
    assert (s.voxels, s.folding_voxels) == (24, 4)
    assert s.folding_percent == pytest.approx(100 * 4 / 24)
    assert (s.min, s.max) == (-0.5, 4.0)
    assert s.mean == pytest.approx(values.mean())
    assert s.sdlogj == pytest.approx(np.log(np.maximum(values, 1e-9)).std(), rel=1e-6)
    assert s.sdlogj_learn2reg == pytest.approx(np.log(values + 3.0).std(), rel=1e-6)
    assert s.min_at_lps == pytest.approx(list(Geometry.from_image(ref).index_to_physical([0, 0, 0])), abs=0.01)
    mask = sitk.GetImageFromArray((values >= 1.0).astype(np.uint8))
    mask.CopyInformation(ref)
    m = qa.jacobian_stats(jac, mask, region="body")
    assert (m.region, m.voxels, m.folding_voxels, m.min, m.max) == ("body", 14, 0, 1.0, 4.0)


def _folding_field(ref, strength=2.5):
    """A local compression so strong (du_x/dx = -strength at the centre) that det < 0 there."""
    c = centre(ref)

    def fn(p):
        bump = np.exp(-((p - c) ** 2).sum(-1) / (2 * 6.0 ** 2))
        u = np.zeros(p.shape)
        u[..., 0] = -strength * (p[..., 0] - c[0]) * bump
        return u

    return field_from(fn, ref)


def test_a_folding_field_fails_and_says_folding():
    ref = grid(size=(24, 24, 16))
    report = qa.registration_qa(_folding_field(ref))
    assert report.jacobian.folding_voxels > 0 and report.jacobian.min < 0
    assert report.verdict == "FAIL"
    assert any("fold" in r.lower() for r in report.reasons)
    fold = next(c for c in report.checks if c.name.startswith("folding"))
    assert fold.status == "fail" and "TG-132" in fold.source
    # the tolerance in use decides: one lenient enough lets this folding pass (and says so)
    lenient = qa.Tolerances(max_folding_percent=100.0, jacobian_range=(-10.0, 10.0))
    assert qa.registration_qa(_folding_field(ref), tolerances=lenient).verdict == "PASS"


# ---- whole verdicts -------------------------------------------------------------------------------------------------
def test_an_identity_registration_of_identical_images_passes():
    ref = grid()
    image = ct(ref)
    zero = affine_field(ref, np.eye(3))
    structures = {"block": box(ref, [-2, -2, -6], [8, 6, 6]), "body": sitk.Cast(image > -500, sitk.sitkUInt8)}
    points = centre(ref) + np.array([[0, 0, 0], [5, -4, 3], [-6, 5, -3.0]])
    report = qa.registration_qa(zero, fixed=image, mask=structures["body"], backward_field=zero,
                                fixed_structures=structures, moving_structures=dict(structures),
                                fixed_landmarks=points, moving_landmarks=points)
    assert report.verdict == "PASS", report.reasons
    assert report.reasons == [] and report.not_checked == []
    assert all(c.dice == 1.0 and c.mda_mm == 0.0 for c in report.contours)
    assert report.landmarks.max_mm == pytest.approx(0.0, abs=1e-9)
    assert report.inverse_consistency.max_mm == pytest.approx(0.0, abs=1e-9)
    assert report.jacobian.folding_voxels == 0 and report.jacobian.min == pytest.approx(1.0)


def test_checks_that_could_not_run_are_listed_not_passed():
    report = qa.registration_qa(affine_field(grid(), np.eye(3)))
    assert report.verdict == "PASS"  # the Jacobian, the only check that ran, passes
    assert len(report.not_checked) == 3
    assert {c.group for c in report.checks if c.status == "not checked"} == {"Inverse consistency", "Contours",
                                                                            "Landmarks"}
    assert "not checked: 3" in report.summary


def test_a_wrong_pair_fails_on_dice_with_the_reason():
    ref = grid()
    fixed = {"Parotid_L": box(ref, [-15, -15, -12], [-5, -5, -3])}
    moving = {"Parotid_L": box(ref, [5, 5, 3], [15, 15, 12])}  # nowhere near: another patient's anatomy
    report = qa.registration_qa(affine_field(ref, np.eye(3)), fixed_structures=fixed, moving_structures=moving)
    assert report.verdict == "FAIL"
    assert report.contours[0].dice == 0.0
    dice_reason = next(r for r in report.reasons if "Dice" in r)
    assert "Parotid_L" in dice_reason and "0.000" in dice_reason


def test_an_over_smooth_registration_fails_on_tre_and_dice_where_the_right_one_passes():
    ref = grid(size=(24, 22, 16))
    shift = np.array([6.0, -5.0, 6.0])  # the moving anatomy sits here relative to the fixed (mm)
    fixed_block = box(ref, [-4, -4, -6], [6, 4, 6])
    moving_block = box(ref, np.array([-4, -4, -6]) + shift, np.array([6, 4, 6]) + shift)
    f_pts = centre(ref) + np.array([[0, 0, 0], [5, -3, 4], [-4, 4, -3.0]])
    kwargs = dict(fixed_structures={"block": fixed_block}, moving_structures={"block": moving_block},
                  fixed_landmarks=f_pts, moving_landmarks=f_pts + shift)
    flat = qa.registration_qa(affine_field(ref, np.eye(3)), **kwargs)  # no deformation where one was needed
    assert flat.verdict == "FAIL"
    failed = {c.name for c in flat.checks if c.status == "fail"}
    assert {"mean TRE", "max TRE", "block: Dice"} <= failed
    assert flat.landmarks.mean_mm == pytest.approx(np.linalg.norm(shift))
    right = qa.registration_qa(affine_field(ref, np.eye(3), shift), **kwargs)
    assert right.verdict == "PASS", right.reasons
    assert right.contours[0].dice == pytest.approx(1.0)


# ---- TRE and the sign convention ------------------------------------------------------------------------------------
def test_tre_is_the_analytic_value_and_the_convention_is_p_plus_u():
    ref = grid(direction=DIRECTIONS["oblique"])
    t = np.array([4.0, -3.0, 2.0])
    field = affine_field(ref, A, t)
    c = centre(ref)
    f = c + np.array([[0.0, 0, 0], [4, 3, -2], [-5, 2, 6], [3, -6, -4]])
    errors = np.array([[0.0, 0, 0], [1.0, 0, 0], [0, -2.0, 0], [1.0, 2.0, -2.0]])
    m = (f - c) @ A.T + c + t + errors  # where u sends f, plus a known error
    tre = qa.landmark_tre(field, f, m, ["a", "b", "c", "d"])
    assert [r.tre_mm for r in tre.landmarks] == pytest.approx(np.linalg.norm(errors, axis=1), abs=1e-6)
    assert tre.mean_mm == pytest.approx(np.linalg.norm(errors, axis=1).mean(), abs=1e-6)
    assert tre.max_mm == pytest.approx(3.0, abs=1e-6)
    # were u applied as p - u the landmarks would land at f - u(f): TRE 2|u(f) + ...|, far from these values
    flipped = np.linalg.norm(f - ((f - c) @ (A - np.eye(3)).T + t) - m, axis=1)
    assert flipped.min() > 5.0


def test_a_moving_contour_is_carried_to_the_fixed_frame_by_p_plus_u():
    ref = grid()
    t = np.array([6.0, 5.0, 6.0])
    fixed = box(ref, [-6, -6, -6], [4, 4, 6])
    moving = box(ref, np.array([-6, -6, -6]) + t, np.array([4, 4, 6]) + t)  # the same structure at p + t
    (right,), _ = qa.contour_agreement({"s": fixed}, {"s": moving}, affine_field(ref, np.eye(3), t))
    (wrong,), _ = qa.contour_agreement({"s": fixed}, {"s": moving}, affine_field(ref, np.eye(3), -t))
    assert right.dice == pytest.approx(1.0) and right.mda_mm == 0.0
    assert wrong.dice < 0.1


def test_landmarks_outside_the_fixed_image_get_a_clear_error():
    ref = grid()
    inside = centre(ref)
    with pytest.raises(GeometryError, match="RAS or LPS"):
        qa.landmark_tre(affine_field(ref, np.eye(3)), [inside + [500, 0, 0]], [inside])


def test_qa_leaves_the_callers_field_intact():
    # DisplacementFieldTransform empties the image it is given: the QA must hand it a copy
    ref = grid()
    field = affine_field(ref, A, (1.0, 2.0, 3.0))
    before = sitk.GetArrayFromImage(field)
    s = {"s": box(ref, [-6, -6, -6], [4, 4, 6])}
    qa.registration_qa(field, backward_field=field, fixed_structures=s, moving_structures=s,
                       fixed_landmarks=[centre(ref)], moving_landmarks=[centre(ref)])
    assert field.GetSize() == ref.GetSize()
    assert np.array_equal(sitk.GetArrayFromImage(field), before)


# ---- inverse consistency --------------------------------------------------------------------------------------------
def test_inverse_consistency_of_an_exact_inverse_is_zero_and_of_the_field_itself_is_not():
    fixed_grid, moving_grid = grid(), grid(size=(40, 36, 32), origin=(-40.0, -45.0, -50.0))
    t = np.array([3.0, -2.0, 4.0])
    c = centre(fixed_grid)
    forward = affine_field(fixed_grid, A, t)  # phi(p) = A (p - c) + c + t
    a_inv = np.linalg.inv(A)
    backward = field_from(lambda q: (q - c - t) @ a_inv.T + c - q, moving_grid)  # phi^-1(q) - q
    exact = qa.inverse_consistency(forward, backward)
    assert exact.max_mm < 1e-6 and exact.outside_percent == 0.0
    shift = affine_field(fixed_grid, np.eye(3), t)
    twice = qa.inverse_consistency(shift, shift)  # a translation composed with itself: 2t, not 0
    assert twice.mean_mm == pytest.approx(2 * np.linalg.norm(t), rel=1e-6)
    report = qa.registration_qa(shift, backward_field=shift)
    assert report.verdict == "FAIL" and any("Inverse consistency" in r for r in report.reasons)


# ---- contour metrics ------------------------------------------------------------------------------------------------
def test_contour_metrics_on_a_hand_computed_case_and_the_metrics_module():
    a, b = np.zeros((3, 3, 8), bool), np.zeros((3, 3, 8), bool)
    a[1, 1, 1], b[1, 1, 4] = True, True  # single voxels 3 columns apart at 2 mm: every distance is 6 mm
    r = qa.compare_masks(a, b, (3.0, 2.5, 2.0))
    assert (r.dice, r.mda_mm, r.hd95_mm) == (0.0, pytest.approx(6.0), pytest.approx(6.0))
    rng = np.random.default_rng(0)
    x = np.zeros((20, 22, 24), bool)
    x[4:15, 5:17, 3:20] = True
    y = np.roll(x, 2, axis=2) & (rng.random(x.shape) > 0.05)
    r = qa.compare_masks(x, y, (2.5, 1.0, 1.5))
    assert r.hd95_mm == pytest.approx(metrics.hd95(x, y, (2.5, 1.0, 1.5)))  # cropping changes nothing
    d_xy, d_yx = metrics.surface_distances(x, y, (2.5, 1.0, 1.5))
    assert r.mda_mm == pytest.approx(np.concatenate([d_xy, d_yx]).mean())
    assert r.dice == pytest.approx(metrics.dice(x, y))


def test_a_contour_warped_out_of_the_image_fails_and_json_has_no_infinity():
    ref = grid()
    s = {"s": box(ref, [-6, -6, -6], [4, 4, 6])}
    report = qa.registration_qa(affine_field(ref, np.eye(3), (300.0, 0, 0)), fixed_structures=s,
                                moving_structures=s)
    assert report.contours[0].warped_cc == 0 and report.contours[0].mda_mm == float("inf")
    assert any("empty" in r for r in report.reasons)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["contours"][0]["mda_mm"] is None and data["verdict"] == "FAIL"


def test_structures_present_on_one_side_only_are_not_checked():
    ref = grid()
    block = box(ref, [-6, -6, -6], [4, 4, 6])
    report = qa.registration_qa(affine_field(ref, np.eye(3)), fixed_structures={"a": block, "b": block},
                                moving_structures={"a": block, "c": block})
    assert [c.name for c in report.contours] == ["a"]
    assert any("'b'" in t and "fixed" in t for t in report.not_checked)
    assert any("'c'" in t and "moving" in t for t in report.not_checked)


# ---- inputs ---------------------------------------------------------------------------------------------------------
def test_bad_fields_get_clear_errors():
    ref = grid()
    with pytest.raises(InvalidImageError, match="3-vectors"):
        qa.registration_qa(sitk.Image([5, 5, 5], sitk.sitkFloat32))
    nan = affine_field(ref, np.eye(3))
    arr = sitk.GetArrayFromImage(nan)
    arr[2, 2, 2, 0] = np.nan
    bad = sitk.GetImageFromArray(arr, isVector=True)
    bad.CopyInformation(ref)
    with pytest.raises(InvalidImageError, match="NaN"):
        qa.registration_qa(bad)
    with pytest.raises(GeometryError, match="fixed image's grid"):
        qa.registration_qa(affine_field(ref, np.eye(3)), fixed=ct(grid(spacing=(2.0, 2.0, 2.0))))
    float32 = sitk.Cast(affine_field(ref, A), sitk.sitkVectorFloat32)  # accepted, as float64
    assert qa.registration_qa(float32).jacobian.mean == pytest.approx(np.linalg.det(A), rel=1e-5)


# ---- landmark files -------------------------------------------------------------------------------------------------
POINTS_LPS = np.array([[10.5, -20.0, 30.25], [-4.0, 5.0, -6.0], [0.0, 0.0, 1.0]])


def _markups(system, points, units=None, status=None):
    markup = {"type": "Fiducial", "controlPoints": [
        {"id": str(i + 1), "label": f"F-{i + 1}", "position": list(map(float, p)),
         **({"positionStatus": status} if status and i == 1 else {})} for i, p in enumerate(points)]}
    if system:
        markup["coordinateSystem"] = system
    if units:
        markup["coordinateUnits"] = units
    return json.dumps({"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                                  "Resources/Schema/markups-schema-v1.0.3.json#", "markups": [markup]})


def test_markups_json_in_ras_lps_and_the_schema_default(tmp_path):
    ras = POINTS_LPS * [-1, -1, 1]
    (tmp_path / "ras.mrk.json").write_text(_markups("RAS", ras))
    (tmp_path / "lps.mrk.json").write_text(_markups("LPS", POINTS_LPS))
    (tmp_path / "default.mrk.json").write_text(_markups(None, POINTS_LPS))  # the schema's default is LPS
    (tmp_path / "um.mrk.json").write_text(_markups("LPS", POINTS_LPS * 1000, units="um"))
    for name in ("ras", "lps", "default", "um"):
        marks = qa.read_landmarks(tmp_path / f"{name}.mrk.json")
        assert np.allclose(marks.points, POINTS_LPS), name
        assert marks.labels == ["F-1", "F-2", "F-3"]
    assert qa.read_landmarks(tmp_path / "ras.mrk.json").coordinate_system == "RAS"
    (tmp_path / "undefined.mrk.json").write_text(_markups("LPS", POINTS_LPS, status="undefined"))
    with pytest.raises(PrismRTError, match="F-2.*no defined position"):
        qa.read_landmarks(tmp_path / "undefined.mrk.json")
    (tmp_path / "broken.mrk.json").write_text("{not json")
    with pytest.raises(PrismRTError, match="not valid JSON"):
        qa.read_landmarks(tmp_path / "broken.mrk.json")


FCSV = """# Markups fiducial file version = 4.11
# CoordinateSystem = {system}
# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID
{rows}"""


def _fcsv_rows(points):
    return "\n".join(f"vtkMRMLMarkupsFiducialNode_{i},{p[0]},{p[1]},{p[2]},0,0,0,1,1,1,0,P{i + 1},,"
                     for i, p in enumerate(points))


def test_fcsv_in_ras_lps_and_the_numeric_codes(tmp_path):
    ras = POINTS_LPS * [-1, -1, 1]
    for name, system, points in (("ras", "RAS", ras), ("zero", "0", ras), ("lps", "LPS", POINTS_LPS),
                                 ("one", "1", POINTS_LPS)):
        (tmp_path / f"{name}.fcsv").write_text(FCSV.format(system=system, rows=_fcsv_rows(points)))
        marks = qa.read_landmarks(tmp_path / f"{name}.fcsv")
        assert np.allclose(marks.points, POINTS_LPS), name
        assert marks.labels == ["P1", "P2", "P3"]
    # no CoordinateSystem line: RAS, as Slicer wrote fcsv files before 4.11
    (tmp_path / "old.fcsv").write_text("# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                                       + _fcsv_rows(ras))
    assert np.allclose(qa.read_landmarks(tmp_path / "old.fcsv").points, POINTS_LPS)
    (tmp_path / "bad.fcsv").write_text(FCSV.format(system="LPS", rows="a,1,two,3,0,0,0,1,1,1,0,P1,,"))
    with pytest.raises(PrismRTError, match="point 1"):
        qa.read_landmarks(tmp_path / "bad.fcsv")


def test_csv_of_lps_points_with_or_without_a_header_and_labels(tmp_path):
    plain = "\n".join(",".join(map(str, p)) for p in POINTS_LPS)
    (tmp_path / "plain.csv").write_text(plain + "\n")
    (tmp_path / "header.csv").write_text("label,x,y,z\n" + "\n".join(
        f"L{i},{p[0]},{p[1]},{p[2]}" for i, p in enumerate(POINTS_LPS)))
    (tmp_path / "labelled.csv").write_text("\n".join(f"L{i},{p[0]},{p[1]},{p[2]}" for i, p in enumerate(POINTS_LPS)))
    for name in ("plain", "header", "labelled"):
        marks = qa.read_landmarks(tmp_path / f"{name}.csv")
        assert np.allclose(marks.points, POINTS_LPS), name
    assert qa.read_landmarks(tmp_path / "plain.csv").labels == ["1", "2", "3"]
    assert qa.read_landmarks(tmp_path / "header.csv").labels == ["L0", "L1", "L2"]
    assert qa.read_landmarks(tmp_path / "labelled.csv").labels == ["L0", "L1", "L2"]
    (tmp_path / "five.csv").write_text("1,2,3,4,5\n")
    with pytest.raises(PrismRTError, match="expected 3 columns"):
        qa.read_landmarks(tmp_path / "five.csv")
    (tmp_path / "text.csv").write_text("1,2,3\n4,five,6\n")
    with pytest.raises(PrismRTError, match="row 2"):
        qa.read_landmarks(tmp_path / "text.csv")
    (tmp_path / "points.xyz").write_text(plain)
    with pytest.raises(PrismRTError, match="unknown format"):
        qa.read_landmarks(tmp_path / "points.xyz")
    with pytest.raises(PrismRTError, match="no such file"):
        qa.read_landmarks(tmp_path / "missing.csv")


def test_landmarks_pair_by_label_else_by_order():
    f = qa.Landmarks(POINTS_LPS, ["a", "b", "c"])
    m = qa.Landmarks(POINTS_LPS[[2, 0, 1]] + 1.0, ["c", "a", "b"])
    fp, mp, labels = qa.pair_landmarks(f, m)
    assert labels == ["a", "b", "c"] and np.allclose(mp, POINTS_LPS + 1.0)
    fp, mp, labels = qa.pair_landmarks(f, qa.Landmarks(POINTS_LPS, ["1", "2", "3"]))  # labels differ: by order
    assert np.allclose(mp, POINTS_LPS) and labels[0] == "a / 1"
    with pytest.raises(PrismRTError, match="3 landmarks.*2"):
        qa.pair_landmarks(f, qa.Landmarks(POINTS_LPS[:2], ["x", "y"]))


def test_registration_qa_reads_landmark_files(tmp_path):
    ref = grid()
    t = np.array([2.0, -1.0, 3.0])
    f = centre(ref) + np.array([[0.0, 0, 0], [4, 3, -2], [-5, 2, 6]])
    (tmp_path / "fixed.mrk.json").write_text(_markups("RAS", f * [-1, -1, 1]))
    (tmp_path / "moving.csv").write_text("label,x,y,z\n" + "\n".join(
        f"F-{i + 1},{p[0]},{p[1]},{p[2]}" for i, p in enumerate(f + t)))
    report = qa.registration_qa(affine_field(ref, np.eye(3), t), fixed_landmarks=tmp_path / "fixed.mrk.json",
                                moving_landmarks=tmp_path / "moving.csv")
    assert report.landmarks.max_mm == pytest.approx(0.0, abs=1e-9)
    assert report.landmarks.mean_before_mm == pytest.approx(np.linalg.norm(t))


# ---- the report files -----------------------------------------------------------------------------------------------
def test_the_report_files_are_written_and_say_the_verdict(tmp_path):
    pytest.importorskip("matplotlib")
    from PRISMRTLib.registration.qa_report import write_qa_report

    ref = grid(size=(28, 26, 18))
    fixed, moving = ct(ref), ct(ref, shift=(4.0, 0.0, 0.0))
    body = sitk.Cast(fixed > -500, sitk.sitkUInt8)
    field = _folding_field(ref)
    report = qa.registration_qa(field, fixed=fixed, mask=body, mask_name="body",
                                fixed_structures={"block": box(ref, [-2, -2, -6], [8, 6, 6])},
                                moving_structures={"block": box(ref, [2, -2, -6], [12, 6, 6])},
                                inputs={"fixed": "phantom.nii.gz", "method": "synthetic"})
    paths = write_qa_report(report, tmp_path / "qa", fixed=fixed, field=field, moving=moving, mask=body)
    for name in ("qa.json", "qa.md", "checkerboard.png", "difference.png", "jacobian.png"):
        assert paths[name].is_file() and paths[name].stat().st_size > 0, name
    for name in ("checkerboard.png", "difference.png", "jacobian.png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["qa.md"].read_text()
    assert md.index("Verdict: **FAIL**") < md.index("## Inputs")  # the verdict comes first
    assert "fold" in md.lower() and "phantom.nii.gz" in md and "TG-132" in md and "not checked" in md
    data = json.loads(paths["qa.json"].read_text())
    assert data["verdict"] == "FAIL" and data["jacobian"]["folding_voxels"] > 0
    with pytest.raises(PrismRTError, match="already exists"):
        write_qa_report(report, tmp_path / "qa", fixed=fixed, field=field, moving=moving)
    write_qa_report(report, tmp_path / "qa", fixed=fixed, field=field, moving=moving, overwrite=True)


def test_a_label_map_splits_into_named_masks():
    ref = grid(size=(6, 5, 4))
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 1, 1], labels[2, 2, 2:4] = 1, 3
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ref)
    masks = qa.masks_from_labels(image, {1: "GTV", 3: "Cord", 7: "absent"})
    assert [int(sitk.GetArrayFromImage(masks[n]).sum()) for n in ("GTV", "Cord", "absent")] == [1, 2, 0]
