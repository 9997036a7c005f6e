"""Registration in the panel: a fixed and a moving volume node -> PRISMRTLib's ``register`` and QA -> MRML nodes.

- :class:`RegistrationLogic` (MRML only, no Qt): reads and checks the inputs on the GUI thread (:meth:`prepare`),
  computes on any thread without touching MRML (:meth:`compute`: registration, warped segments, Jacobian, QA), and
  writes the results as new nodes (:meth:`apply`); :meth:`run` does the three in one call for scripts. The one-click
  views (:meth:`showCheckerboard`, :meth:`showJacobian`, :meth:`showFusion`) work from the result's nodes alone, so
  they also work on a result saved with the scene and loaded again.
- :class:`RegistrationController` (no Qt): what the section's buttons do; the registration runs as a
  :class:`~PRISMRTModule.jobs.BackgroundJob` (progress text and fraction, Cancel), its result applied on the GUI
  thread from :meth:`RegistrationController.poll` (a timer, or a test).

The results of one run (each a new node, named after the inputs, unique in the scene; nothing the user made is
changed, and running again makes a new set beside the earlier ones, so runs with another method or smoothness can
be compared):

- a ``vtkMRMLGridTransformNode``, the hub: the displacement field as Slicer's resampling transform (see below), with
  node references to the fixed and moving volumes (``PRISMRT.FixedVolume``, ``PRISMRT.MovingVolume``) and to every
  other result, and the QA verdict and summary as attributes;
- the warped moving volume (the moving image on the fixed grid, PRISMRTLib's linear warp);
- the warped segments (when a moving segmentation is chosen): each segment warped with nearest neighbour onto the
  fixed grid, into a new segmentation node (names, colours and terminology kept);
- a QA ``vtkMRMLTableNode``: one row per check (group, quantity, status, value, tolerance, reason, source) and the
  Jacobian statistics (coordinates in RAS, as Slicer shows them);
- made on the first click of a view, then reused: a checkerboard volume and a Jacobian determinant volume.

**Conventions.** PRISMRTLib's field ``u`` lives on the fixed grid in LPS mm with ``p_moving = p + u(p)`` (ITK's
DisplacementFieldTransform). That maps fixed points to moving points, which in Slicer is a transform's
*FromParent* direction (the resampling transform; Slicer stores transforms read from ITK files the same way): the
moving volume placed under the transform node is shown on the fixed image. In RAS the grid's origin, direction and
vectors have their x and y negated (``diag(-1, -1, 1)``), exactly as Slicer's own reader converts ``transform.h5``;
the displacement is interpolated linearly, as ITK (and so the warped volume, the QA and the landmark TRE) does.
"""

import importlib.util
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import vtk

import slicer

from .conversions import RAS_LPS_FLIP, imageToVolumeNode, maskToSegment, segmentToMask, volumeNodeToImage
from .jobs import BackgroundJob
from .library import importPRISMRTLib, prismrtError
from .mrml import nodesByClass
from .parameters import PRISMRTParameters

METHODS = ("mind", "features", "both")
METHOD_TEXT = {
    "mind": "MIND-SSC descriptors (local structure; works across CT, CBCT and MR)",
    "features": "the backbone's dense features",
    "both": "MIND-SSC and the backbone's dense features together",
}
SMOOTHNESS_RANGE = (0.0, 10.0)
# Stops of the smoothness slider (the spin box takes any value in the range): the useful range is 0.25 .. 4.
SMOOTHNESS_STOPS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0)
DEFAULT_MAX_FOLDING_PERCENT = 0.1  # as `prismrt register --max-folding`
CHECKERBOARD_TILE_MM = 20.0
JACOBIAN_WINDOW = (0.0, 2.0)  # the colour map's range: 1 (no volume change) in the middle
JACOBIAN_OPACITY = 0.6
FUSION_OPACITY = 0.5

# MRML node references (from the transform node, the hub of one result) and attributes.
FIXED_ROLE = "PRISMRT.FixedVolume"
MOVING_ROLE = "PRISMRT.MovingVolume"
TRANSFORM_ROLE = "PRISMRT.Transform"
WARPED_ROLE = "PRISMRT.WarpedVolume"
WARPED_SEGMENTATION_ROLE = "PRISMRT.WarpedSegmentation"
QA_TABLE_ROLE = "PRISMRT.QATable"
JACOBIAN_ROLE = "PRISMRT.Jacobian"
CHECKERBOARD_ROLE = "PRISMRT.Checkerboard"
FIXED_SEGMENTATION_ROLE = "PRISMRT.FixedSegmentation"
MOVING_SEGMENTATION_ROLE = "PRISMRT.MovingSegmentation"
FIXED_MASK_ROLE = "PRISMRT.FixedMask"
ROLE_ATTRIBUTE = "PRISMRT.Role"
VERDICT_ATTRIBUTE = "PRISMRT.Verdict"
SUMMARY_ATTRIBUTE = "PRISMRT.Summary"
TRANSFORM_KIND = "registration"
JACOBIAN_COLORS_KIND = "jacobian colours"
QA_COLUMNS = ("Group", "Quantity", "Status", "Value", "Tolerance", "Reason", "Source")


def smoothnessHint(value: float) -> str:
    """What a smoothness value does, in plain words (see PRISMRTLib.registration.convex_adam)."""
    value = float(value)
    if value <= 0.0:
        return "0: no smoothness penalty; the field follows the images as closely as it can, noise included."
    if value < 0.75:
        return f"{value:g}: flexible; follows local anatomy closely (and noise too)."
    if value == 1.0:
        return "1: the default, tuned on head-and-neck CT."
    if value <= 1.5:
        return f"{value:g}: near the default (1, tuned on head-and-neck CT)."
    if value < 5.0:
        return f"{value:g}: stiffer; a smoother field that follows less local detail."
    return f"{value:g}: very stiff; stays close to the initial affine alignment."


def methodAvailability(method: str) -> "str | None":
    """None when ``method`` can run in this installation, else a sentence saying why not and what to do."""
    if method not in METHODS:
        return f"unknown registration method '{method}': choose one of {', '.join(METHODS)}"
    if method == "mind":
        return None
    try:
        found = importlib.util.find_spec("PRISMRTLib.registration.backbone") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        importPRISMRTLib("PRISMRTLib")  # the library on the path first: the answer is about it, not about sys.path
        found = importlib.util.find_spec("PRISMRTLib.registration.backbone") is not None
    if found:
        return None
    return (f"the method '{method}' is not available in this version of PRISM-RT: it needs the backbone's dense "
            "features for registration (PRISMRTLib.registration.backbone), which this version does not have; "
            "use 'mind'")


