"""Chat in the panel: a question about the volume on screen -> PRISMRTLib's ``ChatSession`` -> an answer in the history.

- the **slice** a question is about is the current slice of the slice view in use (:func:`viewSlice`): a view whose
  plane is aligned with one of the volume's IJK axes gives ``SliceRef(axis, index)``, ``index`` the 0-based voxel
  index along k, j or i (axial, coronal, sagittal: PRISMRTLib.chat.types.AXES) found from the plane's position through
  the volume's RAS -> IJK matrix; an oblique view, a view outside the volume or no view gives no slice and a note.
  :func:`jumpToSlice` is the way back: it puts a view on a slice (slice offset through the slice's centre in RAS).
- the **structures** are every segment of the scene's segmentation nodes, as masks on the volume's grid
  (:func:`~PRISMRTModule.conversions.segmentToMask`), so the library sees them in LPS with the volume's geometry;
- :class:`ChatLogic` (MRML only, no Qt): reads the scene on the GUI thread (:meth:`ChatLogic.prepare`), answers on any
  thread (:meth:`ChatLogic.compute`), and keeps the session of the last (volume, segmentations) it built, keyed by
  their modified times, so a second question costs only the answer;
- :class:`ChatController` (no Qt): the history and what the section's widgets do; each question runs as a
  :class:`~PRISMRTModule.jobs.BackgroundJob` (the first image question loads the image model), its answer put into
  the history on the GUI thread from :meth:`ChatController.poll`;
- :func:`historyHtml` and :func:`parseLink`: the history as the HTML the section's text browser shows, and the
  links in it (jump to a slice, choose a reading).
"""

import html
import logging
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import vtk

import slicer

from .conversions import ijkToRasArray, projectOntoSlicePlane, segmentToMask, volumeNodeToImage
from .jobs import BackgroundJob
from .library import importPRISMRTLib, prismrtError
from .mrml import nodesByClass
from .parameters import PRISMRTParameters

# IJK axis -> SliceRef axis name (the inverse of PRISMRTLib.chat.types.AXES).
AXIS_NAMES = {2: "axial", 1: "coronal", 0: "sagittal"}
# A view counts as aligned with a volume axis when the sine of the angle between them is below this (0.06 degrees:
# across a 250 mm half field of view the plane then strays 0.25 mm, well within a slice).
ALIGNED_SINE = 1e-3
VIEW_ORDER = ("Red", "Yellow", "Green")  # the fallback order of slice views
LINK_SCHEME = "prismrt-chat"
_LINK = re.compile(rf"^{LINK_SCHEME}:(slice|reading)/(\d+)(?:/(\d+))?$")
# entry states
PENDING, ANSWERED, ERROR, CANCELLED = "pending", "answered", "error", "cancelled"


class ChatParameters(PRISMRTParameters):
    """The Chat section's state in the module's parameter node: the volume chosen (None: the one shown in the
    slice views, the active background volume)."""

    NODES = dict(PRISMRTParameters.NODES, chatVolume=("ChatVolume", "vtkMRMLScalarVolumeNode"))


# ---- slices <-> slice views ---------------------------------------------------------------------------------------
@dataclass
class ViewSlice:
    """The slice a question is about: ``ref`` a PRISMRTLib SliceRef or None, with the view it came from and a note
    for the user (what was used, or why no slice)."""

    ref: object = None
    viewName: str = ""
    note: str = ""


def _array(matrix4x4) -> np.ndarray:
    return np.array([[matrix4x4.GetElement(r, c) for c in range(4)] for r in range(4)])


def _extent(volumeNode):
    """(first index, size) per IJK axis of the volume's voxels (Slicer lets the extent start elsewhere than 0)."""
    extent = volumeNode.GetImageData().GetExtent()
    first = np.array(extent[0::2], float)
    return first, np.array(extent[1::2], float) - first + 1


def _viewName(sliceNode) -> str:
    return (sliceNode.GetLayoutName() or sliceNode.GetName()) if sliceNode is not None else ""


