"""MRML volume and segment <-> SimpleITK image: the module boundary, the only place where Slicer's RAS and
PRISMRTLib's LPS meet. MRML, VTK, NumPy and SimpleITK only (it runs against slicer-core)."""

from typing import TYPE_CHECKING

import numpy as np
import vtk

import slicer

from .library import invalidImage

if TYPE_CHECKING:
    import SimpleITK

# LPS = diag(-1, -1, 1) @ RAS, and back (the flip is its own inverse).
RAS_LPS_FLIP = np.diag([-1.0, -1.0, 1.0])


def rasToLps(pointRas) -> np.ndarray:
    return RAS_LPS_FLIP @ np.asarray(pointRas, dtype=float)[:3]


def ijkToRasArray(volumeNode) -> np.ndarray:
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
        raise invalidImage("no volume is selected: choose a CT volume in the Input section")
    imageData = volumeNode.GetImageData()
    scalars = imageData.GetPointData().GetScalars() if imageData is not None else None
    if scalars is None or imageData.GetNumberOfPoints() == 0:
        raise invalidImage("the volume has no voxels: load the CT again (File > Add Data) and select it")
    if scalars.GetNumberOfComponents() != 1:
        raise invalidImage(
            f"the volume has {scalars.GetNumberOfComponents()} values per voxel (colour or vector data): PRISM-RT "
            "needs a greyscale CT; convert it with the 'Vector to Scalar Volume' module or load the CT series"
        )

    ni, nj, nk = imageData.GetDimensions()
    array = numpy_support.vtk_to_numpy(scalars).reshape(nk, nj, ni)  # a view; GetImageFromArray copies
    image = sitk.GetImageFromArray(array)

    ijkToRas = ijkToRasArray(volumeNode)
    linear = ijkToRas[:3, :3]
    # Slicer ignores the vtkImageData's origin and spacing; its extent may start at a non-zero index.
    firstIndex = np.array(imageData.GetExtent()[0::2], dtype=float)
    originRas = ijkToRas[:3, 3] + linear @ firstIndex
    spacing = np.linalg.norm(linear, axis=0)
    if not (np.all(np.isfinite(ijkToRas)) and np.all(spacing > 0)):
        raise invalidImage(
            "the volume's geometry is invalid (zero or undefined voxel spacing): fix the spacing in the "
            "Volumes module (Volume Information) or load the CT again"
        )
    directionLps = RAS_LPS_FLIP @ (linear / spacing)
    if abs(np.linalg.det(directionLps)) < 1e-6:
        raise invalidImage("the volume's axes are degenerate (parallel or zero): load the CT again")
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in RAS_LPS_FLIP @ originRas])
    image.SetDirection([float(v) for v in directionLps.ravel()])
    return image


def imageIjkToRasMatrix(image) -> "vtk.vtkMatrix4x4":
    """The IJKToRAS matrix of a SimpleITK image's (LPS) geometry."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    linearRas = RAS_LPS_FLIP @ direction @ np.diag(image.GetSpacing())
    originRas = RAS_LPS_FLIP @ np.array(image.GetOrigin(), dtype=float)
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
        raise invalidImage(
            f"only 3D single-component images can be shown as a volume, got a {image.GetDimension()}D image "
            f"with {image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    array = sitk.GetArrayViewFromImage(image)  # (k, j, i)
    if array.dtype.kind not in "iuf":
        raise invalidImage(f"images of pixel type '{image.GetPixelIDTypeAsString()}' cannot be shown as a volume")
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    scalars.SetName("ImageScalars")
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*[int(n) for n in image.GetSize()])
    imageData.GetPointData().SetScalars(scalars)

    ijkToRas = imageIjkToRasMatrix(image)

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
    inside = sitk.GetArrayViewFromImage(maskImage) != 0  # (k, j, i)
    # Only the mask's bounding box is handed over (Slicer keeps a labelmap at its effective extent anyway): a
    # tumour's box, not the whole CT, is copied on every click. An empty mask is one voxel of background.
    bounds = [np.flatnonzero(inside.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]  # k, j, i
    (k0, k1), (j0, j1), (i0, i1) = [(int(b[0]), int(b[-1])) if len(b) else (0, 0) for b in bounds]
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetExtent(i0, i1, j0, j1, k0, k1)
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = \
        inside[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1].ravel()
    labelmap.SetImageToWorldMatrix(imageIjkToRasMatrix(maskImage))

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


def segmentToMask(segmentationNode, segmentName: str, referenceVolumeNode) -> "np.ndarray | None":
    """The segment named ``segmentName`` as a (k, j, i) uint8 array on ``referenceVolumeNode``'s voxel grid (what the
    user sees, edits by hand included), or None when the node has no segment of that name. A labelmap on another
    grid (a segmentation whose geometry the user changed) is resampled onto the volume's, nearest neighbour."""
    from vtk.util import numpy_support

    if segmentationNode is None:
        return None
    segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segmentName)
    if not segmentId:
        return None
    ni, nj, nk = referenceVolumeNode.GetImageData().GetDimensions()
    out = np.zeros((nk, nj, ni), np.uint8)
    labelmap = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap)
    if labelmap.GetPointData().GetScalars() is None or labelmap.IsEmpty():
        return out
    ijkToRas = vtk.vtkMatrix4x4()
    referenceVolumeNode.GetIJKToRASMatrix(ijkToRas)
    imageToWorld = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(imageToWorld)
    sameGrid = all(abs(imageToWorld.GetElement(r, c) - ijkToRas.GetElement(r, c)) < 1e-6
                   for r in range(4) for c in range(4))
    if sameGrid:  # as PRISM-RT and Segment Editor write it: the voxels of its extent, within the volume, as they are
        extent = labelmap.GetExtent()
        values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
            extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        lo = [max(extent[2 * a], 0) for a in range(3)]
        hi = [min(extent[2 * a + 1], n - 1) for a, n in enumerate((ni, nj, nk))]
        if all(h >= low for low, h in zip(lo, hi)):
            out[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = values[
                lo[2] - extent[4]:hi[2] - extent[4] + 1, lo[1] - extent[2]:hi[1] - extent[2] + 1,
                lo[0] - extent[0]:hi[0] - extent[0] + 1] != 0
        return out
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, ni - 1, 0, nj - 1, 0, nk - 1)
    reference.SetImageToWorldMatrix(ijkToRas)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, False):
        raise RuntimeError(f"the segment '{segmentName}' could not be read on the volume's grid")
    i0, i1, j0, j1, k0, k1 = resampled.GetExtent()
    if i1 < i0 or j1 < j0 or k1 < k0:
        return out
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(
        k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    # not padded: the resampled extent lies within the reference's
    out[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = values != 0
    return out