def featureExtractor(method: str, model=None, backend: str = "auto", device: str = "auto", progress=None,
                     cancel=None):
    """The dense-feature extractor for ``register(features=...)`` ("features" and "both": PRISMRTLib's
    BackboneFeatures on the feature backend delineation uses), or None for "mind". It may load, and on first use
    download, a model (``progress(done_bytes, total_bytes)``, ``cancel()`` -> True to stop): call it off the GUI
    thread."""
    if method == "mind":
        return None
    problem = methodAvailability(method)
    if problem:
        raise prismrtError(problem)
    try:
        backbone = importPRISMRTLib("PRISMRTLib.registration.backbone")
    except ImportError as error:
        raise prismrtError(f"the method '{method}' cannot be used: {error}; use 'mind', or install what is "
                           "missing") from None
    return backbone.BackboneFeatures.from_model(model, backend=backend, device=device, progress=progress,
                                                cancel=cancel)


# ---- displacement field <-> grid transform ------------------------------------------------------------------------
def fieldToGridTransform(displacement) -> "vtk.vtkAbstractTransform":
    """A vtkOrientedGridTransform (RAS) of a PRISMRTLib field (LPS mm on the fixed grid, ``p_moving = p + u(p)``): to
    be set as a transform node's *FromParent* (it maps fixed RAS points to moving RAS points)."""
    import SimpleITK as sitk
    from vtk.util import numpy_support

    if displacement.GetDimension() != 3 or displacement.GetNumberOfComponentsPerPixel() != 3:
        raise prismrtError("the displacement field must be a 3D image of 3-vectors")
    vectors = sitk.GetArrayFromImage(displacement).astype(np.float64)  # (k, j, i, 3), LPS
    vectors *= np.diag(RAS_LPS_FLIP)  # LPS -> RAS: x and y negated
    gridData = vtk.vtkImageData()
    gridData.SetDimensions(*[int(n) for n in displacement.GetSize()])
    gridData.SetOrigin(*(RAS_LPS_FLIP @ np.array(displacement.GetOrigin(), float)))
    gridData.SetSpacing(*[float(s) for s in displacement.GetSpacing()])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(vectors.reshape(-1, 3)), deep=True,
                                         array_type=vtk.VTK_DOUBLE)
    scalars.SetName("DisplacementField")
    gridData.GetPointData().SetScalars(scalars)
    directionRas = RAS_LPS_FLIP @ np.array(displacement.GetDirection(), float).reshape(3, 3)
    direction = vtk.vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            direction.SetElement(row, column, float(directionRas[row, column]))
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(gridData)
    grid.SetGridDirectionMatrix(direction)
    grid.SetInterpolationModeToLinear()  # as ITK's DisplacementFieldTransform: what the warp and the QA used
    return grid