def _alignedAxis(sliceNode, volumeNode) -> "int | None":
    """The IJK axis whose voxel planes the view's plane is parallel to, or None when the view is oblique to them."""
    # the planes {index a = constant} have the normal of row a of RAS -> IJK (the index's gradient): the angle is
    # measured in millimetres, whatever the spacing
    gradients = np.linalg.inv(ijkToRasArray(volumeNode))[:3, :3]
    gradients /= np.linalg.norm(gradients, axis=1, keepdims=True)
    normal = _array(sliceNode.GetSliceToRAS())[:3, 2]
    cosines = np.abs(gradients @ (normal / np.linalg.norm(normal)))
    axis = int(np.argmax(cosines))
    return axis if np.sqrt(max(0.0, 1.0 - cosines[axis] ** 2)) < ALIGNED_SINE else None


def _checkVolume(volumeNode) -> None:
    if volumeNode is None:
        raise prismrtError("no volume to ask about: load a CT, or choose one in the Chat section")
    if volumeNode.GetImageData() is None:
        raise prismrtError(f"the volume '{volumeNode.GetName()}' has no voxels: load it again")
    if volumeNode.GetParentTransformNode() is not None:
        raise prismrtError(f"the volume '{volumeNode.GetName()}' is under a transform: harden it (Transforms module, "
                           "Harden transform) or remove the transform, so that slices and sides are where they show")


def viewSlice(sliceNode, volumeNode) -> ViewSlice:
    """The slice of ``volumeNode`` that ``sliceNode`` shows, as PRISMRTLib's SliceRef, or no slice with a note (no
    view, an oblique view, a view outside the volume). The index is that of the voxel plane nearest the view's
    plane, counted from the volume's first voxel (as ``volumeNodeToImage`` counts)."""
    if sliceNode is None:
        return ViewSlice(None, "", "no slice view: the question is about the whole volume")
    name = _viewName(sliceNode)
    axis = _alignedAxis(sliceNode, volumeNode)
    if axis is None:
        return ViewSlice(None, name, f"the {name} view is oblique to the volume's axes, so no slice is used (set it "
                                     "to axial, coronal or sagittal, or rotate it to the volume plane)")
    first, size = _extent(volumeNode)
    ijkToRas = ijkToRasArray(volumeNode)
    centreRas = (ijkToRas @ np.append(first + (size - 1) / 2, 1.0))[:3]
    # any point of the plane has the same index along the axis; the one nearest the volume's centre keeps the small
    # misalignment ALIGNED_SINE allows from adding up
    pointRas = projectOntoSlicePlane(sliceNode.GetSliceToRAS(), centreRas)
    position = (np.linalg.inv(ijkToRas) @ np.append(pointRas, 1.0))[axis] - first[axis]
    index = int(np.floor(position + 0.5))
    axisName = AXIS_NAMES[axis]
    if not 0 <= index < size[axis]:
        return ViewSlice(None, name, f"the {name} view is outside the volume '{volumeNode.GetName()}', so no slice "
                                     "is used")
    SliceRef = importPRISMRTLib("PRISMRTLib.chat.types").SliceRef
    return ViewSlice(SliceRef(axisName, index), name, f"{name} view: {axisName} slice {index}")


def sliceCentreRas(volumeNode, ref) -> np.ndarray:
    """The RAS point at the centre of the slice ``ref`` (a SliceRef or "axis:index") of ``volumeNode``."""
    types = importPRISMRTLib("PRISMRTLib.chat.types")
    ref = types.SliceRef.parse(ref)
    axis = types.AXES[ref.axis]
    first, size = _extent(volumeNode)
    if not 0 <= ref.index < size[axis]:
        raise prismrtError(f"the {ref.axis} slice {ref.index} is not in the volume '{volumeNode.GetName()}' "
                           f"(it has {int(size[axis])})")
    ijk = first + (size - 1) / 2
    ijk[axis] = first[axis] + ref.index
    return (ijkToRasArray(volumeNode) @ np.append(ijk, 1.0))[:3]


def _defaultNormal(sliceNode) -> "np.ndarray | None":
    name = sliceNode.GetDefaultOrientation() or ""
    if not sliceNode.HasSliceOrientationPreset(name):  # asking for a missing one logs an error
        return None
    preset = sliceNode.GetSliceOrientationPreset(name)
    return np.array([preset.GetElement(r, 2) for r in range(3)])


