"""Registration from the Slicer module's logic against slicer-core (PRISMRTModule.registration).

The pair is real: a crop of OpenKBP pt_201's CT as the fixed volume, and the same CT moved by a known rigid motion M
(5 degrees about the crop's centre, then 7, -5, 4 mm in LPS) and resampled onto another grid (6 x 6 x 3.5 mm, its
own origin) as the moving volume, with real structures (PTV70, Mandible, Larynx) carried the same way. So a point p
of the fixed image is at M(p) in the moving one, and the result's grid transform must map p (in RAS) to M(p) (in
RAS): a sign, an axis or a direction (FromParent vs ToParent) mistake moves points by about twice the motion (10 mm
and more), far beyond the tolerances here. The field's conversion itself is checked exactly, on a random field with
an oblique grid and against Slicer's own reader of ITK transform files.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from prismrt_testing import REPO, SHARED_DATA, rotation, slicer_core_or_skip

slicer = slicer_core_or_skip()
sitk = pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")

import vtk  # noqa: E402  (comes with slicer-core)

from PRISMRTLib.errors import PrismRTError  # noqa: E402
from PRISMRTLib.registration.alignment import body_mask  # noqa: E402
from PRISMRTLib.registration.convex_adam import ConvexAdamSettings  # noqa: E402
from PRISMRTLib.registration.field import field_to_transform, write_transform  # noqa: E402
from PRISMRTLib.registration.qa import jacobian_determinant  # noqa: E402
from PRISMRTModule import conversions, registration  # noqa: E402
from PRISMRTModule.parameters import PRISMRTParameters  # noqa: E402
from PRISMRTModule.registration import (  # noqa: E402
    METHODS,
    QA_COLUMNS,
    RegistrationController,
    RegistrationLogic,
    RegistrationOutputs,
    RegistrationParameters,
    fieldToGridTransform,
    gridTransformToField,
    smoothnessHint,
)

PATIENT = SHARED_DATA / "openkbp" / "validation-pats" / "pt_201"
STRUCTURES = ("PTV70", "Mandible", "Larynx")
FLIP = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS
FAST = ConvexAdamSettings(grid_spacing=3, search_radius=3, adam_grid_spacing=2, iterations=40)
# a quick run for the plumbing (the controller's tests): no alignment, a coarse grid, few iterations; not accurate
QUICK = dict(alignment="none", settings=ConvexAdamSettings(grid_spacing=3, search_radius=2, iterations=5),
             working_spacing=8.0, device="cpu")

pytestmark = pytest.mark.skipif(not (PATIENT / "ct.nii.gz").is_file(),
                                reason=f"the OpenKBP CT is not in {PATIENT} (../shared/data)")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the pair ---------------------------------------------------------------------------------------------------
class Pair:
    """The real CT pair with a known motion, as images (LPS) and as nodes of one scene."""

    def __init__(self):
        ct = sitk.ReadImage(str(PATIENT / "ct.nii.gz"))  # 128^3, 5.4 x 5.4 x 3 mm, direction diag(1, 1, -1)
        self.fixed = ct[20:112, 36:90, 44:84]  # 92 x 54 x 40 voxels: the whole neck in-plane
        centre = self.fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in self.fixed.GetSize()])
        self.motion = sitk.Euler3DTransform()
        self.motion.SetCenter(centre)
        self.motion.SetRotation(0.0, 0.0, np.radians(5.0))
        self.motion.SetTranslation((7.0, -5.0, 4.0))
        size, spacing = np.array([84, 52, 52]), np.array([6.0, 6.0, 3.5])
        direction = np.array(self.fixed.GetDirection()).reshape(3, 3)
        grid = sitk.Image([int(n) for n in size], sitk.sitkInt16)
        grid.SetSpacing(tuple(float(s) for s in spacing))
        grid.SetDirection(self.fixed.GetDirection())
        grid.SetOrigin(tuple(np.array(centre) + (3.0, -2.0, 1.5) - direction @ (spacing * (size - 1) / 2)))
        # moving(q) = ct(M^-1(q)): the anatomy at p in the fixed image is at M(p) in the moving one
        inverse = self.motion.GetInverse()
        self.moving = sitk.Resample(ct, grid, inverse, sitk.sitkLinear, -1024.0, sitk.sitkInt16)
        self.fixedMasks, self.movingMasks = {}, {}
        for name in STRUCTURES:
            mask = sitk.ReadImage(str(PATIENT / f"{name}.nii.gz"))
            self.fixedMasks[name] = sitk.Resample(mask, self.fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                  sitk.sitkUInt8)
            self.movingMasks[name] = sitk.Resample(mask, grid, inverse, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        self.body = sitk.GetArrayFromImage(sitk.BinaryErode(body_mask(self.fixed), [2, 2, 2])) > 0

    def nodes(self, scene):
        fixed = conversions.imageToVolumeNode(self.fixed, "planning CT", scene=scene)
        moving = conversions.imageToVolumeNode(self.moving, "CT week 3", scene=scene)
        segmentations = []
        for name, masks in (("planning structures", self.fixedMasks), ("week 3 structures", self.movingMasks)):
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            node.CreateDefaultDisplayNodes()
            for index, (structure, mask) in enumerate(masks.items()):
                conversions.maskToSegment(mask, node, structure, (0.2 * index, 0.5, 1.0 - 0.2 * index))
            segmentations.append(node)
        return fixed, moving, segmentations[0], segmentations[1]

    def bodyPoints(self, step=23):
        """LPS points of fixed voxels well inside the body, and their known moving points M(p)."""
        points = np.array([self.fixed.TransformIndexToPhysicalPoint(tuple(int(v) for v in kji[::-1]))
                           for kji in np.argwhere(self.body)[::step]])
        return points, np.array([self.motion.TransformPoint(tuple(p)) for p in points])


@pytest.fixture(scope="module")
def pair():
    return Pair()


@pytest.fixture(scope="module")
def run(pair):
    """One registration through the logic, in its own scene (kept for the module): (scene, nodes, outputs,
    progress seen, seconds)."""
    scene = slicer.vtkMRMLScene()
    fixed, moving, fixedSegmentation, movingSegmentation = pair.nodes(scene)
    logic = RegistrationLogic()
    seen = []
    begin = time.perf_counter()
    outputs = logic.run(fixed, moving, fixedSegmentation=fixedSegmentation, movingSegmentation=movingSegmentation,
                        progress=lambda fraction, text: seen.append((fraction, text)), alignment="rigid",
                        settings=FAST, working_spacing=5.0, device="cpu")
    yield scene, (fixed, moving, fixedSegmentation, movingSegmentation), outputs, logic, seen, \
        time.perf_counter() - begin
    scene.Clear(1)


def _ijk_to_ras(volume) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _from_parent(transform_node, points_lps) -> np.ndarray:
    """The transform node's FromParent (what Slicer resamples with) at LPS points, back in LPS."""
    transform = transform_node.GetTransformFromParent()
    return np.array([np.array(transform.TransformPoint(tuple(FLIP * p))) * FLIP for p in points_lps])