def gridTransformToField(transformNode):
    """The field of a grid transform node that holds a fixed -> moving grid as its FromParent (as
    :func:`fieldToGridTransform` and Slicer's reader of ITK displacement-field files make it), in PRISMRTLib's
    convention (SimpleITK vector image, LPS mm)."""
    import SimpleITK as sitk
    from vtk.util import numpy_support

    grid = transformNode.GetTransformFromParent() if transformNode is not None else None
    if grid is None or not grid.IsA("vtkOrientedGridTransform"):
        raise prismrtError("the transform is not a PRISM-RT grid transform: choose the registration result")
    if grid.GetInverseFlag():
        raise prismrtError(f"the transform '{transformNode.GetName()}' has been inverted: invert it back "
                           "(Transforms module) to use it as the fixed -> moving registration")
    grid.Update()
    gridData = grid.GetDisplacementGrid()
    ni, nj, nk = gridData.GetDimensions()
    vectors = numpy_support.vtk_to_numpy(gridData.GetPointData().GetScalars()).astype(np.float64).reshape(
        nk, nj, ni, 3)
    vectors = vectors * grid.GetDisplacementScale() + grid.GetDisplacementShift()
    vectors *= np.diag(RAS_LPS_FLIP)
    image = sitk.GetImageFromArray(vectors, isVector=True)
    image.SetSpacing(gridData.GetSpacing())
    image.SetOrigin(tuple(RAS_LPS_FLIP @ np.array(gridData.GetOrigin(), float)))
    matrix = grid.GetGridDirectionMatrix()
    directionRas = np.eye(3) if matrix is None else np.array(
        [[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    image.SetDirection(tuple((RAS_LPS_FLIP @ directionRas).ravel()))
    return image


# ---- what one run reads, computes and makes -----------------------------------------------------------------------
@dataclass
class RegistrationInputs:
    """What :meth:`RegistrationLogic.prepare` read from the scene (GUI thread): images and options, no MRML needed
    any more (the node references are kept only to link the results to them)."""

    fixedNode: object
    movingNode: object
    fixed: object  # SimpleITK images (LPS)
    moving: object
    fixedMask: object = None
    fixedMaskName: str = ""
    fixedSegmentationNode: object = None
    movingSegmentationNode: object = None
    fixedStructures: dict = field(default_factory=dict)  # name -> mask (SimpleITK, fixed grid)
    movingStructures: dict = field(default_factory=dict)  # name -> mask (moving grid)
    movingSegments: list = field(default_factory=list)  # (name, colour, terminology tag) in the segmentation's order
    method: str = "mind"
    smoothness: float = 1.0
    inverseConsistency: bool = False
    device: str = "auto"
    maxFoldingPercent: float = DEFAULT_MAX_FOLDING_PERCENT
    featureModel: object = None
    featureBackend: str = "auto"
    registerOptions: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    names: dict = field(default_factory=dict)  # "fixed", "moving": the volumes' names when the run started


@dataclass
class RegistrationOutcome:
    """What :meth:`RegistrationLogic.compute` found (no MRML): PRISMRTLib's result and QA report, the warped masks."""

    result: object  # PRISMRTLib RegistrationResult
    report: object  # PRISMRTLib QAReport
    warpedStructures: dict = field(default_factory=dict)  # name -> mask on the fixed grid
    warnings: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class RegistrationOutputs:
    """The nodes of one result (:meth:`fromTransformNode` finds them again from the transform node's references)."""

    transformNode: object
    fixedVolumeNode: object
    movingVolumeNode: object
    warpedVolumeNode: object
    qaTableNode: object
    warpedSegmentationNode: object = None
    verdict: str = ""
    summary: str = ""

    @classmethod
    def fromTransformNode(cls, transformNode) -> "RegistrationOutputs":
        if transformNode is None or transformNode.GetAttribute(ROLE_ATTRIBUTE) != TRANSFORM_KIND:
            raise prismrtError("this is not a PRISM-RT registration result: run a registration first")
        get = transformNode.GetNodeReference
        return cls(transformNode, get(FIXED_ROLE), get(MOVING_ROLE), get(WARPED_ROLE), get(QA_TABLE_ROLE),
                   get(WARPED_SEGMENTATION_ROLE), transformNode.GetAttribute(VERDICT_ATTRIBUTE) or "",
                   transformNode.GetAttribute(SUMMARY_ATTRIBUTE) or "")

    def nodes(self) -> list:
        return [n for n in (self.transformNode, self.warpedVolumeNode, self.warpedSegmentationNode, self.qaTableNode)
                if n is not None]


class RegistrationParameters(PRISMRTParameters):
    """The Registration section's state in the module's parameter node (saved with the scene), beside the others.
    (Kept here so the section is one self-contained addition; it can move into ``parameters`` as is.)"""

    STRINGS = dict(PRISMRTParameters.STRINGS, **{
        "registrationMethod": "mind",
        "smoothness": "1",
        "inverseConsistency": "false",
        "multimodal": "false",
    })
    NODES = dict(PRISMRTParameters.NODES, **{
        "fixedVolume": ("RegistrationFixedVolume", "vtkMRMLScalarVolumeNode"),
        "movingVolume": ("RegistrationMovingVolume", "vtkMRMLScalarVolumeNode"),
        "fixedMask": ("RegistrationFixedMask", "vtkMRMLDisplayableNode"),
        "fixedSegmentation": ("RegistrationFixedSegmentation", "vtkMRMLSegmentationNode"),
        "movingSegmentation": ("RegistrationMovingSegmentation", "vtkMRMLSegmentationNode"),
        "registrationResult": ("RegistrationResult", "vtkMRMLGridTransformNode"),
    })


def _uniqueName(scene, name: str) -> str:
    return scene.GenerateUniqueName(name) if scene.GetFirstNodeByName(name) is not None else name


def _copyWindowLevel(source, target) -> None:
    sourceDisplay = source.GetDisplayNode() if source is not None else None
    targetDisplay = target.GetDisplayNode()
    if sourceDisplay is None or targetDisplay is None or not sourceDisplay.IsA("vtkMRMLScalarVolumeDisplayNode"):
        return
    if sourceDisplay.GetAutoWindowLevel():
        return
    targetDisplay.AutoWindowLevelOff()
    targetDisplay.SetWindowLevel(sourceDisplay.GetWindow(), sourceDisplay.GetLevel())


def _terminologyTag(segment) -> "str | None":
    """The segment's terminology entry (what it is, for DICOM export and the terminology browser), if it has one."""
    value = vtk.reference("")
    try:
        found = segment.GetTag(segment.GetTerminologyEntryTagName(), value)
    except TypeError:
        return None
    return str(value) if found and str(value) else None


def _lpsToRasText(pointLps) -> str:
    r, a, s = RAS_LPS_FLIP @ np.asarray(pointLps, float)
    return f"(R {r:.1f}, A {a:.1f}, S {s:.1f}) mm"


class RegistrationLogic:
    """One registration at a time, from two volume nodes to the result's nodes (see the module docstring)."""

    def __init__(self):
        self.lastOutputs = None

    # ---- inputs (GUI thread: reads MRML) -------------------------------------------------------------------------
    @staticmethod
    def _volume(node, role: str):
        if node is None:
            what = "the planning CT the other image is mapped onto" if role == "fixed" else \
                "the image to be deformed onto the fixed one"
            raise prismrtError(f"no {role} volume is selected: choose the {role} volume ({what})")
        if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise prismrtError(f"the {role} volume '{node.GetName()}' is not a greyscale volume: choose a CT or MR "
                               "volume")
        if node.GetParentTransformNode() is not None:
            raise prismrtError(
                f"the {role} volume '{node.GetName()}' is under a transform: harden it (Transforms module, Harden "
                "transform) or remove the transform, then run the registration again")
        imaging = importPRISMRTLib("PRISMRTLib.imaging")
        errors = importPRISMRTLib("PRISMRTLib.errors")
        try:
            image = volumeNodeToImage(node)
            summary = imaging.check_volume(image)
        except errors.PrismRTError as error:
            raise type(error)(f"the {role} volume '{node.GetName()}' cannot be registered: {error}") from None
        return image, summary

    @staticmethod
    def _structures(segmentationNode, referenceNode, image, role: str):
        """name -> mask (SimpleITK, on ``referenceNode``'s grid) of every segment, and (name, colour, tag) each."""
        import SimpleITK as sitk

        if segmentationNode is None:
            return {}, []
        if segmentationNode.GetParentTransformNode() is not None:
            raise prismrtError(f"the {role} segmentation '{segmentationNode.GetName()}' is under a transform: harden "
                               "it or remove the transform first")
        segmentation = segmentationNode.GetSegmentation()
        masks, segments = {}, []
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            name = segment.GetName()
            if name in masks:
                raise prismrtError(f"the {role} segmentation '{segmentationNode.GetName()}' has two segments named "
                                   f"'{name}': rename one (Segment Editor) so that each can be matched by name")
            array = segmentToMask(segmentationNode, name, referenceNode)
            mask = sitk.GetImageFromArray(array.astype(np.uint8))
            mask.CopyInformation(image)
            masks[name] = mask
            segments.append((name, tuple(segment.GetColor()), _terminologyTag(segment)))
        return masks, segments

    @staticmethod
    def _fixedMask(maskNode, fixedNode, fixed):
        """A label map (non-zero inside) or a segmentation (all its segments) as a mask on the fixed grid."""
        import SimpleITK as sitk

        if maskNode is None:
            return None, ""
        name = maskNode.GetName()
        if maskNode.GetParentTransformNode() is not None:
            raise prismrtError(f"the fixed mask '{name}' is under a transform: harden it or remove the transform first")
        if maskNode.IsA("vtkMRMLSegmentationNode"):
            segmentation = maskNode.GetSegmentation()
            inside = np.zeros(sitk.GetArrayViewFromImage(fixed).shape, bool)
            for index in range(segmentation.GetNumberOfSegments()):
                inside |= segmentToMask(maskNode, segmentation.GetNthSegment(index).GetName(), fixedNode) != 0
            mask = sitk.GetImageFromArray(inside.astype(np.uint8))
            mask.CopyInformation(fixed)
        elif maskNode.IsA("vtkMRMLScalarVolumeNode"):
            mask = sitk.Cast(sitk.NotEqual(volumeNodeToImage(maskNode), 0), sitk.sitkUInt8)
            field = importPRISMRTLib("PRISMRTLib.registration.field")
            if not field.same_grid(mask, fixed):  # a mask drawn elsewhere: onto the fixed grid (same physical space)
                mask = sitk.Resample(mask, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        else:
            raise prismrtError(f"the fixed mask '{name}' is a {maskNode.GetClassName()}: choose a label map volume "
                               "or a segmentation")
        if not np.any(sitk.GetArrayViewFromImage(mask)):
            raise prismrtError(f"the fixed mask '{name}' is empty on the fixed volume's grid: choose a mask of the "
                               "region to register (e.g. the body), or none")
        return mask, name

    def prepare(self, fixedVolume, movingVolume, *, fixedMask=None, fixedSegmentation=None, movingSegmentation=None,
                method: str = "mind", smoothness: float = 1.0, inverseConsistency: bool = False,
                multimodal: bool = False, device: str = "auto", maxFoldingPercent: float = DEFAULT_MAX_FOLDING_PERCENT,
                featureModel=None, featureBackend: str = "auto", **registerOptions) -> RegistrationInputs:
        """Check the selection and read it (GUI thread). Raises PrismRTError saying what to do: a missing or repeated
        volume, a 2D or otherwise unusable volume, CT against non-CT without ``multimodal``, a method this version
        lacks, a smoothness outside 0-10, an empty mask. ``featureModel`` and ``featureBackend``: the backbone of the
        "features" and "both" methods (PRISMRTLib.features.open_backend's model and backend). ``registerOptions`` go
        to PRISMRTLib's ``register`` as they are (``alignment``, ``settings``, ``working_spacing``, ``seed``, ...)."""
        if fixedVolume is not None and fixedVolume is movingVolume:
            raise prismrtError(f"the fixed and the moving volume are the same volume ('{fixedVolume.GetName()}'): "
                               "choose two different volumes")
        problem = methodAvailability(method)
        if problem:
            raise prismrtError(problem)
        low, high = SMOOTHNESS_RANGE
        if not (isinstance(smoothness, (int, float)) and math.isfinite(smoothness) and low <= smoothness <= high):
            raise prismrtError(f"the smoothness must be between {low:g} and {high:g} (1 is the default), "
                               f"got {smoothness}")
        if maxFoldingPercent < 0:
            raise prismrtError("the folding tolerance is a percentage of voxels: 0 or more")
        fixed, fixedSummary = self._volume(fixedVolume, "fixed")
        moving, movingSummary = self._volume(movingVolume, "moving")
        if fixedSummary.is_ct != movingSummary.is_ct and not multimodal:
            ct, other = (("fixed", fixedVolume), ("moving", movingVolume))[::1 if fixedSummary.is_ct else -1]
            raise prismrtError(
                f"the {ct[0]} volume '{ct[1].GetName()}' looks like CT and the {other[0]} volume "
                f"'{other[1].GetName()}' does not: tick 'Different modalities' if that is intended (MIND-SSC "
                "compares local structure, not intensities), or check the selection")
        if fixedSegmentation is not None and fixedSegmentation is movingSegmentation:
            raise prismrtError(f"the same segmentation ('{fixedSegmentation.GetName()}') is chosen for both images: "
                               "the moving segmentation is the one drawn on the moving volume")
        mask, maskName = self._fixedMask(fixedMask, fixedVolume, fixed)
        fixedStructures, _ = self._structures(fixedSegmentation, fixedVolume, fixed, "fixed")
        movingStructures, movingSegments = self._structures(movingSegmentation, movingVolume, moving, "moving")
        # the volume check's warnings, but those about CT: registration takes any modality (checked above)
        warnings = [f"{role} volume: {w}" for role, s in (("fixed", fixedSummary), ("moving", movingSummary))
                    for w in s.warnings if "CT" not in w]
        if fixedSegmentation is not None and movingSegmentation is None:
            warnings.append("a fixed segmentation without a moving one is not used: choose the moving segmentation "
                            "to propagate its contours and score them")
        return RegistrationInputs(
            fixedNode=fixedVolume, movingNode=movingVolume, fixed=fixed, moving=moving, fixedMask=mask,
            fixedMaskName=maskName, fixedSegmentationNode=fixedSegmentation,
            movingSegmentationNode=movingSegmentation, fixedStructures=fixedStructures,
            movingStructures=movingStructures, movingSegments=movingSegments, method=method,
            smoothness=float(smoothness), inverseConsistency=bool(inverseConsistency), device=device,
            maxFoldingPercent=float(maxFoldingPercent), featureModel=featureModel, featureBackend=featureBackend,
            registerOptions=dict(registerOptions), warnings=warnings,
            names={"fixed": fixedVolume.GetName(), "moving": movingVolume.GetName()})

    # ---- the work (any thread: no MRML) --------------------------------------------------------------------------
    @staticmethod
    def compute(inputs: RegistrationInputs, progress=None, cancel=None) -> RegistrationOutcome:
        """Register, warp the moving segments, compute the Jacobian and the QA. ``progress(fraction, text)`` is
        called throughout; whatever it raises stops the work (Cancel). ``cancel()`` -> True stops a model download
        (methods "features" and "both")."""
        pipeline = importPRISMRTLib("PRISMRTLib.registration.pipeline")
        fieldModule = importPRISMRTLib("PRISMRTLib.registration.field")
        qa = importPRISMRTLib("PRISMRTLib.registration.qa")
        alignment = importPRISMRTLib("PRISMRTLib.registration.alignment")
        begin = time.perf_counter()

        def report(lo, hi):
            if progress is None:
                return None
            return lambda fraction, text="": progress(lo + (hi - lo) * float(fraction), text)

        step = report(0.0, 1.0) or (lambda fraction, text="": None)
        features = None
        if inputs.method != "mind":
            step(0.0, "Loading the feature backbone...")

            def download(done, total):
                step(0.0, f"Downloading the model: {done / 2**20:.0f} of {total / 2**20:.0f} MB" if total else
                     "Downloading the model...")

            features = featureExtractor(inputs.method, inputs.featureModel, inputs.featureBackend, inputs.device,
                                        progress=download, cancel=cancel)
        result = pipeline.register(
            inputs.fixed, inputs.moving, method=inputs.method, smoothness=inputs.smoothness,
            fixed_mask=inputs.fixedMask, inverse_consistency=inputs.inverseConsistency, device=inputs.device,
            progress=report(0.0, 0.85), features=features, **inputs.registerOptions)
        field = result.displacement
        warped = {}
        for index, name in enumerate(inputs.movingStructures):
            step(0.85 + 0.05 * index / max(1, len(inputs.movingStructures)), f"Warping the segment '{name}'...")
            warped[name] = fieldModule.warp_label(inputs.movingStructures[name], field)
        step(0.9, "Quality assurance: Jacobian, contours...")
        warnings = list(inputs.warnings) + list(result.warnings)
        try:
            body, bodyName = alignment.body_mask(inputs.fixed), "body"
        except importPRISMRTLib("PRISMRTLib.errors").PrismRTError:
            body, bodyName = None, ""
            warnings.append("no body was found in the fixed volume: the Jacobian is judged over the whole field")
        if inputs.fixedMask is not None:  # the region the user asked for, within the body
            body, bodyName = inputs.fixedMask, f"fixed mask '{inputs.fixedMaskName}'"
        jacobian = qa.jacobian_determinant(field)
        qaInputs = {"fixed": inputs.names.get("fixed", ""), "moving": inputs.names.get("moving", ""),
                    "method": inputs.method, "smoothness": f"{inputs.smoothness:g}", "device": result.device,
                    "time": f"{result.timings.get('total_s', 0.0):.0f} s"}
        qaReport = qa.registration_qa(
            field, fixed=inputs.fixed, mask=body, mask_name=bodyName or "mask",
            backward_field=result.inverse_displacement,
            fixed_structures=inputs.fixedStructures or None,
            moving_structures=inputs.movingStructures or None,
            tolerances=qa.Tolerances(max_folding_percent=inputs.maxFoldingPercent), inputs=qaInputs,
            jacobian=jacobian)
        step(1.0, "Registration done")
        return RegistrationOutcome(result=result, report=qaReport, warpedStructures=warped, warnings=warnings,
                                   seconds=time.perf_counter() - begin)

    # ---- the results (GUI thread: new MRML nodes) ----------------------------------------------------------------
    def addGridTransform(self, displacement, fixedNode, movingNode, name: str | None = None):
        """A new vtkMRMLGridTransformNode holding ``displacement`` (fixed -> moving, FromParent), referencing the two
        volumes."""
        scene = fixedNode.GetScene()
        name = name or f"{movingNode.GetName()} to {fixedNode.GetName()} displacement"
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", _uniqueName(scene, name))
        node.SetAndObserveTransformFromParent(fieldToGridTransform(displacement))
        node.SetNodeReferenceID(FIXED_ROLE, fixedNode.GetID())
        node.SetNodeReferenceID(MOVING_ROLE, movingNode.GetID())
        node.SetAttribute(ROLE_ATTRIBUTE, TRANSFORM_KIND)
        return node

    def apply(self, inputs: RegistrationInputs, outcome: RegistrationOutcome) -> RegistrationOutputs:
        """Write one result as new nodes (see the module docstring). Returns them; also kept as ``lastOutputs``."""
        fixedNode, movingNode = inputs.fixedNode, inputs.movingNode
        for node, role in ((fixedNode, "fixed"), (movingNode, "moving")):
            if node is None or node.GetScene() is None:
                raise prismrtError(f"the {role} volume was removed from the scene while the registration ran: run it "
                                   "again")
        scene = fixedNode.GetScene()
        result, report = outcome.result, outcome.report
        label = f"{movingNode.GetName()} to {fixedNode.GetName()}"
        made = []
        try:
            transformNode = self.addGridTransform(result.displacement, fixedNode, movingNode,
                                                  f"{label} displacement")
            made.append(transformNode)
            warpedNode = imageToVolumeNode(result.warped, _uniqueName(scene, f"{movingNode.GetName()} warped"),
                                           scene=scene)
            made.append(warpedNode)
            _copyWindowLevel(movingNode, warpedNode)
            warpedSegmentation = None
            if inputs.movingSegmentationNode is not None and outcome.warpedStructures:
                warpedSegmentation = self._warpedSegmentation(inputs, outcome, scene)
                made.append(warpedSegmentation)
            tableNode = self._qaTable(scene, f"{label} QA", report, result, outcome)
            made.append(tableNode)
        except Exception:
            for node in made:  # all or nothing: a half-made result is not left behind
                scene.RemoveNode(node)
            raise

        summary = self.summaryText(report, result, outcome)
        for node in made:
            node.SetNodeReferenceID(FIXED_ROLE, fixedNode.GetID())
            node.SetNodeReferenceID(MOVING_ROLE, movingNode.GetID())
            if node is not transformNode:
                node.SetNodeReferenceID(TRANSFORM_ROLE, transformNode.GetID())
        for role, node in ((WARPED_ROLE, warpedNode), (WARPED_SEGMENTATION_ROLE, warpedSegmentation),
                           (QA_TABLE_ROLE, tableNode), (FIXED_SEGMENTATION_ROLE, inputs.fixedSegmentationNode),
                           (MOVING_SEGMENTATION_ROLE, inputs.movingSegmentationNode)):
            if node is not None:
                transformNode.SetNodeReferenceID(role, node.GetID())
        warpedNode.SetAttribute(ROLE_ATTRIBUTE, "warped volume")
        tableNode.SetAttribute(ROLE_ATTRIBUTE, "registration QA")
        if warpedSegmentation is not None:
            warpedSegmentation.SetAttribute(ROLE_ATTRIBUTE, "warped segmentation")
        for node in (transformNode, tableNode):
            node.SetAttribute(VERDICT_ATTRIBUTE, report.verdict)
            node.SetAttribute(SUMMARY_ATTRIBUTE, report.summary)
        transformNode.SetAttribute("PRISMRT.Method", inputs.method)
        transformNode.SetAttribute("PRISMRT.Smoothness", f"{inputs.smoothness:g}")
        self._groupInFolder(scene, made, f"Registration: {label}")
        outputs = RegistrationOutputs(transformNode, fixedNode, movingNode, warpedNode, tableNode,
                                      warpedSegmentation, report.verdict, summary)
        self.lastOutputs = outputs
        return outputs

    def run(self, fixedVolume, movingVolume, progress=None, **options) -> RegistrationOutputs:
        """:meth:`prepare`, :meth:`compute` and :meth:`apply` on the calling thread (scripts, the self-test)."""
        inputs = self.prepare(fixedVolume, movingVolume, **options)
        return self.apply(inputs, self.compute(inputs, progress))

    @staticmethod
    def _warpedSegmentation(inputs, outcome, scene):
        source = inputs.movingSegmentationNode
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", _uniqueName(scene, f"{source.GetName()} warped"))
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(inputs.fixedNode)
        for name, color, tag in inputs.movingSegments:
            segmentId = maskToSegment(outcome.warpedStructures[name], node, name, color)
            segment = node.GetSegmentation().GetSegment(segmentId)
            segment.SetColor(*color)
            if tag:
                segment.SetTag(segment.GetTerminologyEntryTagName(), tag)
        return node

    @staticmethod
    def _qaRows(report, result, outcome) -> list:
        """(group, quantity, status, value, tolerance, reason, source) rows: every check, then the statistics."""
        rows = [(c.group, c.name, c.status, c.value_text, c.tolerance, c.reason, c.source) for c in report.checks]
        j = report.jacobian
        region = f"inside the {j.region}" if j.region != "whole field" else "over the whole field"
        stats = [
            ("voxels checked", f"{j.voxels}", f"{region}"),
            ("folding voxels (det <= 0)", f"{j.folding_voxels} ({j.folding_percent:.3f} %)", ""),
            ("minimum", f"{j.min:.4f}", f"at {_lpsToRasText(j.min_at_lps)}"),
            ("maximum", f"{j.max:.4f}", f"at {_lpsToRasText(j.max_at_lps)}"),
            ("mean", f"{j.mean:.4f}", "1 where volume is kept on average"),
            ("1st - 99th percentile", f"{j.p1:.4f} .. {j.p99:.4f}", ""),
            ("SDlogJ", f"{j.sdlogj:.4f}", "std(log det): how irregular the deformation is (0 for a rigid one)"),
            ("SDlogJ (Learn2Reg)", f"{j.sdlogj_learn2reg:.4f}", "std(log(det + 3)), as Learn2Reg reports it"),
        ]
        rows += [("Jacobian statistics", name, "info", value, "reported", reason, "") for name, value, reason in stats]
        maximum = report.grid.get("max_displacement_mm")
        if maximum is not None:
            rows.append(("Registration", "largest displacement", "info", f"{maximum:.2f} mm", "reported",
                         "The largest |u| over the fixed grid.", ""))
        settings = result.settings or {}
        rows.append(("Registration", "settings", "info",
                     f"method {settings.get('method', '?')}, smoothness {settings.get('smoothness', 0):g}, "
                     f"alignment {settings.get('alignment', '?')}, working grid "
                     f"{settings.get('working_spacing_mm', 0):.2f} mm", "reported", "", ""))
        rows.append(("Registration", "time", "info", f"{outcome.seconds:.1f} s on {result.device}", "reported", "", ""))
        for text in outcome.warnings:
            rows.append(("Registration", "warning", "info", "", "", text, ""))
        return rows

    def _qaTable(self, scene, name, report, result, outcome):
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", _uniqueName(scene, name))
        table = tableNode.GetTable()
        columns = []
        for title in QA_COLUMNS:
            column = vtk.vtkStringArray()
            column.SetName(title)
            table.AddColumn(column)
            columns.append(column)
        for row in self._qaRows(report, result, outcome):
            for column, value in zip(columns, row):
                column.InsertNextValue("" if value is None else str(value))
        table.Modified()
        if hasattr(tableNode, "SetLocked"):
            tableNode.SetLocked(True)  # a record of the run: not edited by a stray click in the table view
        return tableNode

    @staticmethod
    def summaryText(report, result, outcome) -> str:
        """The panel's text: the verdict first, then why, what was not checked, warnings, and the time."""
        lines = [f"QA {report.summary}."]
        lines += [f"- {reason}" for reason in report.reasons]
        lines += [f"Not checked: {text}." for text in report.not_checked]
        lines += [f"Warning: {w}." for w in outcome.warnings]
        lines.append(f"Registered in {outcome.seconds:.0f} s on {result.device}.")
        return "\n".join(lines)

    @staticmethod
    def _groupInFolder(scene, nodes, name) -> None:
        """The result's nodes in one subject hierarchy folder (Data module), when the scene has a hierarchy."""
        try:
            hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
            if hierarchy is None:
                return
            folder = hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), _uniqueName(scene, name))
            for node in nodes:
                item = hierarchy.GetItemByDataNode(node)
                if item:
                    hierarchy.SetItemParent(item, folder)
                else:
                    hierarchy.CreateItem(folder, node)
        except Exception:  # only tidiness: the nodes are there either way
            logging.exception("PRISM-RT: could not group the registration result in a folder")

    # ---- finding results -----------------------------------------------------------------------------------------
    @staticmethod
    def results(scene) -> list:
        """PRISM-RT registration results in ``scene`` (their transform nodes), oldest first."""
        nodes = []
        for node in nodesByClass(scene, "vtkMRMLGridTransformNode"):
            if node.GetAttribute(ROLE_ATTRIBUTE) == TRANSFORM_KIND:
                nodes.append(node)
        return nodes

    def outputsOf(self, transformNode=None, scene=None) -> RegistrationOutputs:
        """The result of ``transformNode``; without one, the last result made here, else the scene's newest."""
        if transformNode is not None:
            return RegistrationOutputs.fromTransformNode(transformNode)
        last = self.lastOutputs
        if last is not None and last.transformNode.GetScene() is not None and (
                scene is None or last.transformNode.GetScene() is scene):
            return last
        found = self.results(scene) if scene is not None else []
        if not found:
            raise prismrtError("there is no registration result yet: run a registration first")
        return RegistrationOutputs.fromTransformNode(found[-1])

    # ---- one-click views -----------------------------------------------------------------------------------------
    @staticmethod
    def showLayers(scene, background=None, foreground=None, foregroundOpacity: float = 0.0, label=None) -> None:
        """Every slice view of ``scene`` shows ``background`` with ``foreground`` over it."""
        for composite in nodesByClass(scene, "vtkMRMLSliceCompositeNode"):
            wasModifying = composite.StartModify()
            composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
            composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
            composite.SetForegroundOpacity(float(foregroundOpacity))
            if label is not None:
                composite.SetLabelVolumeID(label.GetID())
            composite.EndModify(wasModifying)

    def _requireInputs(self, outputs):
        for node, what in ((outputs.fixedVolumeNode, "fixed volume"), (outputs.warpedVolumeNode, "warped volume")):
            if node is None or node.GetScene() is None:
                raise prismrtError(f"the result's {what} is no longer in the scene: run the registration again")

    def showFusion(self, outputs=None) -> None:
        """The warped moving volume over the fixed one, half transparent."""
        outputs = outputs or self.outputsOf()
        self._requireInputs(outputs)
        self.showLayers(outputs.fixedVolumeNode.GetScene(), outputs.fixedVolumeNode, outputs.warpedVolumeNode,
                        FUSION_OPACITY)

    def checkerboardVolume(self, outputs=None, tileMm: float = CHECKERBOARD_TILE_MM):
        """A volume on the fixed grid made of alternating 3D tiles (``tileMm``) of the fixed and the warped moving
        image: where the registration is right, edges run on unbroken across tile borders, in any slice view. Made
        once per result (referenced from its transform node), then reused."""
        import SimpleITK as sitk

        outputs = outputs or self.outputsOf()
        self._requireInputs(outputs)
        existing = outputs.transformNode.GetNodeReference(CHECKERBOARD_ROLE)
        if existing is not None:
            return existing
        fixed = volumeNodeToImage(outputs.fixedVolumeNode)
        warped = volumeNodeToImage(outputs.warpedVolumeNode)
        field = importPRISMRTLib("PRISMRTLib.registration.field")
        if not field.same_grid(fixed, warped):
            raise prismrtError("the warped volume is not on the fixed volume's grid any more: run the registration "
                               "again")
        f = sitk.GetArrayViewFromImage(fixed).astype(np.float32)
        w = sitk.GetArrayViewFromImage(warped).astype(np.float32)
        nk, nj, ni = f.shape
        si, sj, sk = fixed.GetSpacing()
        parity = (np.floor((np.arange(nk) + 0.5) * sk / tileMm)[:, None, None]
                  + np.floor((np.arange(nj) + 0.5) * sj / tileMm)[None, :, None]
                  + np.floor((np.arange(ni) + 0.5) * si / tileMm)[None, None, :]) % 2 == 1
        board = sitk.GetImageFromArray(np.where(parity, w, f))
        board.CopyInformation(fixed)
        scene = outputs.fixedVolumeNode.GetScene()
        node = imageToVolumeNode(board, _uniqueName(scene, f"{outputs.transformNode.GetName()} checkerboard"),
                                 scene=scene)
        _copyWindowLevel(outputs.fixedVolumeNode, node)
        node.SetAttribute(ROLE_ATTRIBUTE, "checkerboard")
        node.SetAttribute("PRISMRT.TileMm", f"{tileMm:g}")
        node.SetNodeReferenceID(TRANSFORM_ROLE, outputs.transformNode.GetID())
        outputs.transformNode.SetNodeReferenceID(CHECKERBOARD_ROLE, node.GetID())
        self._addToResultFolder(node, outputs.transformNode)
        return node

    def showCheckerboard(self, outputs=None):
        """One click: the checkerboard of fixed and warped in every slice view. Returns its volume node."""
        node = self.checkerboardVolume(outputs)
        self.showLayers(node.GetScene(), node, None, 0.0)
        return node

    @staticmethod
    def jacobianColorNode(scene):
        """The Jacobian's colour table (made once per scene): det 0 .. 2 from blue (shrinking) through white (1: no
        volume change) to red (growing); the first entry, det <= 0.008 (folding), is lime."""
        for node in nodesByClass(scene, "vtkMRMLColorTableNode"):
            if node.GetAttribute(ROLE_ATTRIBUTE) == JACOBIAN_COLORS_KIND:
                return node
        node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", _uniqueName(scene, "PRISM-RT Jacobian determinant"))
        node.SetTypeToUser()
        count = 256
        node.SetNumberOfColors(count)
        node.SetColor(0, "folding (det <= 0)", 0.22, 1.0, 0.08, 1.0)
        blue, white, red = np.array([0.13, 0.30, 0.85]), np.ones(3), np.array([0.85, 0.12, 0.10])
        middle = (count - 1) / 2.0
        for index in range(1, count):
            t = (index - middle) / middle  # -1 .. 1
            rgb = white + (red - white) * t if t >= 0 else white + (blue - white) * (-t)
            det = JACOBIAN_WINDOW[0] + (index + 0.5) * (JACOBIAN_WINDOW[1] - JACOBIAN_WINDOW[0]) / count
            node.SetColor(index, f"det {det:.2f}", float(rgb[0]), float(rgb[1]), float(rgb[2]), 1.0)
        node.SetAttribute(ROLE_ATTRIBUTE, JACOBIAN_COLORS_KIND)
        node.SetSaveWithScene(True)
        return node

    def jacobianVolume(self, outputs=None):
        """The Jacobian determinant of the result's field (float, fixed grid) with the Jacobian colour map; made once
        per result from the transform node itself (so it also works on a result loaded with a scene)."""
        import SimpleITK as sitk

        outputs = outputs or self.outputsOf()
        existing = outputs.transformNode.GetNodeReference(JACOBIAN_ROLE)
        if existing is not None:
            return existing
        qa = importPRISMRTLib("PRISMRTLib.registration.qa")
        determinant = sitk.Cast(qa.jacobian_determinant(gridTransformToField(outputs.transformNode)),
                                sitk.sitkFloat32)
        scene = outputs.transformNode.GetScene()
        node = imageToVolumeNode(determinant, _uniqueName(scene, f"{outputs.transformNode.GetName()} Jacobian"),
                                 scene=scene)
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.jacobianColorNode(scene).GetID())
        display.AutoWindowLevelOff()
        low, high = JACOBIAN_WINDOW
        display.SetWindowLevel(high - low, (high + low) / 2.0)
        display.SetInterpolate(False)  # show voxels as computed
        node.SetAttribute(ROLE_ATTRIBUTE, "jacobian determinant")
        node.SetNodeReferenceID(TRANSFORM_ROLE, outputs.transformNode.GetID())
        outputs.transformNode.SetNodeReferenceID(JACOBIAN_ROLE, node.GetID())
        self._addToResultFolder(node, outputs.transformNode)
        return node

    def showJacobian(self, outputs=None):
        """One click: the Jacobian determinant, coloured, over the fixed volume in every slice view."""
        outputs = outputs or self.outputsOf()
        node = self.jacobianVolume(outputs)
        background = outputs.fixedVolumeNode if outputs.fixedVolumeNode is not None and \
            outputs.fixedVolumeNode.GetScene() is not None else None
        self.showLayers(node.GetScene(), background, node, JACOBIAN_OPACITY)
        return node

    @staticmethod
    def _addToResultFolder(node, transformNode) -> None:
        try:
            hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
            parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(transformNode)) if hierarchy else 0
            if not parent:
                return
            item = hierarchy.GetItemByDataNode(node)
            hierarchy.SetItemParent(item, parent) if item else hierarchy.CreateItem(parent, node)
        except Exception:
            logging.exception("PRISM-RT: could not put a view into the registration's folder")