def jumpToSlice(volumeNode, ref, sliceNodes) -> "vtkMRMLSliceNode":
    """Show the slice ``ref`` of ``volumeNode`` in a view: the first of ``sliceNodes`` (in order of preference)
    whose plane is along the slice's axis, else the one whose default orientation is nearest that axis, set to it
    (and rotated to the volume plane for an oblique volume). The slice offset goes through the slice's centre, the
    in-plane position is kept. Returns the slice node."""
    _checkVolume(volumeNode)
    types = importPRISMRTLib("PRISMRTLib.chat.types")
    ref = types.SliceRef.parse(ref)
    axis = types.AXES[ref.axis]
    centre = sliceCentreRas(volumeNode, ref)
    sliceNodes = [n for n in sliceNodes if n is not None]
    if not sliceNodes:
        raise prismrtError("there is no slice view to show the slice in: choose a layout with slice views")
    target = next((n for n in sliceNodes if _alignedAxis(n, volumeNode) == axis), None)
    if target is None:
        axisRas = ijkToRasArray(volumeNode)[:3, axis]
        axisRas = axisRas / np.linalg.norm(axisRas)

        def nearness(node):
            normal = _defaultNormal(node)
            return -1.0 if normal is None else abs(float(np.dot(normal, axisRas)))

        target = max(sliceNodes, key=nearness)
        if _defaultNormal(target) is not None:
            target.SetOrientationToDefault()
        if _alignedAxis(target, volumeNode) != axis:
            target.RotateToVolumePlane(volumeNode)  # an oblique volume: Slicer's "rotate to volume plane"
        if _alignedAxis(target, volumeNode) != axis:
            raise prismrtError(f"no slice view could be turned to the {ref.axis} slices of '{volumeNode.GetName()}': "
                               "set a view to its plane by hand")
    target.JumpSliceByOffsetting(*[float(v) for v in centre])
    return target


# ---- the scene's structures ---------------------------------------------------------------------------------------
def _sameGrid(a, b) -> bool:
    return a.GetImageData() is not None and b.GetImageData() is not None and \
        a.GetImageData().GetDimensions() == b.GetImageData().GetDimensions() and \
        np.allclose(ijkToRasArray(a), ijkToRasArray(b), atol=1e-6)


def segmentationsFor(scene, volumeNode) -> tuple:
    """(segmentation nodes whose segments describe ``volumeNode``, notes on those left out): a segmentation drawn on
    another volume of another grid (its reference geometry) or under a transform is left out, since its voxels would
    be read at the wrong place."""
    nodes, notes = [], []
    for node in nodesByClass(scene, "vtkMRMLSegmentationNode"):
        if node.GetSegmentation() is None or node.GetSegmentation().GetNumberOfSegments() == 0:
            continue
        if node.GetParentTransformNode() is not None:
            notes.append(f"'{node.GetName()}' is under a transform and is not used (harden it to use it)")
            continue
        reference = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
        if reference is not None and reference is not volumeNode and reference.IsA("vtkMRMLVolumeNode") \
                and not _sameGrid(reference, volumeNode):
            notes.append(f"'{node.GetName()}' was drawn on '{reference.GetName()}' and is not used")
            continue
        nodes.append(node)
    return nodes, notes


def _segments(node):
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments())]


def structureMasks(segmentationNodes, volumeNode, image) -> tuple:
    """({segment name: mask}, notes): every segment as a uint8 SimpleITK mask on ``volumeNode``'s grid with
    ``image``'s (LPS) geometry; a name seen again in a later segmentation is left out (with a note), the first kept."""
    import SimpleITK as sitk

    masks, notes = {}, []
    for node in segmentationNodes:
        for segment in _segments(node):
            name = segment.GetName()
            if name in masks:
                notes.append(f"a second '{name}' (in '{node.GetName()}') is not used")
                continue
            mask = sitk.GetImageFromArray(segmentToMask(node, name, volumeNode))
            mask.CopyInformation(image)
            masks[name] = mask
    return masks, notes