def _dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def _table_rows(table_node) -> list[dict]:
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [{name: table.GetValue(r, c).ToString() for c, name in enumerate(names)}
            for r in range(table.GetNumberOfRows())]


# ---- the field as a Slicer transform, exactly ---------------------------------------------------------------------
def _random_field(direction, size=(9, 7, 6), spacing=(2.0, 3.0, 4.0), origin=(10.0, -20.0, 30.0), seed=0):
    reference = sitk.Image(list(size), sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    reference.SetOrigin(origin)
    reference.SetDirection(tuple(np.asarray(direction, float).ravel()))
    rng = np.random.default_rng(seed)
    field = sitk.GetImageFromArray(rng.normal(scale=3.0, size=tuple(size)[::-1] + (3,)), isVector=True)
    field.CopyInformation(reference)
    return field


@pytest.mark.parametrize("direction", [np.diag([1.0, 1.0, -1.0]),
                                       rotation(2, 12.0) @ rotation(0, -7.0) @ np.diag([1.0, 1.0, -1.0])],
                         ids=["openkbp", "oblique"])
def test_the_grid_transform_maps_fixed_ras_points_as_the_itk_field_maps_lps_points(direction):
    field = _random_field(direction)
    transform = fieldToGridTransform(field)
    itk = field_to_transform(field)
    rng = np.random.default_rng(1)
    size = np.array(field.GetSize())
    indices = [tuple(int(v) for v in rng.integers(0, size)) for _ in range(20)]  # voxel centres
    continuous = [tuple(float(v) for v in rng.uniform(0, size - 1)) for _ in range(40)]  # between them
    points = [field.TransformIndexToPhysicalPoint(i) for i in indices] + \
        [field.TransformContinuousIndexToPhysicalPoint(c) for c in continuous]
    for p in points:
        expected = np.array(itk.TransformPoint(p))  # p + u(p), LPS
        got = np.array(transform.TransformPoint(tuple(FLIP * np.array(p)))) * FLIP
        np.testing.assert_allclose(got, expected, atol=1e-4)  # VTK interpolates in float: 2e-5 mm seen
    # and back: the node's field is the field
    node = slicer.vtkMRMLScene().AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformFromParent(transform)
    back = gridTransformToField(node)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), field.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(back.GetSpacing(), field.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), field.GetDirection(), atol=1e-12)


