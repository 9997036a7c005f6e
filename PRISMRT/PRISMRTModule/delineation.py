"""Delineation in the panel: clicks in the slice views -> PRISMRTLib's segmentation session -> a segment.

- :class:`DelineationLogic`: the session on a volume node, its segment, undo and redo of what it writes, and the
  user's own edits of the segment read back into the session before each click (MRML only).
- :class:`DelineationController`: what the panel's buttons do, without Qt: click mode in the slice views (markups
  nodes, the interaction node), the model load, clicks, propagation and idle prefetch as background jobs whose
  results are applied on the GUI thread (:meth:`DelineationController.poll`, called from a timer), and leaving
  (:meth:`DelineationController.leave`: the module closed, the scene closed), which ends all of it.

The segment is what the user sees and owns: painting or erasing it in Segment Editor is adopted as the next click's
input (slices the user edited become theirs, see ``SegmentationSession.adopt``), as a step of the session's history,
so PRISM-RT's Undo restores the segment exactly as the user left it (and Segment Editor's Undo covers PRISM-RT's
writes when the editor shows this segmentation): nothing the user drew is overwritten without an undo.
"""

import logging

import numpy as np

import slicer
from slicer.util import VTKObservationMixin

from .conversions import maskToSegment, rasToLps, segmentToMask, volumeNodeToImage
from .jobs import BackgroundJob
from .library import importPRISMRTLib, prismrtError

# The segment's meaning for DICOM export and Slicer's terminology browser: SNOMED CT 228791009 "Gross tumor volume"
# (DICOM CID 9534, Radiotherapy Targets), in Slicer's serialised terminology-entry form.
GTV_TERMINOLOGY = ("Segmentation category and type - DICOM master list"
                   "~SCT^49755003^Morphologically Altered Structure"
                   "~SCT^228791009^Gross Tumor Volume"
                   "~^^"
                   "~Anatomic codes - DICOM master list"
                   "~^^"
                   "~^^")
GTV_COLOR = (0.86, 0.16, 0.16)  # red, as planning systems show GTVs


def _saveSegmentEditorStateForUndo(segmentationNode) -> None:
    """Inside the application, Segment Editor's own Undo covers PRISM-RT's writes when it shows this segmentation."""
    modules = getattr(slicer, "modules", None)
    widget = getattr(modules, "SegmentEditorWidget", None) if modules is not None else None
    editor = getattr(widget, "editor", None)
    try:
        if editor is not None and editor.segmentationNode() is segmentationNode:
            editor.saveStateForUndo()
    except Exception:  # the editor is optional: PRISM-RT's own undo has the state
        logging.exception("PRISM-RT: could not save Segment Editor's undo state")