def cacheKey(volumeNode, segmentationNodes) -> tuple:
    """What a session depends on, as (volume part, segmentations part): the volume's voxels and geometry, each
    segmentation's segments (names and labelmaps). Modified times, so nothing is converted to tell whether anything
    changed."""
    imageData = volumeNode.GetImageData()
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    volume = (volumeNode.GetID(), tuple(np.round(ijkToRasArray(volumeNode), 9).ravel()),
              imageData.GetMTime() if imageData is not None else 0)
    segmentations = []
    for node in segmentationNodes:
        segments = []
        for segment in _segments(node):
            representation = segment.GetRepresentation(labelmap)
            segments.append((segment.GetName(), representation.GetMTime() if representation is not None else 0))
        segmentations.append((node.GetID(), tuple(segments)))
    return volume, tuple(segmentations)


# ---- asking -------------------------------------------------------------------------------------------------------
class LibrarySessions:
    """The default session factory: PRISMRTLib's ChatSession on the image, with the masks as its structure set (none:
    None). One image model serves every session (built on the first question that needs it, by whichever thread
    asks first), so a session rebuilt after a segment edit does not load the model again; its per-slice feature
    cache follows the image object, which :meth:`ChatLogic.prepare` keeps while the volume is unchanged."""

    def __init__(self):
        self._lock = threading.Lock()
        self._imageModel = None

    def imageModel(self):
        with self._lock:
            if self._imageModel is None:
                engine = importPRISMRTLib("PRISMRTLib.chat.engines.image")
                self._imageModel = engine.ImageModelEngine.default()  # PrismRTError: the session says why
            return self._imageModel

    def __call__(self, image, masks):
        session = importPRISMRTLib("PRISMRTLib.chat.session")
        structures = None
        if masks:
            structures = importPRISMRTLib("PRISMRTLib.chat.structures").StructureSet.from_masks(masks, image)
        return session.ChatSession(image, structures, image_model="auto", image_model_factory=self.imageModel)


@dataclass
class ChatRequest:
    """What :meth:`ChatLogic.prepare` read from the scene (GUI thread) for one question; no MRML needed after."""

    question: str
    volumeNodeID: str
    volumeName: str
    slice: ViewSlice
    key: tuple
    session: object = None  # the cached session, or None: built from image and masks
    image: object = None
    masks: dict = field(default_factory=dict)
    structureNames: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    maskNotes: list = field(default_factory=list)  # what reading the masks found (names seen twice)


@dataclass
class ChatOutcome:
    session: object
    answer: object
    seconds: float = 0.0