def test_the_grid_transform_is_what_slicer_reads_from_the_transform_file(tmp_path, scene):
    """Slicer's own reader of ITK displacement-field files (vtkMRMLTransformStorageNode, as File > Add Data loads
    PRISMRTLib's transform.h5) gives the same grid, geometry and mapping: the conventions are Slicer's."""
    field = _random_field(rotation(1, 9.0) @ np.diag([1.0, 1.0, -1.0]), seed=3)
    path = write_transform(field, tmp_path / "transform.h5")
    read = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "read")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(read)
    ours = RegistrationLogic().addGridTransform(field, *_two_volumes(scene))
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(ours), slicer.util.arrayFromGridTransform(read),
                               atol=1e-9)
    a, b = ours.GetTransformFromParent(), read.GetTransformFromParent()
    for name in ("GetOrigin", "GetSpacing", "GetDimensions"):
        np.testing.assert_allclose(getattr(a.GetDisplacementGrid(), name)(), getattr(b.GetDisplacementGrid(), name)(),
                                   atol=1e-9)
    ma, mb = a.GetGridDirectionMatrix(), b.GetGridDirectionMatrix()
    np.testing.assert_allclose([[ma.GetElement(r, c) for c in range(3)] for r in range(3)],
                               [[mb.GetElement(r, c) for c in range(3)] for r in range(3)], atol=1e-12)
    assert not b.GetInverseFlag()  # the file's transform is the FromParent (resampling) one, as ours
    for index in [(0, 0, 0), (4, 3, 2), (8, 6, 5)]:  # at grid nodes (Slicer's reader interpolates cubically)
        p = FLIP * np.array(field.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(a.TransformPoint(tuple(p)), b.TransformPoint(tuple(p)), atol=1e-6)


def _two_volumes(scene):
    image = sitk.Image([4, 4, 4], sitk.sitkInt16)
    return (conversions.imageToVolumeNode(image, "fixed", scene=scene),
            conversions.imageToVolumeNode(image, "moving", scene=scene))


# ---- a real registration through the logic ------------------------------------------------------------------------
def test_the_grid_transform_maps_a_fixed_point_to_its_known_moving_point(pair, run):
    scene, (fixed, moving, *_), outputs, _, _, _ = run
    transform = outputs.transformNode
    assert transform.IsA("vtkMRMLGridTransformNode")
    assert transform.GetNodeReference(registration.FIXED_ROLE) is fixed
    assert transform.GetNodeReference(registration.MOVING_ROLE) is moving
    points, truth = pair.bodyPoints()
    moved = np.linalg.norm(truth - points, axis=1)
    assert moved.mean() > 8.0  # the motion is large enough that a sign or axis error cannot hide
    error = np.linalg.norm(_from_parent(transform, points) - truth, axis=1)
    # measured: median 0.5 mm, 90th percentile 1.0 mm, max 1.4 mm (voxels 5.4 x 5.4 x 3 mm)
    assert np.median(error) < 1.5 and np.percentile(error, 90) < 2.5 and error.max() < 5.0, \
        (np.median(error), np.percentile(error, 90), error.max())
    # the node holds exactly PRISMRTLib's field (grid nodes of the fixed image)
    field = gridTransformToField(transform)
    assert field.GetSize() == pair.fixed.GetSize()
    np.testing.assert_allclose(field.GetOrigin(), pair.fixed.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(field.GetDirection(), pair.fixed.GetDirection(), atol=1e-9)


def test_the_moving_volume_under_the_transform_lands_on_the_fixed_one(pair, run):
    """What a user does in the Transforms module: the moving volume under the result's transform. Its points go to
    the world through ToParent (the inverse of the stored field): M(p) must come back to p."""
    _, (_, moving, *_), outputs, _, _, _ = run
    points, truth = pair.bodyPoints(step=97)
    moving.SetAndObserveTransformNodeID(outputs.transformNode.GetID())
    try:
        toWorld = vtk.vtkGeneralTransform()
        moving.GetParentTransformNode().GetTransformToWorld(toWorld)
        back = np.array([np.array(toWorld.TransformPoint(tuple(FLIP * q))) * FLIP for q in truth])
    finally:
        moving.SetAndObserveTransformNodeID(None)
    error = np.linalg.norm(back - points, axis=1)
    assert np.median(error) < 1.5 and error.max() < 5.0, (np.median(error), error.max())


def test_the_warped_volume_is_the_moving_image_on_the_fixed_grid(pair, run):
    scene, (fixed, moving, *_), outputs, _, _, _ = run
    warped = outputs.warpedVolumeNode
    assert warped.GetName() == "CT week 3 warped" and warped is not moving
    np.testing.assert_allclose(_ijk_to_ras(warped), _ijk_to_ras(fixed), atol=1e-9)
    w = sitk.GetArrayFromImage(conversions.volumeNodeToImage(warped)).astype(float)
    f = sitk.GetArrayFromImage(pair.fixed).astype(float)
    unregistered = sitk.GetArrayFromImage(sitk.Resample(pair.moving, pair.fixed, sitk.Transform(), sitk.sitkLinear,
                                                        -1024.0)).astype(float)
    # the moving image through the true motion, resampled the same way: what a perfect registration gives
    ideal = sitk.GetArrayFromImage(sitk.Resample(pair.moving, pair.fixed, pair.motion, sitk.sitkLinear,
                                                 -1024.0)).astype(float)
    after, before = np.abs(w - ideal)[pair.body].mean(), np.abs(unregistered - ideal)[pair.body].mean()
    assert after < 0.25 * before, (after, before)
    assert np.abs(w - f)[pair.body].mean() < 0.6 * np.abs(unregistered - f)[pair.body].mean()
    assert warped.GetNodeReference(registration.TRANSFORM_ROLE) is outputs.transformNode
    # the inputs are as they were: same voxels, no transform
    np.testing.assert_array_equal(sitk.GetArrayFromImage(conversions.volumeNodeToImage(moving)),
                                  sitk.GetArrayFromImage(pair.moving))
    assert moving.GetParentTransformNode() is None and fixed.GetParentTransformNode() is None


def test_the_moving_segments_are_warped_onto_the_fixed_structures(pair, run):
    _, (fixed, _, _, movingSegmentation), outputs, _, _, _ = run
    warped = outputs.warpedSegmentationNode
    assert warped is not None and warped is not movingSegmentation
    assert warped.GetName() == "week 3 structures warped"
    segmentation = warped.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        list(STRUCTURES)
    source = movingSegmentation.GetSegmentation()
    for name in STRUCTURES:
        mask = conversions.segmentToMask(warped, name, fixed) > 0
        truth = sitk.GetArrayFromImage(pair.fixedMasks[name]) > 0
        unwarped = sitk.GetArrayFromImage(sitk.Resample(pair.movingMasks[name], pair.fixed, sitk.Transform(),
                                                        sitk.sitkNearestNeighbor, 0)) > 0
        # measured Dice: PTV70 0.97, Mandible 0.88, Larynx 0.83; without the registration 0.71, 0.07, 0.05
        assert _dice(mask, truth) > 0.75 and _dice(mask, truth) > _dice(unwarped, truth) + 0.1, name
        got = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name)).GetColor()
        want = source.GetSegment(source.GetSegmentIdBySegmentName(name)).GetColor()
        np.testing.assert_allclose(got, want)


