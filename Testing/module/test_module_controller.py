"""The delineation section's behaviour (PRISMRTModule.delineation.DelineationController) against slicer-core: clicks
placed as markups in click mode, work on a worker thread, the user's own edits of the segment, undo, leaving the
module, and the parameter node through a saved and reloaded scene.

The backend is the oracle of prismrt_testing with ``echo_mask``: given a mask input it returns that mask with a disk
added at each positive click, so what the session fed the model shows in the result.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from prismrt_testing import OracleBackend, ptv_phantom, slicer_core_or_skip

slicer = slicer_core_or_skip()

import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402

from PRISMRTLib.segmentation import interior_point  # noqa: E402
from PRISMRTModule import conversions  # noqa: E402
from PRISMRTModule.delineation import DelineationController  # noqa: E402
from PRISMRTModule.jobs import BackgroundJob, JobCancelled  # noqa: E402
from PRISMRTModule.parameters import PRISMRTParameters  # noqa: E402


@pytest.fixture(scope="module")
def phantom():
    return ptv_phantom()


def _ijk_to_ras(volume) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _settle(controller, timeout=120.0):
    """What the panel's timer does: poll until no job runs and no click is queued."""
    deadline = time.monotonic() + timeout
    while controller.busy or controller._queue or controller.prefetchJob is not None:
        controller.poll()
        if time.monotonic() > deadline:
            raise AssertionError("the controller did not settle")
        time.sleep(0.01)


class _Setup:
    def __init__(self, scene, phantom, backend):
        image, self.ptv = phantom
        self.scene = scene
        self.volume = conversions.imageToVolumeNode(image, name="CT", scene=scene)
        self.segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "PRISM-RT")
        self.interaction = scene.AddNewNodeByClass("vtkMRMLInteractionNode")
        self.selection = scene.AddNewNodeByClass("vtkMRMLSelectionNode")
        self.controller = DelineationController(scene, self.interaction, self.selection)
        self.controller.start(self.volume, self.segmentation, "GTV", backend=backend)
        _settle(self.controller)
        assert self.controller.logic.active, self.controller.status
        self.k = int(np.argmax(self.ptv.sum(axis=(1, 2))))
        self.m = _ijk_to_ras(self.volume)

    def ras(self, i, j, k=None):
        return (self.m @ np.array([i, j, self.k if k is None else k, 1.0]))[:3]

    def click(self, kind, ras):
        """A click in a slice view in the current click mode: a control point placed on our markups node."""
        node = self.controller._clickNode(kind)
        node.AddControlPoint(vtk.vtkVector3d(*ras))
        _settle(self.controller)

    def segment(self):
        return conversions.segmentToMask(self.segmentation, "GTV", self.volume)

    def paint(self, mask):
        """Hand edits, as Segment Editor makes them: the segment's labelmap replaced."""
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.CopyInformation(self.controller.logic.image)
        conversions.maskToSegment(image, self.segmentation, "GTV")


@pytest.fixture
def setup(scene, phantom):
    return _Setup(scene, phantom, OracleBackend(echo_mask=True))


def test_a_hand_painted_voxel_survives_the_next_click_and_is_its_input(setup):
    c = setup.controller
    c.startPlacing("positive")
    j, i = interior_point(setup.ptv[setup.k])
    setup.click("positive", setup.ras(i, j))
    first = setup.segment()
    assert first[setup.k].any() and not np.delete(first, setup.k, axis=0).any()
    np.testing.assert_array_equal(first, c.logic.session.mask)
    assert "Slice" in c.status and "predicted IoU" in c.status

    # the user paints a voxel far from the structure (and nothing else)
    jj, ii = np.nonzero(~setup.ptv[setup.k].astype(bool))
    far = int(np.argmax((jj - j) ** 2 + (ii - i) ** 2))
    painted = first.copy()
    painted[setup.k, jj[far], ii[far]] = 1
    setup.paint(painted)

    # a positive click inside: the model's mask input is what the user painted, so the voxel survives
    setup.click("positive", setup.ras(i + 1, j))
    after = setup.segment()
    assert after[setup.k, jj[far], ii[far]], "the hand-painted voxel was lost"
    # the rest of the slice is the painted mask again, up to the edge pixels a low-resolution mask prompt shifts
    overlap = np.count_nonzero(after[setup.k] & painted[setup.k]) / np.count_nonzero(painted[setup.k])
    assert overlap > 0.95 and "your edits on 1 slice(s) kept" in c.status
    np.testing.assert_array_equal(after, c.logic.session.mask)


def test_undo_after_a_click_restores_the_users_segment_exactly(setup):
    c = setup.controller
    c.startPlacing("positive")
    j, i = interior_point(setup.ptv[setup.k])
    setup.click("positive", setup.ras(i, j))
    users = setup.segment()
    users[setup.k + 3, j, i - 2: i + 3] = 1  # the user's own strokes on another slice
    users[setup.k, j, i] = 0  # and an erased voxel
    setup.paint(users)
    setup.click("positive", setup.ras(i + 2, j + 2))
    assert not np.array_equal(setup.segment(), users)
    assert c.undo() == "positive click"
    np.testing.assert_array_equal(setup.segment(), users)  # exactly as the user left it
    np.testing.assert_array_equal(c.logic.session.mask, users)
    assert c.redo() == "positive click"
    assert setup.segment()[setup.k, j + 2, i + 2]