class ChatLogic:
    """Questions about a volume node, with the scene's segmentations and the slice in view (see the module
    docstring). ``sessionFactory(image, masks) -> session`` (an object with ``ask(question, slice)``) replaces
    PRISMRTLib's ChatSession, e.g. in tests."""

    def __init__(self, sessionFactory=None):
        self.sessionFactory = sessionFactory or LibrarySessions()
        self._cached = None  # (key, session, mask notes) of the last question answered
        self._image = None  # (volume part of the key, image): kept while only the segments change
        self.lastViewID = None  # the slice view last scrolled, turned or jumped

    # ---- views ---------------------------------------------------------------------------------------------------
    @staticmethod
    def sliceNodes(scene) -> list:
        """The scene's slice views, those shown in the layout first, then Red, Yellow, Green, then by name."""
        nodes = nodesByClass(scene, "vtkMRMLSliceNode")

        def order(node):
            name = _viewName(node)
            return (not node.IsMappedInLayout(), VIEW_ORDER.index(name) if name in VIEW_ORDER else len(VIEW_ORDER),
                    name)

        return sorted(nodes, key=order)

    def noteViewUsed(self, sliceNode) -> None:
        if sliceNode is not None:
            self.lastViewID = sliceNode.GetID()

    def currentView(self, scene):
        """The slice view a question is about: the view marked active, else the one under the mouse (the crosshair
        node's), else the last one used (scrolled, turned, jumped to), else the first of :meth:`sliceNodes`."""
        nodes = self.sliceNodes(scene)
        active = [n for n in nodes if n.GetActive()]
        if len(active) == 1:
            return active[0]
        crosshair = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            underMouse = crosshair.GetCursorPositionXYZ([0.0, 0.0, 0.0])
            if underMouse is not None and underMouse.IsA("vtkMRMLSliceNode"):
                return underMouse
        last = scene.GetNodeByID(self.lastViewID) if self.lastViewID else None
        if last is not None and last.IsA("vtkMRMLSliceNode"):
            return last
        return nodes[0] if nodes else None

    @staticmethod
    def compositeNode(scene, sliceNode):
        for composite in nodesByClass(scene, "vtkMRMLSliceCompositeNode"):
            if composite.GetLayoutName() == sliceNode.GetLayoutName():
                return composite
        return None

    def defaultVolume(self, scene, sliceNode=None):
        """The volume a question is about when none is chosen: the background of the view in use, else the
        selection node's active volume, else the scene's first greyscale volume."""
        candidates = []
        composite = self.compositeNode(scene, sliceNode) if sliceNode is not None else None
        if composite is not None:
            candidates.append(composite.GetBackgroundVolumeID())
        selection = scene.GetFirstNodeByClass("vtkMRMLSelectionNode")
        if selection is not None:
            candidates.append(selection.GetActiveVolumeID())
        for nodeID in candidates:
            node = scene.GetNodeByID(nodeID) if nodeID else None
            if node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
                return node
        for node in nodesByClass(scene, "vtkMRMLScalarVolumeNode"):
            if not node.IsA("vtkMRMLLabelMapVolumeNode"):
                return node
        return None

    # ---- one question --------------------------------------------------------------------------------------------
    def prepare(self, scene, question: str, volumeNode=None, sliceNode="current", view: "ViewSlice | None" = None):
        """Read what the question needs from the scene (GUI thread): the volume (default :meth:`defaultVolume`), the
        slice (``view`` as given, else that of ``sliceNode``: "current" for :meth:`currentView`, None for none) and,
        unless the cached session still fits, the image and the structure masks. Raises PrismRTError saying what to
        do."""
        if sliceNode == "current":
            sliceNode = self.currentView(scene)
        if volumeNode is None:
            volumeNode = self.defaultVolume(scene, sliceNode)
        _checkVolume(volumeNode)
        segmentations, notes = segmentationsFor(scene, volumeNode)
        request = ChatRequest(question, volumeNode.GetID(), volumeNode.GetName(),
                              view if view is not None else viewSlice(sliceNode, volumeNode),
                              cacheKey(volumeNode, segmentations), notes=notes)
        request.structureNames = list(dict.fromkeys(s.GetName() for n in segmentations for s in _segments(n)))
        if self._cached is not None and self._cached[0] == request.key:
            request.session, request.maskNotes = self._cached[1], self._cached[2]
            request.notes += request.maskNotes
        else:
            if self._image is None or self._image[0] != request.key[0]:
                self._image = (request.key[0], volumeNodeToImage(volumeNode))
            request.image = self._image[1]
            request.masks, request.maskNotes = structureMasks(segmentations, volumeNode, request.image)
            request.notes += request.maskNotes
        return request

    def compute(self, request: ChatRequest) -> ChatOutcome:
        """The answer (any thread; no MRML): the cached session, or one built from the request's image and masks."""
        begin = time.perf_counter()
        session = request.session or self.sessionFactory(request.image, request.masks)
        answer = session.ask(request.question, request.slice.ref)
        return ChatOutcome(session, answer, time.perf_counter() - begin)

    def remember(self, request: ChatRequest, outcome: ChatOutcome) -> None:
        """Keep the session for the next question on the same volume and structures (GUI thread, after an answer:
        a cancelled question's session may still be busy on its thread and is never kept)."""
        self._cached = (request.key, outcome.session, request.maskNotes)

    def forget(self) -> None:
        self._cached = self._image = None

    def ask(self, scene, question: str, volumeNode=None, sliceNode="current"):
        """One question, answered here and now (scripts): PRISMRTLib's Answer."""
        request = self.prepare(scene, question, volumeNode, sliceNode)
        outcome = self.compute(request)
        self.remember(request, outcome)
        return outcome.answer

    def jumpToSlice(self, scene, volumeNode, ref, preferredView=None):
        """:func:`jumpToSlice` over the scene's views (``preferredView`` first, e.g. the one the question came from);
        the view also shows the volume when it showed none. Returns the slice node."""
        nodes = self.sliceNodes(scene)
        if preferredView is not None:
            nodes = [n for n in nodes if _viewName(n) == preferredView] + \
                [n for n in nodes if _viewName(n) != preferredView]
        sliceNode = jumpToSlice(volumeNode, ref, nodes)
        composite = self.compositeNode(scene, sliceNode)
        if composite is not None and not composite.GetBackgroundVolumeID():
            composite.SetBackgroundVolumeID(volumeNode.GetID())
        self.noteViewUsed(sliceNode)
        return sliceNode