def test_the_qa_table_has_one_row_per_check_with_its_verdict(run):
    _, _, outputs, _, _, _ = run
    table = outputs.qaTableNode
    assert table.IsA("vtkMRMLTableNode") and table.GetName() == "CT week 3 to planning CT QA"
    rows = _table_rows(table)
    assert list(rows[0]) == list(QA_COLUMNS)
    statuses = {row["Status"] for row in rows}
    assert statuses <= {"pass", "fail", "not checked", "info"} and "pass" in statuses
    checks = {(row["Group"], row["Quantity"]): row for row in rows}
    folding = checks[("Jacobian", "folding (det <= 0)")]
    assert folding["Status"] == "pass" and folding["Tolerance"] == "<= 0.1 %" and folding["Reason"]
    for name in STRUCTURES:  # the fixed segmentation was given: contour agreement, judged
        dice = checks[("Contours", f"{name}: Dice")]
        assert dice["Status"] in ("pass", "fail") and dice["Tolerance"] == ">= 0.80"
        assert 0.75 < float(dice["Value"]) <= 1.0
    assert checks[("Inverse consistency", "round trip error")]["Status"] == "not checked"
    assert ("Jacobian statistics", "minimum") in checks and "R " in checks[("Jacobian statistics", "minimum")]["Reason"]
    assert float(checks[("Jacobian statistics", "mean")]["Value"]) == pytest.approx(1.0, abs=0.1)
    assert table.GetAttribute(registration.VERDICT_ATTRIBUTE) in ("PASS", "FAIL")
    verdict = outputs.transformNode.GetAttribute(registration.VERDICT_ATTRIBUTE)
    assert outputs.summary.startswith(f"QA {verdict}: ") and outputs.verdict == verdict
    failed = [row for row in rows if row["Status"] == "fail"]
    assert (verdict == "FAIL") == bool(failed)
    for row in failed:
        assert f"- {row['Reason']}" in outputs.summary  # the panel says why