class DelineationLogic:
    """One delineation: a PRISMRTLib SegmentationSession on a volume node, written into one segment.

    The session and the segment move in step: before each prompt the segment is read back and whatever the user
    changed by hand is adopted into the session as a step of its own (``SegmentationSession.adopt``), so the session's
    history is the history of the segment, whoever changed it. Undo and redo are the session's (per slice, exact:
    its prompts and mask inputs come back too), written into the segment; each write is preceded by a sync, so what
    an undo restores is the segment exactly as the user left it."""

    def __init__(self):
        self.session = None
        self.volumeNode = None
        self.image = None
        self.segmentationNode = None
        self.segmentName = "GTV"
        self._createdSegment = False  # the segment was made by this delineation (an undo to nothing removes it)
        self._synced = None  # the segment's fingerprint when it last equalled the session's mask
        self._segmentIdWritten = None

    # ---- start ---------------------------------------------------------------------------------------------------
    @staticmethod
    def checkVolumeNode(volumeNode):
        """The volume as a SimpleITK image (GUI thread: reads MRML); refuses what cannot be delineated."""
        if volumeNode is not None and volumeNode.GetParentTransformNode() is not None:
            raise prismrtError(
                f"the volume '{volumeNode.GetName()}' is under a transform: harden it (Transforms module, Harden "
                "transform) or remove it, then start the delineation again")
        return volumeNodeToImage(volumeNode)

    @staticmethod
    def openSession(image, backend="auto", model=None, device="auto", orientation="axial", window=None,
                    progress=None, cancel=None):
        """The model (weights fetched on first use; ``backend`` may be a ready FeatureBackend) and a session on
        ``image``: no MRML, so it may run on a worker thread."""
        segmentation = importPRISMRTLib("PRISMRTLib.segmentation")
        if isinstance(backend, str):
            backend = importPRISMRTLib("PRISMRTLib.features").open_backend(
                backend, model, device, progress=progress, cancel=cancel)
        return segmentation.SegmentationSession(backend, image, orientation, window=window)

    def begin(self, volumeNode, image, session, segmentationNode, segmentName: str = "GTV") -> None:
        """Make ``session`` (from :meth:`openSession` on ``volumeNode``'s ``image``) the delineation, written into
        ``segmentationNode`` as ``segmentName``. A segment of that name that exists already is the user's: it is
        adopted as the starting mask (so a delineation continues one drawn before, by hand or by PRISM-RT)."""
        if not segmentName.strip():
            raise prismrtError("the segment needs a name: type one in the Segment field")
        self.session, self.volumeNode, self.image = session, volumeNode, image
        self.segmentationNode, self.segmentName = segmentationNode, segmentName.strip()
        if not segmentationNode.GetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole()):
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        self._createdSegment = self._segmentId() is None
        self._synced = self._segmentIdWritten = None
        existing = segmentToMask(segmentationNode, self.segmentName, volumeNode)
        if existing is not None:  # where this delineation starts from, not a step to undo
            session.adopt(existing, "the segment as it was", undoable=False)
            self._synced = self._fingerprint()

    def start(self, volumeNode, segmentationNode, segmentName="GTV", backend="auto", model=None, device="auto",
              orientation="axial", window=None):
        """:meth:`checkVolumeNode`, :meth:`openSession` and :meth:`begin` in one call (on the calling thread)."""
        image = self.checkVolumeNode(volumeNode)
        self.begin(volumeNode, image, self.openSession(image, backend, model, device, orientation, window),
                   segmentationNode, segmentName)
        return self.session

    def end(self) -> None:
        self.session = self.volumeNode = self.image = self.segmentationNode = None
        self._synced = None

    @property
    def active(self) -> bool:
        return self.session is not None

    def _require(self):
        if self.session is None:
            raise prismrtError("no delineation is in progress: select the CT and start a delineation first")
        return self.session

    # ---- the segment <-> the session -----------------------------------------------------------------------------
    def _segmentId(self):
        node = self.segmentationNode
        segmentId = node.GetSegmentation().GetSegmentIdBySegmentName(self.segmentName) if node is not None else ""
        return segmentId or None

    def _fingerprint(self):
        """Changes whenever the segment's labelmap does (a write, a paint stroke, an undo in Segment Editor)."""
        segmentId = self._segmentId()
        if segmentId is None:
            return None
        segment = self.segmentationNode.GetSegmentation().GetSegment(segmentId)
        representation = segment.GetRepresentation(
            slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
        return (segmentId, representation.GetAddressAsString("vtkObject") if representation is not None else None,
                representation.GetMTime() if representation is not None else None)

    def syncFromSegment(self, name: str = "edits made by hand") -> list:
        """Adopt the user's own edits of the segment (Segment Editor's paint, erase, ...) into the session before
        the next prompt, as one undoable step; a segment the user deleted counts as erased. Returns the slices that
        changed. Unchanged since the last write or sync: nothing is read."""
        session = self._require()
        fingerprint = self._fingerprint()
        if fingerprint is not None and fingerprint == self._synced:
            return []
        mask = segmentToMask(self.segmentationNode, self.segmentName, self.volumeNode)
        changed = session.adopt(np.zeros_like(session.mask) if mask is None else mask, name)
        self._synced = fingerprint
        return changed

    def writeSegment(self, stepName: str = "") -> "str | None":
        """The session's 3D mask into the segment (call :meth:`syncFromSegment` before changing the session). A new
        segment gets the GTV terminology and colour. Returns the segment ID (None when an undo to nothing removed a
        segment this delineation had made)."""
        session = self._require()
        node = self.segmentationNode
        _saveSegmentEditorStateForUndo(node)
        segmentId = self._segmentId()
        if segmentId is not None and self._createdSegment and not session.mask.any() and not session.can_undo():
            node.GetSegmentation().RemoveSegment(segmentId)  # back to before the first click: no segment
            self._synced = None
            return None
        segmentId = maskToSegment(session.result(), node, self.segmentName, GTV_COLOR)
        if segmentId != self._segmentIdWritten and self._createdSegment:  # new: say what it is (Slicer's default
            segment = node.GetSegmentation().GetSegment(segmentId)  # would be "Tissue")
            segment.SetTag(segment.GetTerminologyEntryTagName(), GTV_TERMINOLOGY)
            segment.SetColor(*GTV_COLOR)
        self._segmentIdWritten = segmentId
        self._synced = self._fingerprint()
        return segmentId

    # ---- prompts (call syncFromSegment first, on the GUI thread) --------------------------------------------------
    def addPoint(self, pointRas, positive: bool = True):
        """A click at a RAS point (world; the volume has no transform) on the slice that holds it."""
        return self._require().add_point(rasToLps(pointRas), positive=positive)

    def setBox(self, cornerARas, cornerBRas):
        """A box from two opposite corners (RAS) on one slice; corners on two slices are refused with what to do."""
        return self._require().set_box(rasToLps(cornerARas), rasToLps(cornerBRas))

    def propagate(self, **options):
        """Propagate the drawn slices into 3D (options: ``SegmentationSession.propagate``)."""
        return self._require().propagate(**options)

    def sliceIndex(self, pointRas):
        """The delineated slice holding ``pointRas`` (RAS), or None outside the volume or without a delineation."""
        if self.session is None or pointRas is None:
            return None
        try:
            return self.session.locate(rasToLps(pointRas))[0]
        except importPRISMRTLib("PRISMRTLib.errors").GeometryError:
            return None

    def prefetch(self, pointRas, radius: int = 2):
        """Features of one not yet computed slice near the slice of ``pointRas``; None when all are there (or the
        point is outside, or no delineation): prefetching is only ever ahead of time, never an error."""
        index = self.sliceIndex(pointRas)
        return None if index is None else self.session.prefetch_next(index, radius)

    # ---- undo / redo: the session's steps (the user's own edits among them), written into the segment ------------
    def canUndo(self) -> bool:
        return self.active and self.session.can_undo()

    def canRedo(self) -> bool:
        return self.active and self.session.can_redo()

    def undo(self) -> str:
        """Undo the last change of the segment: a click, box or propagation, or the user's own edits (a sync first
        makes edits since the last write a step of their own, so they are what an undo takes back first)."""
        self._require()
        self.syncFromSegment()
        name = self.session.undo()
        self.writeSegment()
        return name

    def redo(self) -> str:
        self._require()
        self.syncFromSegment()  # an edit made since the undo ends what can be redone
        name = self.session.redo()
        self.writeSegment()
        return name


class DelineationController(VTKObservationMixin):
    """The delineation section's behaviour, without Qt (the section widget maps its buttons to these methods and
    shows :attr:`status` whenever ``onChanged`` is called).

    ``scene``, ``interactionNode`` and ``selectionNode``: the application's in Slicer (the views' click mode); any
    MRML scene's in tests. Work runs as :class:`BackgroundJob` s; :meth:`poll` (a GUI timer, or a test) delivers their
    results and starts queued clicks.
    """

    PLACE_NODES = {  # placing kind -> (markups node name, colour)
        "positive": ("PRISM-RT + clicks", (0.2, 0.9, 0.2)),
        "negative": ("PRISM-RT - clicks", (0.9, 0.2, 0.2)),
        "box": ("PRISM-RT box corners", (0.95, 0.85, 0.2)),
    }
    PREFETCH_RADIUS = 2

    def __init__(self, scene, interactionNode, selectionNode, logic: DelineationLogic | None = None,
                 onChanged=None, sliceViewNodeIDs=()):
        VTKObservationMixin.__init__(self)
        self.scene = scene
        self.interactionNode = interactionNode
        self.selectionNode = selectionNode
        self.logic = logic or DelineationLogic()
        self.onChanged = onChanged or (lambda: None)
        self.sliceViewNodeIDs = list(sliceViewNodeIDs)
        self.placing = None  # "positive", "negative", "box" or None
        self.status = ""
        self.job = None  # the running job that changes the delineation (load, prompt, propagation)
        self.prefetchJob = None
        self._queue = []  # prompts placed while a job ran, applied in order
        self._clickNodeIDs = {}
        self.lastResult = None

    # ---- state ---------------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.job is not None

    def _set(self, status: str) -> None:
        self.status = status
        self.onChanged()

    @staticmethod
    def warningText(warnings) -> str:
        return "".join(f"\nWarning: {w}." for w in warnings)

    # ---- starting: the model load runs on a worker ---------------------------------------------------------------
    def start(self, volumeNode, segmentationNode, segmentName="GTV", backend="auto", model=None, device="auto",
              orientation="axial", onStarted=None):
        """Start delineating on ``volumeNode`` into ``segmentationNode``: the volume is read here (GUI thread), the
        model loaded (downloaded on first use, with progress) and the session made on a worker. Returns the job."""
        if self.busy:
            raise prismrtError(f"PRISM-RT is busy ({self.job.name}): wait for it or cancel it first")
        self.leave()
        image = self.logic.checkVolumeNode(volumeNode)

        def work(job):
            def progress(done, total):
                job.progress(done / total if total else None,
                             f"Downloading the model: {done / 2**20:.0f} of {total / 2**20:.0f} MB")
            job.progress(None, "Loading the model...")
            return self.logic.openSession(image, backend, model, device, orientation, progress=progress,
                                          cancel=job.isCancelled)

        def done(session):
            self.logic.begin(volumeNode, image, session, segmentationNode, segmentName)
            self._set("Click on the structure in an axial slice view (Add + points is on).")
            if onStarted:
                onStarted()

        return self._run("loading the model", work, done)

    def _run(self, name, work, onDone, onCancelled=None):
        def finished():
            self.job = None

        def doneWrapper(result):
            finished()
            try:
                onDone(result)
            except Exception as error:  # applying a result failed: say so, keep the scene as it is
                logging.exception("PRISM-RT")
                self._set(f"{name.capitalize()} failed: {error}")
            self.onChanged()

        def error(exception):
            finished()
            self._queue.clear()
            self._set(f"{name.capitalize()} failed: {exception}")

        def cancelled():
            finished()
            self._queue.clear()
            if onCancelled:
                onCancelled()
            self._set(f"{name.capitalize()} cancelled; the delineation is as it was.")

        self.stopPrefetch(wait=False)  # it finishes at most its current slice, under the feature cache's lock
        self.job = BackgroundJob(name, work, doneWrapper, error, cancelled).start()
        self.onChanged()
        return self.job

    def cancel(self) -> None:
        """Cancel the running job (its result is then never applied: the scene stays as it was)."""
        if self.job is not None:
            self.job.cancel()

    # ---- click mode ----------------------------------------------------------------------------------------------
    def _clickNode(self, kind: str):
        node = self.scene.GetNodeByID(self._clickNodeIDs.get(kind, ""))
        if node is None:
            name, color = self.PLACE_NODES[kind]
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if display is not None:
                display.SetSelectedColor(color)
                display.SetPointLabelsVisibility(False)
                if self.sliceViewNodeIDs:  # clicks belong on slices, not on 3D surfaces
                    display.SetViewNodeIDs(self.sliceViewNodeIDs)
            node.SetHideFromEditors(True)
            node.SetSaveWithScene(False)  # only the input of a click: never part of the user's scene
            self.addObserver(node, node.PointPositionDefinedEvent, self.onClickPlaced)
            self._clickNodeIDs[kind] = node.GetID()
        return node

    def startPlacing(self, kind: str) -> None:
        """Clicks of ``kind`` ("positive", "negative" or "box" corners) in the slice views go to the delineation."""
        if kind not in self.PLACE_NODES:
            raise ValueError(f"unknown click mode '{kind}'")
        if not self.logic.active:
            raise prismrtError("start a delineation first")
        if kind != "box":
            self._dropBoxCorner()
        node = self._clickNode(kind)
        self.placing = kind
        self.selectionNode.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        self.selectionNode.SetActivePlaceNodeID(node.GetID())
        if not self.hasObserver(self.interactionNode, self.interactionNode.InteractionModeChangedEvent,
                                self.onInteractionMode):
            self.addObserver(self.interactionNode, self.interactionNode.InteractionModeChangedEvent,
                             self.onInteractionMode)
        self.interactionNode.SetPlaceModePersistence(1)
        self.interactionNode.SetCurrentInteractionMode(self.interactionNode.Place)
        self.onChanged()

    def stopPlacing(self) -> None:
        """End click mode: the views go back to viewing, and Slicer's own point placing no longer feeds our nodes."""
        wasPlacing = self.placing
        self.placing = None
        self._dropBoxCorner()
        if self.hasObserver(self.interactionNode, self.interactionNode.InteractionModeChangedEvent,
                            self.onInteractionMode):
            self.removeObserver(self.interactionNode, self.interactionNode.InteractionModeChangedEvent,
                                self.onInteractionMode)
        if wasPlacing is not None and self.interactionNode.GetCurrentInteractionMode() == self.interactionNode.Place:
            self.interactionNode.SwitchToViewTransformMode()
        if self.selectionNode.GetActivePlaceNodeID() in self._clickNodeIDs.values():
            self.selectionNode.SetActivePlaceNodeID("")
        self.onChanged()

    def onInteractionMode(self, caller, event) -> None:
        """Place mode ended in the views (right-click, Escape, the toolbar): click mode ends with it."""
        if caller.GetCurrentInteractionMode() != caller.Place and self.placing is not None:
            self.stopPlacing()

    def _dropBoxCorner(self) -> None:
        node = self.scene.GetNodeByID(self._clickNodeIDs.get("box", ""))
        if node is not None and node.GetNumberOfControlPoints():
            node.RemoveAllControlPoints()

    def onClickPlaced(self, caller, event) -> None:
        """A click (or box corner) was placed: queued, and run from :meth:`poll` (not inside the markups event)."""
        kind = next((k for k, nodeID in self._clickNodeIDs.items() if nodeID == caller.GetID()), None)
        if kind is None or kind != self.placing or not self.logic.active:
            return
        count = caller.GetNumberOfControlPoints()
        if kind == "box":
            if count < 2:
                self._set("Box: now click the opposite corner, on the same slice.")
                return
            corners = [np.array(caller.GetNthControlPointPositionWorld(i)) for i in (count - 2, count - 1)]
            self._queue.append(("box", corners, caller))
        else:
            self._queue.append((kind, [np.array(caller.GetNthControlPointPositionWorld(count - 1))], caller))

    # ---- prompts and propagation as jobs -------------------------------------------------------------------------
    def poll(self) -> None:
        """GUI thread, from a timer: deliver finished jobs' results, then start the next queued click."""
        for job in (self.job, self.prefetchJob):
            if job is not None:
                job.poll()
        if self.prefetchJob is not None and not self.prefetchJob.running:
            self.prefetchJob = None
        if self.job is None and self._queue:
            kind, points, markupsNode = self._queue.pop(0)
            if markupsNode.GetNumberOfControlPoints():
                markupsNode.RemoveAllControlPoints()  # the points were only the input
            self._runPrompt(kind, points)

    def _runPrompt(self, kind, points) -> None:
        logic = self.logic
        if not logic.active:
            return
        changed = logic.syncFromSegment()  # the user's own edits first (GUI thread: reads the segment)
        if kind == "box":
            work = lambda job: logic.setBox(*points)  # noqa: E731
            stepName = "box"
        else:
            work = lambda job: logic.addPoint(points[0], positive=kind == "positive")  # noqa: E731
            stepName = f"{kind} click"

        def done(result):
            logic.writeSegment(stepName)
            self.lastResult = result
            edited = f" (your edits on {len(changed)} slice(s) kept)" if changed else ""
            self._set(f"Slice {result.index}: predicted IoU {result.score:.2f}, {result.area_mm2 / 100.0:.1f} cm\u00b2"
                      f"{edited}. Click more on any slice, or Propagate to 3D." + self.warningText(result.warnings))
            self.startPrefetch(points[0])

        self._run(stepName, work, done)

    def propagate(self, **options):
        """Propagate on a worker; :meth:`cancel` stops it and leaves the session and the segment as they were."""
        logic = self.logic
        if self.busy:
            raise prismrtError(f"PRISM-RT is busy ({self.job.name}): wait for it or cancel it first")
        session = logic._require()
        logic.syncFromSegment()

        def work(job):
            return logic.propagate(progress=lambda index: job.progress(None, f"Propagating: slice {index}..."),
                                   **options)

        def done(_):
            logic.writeSegment("propagate")
            slices = int(np.count_nonzero(session.mask.any(axis=(1, 2))))
            volumeCm3 = float(np.count_nonzero(session.mask)) * float(np.prod(session.image.GetSpacing())) / 1000.0
            report = session.last_propagation
            where = f" ({report.describe(session.plane.orientation.value)})" if report else ""
            self._set(f"{volumeCm3:.1f} cm\u00b3 on {slices} slices{where}. Click on any slice to correct it, then "
                      "propagate again." + self.warningText(report.warnings if report else []))

        return self._run("propagation", work, done)

    def undo(self) -> str:
        return self._history(True)

    def redo(self) -> str:
        return self._history(False)

    def _history(self, undo: bool) -> str:
        if self.busy:
            raise prismrtError("wait for the running job to end (or cancel it) before undoing")
        name = self.logic.undo() if undo else self.logic.redo()
        self._set(("Undone: {step}." if undo else "Redone: {step}.").format(step=name))
        return name

    # ---- idle prefetch: features of the viewed slice and its neighbours, on a worker -----------------------------
    def startPrefetch(self, centerRas) -> None:
        """Compute the features around the slice of ``centerRas`` in the background (nearest first), so that a click
        there runs only the mask decoder. It yields to any prompt or propagation (they cancel it)."""
        if centerRas is None or not self.logic.active or self.busy:
            return
        self.stopPrefetch()
        logic, radius = self.logic, self.PREFETCH_RADIUS

        def work(job):
            computed = []
            while True:
                job.progress(None, "")
                index = logic.prefetch(centerRas, radius)
                if index is None:
                    return computed
                computed.append(index)

        self.prefetchJob = BackgroundJob("prefetch", work).start()

    def stopPrefetch(self, wait: bool = True) -> None:
        """Stop the prefetch after its current slice; ``wait`` for that slice (leaving, closing the scene). Not
        waiting is safe: prefetching only adds to the feature cache, under its lock, beside a prompt or propagation."""
        job, self.prefetchJob = self.prefetchJob, None
        if job is not None:
            job.cancel()
            if wait:
                job.wait()

    # ---- leaving -------------------------------------------------------------------------------------------------
    def leave(self, timeout: float = 30.0) -> None:
        """The module was left or the scene is closing: click mode, prefetch and any running job end (a cancelled
        job's result is never applied)."""
        self._queue.clear()
        if self.placing is not None:
            self.stopPlacing()
        self.stopPrefetch()
        job = self.job
        if job is not None:
            job.cancel()
            job.wait(timeout)

    def forgetScene(self) -> None:
        """After the scene was closed: nothing of it is referenced any more."""
        self.leave()
        self.removeObservers()
        self._clickNodeIDs = {}
        self.logic.end()
        self.status = ""