# ---- the history --------------------------------------------------------------------------------------------------
@dataclass
class ChatEntry:
    """One question and (once it came) its answer, a PRISMRTLib Answer."""

    id: int
    question: str
    volumeNodeID: str = ""
    volumeName: str = ""
    slice: ViewSlice = field(default_factory=ViewSlice)
    structureNames: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    state: str = PENDING
    answer: object = None
    error: str = ""
    seconds: float = 0.0
    chosenFrom: "int | None" = None  # the clarify entry whose reading this question is


class ChatController:
    """The Chat section's behaviour without Qt: the section calls these and shows :attr:`history`
    (:func:`historyHtml`) and :attr:`status` whenever ``onChanged`` is called. One question runs at a time, as a
    :class:`BackgroundJob`; :meth:`poll` (a GUI timer, or a test) puts its answer into the history."""

    def __init__(self, scene, logic: ChatLogic | None = None, onChanged=None):
        self.scene = scene
        self.logic = logic or ChatLogic()
        self.onChanged = onChanged or (lambda: None)
        self.history = []
        self.revision = 0  # counts changes of the history, so the view is redrawn only when it changed
        self.status = ""
        self.failed = False
        self.job = None
        self._nextID = 1
        self._abandoned = []  # cancelled jobs still running: polled until they end, their answers dropped

    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def waiting(self) -> bool:
        """A question is answered, or a cancelled one has not ended yet: keep polling."""
        return self.job is not None or bool(self._abandoned)

    def _changed(self, status: "str | None" = None, failed: bool = False) -> None:
        if status is not None:
            self.status, self.failed = status, failed
        self.revision += 1
        self.onChanged()

    def entry(self, entryID: int) -> ChatEntry:
        for entry in self.history:
            if entry.id == entryID:
                return entry
        raise prismrtError("that answer is no longer in the chat history")

    def ask(self, question: str, volumeNode=None, sliceNode="current", view=None, chosenFrom=None) -> ChatEntry:
        """Put the question into the history and answer it on a worker (see :meth:`ChatLogic.prepare` for
        ``volumeNode``, ``sliceNode`` and ``view``). A question the scene cannot serve (no volume, a transformed
        one) gets its reason in the history at once. Returns the entry."""
        question = (question or "").strip()
        if not question:
            raise prismrtError("type a question first")
        if self.busy:
            raise prismrtError("the previous question is still being answered: wait for it, or cancel it")
        entry = ChatEntry(self._nextID, question, chosenFrom=chosenFrom)
        self._nextID += 1
        self.history.append(entry)
        errors = importPRISMRTLib("PRISMRTLib.errors")
        try:
            request = self.logic.prepare(self.scene, question, volumeNode, sliceNode, view)
        except errors.PrismRTError as error:
            entry.state, entry.error = ERROR, str(error)
            self._changed(f"Could not ask: {error}", failed=True)
            return entry
        entry.volumeNodeID, entry.volumeName = request.volumeNodeID, request.volumeName
        entry.slice, entry.structureNames, entry.notes = request.slice, request.structureNames, request.notes
        logic = self.logic
        firstUse = request.session is None

        def work(job):
            job.progress(None, "Reading the volume and structures..." if firstUse else "Answering...")
            return logic.compute(request)

        def finished() -> bool:
            """The job's own end: False for a job cancelled (abandoned) earlier, which must not touch a newer one."""
            if self.job is not job:
                return False
            self.job = None
            return True

        def done(outcome):
            if finished():
                logic.remember(request, outcome)
                entry.state, entry.answer, entry.seconds = ANSWERED, outcome.answer, outcome.seconds
                self._changed(f"Answered in {outcome.seconds:.1f} s.")

        def error(exception):
            if finished():
                logging.error(f"PRISM-RT chat: {exception}")
                entry.state = ERROR
                entry.error = str(exception) if isinstance(exception, errors.PrismRTError) else \
                    f"the chat failed ({type(exception).__name__}: {exception})"
                self._changed(f"Could not answer: {entry.error}", failed=True)

        def cancelled():
            if finished():
                entry.state = CANCELLED
                self._changed("Cancelled.")

        job = BackgroundJob("chat", work, done, error, cancelled)
        self.job = job.start()
        self._changed("Answering... (the first question about the pixels loads the image model; this can take a "
                      "while)" if firstUse else "Answering...")
        return entry

    def cancel(self) -> None:
        """Stop waiting for the answer: the question is marked cancelled at once and its answer, if it still comes,
        is dropped (the library cannot stop a model load midway; its session is not kept)."""
        job = self.job
        if job is None:
            return
        job.cancel()
        self._abandoned.append(job)
        self.job = None
        for entry in self.history:
            if entry.state == PENDING:
                entry.state = CANCELLED
        self._changed("Cancelled.")

    def poll(self) -> None:
        """GUI thread, from a timer: put a finished answer into the history."""
        self._abandoned = [job for job in self._abandoned if not job.poll()]
        if self.job is not None:
            self.job.poll()

    def progress(self) -> tuple:
        return self.job.currentProgress() if self.job is not None else (None, "")

    def _volumeOf(self, entry):
        node = self.scene.GetNodeByID(entry.volumeNodeID) if entry.volumeNodeID else None
        if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
            raise prismrtError(f"the volume '{entry.volumeName}' this answer is about is no longer in the scene")
        return node

    def jumpTo(self, entryID: int):
        """Show the slice the entry's answer speaks of (else the slice it was asked about). Returns the view."""
        entry = self.entry(entryID)
        ref = getattr(entry.answer, "slice", None) or entry.slice.ref
        if ref is None:
            raise prismrtError("this answer is about the whole volume, not one slice")
        sliceNode = self.logic.jumpToSlice(self.scene, self._volumeOf(entry), ref, entry.slice.viewName or None)
        self._changed(f"{_viewName(sliceNode)} view: {ref} of '{entry.volumeName}'.")
        return sliceNode

    def chooseReading(self, entryID: int, index: int) -> ChatEntry:
        """Ask the ``index``-th reading of a clarify answer, about the same volume and slice as the question."""
        entry = self.entry(entryID)
        readings = list(getattr(entry.answer, "readings", None) or [])
        if not 0 <= index < len(readings):
            raise prismrtError("that reading is not offered any more")
        return self.ask(readings[index], self._volumeOf(entry), view=entry.slice, chosenFrom=entry.id)

    def clear(self) -> None:
        if self.busy:
            self.cancel()
        self.history = []
        self._changed("")

    def contextText(self, volumeNode=None) -> str:
        """What the next question will be about (volume, slice, structures), in one line for the panel."""
        sliceNode = self.logic.currentView(self.scene)
        if volumeNode is None:
            volumeNode = self.logic.defaultVolume(self.scene, sliceNode)
        if volumeNode is None or volumeNode.GetImageData() is None:
            return "No volume to ask about: load a CT."
        segmentations, _ = segmentationsFor(self.scene, volumeNode)
        count = len({s.GetName() for n in segmentations for s in _segments(n)})
        structures = f"{count} structure{'s' if count != 1 else ''}" if count else "no structures"
        return f"About '{volumeNode.GetName()}': {viewSlice(sliceNode, volumeNode).note}; {structures}."

    def leave(self, timeout: float = 5.0) -> None:
        """The scene closes or the module is cleaned up: stop waiting for answers (their threads end on their own)."""
        self.cancel()
        deadline = time.monotonic() + timeout
        while self._abandoned and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.02)

    def forgetScene(self) -> None:
        self.leave(timeout=0.0)
        self.logic.forget()
        self.logic.lastViewID = None
        self.history = []
        self._changed("", failed=False)