def test_the_result_is_found_again_from_its_transform_node(run):
    scene, (fixed, moving, fixedSegmentation, movingSegmentation), outputs, logic, _, _ = run
    again = RegistrationOutputs.fromTransformNode(outputs.transformNode)
    assert (again.fixedVolumeNode, again.movingVolumeNode, again.warpedVolumeNode, again.qaTableNode,
            again.warpedSegmentationNode) == (fixed, moving, outputs.warpedVolumeNode, outputs.qaTableNode,
                                              outputs.warpedSegmentationNode)
    transform = outputs.transformNode
    assert transform.GetNodeReference(registration.FIXED_SEGMENTATION_ROLE) is fixedSegmentation
    assert transform.GetNodeReference(registration.MOVING_SEGMENTATION_ROLE) is movingSegmentation
    assert RegistrationLogic.results(scene)[-1] is transform
    assert RegistrationLogic().outputsOf(scene=scene).transformNode is transform  # a fresh logic finds it
    with pytest.raises(PrismRTError, match="not a PRISM-RT registration"):
        RegistrationOutputs.fromTransformNode(scene.AddNewNodeByClass("vtkMRMLGridTransformNode"))


def test_progress_runs_from_0_to_1_with_text(run):
    *_, seen, seconds = run
    fractions = [f for f, _ in seen]
    assert fractions[0] == pytest.approx(0.0) and fractions[-1] == pytest.approx(1.0)
    assert all(b >= a - 1e-9 for a, b in zip(fractions, fractions[1:]))
    texts = " ".join(t for _, t in seen)
    assert "alignment" in texts and "Warping the segment 'PTV70'" in texts and "Quality assurance" in texts


# ---- one-click views ----------------------------------------------------------------------------------------------
def test_the_checkerboard_alternates_fixed_and_warped_tiles_in_the_slice_views(pair, run):
    scene, (fixed, *_), outputs, logic, _, _ = run
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    board = logic.showCheckerboard(outputs)
    assert composite.GetBackgroundVolumeID() == board.GetID() and composite.GetForegroundVolumeID() is None
    np.testing.assert_allclose(_ijk_to_ras(board), _ijk_to_ras(fixed), atol=1e-9)
    b = sitk.GetArrayFromImage(conversions.volumeNodeToImage(board))
    f = sitk.GetArrayFromImage(pair.fixed).astype(np.float32)
    w = sitk.GetArrayFromImage(conversions.volumeNodeToImage(outputs.warpedVolumeNode)).astype(np.float32)
    spacing = pair.fixed.GetSpacing()
    tile = registration.CHECKERBOARD_TILE_MM
    k, j, i = (np.floor((np.arange(n) + 0.5) * s / tile) for n, s in zip(f.shape, spacing[::-1]))
    warped_tiles = (k[:, None, None] + j[None, :, None] + i[None, None, :]) % 2 == 1
    assert 0.3 < warped_tiles.mean() < 0.7
    np.testing.assert_array_equal(b[warped_tiles], w[warped_tiles])
    np.testing.assert_array_equal(b[~warped_tiles], f[~warped_tiles])
    assert logic.showCheckerboard(outputs) is board  # made once per result
    assert outputs.transformNode.GetNodeReference(registration.CHECKERBOARD_ROLE) is board


