"""The panel's Registration section (Qt): ``Resources/UI/PRISMRTRegistration.ui`` wired to a
:class:`~PRISMRTModule.registration.RegistrationController`. Only the application has Qt, so this file is the one part
of the registration that the slicer-core tests cannot run; it holds no logic of its own: buttons call the controller,
and the controller's state is shown.

The section's choices live in the module's parameter node (:class:`~PRISMRTModule.registration.RegistrationParameters`),
so a saved scene restores them. A running registration goes on when the module is left (it is long, and its result is
new nodes only); it is cancelled when the scene closes.
"""

import qt

import slicer
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from .registration import (
    FUSION_OPACITY,
    METHODS,
    SMOOTHNESS_STOPS,
    RegistrationController,
    RegistrationOutputs,
    RegistrationParameters,
    methodAvailability,
    smoothnessHint,
)


class RegistrationSection(VTKObservationMixin):
    POLL_MS = 100  # how often a finished registration is applied and progress shown

    def __init__(self, moduleWidget, parentLayout):
        VTKObservationMixin.__init__(self)
        self.moduleWidget = moduleWidget  # the module's widget: parameter node, selected volume, dependencies
        self.uiWidget = slicer.util.loadUI(moduleWidget.resourcePath("UI/PRISMRTRegistration.ui"))
        parentLayout.addWidget(self.uiWidget)
        self.ui = slicer.util.childWidgetVariables(self.uiWidget)
        self.uiWidget.setMRMLScene(slicer.mrmlScene)  # the .ui passes the scene on to the fixed volume selector
        for selector in (self.ui.movingVolumeSelector, self.ui.fixedMaskSelector, self.ui.fixedSegmentationSelector,
                         self.ui.movingSegmentationSelector):
            selector.setMRMLScene(slicer.mrmlScene)

        self.controller = RegistrationController(slicer.mrmlScene, logic=moduleWidget.logic.registration,
                                                 onChanged=self.updateGUI)

        self._selectors = {"fixedVolume": self.ui.fixedVolumeSelector, "movingVolume": self.ui.movingVolumeSelector,
                           "fixedMask": self.ui.fixedMaskSelector,
                           "fixedSegmentation": self.ui.fixedSegmentationSelector,
                           "movingSegmentation": self.ui.movingSegmentationSelector}
        for name, selector in self._selectors.items():
            selector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node, name=name: self._setSetting(name, node))
        self.ui.registrationMethodComboBox.connect("currentTextChanged(QString)", self.onMethodChanged)
        self.ui.smoothnessSlider.connect("valueChanged(int)", self.onSmoothnessSlider)
        self.ui.smoothnessSpinBox.connect("valueChanged(double)", self.onSmoothnessValue)
        self.ui.inverseConsistencyCheckBox.connect(
            "toggled(bool)", lambda on: self._setSetting("inverseConsistency", "true" if on else "false"))
        self.ui.multimodalCheckBox.connect(
            "toggled(bool)", lambda on: self._setSetting("multimodal", "true" if on else "false"))
        self.ui.runRegistrationButton.connect("clicked(bool)", self.onRun)
        self.ui.cancelRegistrationButton.connect("clicked(bool)", self.controller.cancel)
        self.ui.showFusionButton.connect("clicked(bool)", lambda: self.onView("fusion"))
        self.ui.showCheckerboardButton.connect("clicked(bool)", lambda: self.onView("checkerboard"))
        self.ui.showJacobianButton.connect("clicked(bool)", lambda: self.onView("jacobian"))
        self.ui.showQATableButton.connect("clicked(bool)", self.onShowQATable)
        self.ui.smoothnessSlider.maximum = len(SMOOTHNESS_STOPS) - 1

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.connect("timeout()", self._poll)

    # ---- parameter node <-> GUI ----------------------------------------------------------------------------------
    def _settings(self):
        parameters = self.moduleWidget.parameters
        return RegistrationParameters(parameters.node) if parameters is not None else None

    def _setSetting(self, name, value) -> None:
        settings = self._settings()
        if settings is not None and getattr(settings, name) != value:
            setattr(settings, name, value)

    def updateGUIFromParameters(self, parameters) -> None:
        settings = self._settings()
        if settings is None:
            return
        if settings.fixedVolume is None and parameters.inputVolume is not None \
                and parameters.inputVolume is not settings.movingVolume:
            settings.fixedVolume = parameters.inputVolume  # the CT of the Input section, to save a click
        for name, selector in self._selectors.items():
            wasBlocked = selector.blockSignals(True)
            selector.setCurrentNode(getattr(settings, name))
            selector.blockSignals(wasBlocked)
        method = settings.registrationMethod if settings.registrationMethod in METHODS else METHODS[0]
        try:
            smoothness = float(settings.smoothness)
        except ValueError:
            smoothness = 1.0
        for widget, setter in (
                (self.ui.registrationMethodComboBox, lambda w: setattr(w, "currentText", method)),
                (self.ui.smoothnessSpinBox, lambda w: setattr(w, "value", smoothness)),
                (self.ui.smoothnessSlider, lambda w: setattr(w, "value", self._nearestStop(smoothness))),
                (self.ui.inverseConsistencyCheckBox, lambda w: setattr(
                    w, "checked", settings.inverseConsistency == "true")),
                (self.ui.multimodalCheckBox, lambda w: setattr(w, "checked", settings.multimodal == "true"))):
            wasBlocked = widget.blockSignals(True)
            setter(widget)
            widget.blockSignals(wasBlocked)
        self.ui.smoothnessHintLabel.text = smoothnessHint(smoothness)
        self._showMethodAvailability(method)
        if self.controller.outputs is None and settings.registrationResult is not None:  # a reloaded scene's
            try:
                self.controller.outputs = RegistrationOutputs.fromTransformNode(settings.registrationResult)
            except Exception:  # not a registration result any more (its attribute was removed)
                pass
        self.updateGUI()

    @staticmethod
    def _nearestStop(value: float) -> int:
        return min(range(len(SMOOTHNESS_STOPS)), key=lambda i: abs(SMOOTHNESS_STOPS[i] - value))

    def onSmoothnessSlider(self, position: int) -> None:
        self.ui.smoothnessSpinBox.value = SMOOTHNESS_STOPS[position]  # -> onSmoothnessValue

    def onSmoothnessValue(self, value: float) -> None:
        slider = self.ui.smoothnessSlider
        wasBlocked = slider.blockSignals(True)
        slider.value = self._nearestStop(value)
        slider.blockSignals(wasBlocked)
        self.ui.smoothnessHintLabel.text = smoothnessHint(value)
        self._setSetting("smoothness", f"{value:g}")

    def onMethodChanged(self, method: str) -> None:
        self._setSetting("registrationMethod", method)
        self._showMethodAvailability(method)
        self.updateGUI()

    def _showMethodAvailability(self, method: str) -> None:
        try:
            problem = methodAvailability(method)
        except ImportError:  # PRISMRTLib's dependencies are not installed yet: Run installs them
            problem = None
        label = self.ui.methodStatusLabel
        label.text = (problem[0].upper() + problem[1:] + ".") if problem else ""
        label.visible = bool(problem)
        self._methodProblem = problem

    # ---- controller state -> GUI ---------------------------------------------------------------------------------
    def _hasResult(self) -> bool:
        controller = self.controller
        if controller.outputs is not None and controller.outputs.transformNode.GetScene() is not None:
            return True
        return bool(controller.logic.results(slicer.mrmlScene))

    def updateGUI(self) -> None:
        controller = self.controller
        busy = controller.busy
        settings = self._settings()
        ready = settings is not None and settings.fixedVolume is not None and settings.movingVolume is not None
        problem = getattr(self, "_methodProblem", None)
        run = self.ui.runRegistrationButton
        run.enabled = ready and not busy and not problem
        run.toolTip = (_("A registration is running") if busy else
                       _("Select the fixed and the moving volume first") if not ready else
                       problem if problem else
                       _("Register the moving volume to the fixed one, off the GUI thread. The results are new "
                         "nodes: nothing is changed or overwritten."))
        for widget in (*self._selectors.values(), self.ui.registrationMethodComboBox, self.ui.smoothnessSlider,
                       self.ui.smoothnessSpinBox, self.ui.inverseConsistencyCheckBox, self.ui.multimodalCheckBox):
            widget.enabled = not busy
        hasResult = self._hasResult()
        for button in (self.ui.showFusionButton, self.ui.showCheckerboardButton, self.ui.showJacobianButton,
                       self.ui.showQATableButton):
            button.enabled = hasResult and not busy
        self.ui.registrationProgressBar.visible = busy
        self.ui.cancelRegistrationButton.visible = busy
        if controller.status:
            label = self.ui.registrationStatusLabel
            label.text = controller.status
            verdictFailed = controller.status.startswith("QA FAIL")
            label.styleSheet = "color: #c0392b;" if controller.failed or verdictFailed else ""

    def _poll(self) -> None:
        controller = self.controller
        controller.poll()
        if controller.busy:
            fraction, text = controller.progress()
            bar = self.ui.registrationProgressBar
            bar.maximum = 0 if fraction is None else 100  # 0: a busy indicator when the amount is unknown
            if fraction is not None:
                bar.value = int(round(100 * fraction))
            bar.format = f"{text or 'Registering'} (%p%)" if fraction is not None else (text or "Registering")
        else:
            self._pollTimer.stop()
        self.updateGUI()

    # ---- actions -------------------------------------------------------------------------------------------------
    def onRun(self) -> None:
        settings = self._settings()
        if settings is None or self.controller.busy or not self.moduleWidget.ensurePythonPackages():
            return
        with slicer.util.tryWithErrorDisplay(_("The registration could not be started."), waitCursor=True):
            self.moduleWidget.logic.installTorch()
            self.controller.run(
                settings.fixedVolume, settings.movingVolume, fixedMask=settings.fixedMask,
                fixedSegmentation=settings.fixedSegmentation, movingSegmentation=settings.movingSegmentation,
                method=self.ui.registrationMethodComboBox.currentText,
                smoothness=float(self.ui.smoothnessSpinBox.value),
                inverseConsistency=bool(self.ui.inverseConsistencyCheckBox.checked),
                multimodal=bool(self.ui.multimodalCheckBox.checked),
                featureBackend=self.moduleWidget.parameters.backend,  # the backbone the Delineation section uses
                onDone=self._finished)
            self._pollTimer.start()

    def _finished(self, outputs) -> None:
        self._setSetting("registrationResult", outputs.transformNode)
        slicer.util.setSliceViewerLayers(background=outputs.fixedVolumeNode, foreground=outputs.warpedVolumeNode,
                                         foregroundOpacity=FUSION_OPACITY, fit=True)

    def onView(self, kind: str) -> None:
        with slicer.util.tryWithErrorDisplay(_("The view could not be shown."), waitCursor=True):
            if kind == "checkerboard":
                self.controller.showCheckerboard()
            elif kind == "jacobian":
                self._showColorLegend(self.controller.showJacobian())
            else:
                self.controller.showFusion()

    @staticmethod
    def _showColorLegend(volumeNode) -> None:
        """The Jacobian's colour bar in the slice views (Colors module; once per volume)."""
        colors = getattr(slicer.modules, "colors", None)
        try:
            logic = colors.logic()
            if logic.GetColorLegendDisplayNode(volumeNode) is None:
                logic.AddDefaultColorLegendDisplayNode(volumeNode)
        except AttributeError:  # an application without colour legends: the status text explains the colours
            pass

    def onShowQATable(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The QA table could not be shown."), waitCursor=True):
            table = self.controller.result().qaTableNode
            if table is None or table.GetScene() is None:
                raise ValueError("the QA table of this result is no longer in the scene: run the registration again")
            layoutManager = slicer.app.layoutManager()
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            appLogic = slicer.app.applicationLogic()
            appLogic.GetSelectionNode().SetActiveTableID(table.GetID())
            appLogic.PropagateTableSelection()

    # ---- the module's life ---------------------------------------------------------------------------------------
    def leave(self) -> None:
        """The module was left: a running registration goes on (its result is only new nodes), and is shown when it
        ends."""
        self.updateGUI()

    def enter(self) -> None:
        if self.controller.busy:
            self._pollTimer.start()
        self.updateGUI()

    def sceneClosed(self) -> None:
        self._pollTimer.stop()
        self.controller.forgetScene()
        self.removeObservers()
        self.ui.registrationStatusLabel.text = _("Select the fixed and moving volumes and click Run registration.")
        self.ui.registrationStatusLabel.styleSheet = ""

    def cleanup(self) -> None:
        self._pollTimer.stop()
        self.controller.leave()
        self.removeObservers()