# ---- the history as HTML ------------------------------------------------------------------------------------------
# Backgrounds with their own text colour, so the history reads in Slicer's light and dark styles alike.
STYLES = {
    "question": ("#e3ecf7", "#14202e"),
    "answered": ("#eef6ee", "#142414"),
    "cannot_tell": ("#fbefd9", "#3d2a00"),
    "clarify": ("#ece8fb", "#221845"),
    "pending": ("#f2f2f2", "#404040"),
    "error": ("#fbe3e1", "#5a0f08"),
    "cancelled": ("#f2f2f2", "#606060"),
}
META_COLOUR = "#5f5f5f"


def sliceLink(entryID: int) -> str:
    return f"{LINK_SCHEME}:slice/{entryID}"


def readingLink(entryID: int, index: int) -> str:
    return f"{LINK_SCHEME}:reading/{entryID}/{index}"


def parseLink(text: str) -> "tuple | None":
    """("slice", entry id, None) or ("reading", entry id, reading index) of a history link, else None."""
    match = _LINK.match(str(text).strip())
    if match is None:
        return None
    action, entryID, index = match.groups()
    return action, int(entryID), int(index) if index is not None else None


def _box(kind: str, body: str) -> str:
    background, colour = STYLES[kind]
    return (f'<table width="100%" cellspacing="0" cellpadding="6" style="margin-top: 4px;"><tr>'
            f'<td class="{kind}" style="background-color: {background}; color: {colour};">{body}</td></tr></table>')