class RegistrationController:
    """The Registration section's behaviour, without Qt: the section maps its buttons to these methods and shows
    :attr:`status` (and the job's progress) whenever ``onChanged`` is called. One registration runs at a time, as a
    :class:`BackgroundJob`; :meth:`poll` (a GUI timer, or a test) applies its result. A cancelled or failed run
    adds nothing to the scene."""

    def __init__(self, scene, logic: RegistrationLogic | None = None, onChanged=None):
        self.scene = scene
        self.logic = logic or RegistrationLogic()
        self.onChanged = onChanged or (lambda: None)
        self.status = ""
        self.failed = False  # the last run ended in an error (the section shows the status as an error)
        self.job = None
        self.outputs = None

    @property
    def busy(self) -> bool:
        return self.job is not None

    def _set(self, status: str, failed: bool = False) -> None:
        self.status, self.failed = status, failed
        self.onChanged()

    def run(self, fixedVolume, movingVolume, onDone=None, **options) -> BackgroundJob:
        """Check and read the inputs here (GUI thread: errors are raised at once, with what to do), then register on
        a worker. ``options``: :meth:`RegistrationLogic.prepare`'s. Returns the job."""
        if self.busy:
            raise prismrtError("a registration is already running: wait for it to finish, or cancel it first")
        inputs = self.logic.prepare(fixedVolume, movingVolume, **options)
        logic = self.logic

        def work(job):
            job.progress(0.0, "Starting the registration...")
            return logic.compute(inputs, progress=job.progress, cancel=job.isCancelled)

        def done(outcome):
            job, self.job = self.job, None
            if job is not None and job.isCancelled():  # Cancel was clicked after the work ended: honour it
                cancelled()
                return
            try:
                outputs = logic.apply(inputs, outcome)
            except Exception as error:  # applying failed: nothing of it is left in the scene (apply cleans up)
                logging.exception("PRISM-RT")
                self._set(f"The registration could not be written into the scene: {error}", failed=True)
                return
            self.outputs = outputs
            try:
                logic.showFusion(outputs)
            except Exception:
                logging.exception("PRISM-RT: could not show the result")
            self._set(outputs.summary, failed=False)
            if onDone:
                onDone(outputs)

        def error(exception):
            self.job = None
            logging.error(f"PRISM-RT registration failed: {exception}")
            self._set(f"Registration failed: {exception}", failed=True)

        def cancelled():
            self.job = None
            self._set("Registration cancelled; nothing was added to the scene.")

        self.failed = False
        self.status = "Registering..."
        self.job = BackgroundJob("registration", work, done, error, cancelled).start()
        self.onChanged()
        return self.job

    def cancel(self) -> None:
        """Stop the running registration at its next progress report; its result is never applied."""
        if self.job is not None:
            self.job.cancel()
            self.status = "Cancelling..."
            self.onChanged()

    def poll(self) -> None:
        """GUI thread, from a timer: apply a finished registration."""
        if self.job is not None:
            self.job.poll()

    def progress(self) -> tuple:
        """(fraction or None, text) of the running registration; (None, "") when none runs."""
        return self.job.currentProgress() if self.job is not None else (None, "")

    def result(self) -> RegistrationOutputs:
        """The result the views act on: the last one made here, else the scene's newest."""
        if self.outputs is not None and self.outputs.transformNode.GetScene() is self.scene:
            return self.outputs
        return self.logic.outputsOf(scene=self.scene)

    def showCheckerboard(self):
        node = self.logic.showCheckerboard(self.result())
        self._set(f"Checkerboard of fixed and warped ({CHECKERBOARD_TILE_MM:g} mm tiles): where the registration is "
                  "right, edges run on unbroken across the tile borders.", failed=False)
        return node

    def showJacobian(self):
        node = self.logic.showJacobian(self.result())
        low, high = JACOBIAN_WINDOW
        self._set(f"Jacobian determinant over the fixed volume: white = volume kept (1), blue = shrinking, red = "
                  f"growing ({low:g} .. {high:g}); lime = folding (det <= 0).", failed=False)
        return node

    def showFusion(self):
        self.logic.showFusion(self.result())

    def leave(self, timeout: float = 30.0) -> None:
        """The scene is closing (or the module is cleaned up): the running registration is cancelled and waited for
        (its result is never applied)."""
        job = self.job
        if job is not None:
            job.cancel()
            job.wait(timeout)
            self.job = None

    def forgetScene(self) -> None:
        self.leave()
        self.outputs = None
        self.logic.lastOutputs = None
        self.status, self.failed = "", False
