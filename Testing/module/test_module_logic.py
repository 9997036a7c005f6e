"""The Slicer module's logic against slicer-core: the RAS <-> LPS boundary, the volume check and window presets.

Volume nodes are built here with plain MRML/VTK calls from an explicit IJKToRAS matrix, so the conversion under test
is checked against the definition, not against its own inverse: the voxel (i, j, k) of the SimpleITK image must lie at
diag(-1, -1, 1) @ (IJKToRAS @ (i, j, k, 1)) in LPS and keep its value.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from prismrt_testing import slicer_core_or_skip

slicer = slicer_core_or_skip()
sitk = pytest.importorskip("SimpleITK")

import vtk  # noqa: E402  (comes with slicer-core)
from vtk.util import numpy_support  # noqa: E402

from PRISMRTLib.errors import InvalidImageError, PrismRTError  # noqa: E402
from PRISMRTLib.imaging import WINDOW_PRESETS  # noqa: E402
from prismrt_testing import REPO, SAMPLE_DIR, SHARED_DATA, rotation  # noqa: E402
from PRISMRTModule import conversions, dependencies, volumes  # noqa: E402
from PRISMRTModule.parameters import PRISMRTParameters  # noqa: E402

MODULE_FILE = REPO / "PRISMRT" / "PRISMRT.py"
FLIP = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS
SAMPLE_CT = SAMPLE_DIR / "ct.nii.gz"
SHARED_CT = SHARED_DATA / "openkbp" / "validation-pats" / "pt_201" / "ct.nii.gz"


def ijk_to_ras(directions_ras, spacing, origin_ras) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(directions_ras, float) @ np.diag(spacing)
    m[:3, 3] = origin_ras
    return m


# IJKToRAS matrices of the nodes under test (columns: RAS direction of the i, j, k axes times the spacing).
IJK_TO_RAS = {
    # OpenKBP CTs: LPS direction diag(1, 1, -1), i.e. RAS diag(-1, -1, -1); 3.9 x 3.9 x 2.5 mm
    "openkbp": ijk_to_ras(np.diag([-1.0, -1.0, -1.0]), (3.9, 3.9, 2.5), (80.0, -12.5, 140.0)),
    "ras-flip-k": ijk_to_ras(np.diag([1.0, 1.0, -1.0]), (3.9, 3.9, 2.5), (-80.0, 12.5, -140.0)),
    "axes-permuted": ijk_to_ras([[-1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]], (0.7, 1.2, 3.0), (10.0, 20.0, -30.0)),
    "oblique": ijk_to_ras(rotation(2, 12.0) @ rotation(0, -7.0) @ np.diag([-1.0, -1.0, 1.0]),
                          (0.9, 1.1, 2.0), (-33.3, 101.5, 7.25)),
}
SIZE = (7, 5, 3)  # (i, j, k): all different, so an axis mix-up changes shapes


def vtk_matrix(array4x4) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array4x4[r][c]))
    return m


def make_node(scene, array_kji: np.ndarray, ijk_to_ras_matrix, extent_start=(0, 0, 0), name="ct"):
    """A scalar volume node made with plain MRML/VTK calls; voxel (i, j, k) holds array_kji[k, j, i]."""
    nk, nj, ni = array_kji.shape
    image_data = vtk.vtkImageData()
    i0, j0, k0 = extent_start
    image_data.SetExtent(i0, i0 + ni - 1, j0, j0 + nj - 1, k0, k0 + nk - 1)
    image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array_kji).ravel(), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras_matrix))
    node.SetAndObserveImageData(image_data)
    return node


def node_ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def expected_lps(ijk_to_ras_matrix, index) -> np.ndarray:
    return FLIP @ (np.asarray(ijk_to_ras_matrix) @ np.array([*index, 1.0]))[:3]


def sample_indices(size):
    ni, nj, nk = size
    corners = [(i, j, k) for i in (0, ni - 1) for j in (0, nj - 1) for k in (0, nk - 1)]
    rng = np.random.default_rng(0)
    inner = [tuple(int(v) for v in rng.integers(0, size)) for _ in range(10)]
    return corners + inner


def ramp(size, dtype=np.int16) -> np.ndarray:
    """Distinct values everywhere, shape (k, j, i)."""
    return (np.arange(np.prod(size)).reshape(size[::-1]) * 3 - 50).astype(dtype)


# --- volume node -> SimpleITK image ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(IJK_TO_RAS))
def test_voxel_index_maps_to_lps_point_of_ijk_to_ras(case, scene):
    matrix = IJK_TO_RAS[case]
    node = make_node(scene, ramp(SIZE), matrix)

    image = conversions.volumeNodeToImage(node)

    assert image.GetDimension() == 3
    assert image.GetSize() == SIZE
    for index in sample_indices(SIZE):
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), expected_lps(matrix, index), atol=1e-9)
    # and between voxel centres
    for cindex in [(0.5, 0.25, 1.75), (6.0, 0.0, 0.5), (-0.5, -0.5, -0.5)]:
        np.testing.assert_allclose(
            image.TransformContinuousIndexToPhysicalPoint(cindex), expected_lps(matrix, cindex), atol=1e-9
        )


@pytest.mark.parametrize("case", sorted(IJK_TO_RAS))
def test_voxel_values_and_pixel_type_are_kept(case, scene):
    values = ramp(SIZE)
    node = make_node(scene, values, IJK_TO_RAS[case])

    image = conversions.volumeNodeToImage(node)

    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), values)


def test_marked_voxel_keeps_its_value_and_position(scene):
    matrix = IJK_TO_RAS["oblique"]
    values = np.zeros(SIZE[::-1], dtype=np.float32)
    marked = (5, 1, 2)  # (i, j, k)
    values[marked[2], marked[1], marked[0]] = 1234.5
    node = make_node(scene, values, matrix)

    image = conversions.volumeNodeToImage(node)

    assert image.GetPixel(marked) == pytest.approx(1234.5)
    assert image.GetPixelID() == sitk.sitkFloat32
    hot = np.argwhere(sitk.GetArrayFromImage(image) != 0)
    assert hot.tolist() == [[marked[2], marked[1], marked[0]]]
    # the marked voxel is found again from its LPS point
    point = expected_lps(matrix, marked)
    assert image.TransformPhysicalPointToIndex(point.tolist()) == marked


def test_extent_not_starting_at_zero_shifts_the_origin(scene):
    matrix = IJK_TO_RAS["openkbp"]
    node = make_node(scene, ramp(SIZE), matrix, extent_start=(2, 1, 4))

    image = conversions.volumeNodeToImage(node)

    # array index (0, 0, 0) is the voxel with IJK (2, 1, 4)
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, 0)), expected_lps(matrix, (2, 1, 4)),
                               atol=1e-9)
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((3, 2, 1)), expected_lps(matrix, (5, 3, 5)),
                               atol=1e-9)


def test_multi_component_volume_is_refused_with_a_message(scene):
    rgb = np.zeros((3, 5, 7, 3), dtype=np.uint8)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(7, 5, 3)
    image_data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(rgb.reshape(-1, 3), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "photo")
    node.SetAndObserveImageData(image_data)

    with pytest.raises(InvalidImageError, match="3 values per voxel"):
        conversions.volumeNodeToImage(node)


def test_node_without_voxels_is_refused_with_a_message(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InvalidImageError, match="no voxels"):
        conversions.volumeNodeToImage(node)
    with pytest.raises(InvalidImageError, match="no volume is selected"):
        conversions.volumeNodeToImage(None)


def test_zero_spacing_is_refused_with_a_message(scene):
    matrix = IJK_TO_RAS["openkbp"].copy()
    matrix[:3, 2] = 0.0
    node = make_node(scene, ramp(SIZE), matrix)
    with pytest.raises(InvalidImageError, match="spacing"):
        conversions.volumeNodeToImage(node)


# --- SimpleITK image -> volume node, and round trips -----------------------------------------------------------


def lps_image(direction_lps, dtype=np.int16, size=SIZE, spacing=(3.9, 3.9, 2.5), origin=(-80.0, 12.5, 140.0)):
    image = sitk.GetImageFromArray(ramp(size, dtype))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction_lps, float).ravel().tolist())
    return image


LPS_DIRECTIONS = {case: FLIP @ (m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)) for case, m in IJK_TO_RAS.items()}


@pytest.mark.parametrize("case", sorted(LPS_DIRECTIONS))
def test_image_to_node_sets_ijk_to_ras_from_lps_geometry(case, scene):
    image = lps_image(LPS_DIRECTIONS[case])

    node = conversions.imageToVolumeNode(image, "mask", scene=scene)

    matrix = node_ijk_to_ras(node)
    for index in sample_indices(SIZE):
        ras = (matrix @ np.array([*index, 1.0]))[:3]
        np.testing.assert_allclose(FLIP @ ras, image.TransformIndexToPhysicalPoint(index), atol=1e-9)
    assert node.GetImageData().GetDimensions() == SIZE
    assert node.GetScene() is scene and node.GetName() == "mask"
    assert node.GetDisplayNode() is not None


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(LPS_DIRECTIONS))
def test_round_trip_image_node_image_is_exact(case, dtype, scene):
    image = lps_image(LPS_DIRECTIONS[case], dtype=dtype)

    back = conversions.volumeNodeToImage(conversions.imageToVolumeNode(image, "ct", scene=scene))

    assert back.GetPixelID() == image.GetPixelID()
    assert back.GetSize() == image.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", sorted(IJK_TO_RAS))
def test_round_trip_node_image_node_keeps_ijk_to_ras(case, scene):
    node = make_node(scene, ramp(SIZE), IJK_TO_RAS[case])

    again = conversions.imageToVolumeNode(conversions.volumeNodeToImage(node), "again", scene=scene)

    np.testing.assert_allclose(node_ijk_to_ras(again), IJK_TO_RAS[case], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(numpy_support.vtk_to_numpy(again.GetImageData().GetPointData().GetScalars()),
                                  ramp(SIZE).ravel())


def test_image_to_existing_node_replaces_voxels_and_keeps_display(scene):
    node = make_node(scene, ramp(SIZE), IJK_TO_RAS["openkbp"])
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    volumes.applyWindowPreset(node, "lung")
    new = lps_image(LPS_DIRECTIONS["oblique"], dtype=np.float32, size=(4, 6, 2), spacing=(1.0, 2.0, 3.0))

    returned = conversions.imageToVolumeNode(new, volumeNode=node)

    assert returned is node
    assert node.GetDisplayNode() is display
    assert display.GetWindow() == pytest.approx(WINDOW_PRESETS["lung"].width)
    assert node.GetImageData().GetDimensions() == (4, 6, 2)
    back = conversions.volumeNodeToImage(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(new))
    np.testing.assert_allclose(back.GetDirection(), new.GetDirection(), atol=1e-12)


def test_image_to_label_map_node(scene):
    mask = sitk.Cast(lps_image(LPS_DIRECTIONS["openkbp"]) > 30, sitk.sitkUInt8)

    node = conversions.imageToVolumeNode(mask, "GTV mask", scene=scene, className="vtkMRMLLabelMapVolumeNode")

    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(conversions.volumeNodeToImage(node)),
                                  sitk.GetArrayFromImage(mask))


def test_image_to_node_refuses_2d_and_vector_images(scene):
    with pytest.raises(InvalidImageError, match="3D single-component"):
        conversions.imageToVolumeNode(sitk.Image(4, 4, sitk.sitkInt16), scene=scene)
    with pytest.raises(InvalidImageError, match="3D single-component"):
        conversions.imageToVolumeNode(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), scene=scene)


# --- real CT: Slicer's own NIfTI reader (in slicer-core) against SimpleITK's ------------------------------------


def ct_files():
    return [
        pytest.param(SAMPLE_CT, id="repo-sample-pt_226"),
        pytest.param(SHARED_CT, id="shared-pt_201", marks=pytest.mark.skipif(
            not SHARED_CT.is_file(),
            reason=f"shared data not found at {SHARED_CT} (../shared/data, or set PRISMRT_SHARED_DATA)")),
    ]


@pytest.mark.parametrize("path", ct_files())
def test_real_ct_read_by_slicer_converts_to_the_simpleitk_reading(path, scene):
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    assert storage.ReadData(node), f"Slicer's reader could not read {path}"
    reference = sitk.ReadImage(str(path))

    converted = conversions.volumeNodeToImage(node)

    # Slicer may store the slices in another order (it keeps IJKToRAS right-handed); the voxels must still sit at
    # the same LPS points with the same values: resampling onto SimpleITK's grid is then an exact copy.
    assert converted.GetPixelID() == reference.GetPixelID()
    assert sorted(converted.GetSize()) == sorted(reference.GetSize())
    on_reference_grid = sitk.Resample(converted, reference, sitk.Transform(), sitk.sitkNearestNeighbor, -9999)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_reference_grid), sitk.GetArrayFromImage(reference))
    corners = [(0, 0, 0), tuple(s - 1 for s in converted.GetSize())]
    for index in corners:
        point = converted.TransformIndexToPhysicalPoint(index)
        ref_index = reference.TransformPhysicalPointToContinuousIndex(point)
        np.testing.assert_allclose(ref_index, np.round(ref_index), atol=1e-4)
        assert converted[index] == reference[tuple(int(round(v)) for v in ref_index)]


@pytest.mark.parametrize("path", ct_files())
def test_real_ct_image_to_node_and_back(path, scene):
    image = sitk.ReadImage(str(path))

    node = conversions.imageToVolumeNode(image, "ct", scene=scene)
    back = conversions.volumeNodeToImage(node)

    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    # the RAS matrix Slicer sees: LPS direction diag(1, 1, -1) is RAS diag(-1, -1, -1)
    direction_lps = np.array(image.GetDirection()).reshape(3, 3)
    expected = FLIP @ direction_lps @ np.diag(image.GetSpacing())
    np.testing.assert_allclose(node_ijk_to_ras(node)[:3, :3], expected, atol=1e-9)
    np.testing.assert_allclose(node_ijk_to_ras(node)[:3, 3], FLIP @ np.array(image.GetOrigin()), atol=1e-9)


# --- volume check -----------------------------------------------------------------------------------------------


def test_check_volume_summarises_a_real_ct(scene):
    image = sitk.ReadImage(str(SAMPLE_CT))
    node = conversions.imageToVolumeNode(image, "ct", scene=scene)

    text = volumes.checkVolume(node)

    assert isinstance(text, str)
    size = image.GetSize()
    assert f"{size[0]} x {size[1]} x {size[2]}" in text
    assert "CT" in text


def bad_volume(kind):
    if kind == "constant":
        return np.full((4, 5, 6), 7, dtype=np.int16)
    if kind == "nan":
        values = ramp((6, 5, 4), np.float32)
        values[1, 2, 3] = np.nan
        return values
    if kind == "single-slice":
        return ramp((6, 5, 1))
    raise ValueError(kind)


@pytest.mark.parametrize("kind, message", [("constant", "constant"), ("nan", "NaN"), ("single-slice", "single slice")])
def test_check_volume_raises_clear_errors_for_bad_volumes(kind, message, scene):
    node = make_node(scene, bad_volume(kind), IJK_TO_RAS["openkbp"])

    with pytest.raises(PrismRTError, match=message) as excinfo:
        volumes.checkVolume(node)
    assert len(str(excinfo.value)) > 20


# --- window presets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(WINDOW_PRESETS))
def test_window_preset_sets_window_and_level(preset, scene):
    node = make_node(scene, ramp(SIZE), IJK_TO_RAS["openkbp"])
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOn()

    volumes.applyWindowPreset(node, preset)

    assert not display.GetAutoWindowLevel()
    assert display.GetWindow() == pytest.approx(WINDOW_PRESETS[preset].width)
    assert display.GetLevel() == pytest.approx(WINDOW_PRESETS[preset].level)


def test_window_preset_creates_the_display_node_when_missing(scene):
    node = make_node(scene, ramp(SIZE), IJK_TO_RAS["openkbp"])
    assert node.GetDisplayNode() is None

    volumes.applyWindowPreset(node, "bone")

    assert node.GetDisplayNode().GetWindow() == pytest.approx(WINDOW_PRESETS["bone"].width)


def test_window_preset_errors(scene):
    node = make_node(scene, ramp(SIZE), IJK_TO_RAS["openkbp"])
    with pytest.raises(ValueError, match="soft-tissue"):  # lists the valid names
        volumes.applyWindowPreset(node, "no-such-preset")
    label = conversions.imageToVolumeNode(lps_image(np.eye(3), dtype=np.uint8), "labels", scene=scene,
                                    className="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(ValueError, match="label map"):
        volumes.applyWindowPreset(label, "lung")


def test_preset_names_and_default_come_from_prismrtlib():
    assert volumes.windowPresetNames() == list(WINDOW_PRESETS)
    assert PRISMRTParameters.STRINGS["windowPreset"] in WINDOW_PRESETS


# --- loading the module -----------------------------------------------------------------------------------------


# Stand-ins for what only the application has (Slicer's GUI base classes and translation): enough to load PRISMRT.py
# and see what it imports; the classes are not used.
_APPLICATION_STANDINS = """
import sys, types
def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module
class _Base:
    def __init__(self, *args, **kwargs):
        pass
_module("slicer.ScriptedLoadableModule", ScriptedLoadableModule=_Base, ScriptedLoadableModuleWidget=_Base,
        ScriptedLoadableModuleLogic=_Base, ScriptedLoadableModuleTest=_Base)
_module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
"""


def test_loading_the_module_imports_no_heavy_or_optional_dependency():
    code = (
        _APPLICATION_STANDINS
        + f"sys.path[:0] = [{str(REPO / 'PRISMRT')!r}]\n"
        + "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('PRISMRT', {str(MODULE_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert hasattr(module, 'PRISMRTLogic') and hasattr(module, 'PRISMRTWidget')\n"
        "print(sorted(m for m in ('torch', 'SimpleITK', 'PRISMRTLib', 'pydicom', 'requests', 'qt') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO.parent))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_missing_python_packages(monkeypatch):
    monkeypatch.setattr(dependencies, "PYTHON_REQUIREMENTS",
                        (("json", "json"), ("prismrt_no_such_module_xyz", "prismrt-no-such-package>=1")))
    assert dependencies.missingPythonPackages() == ["prismrt-no-such-package>=1"]