def _meta(text: str) -> str:
    return f'<br><span style="color: {META_COLOUR}; font-size: small;">{text}</span>'


def confidenceText(confidence) -> str:
    return f"{round(100.0 * float(confidence)):.0f} %"


def answerKind(answer) -> str:
    """The look of an answer: "answered", "cannot_tell" or "clarify" (PRISMRTLib Answer.status)."""
    status = getattr(answer, "status", "answered")
    return status if status in ("cannot_tell", "clarify") else "answered"


def _answerHtml(entry: ChatEntry) -> str:
    answer, e = entry.answer, html.escape
    kind = answerKind(answer)
    ref = getattr(answer, "slice", None) or (entry.slice.ref if entry.slice is not None else None)
    text = e(answer.answer)
    if kind == "cannot_tell":
        body = f"<b>Cannot tell.</b> <i>{text}</i>"
    elif kind == "clarify":
        choices = "".join(f'<br>&#8594; <a href="{readingLink(entry.id, i)}">{e(reading)}</a>'
                          for i, reading in enumerate(answer.readings or []))
        # the readings say it all (the library's text is "Did you mean: A, or B?"); without them, its text
        body = f"<b>Which did you mean?</b>{choices}" if choices else f"<b>Which did you mean?</b> {text}"
    elif ref is not None:  # the answer itself is the link to its slice
        body = f'<a href="{sliceLink(entry.id)}" style="color: {STYLES[kind][1]}; text-decoration: none;">{text}</a>'
    else:
        body = text
    meta = [f"source: {e(str(answer.source))}", f"confidence {confidenceText(answer.confidence)}"]
    if ref is not None and kind != "clarify":
        meta.append(f'<a href="{sliceLink(entry.id)}">show {e(str(ref).replace(":", " slice "))}</a>')
    return _box(kind, body + _meta(" &middot; ".join(meta)))


def entryHtml(entry: ChatEntry) -> str:
    e = html.escape
    context = [entry.slice.note] if entry.slice is not None and entry.slice.note else []
    if entry.volumeName:
        count = len(entry.structureNames)
        context.append(f"'{entry.volumeName}', {count} structure{'s' if count != 1 else ''}" if count else
                       f"'{entry.volumeName}', no structures")
    context += entry.notes
    prefix = "You chose" if entry.chosenFrom is not None else "You"
    parts = [_box("question", f"<b>{prefix}:</b> {e(entry.question)}" +
                  (_meta(e("; ".join(context))) if context else ""))]
    if entry.state == PENDING:
        parts.append(_box("pending", "<i>Answering...</i>"))
    elif entry.state == ERROR:
        parts.append(_box("error", f"<b>Could not answer:</b> {e(entry.error)}"))
    elif entry.state == CANCELLED:
        parts.append(_box("cancelled", "<i>Cancelled.</i>"))
    elif entry.answer is not None:
        parts.append(_answerHtml(entry))
    return "".join(parts)


def historyHtml(entries) -> str:
    if not entries:
        return (f'<p style="color: {META_COLOUR};">Ask about the CT on screen: "is the left parotid in this slice?", '
                '"which side is the target on?", "how big is PTV70?", "what is the slice thickness?". The slice in '
                "view and the scene's segmentations are used; click an answer to go to its slice.</p>")
    return "".join(entryHtml(entry) for entry in entries)