def test_the_jacobian_view_shows_the_determinant_over_the_fixed_volume(run):
    scene, (fixed, *_), outputs, logic, _, _ = run
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    node = logic.showJacobian(outputs)
    assert composite.GetBackgroundVolumeID() == fixed.GetID() and composite.GetForegroundVolumeID() == node.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(registration.JACOBIAN_OPACITY)
    determinant = sitk.GetArrayFromImage(jacobian_determinant(gridTransformToField(outputs.transformNode)))
    np.testing.assert_allclose(sitk.GetArrayFromImage(conversions.volumeNodeToImage(node)), determinant, atol=1e-6)
    display = node.GetDisplayNode()
    colors = display.GetColorNode()
    assert colors is not None and colors.GetAttribute(registration.ROLE_ATTRIBUTE) == "jacobian colours"
    assert colors.GetNumberOfColors() == 256
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((2.0, 1.0))  # det 0 .. 2, 1 in the middle
    rgba = [0.0] * 4
    colors.GetColor(128, rgba)
    assert min(rgba[:3]) > 0.95  # det 1 (no volume change) is white
    assert logic.showJacobian(outputs) is node
    assert RegistrationLogic.jacobianColorNode(scene) is colors  # one colour table per scene


# ---- nothing lost, nothing overwritten, clear errors ----------------------------------------------------------------
def test_running_again_makes_new_nodes_and_keeps_the_first_result(pair, scene):
    fixed, moving, _, _ = pair.nodes(scene)
    logic = RegistrationLogic()
    first = logic.run(fixed, moving, **QUICK)
    second = logic.run(fixed, moving, smoothness=2.0, **QUICK)
    for a, b in zip(first.nodes(), second.nodes()):
        assert a is not b and a.GetScene() is scene and a.GetName() != b.GetName()
    assert second.transformNode.GetAttribute("PRISMRT.Smoothness") == "2"
    assert RegistrationLogic.results(scene) == [first.transformNode, second.transformNode]
    assert first.warpedSegmentationNode is None  # no moving segmentation chosen: none made


def test_a_cancelled_registration_adds_nothing_to_the_scene(pair, scene):
    fixed, moving, fixedSegmentation, movingSegmentation = pair.nodes(scene)
    before = scene.GetNumberOfNodes()
    controller = RegistrationController(scene)
    job = controller.run(fixed, moving, fixedSegmentation=fixedSegmentation,
                         movingSegmentation=movingSegmentation, alignment="rigid", settings=FAST, device="cpu")
    assert controller.busy
    with pytest.raises(PrismRTError, match="already running"):
        controller.run(fixed, moving, **QUICK)
    deadline = time.monotonic() + 60
    while (job.currentProgress()[0] or 0.0) < 0.3 and time.monotonic() < deadline:  # well into the work
        time.sleep(0.01)
    controller.cancel()
    while controller.busy and time.monotonic() < deadline:
        controller.poll()
        time.sleep(0.01)
    assert not controller.busy and "cancelled" in controller.status and not controller.failed
    assert scene.GetNumberOfNodes() == before and RegistrationLogic.results(scene) == []
    assert controller.outputs is None


def test_the_controller_runs_off_the_gui_thread_and_applies_the_result_on_poll(pair, scene):
    fixed, moving, _, _ = pair.nodes(scene)
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    changes, done = [], []
    controller = RegistrationController(scene, onChanged=lambda: changes.append(controller.status))
    job = controller.run(fixed, moving, onDone=done.append, **QUICK)
    job._thread.join(120)
    assert RegistrationLogic.results(scene) == []  # nothing is written from the worker
    controller.poll()
    assert not controller.busy and done and done[0] is controller.outputs
    assert controller.status.startswith("QA ") and "Registered in" in controller.status
    assert composite.GetBackgroundVolumeID() == fixed.GetID()  # the fusion of fixed and warped
    assert composite.GetForegroundVolumeID() == controller.outputs.warpedVolumeNode.GetID()
    assert controller.showJacobian().GetNodeReference(registration.TRANSFORM_ROLE) is \
        controller.outputs.transformNode
    assert "Jacobian" in controller.status
    controller.forgetScene()
    assert controller.outputs is None and controller.status == ""
    assert controller.result().transformNode is done[0].transformNode  # found again in the scene


