"""PRISM-RT: the 3D Slicer scripted module.

The module is thin: everything that computes lives in PRISMRTLib (pure Python, LPS, SimpleITK images), and the
module's own parts live in the package ``PRISMRTModule`` next to this file, one file per concern (see its
``__init__``). This file holds the module's description, its widget (the Input, Volume check and Display sections,
and one section per task: Delineation, Registration and Chat), its logic and its self-test.
Heavy or optional imports (SimpleITK, PRISMRTLib, torch) happen on first use, never when Slicer loads the module,
so the module loads even when a dependency is missing.
"""

import logging

import numpy as np
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from PRISMRTModule import dependencies, volumes
from PRISMRTModule.chat import ChatLogic
from PRISMRTModule.conversions import ijkToRasArray
from PRISMRTModule.delineation import DelineationLogic
from PRISMRTModule.library import importPRISMRTLib
from PRISMRTModule.parameters import PRISMRTParameters
from PRISMRTModule.registration import RegistrationLogic

#
# PRISMRT
#


class PRISMRT(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PRISM-RT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiotherapy")]
        self.parent.dependencies = []
        self.parent.contributors = ["PRISM-RT team"]
        self.parent.helpText = _("""
Radiotherapy imaging AI on one distilled vision backbone: GTV delineation from point prompts,
deformable registration with QA, and questions about the loaded CT.
This version checks a CT volume, applies CT window presets, delineates a structure from clicks or a box,
propagated into 3D, registers two volumes deformably with a QA report (pass/fail against TG-132 tolerances), and
answers questions typed about the CT on screen (its header, the scene's segmentations, the slice in view), each answer
with its source and confidence.
See the <a href="https://github.com/prism-rt/PRISMRT">project page</a> for documentation.
""")
        self.parent.acknowledgementText = _("""
Developed by the PRISM-RT team. Built on 3D Slicer, SimpleITK and the SlicerPyTorch extension.
""")


#
# PRISMRTWidget
#


class PRISMRTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: Input (the CT), Volume check and Display, then one section per task, each its own widget and .ui
    (``PRISMRTModule.delineationSection``, ``PRISMRTModule.registrationSection``, ``PRISMRTModule.chatSection``).
    The parameter node (``PRISMRTModule.parameters``) holds the state."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.parameters = None
        self._checkedVolumeID = None
        self.sections = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        import qt

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PRISMRT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = PRISMRTLogic()

        from PRISMRTModule.chatSection import ChatSection
        from PRISMRTModule.delineationSection import DelineationSection
        from PRISMRTModule.registrationSection import RegistrationSection

        self.delineation = DelineationSection(self, self.layout)
        self.registration = RegistrationSection(self, self.layout)
        self.chat = ChatSection(self, self.layout)
        self.sections = [self.delineation, self.registration, self.chat]
        self.layout.addStretch(1)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.checkResultText.setFont(qt.QFontDatabase.systemFont(qt.QFontDatabase.FixedFont))
        self.ui.checkButton.connect("clicked(bool)", self.onCheckButton)
        # "activated" is emitted only by the user, also when the shown preset is chosen again (to re-apply it).
        self.ui.windowPresetComboBox.connect("activated(int)", self.onWindowPresetActivated)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)

        self._populateWindowPresets()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        for section in self.sections:
            section.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        for section in self.sections:
            section.enter()

    def exit(self) -> None:
        """Leaving the module ends click mode, prefetch and any running job (clicks elsewhere are not ours)."""
        for section in self.sections:
            section.leave()

    def onSceneStartClose(self, caller, event) -> None:
        for section in self.sections:
            section.sceneClosed()
        self.setParameters(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---- parameter node ------------------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameters(self.logic.getParameters())
        if self.parameters.inputVolume is None:  # the first volume, to save the user a click
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None:
                self.parameters.inputVolume = first

    def setParameters(self, parameters) -> None:
        if self.parameters is not None:
            self.removeObserver(self.parameters.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameters)
        self.parameters = parameters
        if parameters is not None:
            self.addObserver(parameters.node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameters)
        self.updateGUIFromParameters()

    def selectedVolume(self):
        return self.parameters.inputVolume if self.parameters is not None else None

    def onInputVolumeChanged(self, node) -> None:
        if self.parameters is not None and self.parameters.inputVolume is not node:
            self.parameters.inputVolume = node

    def updateGUIFromParameters(self, caller=None, event=None) -> None:
        volumeNode = self.selectedVolume()
        hasVolume = volumeNode is not None
        wasBlocked = self.ui.inputSelector.blockSignals(True)
        self.ui.inputSelector.setCurrentNode(volumeNode)
        self.ui.inputSelector.blockSignals(wasBlocked)
        self.ui.checkButton.enabled = hasVolume
        self.ui.checkButton.toolTip = (
            _("Check that the selected volume is a usable CT and show its summary")
            if hasVolume else _("Select an input volume first"))
        comboBox = self.ui.windowPresetComboBox
        comboBox.enabled = hasVolume and comboBox.count > 0
        if self.parameters is not None:
            index = comboBox.findText(self.parameters.windowPreset)
            if index >= 0 and index != comboBox.currentIndex:
                wasBlocked = comboBox.blockSignals(True)
                comboBox.currentIndex = index
                comboBox.blockSignals(wasBlocked)
            for section in self.sections:
                section.updateGUIFromParameters(self.parameters)
        # A check result describes one volume: clear it when another one is selected.
        volumeID = volumeNode.GetID() if hasVolume else None
        if self._checkedVolumeID is not None and volumeID != self._checkedVolumeID:
            self.ui.checkResultText.setPlainText("")
            self._checkedVolumeID = None

    # ---- Input, Volume check, Display ----------------------------------------------------------------------------
    def _populateWindowPresets(self) -> None:
        comboBox = self.ui.windowPresetComboBox
        if comboBox.count > 0:
            return
        try:
            names = volumes.windowPresetNames()
        except ImportError as error:  # a dependency is missing: the presets appear once it is installed
            logging.info(f"PRISM-RT window presets not available yet: {error}")
            return
        wasBlocked = comboBox.blockSignals(True)
        for name in names:
            comboBox.addItem(name)
        comboBox.blockSignals(wasBlocked)

    def ensurePythonPackages(self) -> bool:
        """Install PRISMRTLib's missing Python packages after the user confirms. Returns False if declined."""
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages that PRISM-RT needs."),
                                             waitCursor=True):
            if not self.logic.installPythonPackages(askConfirmation=True):
                return False
        self._populateWindowPresets()
        self.updateGUIFromParameters()
        return True

    def onCheckButton(self) -> None:
        volumeNode = self.selectedVolume()
        if volumeNode is None or not self.ensurePythonPackages():
            return
        errors = importPRISMRTLib("PRISMRTLib.errors")
        with slicer.util.tryWithErrorDisplay(_("Failed to check the volume."), waitCursor=True):
            try:
                text = self.logic.checkVolume(volumeNode)
            except errors.PrismRTError as error:
                text = _("The volume '{name}' cannot be used:\n{error}").format(name=volumeNode.GetName(), error=error)
            self.ui.checkResultText.setPlainText(text)
            self._checkedVolumeID = volumeNode.GetID()

    def onWindowPresetActivated(self, index: int) -> None:
        presetName = self.ui.windowPresetComboBox.itemText(index)
        if self.parameters is None or not presetName:
            return
        self.parameters.windowPreset = presetName
        volumeNode = self.parameters.inputVolume
        if volumeNode is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to apply the window preset."), waitCursor=True):
            self.logic.applyWindowPreset(volumeNode, presetName)