def test_leaving_the_module_stops_click_mode(setup):
    c = setup.controller
    c.startPlacing("negative")
    node = c._clickNode("negative")
    assert setup.interaction.GetCurrentInteractionMode() == setup.interaction.Place
    assert setup.selection.GetActivePlaceNodeID() == node.GetID()
    j, i = interior_point(setup.ptv[setup.k])
    setup.click("negative", setup.ras(i, j))
    assert c.logic.session.prompts[setup.k].labels == [0]
    before = setup.segment()
    c.leave()  # what the widget's exit() does
    assert c.placing is None
    assert setup.interaction.GetCurrentInteractionMode() != setup.interaction.Place
    assert setup.selection.GetActivePlaceNodeID() != node.GetID()
    # a point placed afterwards (Slicer's own markups, another module) does not run the model
    node.AddControlPoint(vtk.vtkVector3d(*setup.ras(i, j)))
    c.poll()
    assert not c.busy and not c._queue
    np.testing.assert_array_equal(setup.segment(), before)
    # Escape / right-click in the views (the interaction mode changed from outside) also ends click mode
    c.startPlacing("positive")
    setup.interaction.SwitchToViewTransformMode()
    assert c.placing is None


class _SlowOracle:
    """The echo oracle whose encoder takes a while, and which records the thread it ran on."""

    def __init__(self, seconds=0.15):
        self.backend = OracleBackend(echo_mask=True)
        self.threads = set()
        encode = self.backend.encode

        def slow(*args, **kwargs):
            self.threads.add(threading.current_thread())
            time.sleep(seconds)
            return encode(*args, **kwargs)

        self.backend.encode = slow


def test_a_propagation_on_a_worker_thread_can_be_cancelled_and_leaves_the_scene_unchanged(scene, phantom):
    slow = _SlowOracle()
    setup = _Setup(scene, phantom, slow.backend)
    c = setup.controller
    c.startPlacing("positive")
    j, i = interior_point(setup.ptv[setup.k])
    setup.click("positive", setup.ras(i, j))
    c.stopPlacing()
    segment, session_mask = setup.segment(), c.logic.session.mask.copy()
    nodes = scene.GetNumberOfNodes()
    job = c.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    deadline = time.monotonic() + 60
    while "slice" not in job.currentProgress()[1] and time.monotonic() < deadline:
        time.sleep(0.01)  # the GUI is free meanwhile: this loop is the GUI thread
    assert c.busy and "Propagating: slice" in job.currentProgress()[1]
    c.cancel()
    _settle(c)
    assert "cancelled" in c.status
    np.testing.assert_array_equal(setup.segment(), segment)
    np.testing.assert_array_equal(c.logic.session.mask, session_mask)
    assert scene.GetNumberOfNodes() == nodes
    assert threading.main_thread() not in slow.threads  # features were computed off the GUI thread
    # and a propagation that runs to its end is applied
    c.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    _settle(c)
    assert setup.segment().any(axis=(1, 2)).sum() > 1 and "cm\u00b3 on" in c.status
    assert "propagated from slice" in c.status and "it stopped towards" in c.status


def test_a_failing_job_reports_its_error_and_changes_nothing():
    outcomes = []

    def work(job):
        job.progress(0.5, "half way")
        raise ValueError("no such thing")

    job = BackgroundJob("test", work, onDone=outcomes.append, onError=outcomes.append).start()
    assert job.wait(10)
    assert len(outcomes) == 1 and isinstance(outcomes[0], ValueError)
    assert job.currentProgress() == (0.5, "half way") and not job.running

    cancelled = []
    gate = threading.Event()

    def waits(job):
        gate.wait(10)
        job.progress(None, "")  # raises JobCancelled: cancel() came first
        return "never"

    job = BackgroundJob("test", waits, onDone=outcomes.append, onCancelled=lambda: cancelled.append(True)).start()
    job.cancel()
    gate.set()
    assert job.wait(10) and cancelled == [True] and len(outcomes) == 1
    idle = BackgroundJob("idle", lambda j: None)
    idle.progress(0.1, "fine before a cancel")
    idle.cancel()
    with pytest.raises(JobCancelled):  # how the work learns of the cancel
        idle.progress(0.2, "")


def test_a_saved_and_reloaded_scene_restores_the_parameters(scene, phantom, tmp_path):
    image, _ = phantom
    volume = conversions.imageToVolumeNode(image, name="planning CT", scene=scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "PRISM-RT GTV")
    parameters = PRISMRTParameters.ofScene(scene)
    assert (parameters.backend, parameters.segmentName, parameters.promptMode) == ("auto", "GTV", "positive")
    assert parameters.inputVolume is None and parameters.outputSegmentation is None
    parameters.inputVolume = volume
    parameters.outputSegmentation = segmentation
    parameters.backend = "teachers"
    parameters.segmentName = "GTV-T1"
    parameters.promptMode = "box"
    parameters.windowPreset = "lung"
    with pytest.raises(ValueError, match="unknown prompt mode"):
        parameters.promptMode = "lasso"
    with pytest.raises(TypeError, match="vtkMRMLSegmentationNode"):
        parameters.outputSegmentation = volume
    assert PRISMRTParameters.ofScene(scene).node is parameters.node  # one parameter node per scene

    path = tmp_path / "scene.mrml"
    scene.SetRootDirectory(str(tmp_path))
    scene.SetURL(str(path))
    assert scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetRootDirectory(str(tmp_path))
    reloaded.SetURL(str(path))
    reloaded.Import()
    try:
        again = PRISMRTParameters.ofScene(reloaded)
        assert (again.backend, again.segmentName, again.promptMode, again.windowPreset) == \
            ("teachers", "GTV-T1", "box", "lung")
        assert again.inputVolume is not None and again.inputVolume.GetName() == "planning CT"
        assert again.outputSegmentation is not None and again.outputSegmentation.GetName() == "PRISM-RT GTV"
        assert reloaded.GetNodesByClass("vtkMRMLScriptedModuleNode").GetNumberOfItems() == 1
    finally:
        reloaded.Clear(1)
