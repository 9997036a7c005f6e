"""The panel's Delineation section (Qt): ``Resources/UI/PRISMRTDelineation.ui`` wired to a
:class:`~PRISMRTModule.delineation.DelineationController`. Only the application has Qt, so this file is the one part
of the delineation that the slicer-core tests cannot run; it holds no logic of its own: buttons call the
controller, and the controller's state is shown."""

import numpy as np
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from .conversions import projectOntoSlicePlane
from .delineation import DelineationController


class DelineationSection(VTKObservationMixin):
    POLL_MS = 50  # how often finished jobs are applied and progress shown
    PREFETCH_DELAY_MS = 300  # the view must rest this long before its slices are prefetched

    def __init__(self, moduleWidget, parentLayout):
        VTKObservationMixin.__init__(self)
        self.moduleWidget = moduleWidget  # the module's widget: parameter node, selected volume, dependencies
        self.uiWidget = slicer.util.loadUI(moduleWidget.resourcePath("UI/PRISMRTDelineation.ui"))
        parentLayout.addWidget(self.uiWidget)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)

        appLogic = slicer.app.applicationLogic()
        self.controller = DelineationController(
            slicer.mrmlScene, appLogic.GetInteractionNode(), appLogic.GetSelectionNode(), onChanged=self.updateGUI,
            sliceViewNodeIDs=[n.GetID() for n in slicer.util.getNodesByClass("vtkMRMLSliceNode")])

        self._placeButtons = {"positive": self.ui.positivePointButton, "negative": self.ui.negativePointButton,
                              "box": self.ui.boxButton}
        for kind, button in self._placeButtons.items():
            button.connect("toggled(bool)", lambda on, kind=kind: self.onPlaceToggled(kind, on))
        self.ui.startDelineationButton.connect("clicked(bool)", self.onStart)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.cancelJobButton.connect("clicked(bool)", self.controller.cancel)
        self.ui.undoButton.connect("clicked(bool)", lambda: self.onHistory(undo=True))
        self.ui.redoButton.connect("clicked(bool)", lambda: self.onHistory(undo=False))
        self.ui.delineationBackendComboBox.connect("currentTextChanged(QString)",
                                                   lambda text: self._setParameter("backend", text))
        self.ui.segmentNameLineEdit.connect("editingFinished()", lambda: self._setParameter(
            "segmentName", self.ui.segmentNameLineEdit.text.strip() or "GTV"))
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   lambda node: self._setParameter("outputSegmentation", node))

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.connect("timeout()", self._poll)
        self._prefetchTimer = qt.QTimer()
        self._prefetchTimer.setSingleShot(True)
        self._prefetchTimer.setInterval(self.PREFETCH_DELAY_MS)
        self._prefetchTimer.connect("timeout()", self._prefetchViewedSlice)
        self._viewedIndex = None

    # ---- parameter node <-> GUI ----------------------------------------------------------------------------------
    def _setParameter(self, name, value) -> None:
        parameters = self.moduleWidget.parameters
        if parameters is not None and getattr(parameters, name) != value:
            setattr(parameters, name, value)

    def updateGUIFromParameters(self, parameters) -> None:
        for widget, setter in ((self.ui.delineationBackendComboBox, lambda w: setattr(
                w, "currentText", parameters.backend)),
                               (self.ui.segmentNameLineEdit, lambda w: setattr(w, "text", parameters.segmentName)),
                               (self.ui.outputSegmentationSelector, lambda w: w.setCurrentNode(
                                   parameters.outputSegmentation))):
            wasBlocked = widget.blockSignals(True)
            setter(widget)
            widget.blockSignals(wasBlocked)
        self.updateGUI()

    # ---- controller state -> GUI ---------------------------------------------------------------------------------
    def _delineatingSelected(self) -> bool:
        logic = self.controller.logic
        volumeNode = self.moduleWidget.selectedVolume()
        return logic.active and volumeNode is not None and logic.volumeNode is volumeNode

    def updateGUI(self) -> None:
        controller, logic = self.controller, self.controller.logic
        busy = controller.busy
        active = self._delineatingSelected()
        self.ui.startDelineationButton.enabled = self.moduleWidget.selectedVolume() is not None and not busy
        for kind, button in self._placeButtons.items():
            button.enabled = active
            wasBlocked = button.blockSignals(True)
            button.checked = controller.placing == kind
            button.blockSignals(wasBlocked)
        self.ui.propagateButton.enabled = active and not busy and bool(logic.session.mask.any())
        self.ui.undoButton.enabled = active and not busy and logic.canUndo()
        self.ui.redoButton.enabled = active and not busy and logic.canRedo()
        for widget in (self.ui.delineationBackendComboBox, self.ui.outputSegmentationSelector,
                       self.ui.segmentNameLineEdit):
            widget.enabled = not busy
        self.ui.jobProgressBar.visible = busy
        self.ui.cancelJobButton.visible = busy
        if controller.status:
            self.ui.delineationStatusLabel.text = controller.status

    def _poll(self) -> None:
        controller = self.controller
        controller.poll()
        job = controller.job
        if job is not None:
            fraction, text = job.currentProgress()
            bar = self.ui.jobProgressBar
            bar.maximum = 0 if fraction is None else 100  # 0: a busy indicator when the amount is unknown
            if fraction is not None:
                bar.value = int(round(100 * fraction))
            bar.format = text or job.name
        self.updateGUI()

    # ---- actions -------------------------------------------------------------------------------------------------
    def onStart(self) -> None:
        volumeNode = self.moduleWidget.selectedVolume()
        if volumeNode is None or self.controller.busy or not self.moduleWidget.ensurePythonPackages():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the delineation."), waitCursor=True):
            self.moduleWidget.logic.installTorch()
            parameters = self.moduleWidget.parameters
            segmentationNode = parameters.outputSegmentation if parameters is not None else None
            if segmentationNode is None:
                segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", f"{volumeNode.GetName()} PRISM-RT")
                segmentationNode.CreateDefaultDisplayNodes()
                self._setParameter("outputSegmentation", segmentationNode)
                self.ui.outputSegmentationSelector.setCurrentNode(segmentationNode)
            name = self.ui.segmentNameLineEdit.text.strip() or "GTV"
            mode = parameters.promptMode if parameters is not None else "positive"
            self.controller.start(volumeNode, segmentationNode, name,
                                  backend=self.ui.delineationBackendComboBox.currentText,
                                  onStarted=lambda: self._started(mode))
            self._pollTimer.start()

    def _started(self, mode) -> None:
        self.controller.startPlacing(mode)
        self._observeSliceViews()
        self._prefetchViewedSlice()

    def onPlaceToggled(self, kind: str, on: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Click mode could not be changed.")):
            if on:
                self.controller.startPlacing(kind)
                self._setParameter("promptMode", kind)
                self._observeSliceViews()
            elif self.controller.placing == kind:
                self.controller.stopPlacing()

    def onPropagate(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Propagation failed.")):
            self.controller.propagate()

    def onHistory(self, undo: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Undo failed.") if undo else _("Redo failed."), waitCursor=True):
            self.controller.undo() if undo else self.controller.redo()

    # ---- idle prefetch of the viewed slice -----------------------------------------------------------------------
    def _isDelineationView(self, sliceNode) -> bool:
        session = self.controller.logic.session
        return session is not None and sliceNode.GetOrientation().lower() == session.plane.orientation.value

    def _observeSliceViews(self) -> None:
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            if not self.hasObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceViewModified):
                self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceViewModified)

    def _viewedSliceRas(self, sliceNode=None):
        """A point (RAS) on the plane a view shows: the CT's centre projected onto it."""
        logic = self.controller.logic
        if sliceNode is None:
            nodes = [n for n in slicer.util.getNodesByClass("vtkMRMLSliceNode") if self._isDelineationView(n)]
            if not nodes or logic.volumeNode is None:
                return None
            sliceNode = nodes[0]
        bounds = [0.0] * 6
        logic.volumeNode.GetRASBounds(bounds)
        return projectOntoSlicePlane(sliceNode.GetSliceToRAS(), np.array(bounds).reshape(3, 2).mean(axis=1))

    def onSliceViewModified(self, caller, event) -> None:
        """Slice nodes change for much else (hovering): only a new slice index restarts the prefetch timer."""
        if not self._isDelineationView(caller):
            return
        pointRas = self._viewedSliceRas(caller)
        index = self.controller.logic.sliceIndex(pointRas)
        if index != self._viewedIndex:
            self._viewedIndex, self._viewedRas = index, pointRas
            self._prefetchTimer.start()

    def _prefetchViewedSlice(self) -> None:
        self.controller.startPrefetch(getattr(self, "_viewedRas", None) or self._viewedSliceRas())

    # ---- leaving -------------------------------------------------------------------------------------------------
    def leave(self) -> None:
        """The module was left: click mode, prefetch and any running job end."""
        self._prefetchTimer.stop()
        self.controller.leave()
        self.removeObservers()
        self.updateGUI()

    def enter(self) -> None:
        self._pollTimer.start()

    def sceneClosed(self) -> None:
        self._prefetchTimer.stop()
        self._pollTimer.stop()
        self.controller.forgetScene()
        self.removeObservers()
        self.ui.delineationStatusLabel.text = _("Select a CT volume and click Start.")

    def cleanup(self) -> None:
        self.leave()
        self._pollTimer.stop()
        self.controller.removeObservers()