#
# PRISMRTLogic
#


class PRISMRTLogic(ScriptedLoadableModuleLogic):
    """The module's logic for scripts and the self-test: the volume tools, the task logics (``delineation``,
    ``registration``, ``chat``), the parameter node and the dependency installers. The work itself is in
    ``PRISMRTModule`` (MRML only)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.delineation = DelineationLogic()
        self.registration = RegistrationLogic()
        self.chat = ChatLogic()

    def getParameters(self) -> PRISMRTParameters:
        return PRISMRTParameters.ofScene(slicer.mrmlScene)

    def checkVolume(self, volumeNode) -> str:
        return volumes.checkVolume(volumeNode)

    def applyWindowPreset(self, volumeNode, presetName: str) -> None:
        volumes.applyWindowPreset(volumeNode, presetName)

    def installPythonPackages(self, askConfirmation: bool = True) -> bool:
        return dependencies.installPythonPackages(askConfirmation)

    def installTorch(self, askConfirmation: bool = True):
        return dependencies.installTorch(askConfirmation)


#
# PRISMRTTest
#


class PRISMRTTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a synthetic OpenKBP-like CT (made here, nothing downloaded) goes through the
    module boundary, PRISMRTLib's check and a window preset.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_Conversion()
        self.setUp()
        self.test_CheckVolume()
        self.setUp()
        self.test_WindowPreset()
        self.setUp()
        self.test_Delineation()

    @staticmethod
    def _syntheticCT():
        """A head-sized CT like OpenKBP's: LPS direction diag(1, 1, -1), 3.9 x 3.9 x 2.5 mm, air, soft tissue, bone."""
        import SimpleITK as sitk

        k, j, i = np.mgrid[0:40, 0:64, 0:64]
        radius = np.hypot((i - 31.5) / 26.0, (j - 31.5) / 22.0)
        array = np.full(radius.shape, -1000, dtype=np.int16)
        array[radius < 1.0] = 40
        array[(radius > 0.85) & (radius < 1.0)] = 900
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((3.9, 3.9, 2.5))
        image.SetOrigin((-124.8, -124.8, 60.0))
        image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
        return image

    def test_Conversion(self):
        import SimpleITK as sitk
        import sitkUtils

        self.delayDisplay("Volume node <-> SimpleITK image")
        from PRISMRTModule.conversions import imageToVolumeNode, volumeNodeToImage

        image = self._syntheticCT()
        volumeNode = imageToVolumeNode(image, "PRISMRTTestCT", scene=slicer.mrmlScene)
        back = volumeNodeToImage(volumeNode)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
        np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
        np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
        np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
        # Slicer's own converter must agree on geometry and voxels.
        pulled = sitkUtils.PullVolumeFromSlicer(volumeNode)
        np.testing.assert_allclose(pulled.GetOrigin(), back.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(pulled.GetDirection(), back.GetDirection(), atol=1e-9)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(pulled), sitk.GetArrayFromImage(back))
        self.delayDisplay("Conversion test passed")

    def test_CheckVolume(self):
        self.delayDisplay("Volume check")
        from PRISMRTModule.conversions import imageToVolumeNode

        logic = PRISMRTLogic()
        volumeNode = imageToVolumeNode(self._syntheticCT(), "PRISMRTTestCT", scene=slicer.mrmlScene)
        summary = logic.checkVolume(volumeNode)
        self.assertIsInstance(summary, str)
        self.assertTrue(summary.strip())

        import SimpleITK as sitk

        errors = importPRISMRTLib("PRISMRTLib.errors")
        constant = sitk.Image(32, 32, 16, sitk.sitkInt16)
        constantNode = imageToVolumeNode(constant, "PRISMRTTestConstant", scene=slicer.mrmlScene)
        with self.assertRaises(errors.PrismRTError):
            logic.checkVolume(constantNode)
        self.delayDisplay("Volume check test passed")

    def test_WindowPreset(self):
        self.delayDisplay("Window presets")
        from PRISMRTModule.conversions import imageToVolumeNode

        logic = PRISMRTLogic()
        presets = importPRISMRTLib("PRISMRTLib.imaging").WINDOW_PRESETS
        volumeNode = imageToVolumeNode(self._syntheticCT(), "PRISMRTTestCT", scene=slicer.mrmlScene)
        for name, preset in presets.items():
            logic.applyWindowPreset(volumeNode, name)
            displayNode = volumeNode.GetDisplayNode()
            self.assertFalse(displayNode.GetAutoWindowLevel())
            self.assertAlmostEqual(displayNode.GetWindow(), preset.width)
            self.assertAlmostEqual(displayNode.GetLevel(), preset.level)
        with self.assertRaises(ValueError):
            logic.applyWindowPreset(volumeNode, "no-such-preset")
        self.delayDisplay("Window preset test passed")

    def test_Delineation(self):
        self.delayDisplay("Delineation with the shipped stand-in teachers")
        from PRISMRTModule.conversions import imageToVolumeNode

        logic = PRISMRTLogic()
        volumeNode = imageToVolumeNode(self._syntheticCT(), "PRISMRTTestCT", scene=slicer.mrmlScene)
        logic.installTorch()
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "PRISMRTTestSegments")
        delineation = logic.delineation
        delineation.start(volumeNode, segmentationNode, "GTV", backend="teachers", model="teachers-standin-openkbp")
        # a click in the soft tissue of slice k = 20, given in RAS as a markups point would be
        pointRas = (ijkToRasArray(volumeNode) @ np.array([31.0, 45.0, 20.0, 1.0]))[:3]
        self.assertEqual(delineation.prefetch(pointRas), 20)
        result = delineation.addPoint(pointRas, positive=True)
        self.assertEqual(result.index, 20)
        segmentId = delineation.writeSegment("positive click")
        self.assertEqual(segmentationNode.GetSegmentation().GetSegment(segmentId).GetName(), "GTV")
        array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        np.testing.assert_array_equal(array != 0, delineation.session.mask != 0)
        self.assertEqual(delineation.undo(), "positive click")
        self.assertIsNone(segmentationNode.GetSegmentation().GetSegment(segmentId))
        self.delayDisplay("Delineation test passed")