def test_a_failed_registration_says_why_and_adds_nothing(pair, scene):
    fixed, moving, _, _ = pair.nodes(scene)
    before = scene.GetNumberOfNodes()
    controller = RegistrationController(scene)
    job = controller.run(fixed, moving, **dict(QUICK, alignment="bspline"))  # PRISMRTLib refuses it on the worker
    job.wait(60)
    assert controller.failed and "Registration failed" in controller.status and "alignment" in controller.status
    assert scene.GetNumberOfNodes() == before


def test_bad_input_gets_a_clear_error(pair, scene):
    fixed, moving, fixedSegmentation, movingSegmentation = pair.nodes(scene)
    logic = RegistrationLogic()
    with pytest.raises(PrismRTError, match="no fixed volume is selected"):
        logic.prepare(None, moving)
    with pytest.raises(PrismRTError, match="no moving volume is selected"):
        logic.prepare(fixed, None)
    with pytest.raises(PrismRTError, match="the same volume .*choose two different"):
        logic.prepare(fixed, fixed)
    with pytest.raises(PrismRTError, match="smoothness must be between 0 and 10"):
        logic.prepare(fixed, moving, smoothness=12.0)
    with pytest.raises(PrismRTError, match="unknown registration method"):
        logic.prepare(fixed, moving, method="elastix")
    single = conversions.imageToVolumeNode(pair.fixed[:, :, 20:21], "one slice", scene=scene)
    with pytest.raises(PrismRTError, match="fixed volume 'one slice' cannot be registered: .*single slice"):
        logic.prepare(single, moving)
    mr_like = conversions.imageToVolumeNode(sitk.Cast(pair.moving, sitk.sitkFloat32) / 4.0 + 300.0, "MR", scene=scene)
    with pytest.raises(PrismRTError, match="'planning CT' looks like CT and the moving volume 'MR' does not: tick "
                                           "'Different modalities'"):
        logic.prepare(fixed, mr_like)
    assert logic.prepare(fixed, mr_like, multimodal=True).moving.GetSize() == pair.moving.GetSize()
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moving.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(PrismRTError, match="under a transform: harden it"):
        logic.prepare(fixed, moving)
    moving.SetAndObserveTransformNodeID(None)
    nothing = sitk.Image(pair.fixed.GetSize(), sitk.sitkUInt8)
    nothing.CopyInformation(pair.fixed)
    empty = conversions.imageToVolumeNode(nothing, "empty mask", scene=scene, className="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(PrismRTError, match="fixed mask 'empty mask' is empty"):
        logic.prepare(fixed, moving, fixedMask=empty)
    with pytest.raises(PrismRTError, match="same segmentation"):
        logic.prepare(fixed, moving, fixedSegmentation=movingSegmentation, movingSegmentation=movingSegmentation)
    segment = movingSegmentation.GetSegmentation().GetNthSegment(1)
    segment.SetName("PTV70")
    with pytest.raises(PrismRTError, match="two segments named 'PTV70'"):
        logic.prepare(fixed, moving, movingSegmentation=movingSegmentation)
    segment.SetName("Mandible")


def test_a_fixed_mask_is_read_on_the_fixed_grid_from_a_label_map_or_a_segmentation(pair, scene):
    fixed, moving, fixedSegmentation, _ = pair.nodes(scene)
    logic = RegistrationLogic()
    body = sitk.Cast(body_mask(pair.fixed), sitk.sitkUInt8)
    coarse = sitk.Resample(body, pair.moving, sitk.Transform(), sitk.sitkNearestNeighbor, 0)  # another grid
    label = conversions.imageToVolumeNode(coarse, "body", scene=scene, className="vtkMRMLLabelMapVolumeNode")
    inputs = logic.prepare(fixed, moving, fixedMask=label)
    mask = sitk.GetArrayFromImage(inputs.fixedMask) > 0
    assert inputs.fixedMask.GetSize() == pair.fixed.GetSize() and inputs.fixedMaskName == "body"
    assert _dice(mask, sitk.GetArrayFromImage(body) > 0) > 0.9
    inputs = logic.prepare(fixed, moving, fixedMask=fixedSegmentation)  # all segments together
    union = np.any([sitk.GetArrayFromImage(m) > 0 for m in pair.fixedMasks.values()], axis=0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(inputs.fixedMask) > 0, union)


def test_the_methods_and_their_availability():
    assert METHODS == ("mind", "features", "both")
    assert registration.methodAvailability("mind") is None
    assert "unknown registration method" in registration.methodAvailability("elastix")
    import importlib.util

    has_backbone = importlib.util.find_spec("PRISMRTLib.registration.backbone") is not None
    for method in ("features", "both"):
        problem = registration.methodAvailability(method)
        assert (problem is None) == has_backbone
        if problem:
            assert "not available in this version" in problem and "use 'mind'" in problem


def test_the_features_method_runs_on_the_shipped_standin_backbone(pair, scene):
    pytest.importorskip("PRISMRTLib.registration.backbone")
    from PRISMRTLib.weights import default_manifest, is_available

    if not is_available("teachers-standin-openkbp", default_manifest()):
        pytest.skip("the shipped stand-in teachers are not in this tree")
    fixed, moving, _, _ = pair.nodes(scene)
    outputs = RegistrationLogic().run(fixed, moving, method="features", featureModel="teachers-standin-openkbp",
                                      featureBackend="teachers", alignment="rigid", settings=FAST,
                                      working_spacing=8.0, device="cpu")
    assert outputs.transformNode.GetAttribute("PRISMRT.Method") == "features"
    points, truth = pair.bodyPoints(step=61)
    error = np.linalg.norm(_from_parent(outputs.transformNode, points) - truth, axis=1)
    assert np.median(error) < 2.5, np.median(error)  # measured 1.07 mm (the rigid alignment alone: 0.17 mm)


# ---- the section's settings ---------------------------------------------------------------------------------------
def test_the_section_settings_live_in_the_parameter_node(pair, scene):
    fixed, moving, fixedSegmentation, _ = pair.nodes(scene)
    settings = RegistrationParameters(PRISMRTParameters.ofScene(scene).node)
    assert (settings.registrationMethod, settings.smoothness, settings.fixedVolume) == ("mind", "1", None)
    settings.fixedVolume, settings.movingVolume, settings.fixedMask = fixed, moving, fixedSegmentation
    settings.smoothness = "2.5"
    again = RegistrationParameters(PRISMRTParameters.ofScene(scene).node)
    assert (again.fixedVolume, again.movingVolume, again.fixedMask, again.smoothness) == \
        (fixed, moving, fixedSegmentation, "2.5")
    assert PRISMRTParameters.ofScene(scene).inputVolume is None  # the module's own parameters are untouched
    with pytest.raises(TypeError):
        settings.movingSegmentation = fixed


def test_the_smoothness_hint_says_what_the_value_does():
    assert "follows the images as closely" in smoothnessHint(0)
    assert "flexible" in smoothnessHint(0.25)
    assert "default" in smoothnessHint(1)
    assert "stiffer" in smoothnessHint(3)
    assert "affine" in smoothnessHint(10)
    assert registration.SMOOTHNESS_STOPS[0] == 0.0 and registration.SMOOTHNESS_STOPS[-1] == 10.0
    assert 1.0 in registration.SMOOTHNESS_STOPS


def test_the_section_ui_offers_what_the_logic_takes():
    root = ET.parse(REPO / "PRISMRT" / "Resources" / "UI" / "PRISMRTRegistration.ui").getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    combo = widgets["registrationMethodComboBox"]
    assert tuple(i.findtext("property/string") for i in combo.findall("item")) == METHODS
    spin = widgets["smoothnessSpinBox"]
    values = {p.get("name"): float(p.findtext("double")) for p in spin.findall("property")
              if p.find("double") is not None}
    assert (values["minimum"], values["maximum"], values["value"]) == (*registration.SMOOTHNESS_RANGE, 1.0)
    slider = widgets["smoothnessSlider"]
    numbers = {p.get("name"): int(p.findtext("number")) for p in slider.findall("property")
               if p.find("number") is not None}
    assert numbers["maximum"] == len(registration.SMOOTHNESS_STOPS) - 1
    assert registration.SMOOTHNESS_STOPS[numbers["value"]] == 1.0

    def node_types(name):
        return [s.text for s in widgets[name].find("property[@name='nodeTypes']").iter("string")]

    assert node_types("fixedVolumeSelector") == node_types("movingVolumeSelector") == ["vtkMRMLScalarVolumeNode"]
    assert node_types("fixedMaskSelector") == ["vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"]
    assert node_types("movingSegmentationSelector") == ["vtkMRMLSegmentationNode"]
