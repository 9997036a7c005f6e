"""Backbone features for registration: slices of three orientations back in the right voxels (any direction
matrix), one PCA basis for both images, skipped slices interpolated, and the pipeline's "features" and "both"
methods recovering a known shift with a real backbone (the shipped stand-in)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from prismrt_testing import DIRECTIONS, make_volume
from PRISMRTLib.errors import PrismRTError
from PRISMRTLib.features import SliceFeatures
from PRISMRTLib.imaging import Letterbox
from PRISMRTLib.registration.alignment import body_mask
from PRISMRTLib.registration.backbone import BackboneFeatures
from PRISMRTLib.registration.convex_adam import ConvexAdamSettings
from PRISMRTLib.registration.pipeline import register

FAST = ConvexAdamSettings(grid_spacing=3, search_radius=3, adam_grid_spacing=2, iterations=40)
GRID = 32


class IntensityBackend:
    """A backend whose "dino" patch grid is the windowed slice itself, letterboxed into a 32 x 32 grid (plus its
    square): the features of a voxel are its own intensity, so any flip or shift of a slice shows."""

    roles = ("dino",)
    default_window = "soft-tissue"
    batch_size = 8

    def __init__(self):
        self.slices = 0

    def describe(self):
        return "intensity"

    def encode(self, slices, pixel_spacing=(1.0, 1.0), *, roles=None):
        assert roles == ("dino",)
        slices = np.asarray(slices, np.float32)
        self.slices += len(slices)
        box = Letterbox.fit(slices.shape[1:], pixel_spacing, GRID)
        grid = torch.from_numpy(np.stack([box.resize_to_model(s, antialias=False) for s in slices]))[:, None]
        grid = torch.cat([grid, grid ** 2], 1)
        z = torch.zeros(len(slices), 1)
        return SliceFeatures(None, z, grid, z, None, None, letterbox=box)


def _phantom(direction):
    """An asymmetric volume (a bright block off-centre and a ramp) on a grid with the given direction."""
    image = make_volume(direction, size=(30, 26, 20), spacing=(2.0, 2.0, 2.5), dtype=np.float32)
    a = np.full(image.GetSize()[::-1], -100.0, np.float32)
    a[4:12, 5:15, 3:12] = 150.0
    a[12:16, 16:22, 18:27] += np.linspace(0, 120, 9)[None, None]
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(image)
    return out


def _correlation(a, b):
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("direction", ["openkbp", "ras-stored", "coronal-acq", "oblique"])
@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_each_orientation_puts_features_back_in_their_voxels(direction, orientation):
    image = _phantom(DIRECTIONS[direction])
    extractor = BackboneFeatures(IntensityBackend(), channels=1, orientations=(orientation,)).fit(image, image)
    out = extractor(image)
    assert tuple(out.shape) == (1,) + tuple(image.GetSize()[::-1]) and out.dtype == torch.float32
    windowed = extractor.window.apply(sitk.GetArrayFromImage(image))
    # one PCA channel of (v, v^2) is monotone in v: a flipped or transposed slice would not correlate
    assert abs(_correlation(out[0].numpy(), windowed)) > 0.97


def test_the_orientations_are_fused_and_the_basis_is_shared():
    fixed = _phantom(DIRECTIONS["openkbp"])
    moving = sitk.Resample(fixed, fixed, sitk.TranslationTransform(3, (-4.0, 2.0, 0.0)), sitk.sitkLinear, -100.0)
    extractor = BackboneFeatures(IntensityBackend(), channels=2).fit(fixed, moving)
    assert extractor.basis.shape == (2, 2) and 0.99 < extractor.explained <= 1.0 + 1e-6
    f, m = extractor(fixed), extractor(moving)
    assert f.shape == m.shape == (2,) + tuple(fixed.GetSize()[::-1])
    # the same voxel value gives the same feature in both images (one basis): compare where both are background
    background = (sitk.GetArrayFromImage(fixed) == -100) & (sitk.GetArrayFromImage(moving) == -100)
    np.testing.assert_allclose(f[:, background].mean(1), m[:, background].mean(1), atol=1e-3)
    assert extractor.settings()["orientations"] == ["axial", "coronal", "sagittal"]


def test_skipped_slices_are_interpolated_and_cost_less():
    image = _phantom(DIRECTIONS["openkbp"])
    every, third = IntensityBackend(), IntensityBackend()
    a = BackboneFeatures(every, channels=1).fit(image, image)
    b = BackboneFeatures(third, channels=1, slice_step=3).fit(image, image)
    fit_cost = every.slices
    fa, fb = a(image), b(image)
    assert (third.slices - fit_cost) < 0.45 * (every.slices - fit_cost)
    assert _correlation(fa.numpy(), fb.numpy()) > 0.95


def test_errors_say_what_to_do():
    image = _phantom(DIRECTIONS["openkbp"])
    extractor = BackboneFeatures(IntensityBackend(), channels=1)
    with pytest.raises(PrismRTError, match="fit"):
        extractor(image)
    with pytest.raises(PrismRTError, match="no sam model"):
        BackboneFeatures(IntensityBackend(), role="sam")
    with pytest.raises(ValueError, match="orientation"):
        BackboneFeatures(IntensityBackend(), orientations=("oblique",))
    empty = sitk.Image(image.GetSize(), sitk.sitkFloat32) - 1000.0
    empty.CopyInformation(image)
    with pytest.raises(Exception, match="no body"):
        extractor.fit(empty, empty)


# ---- with a real backbone ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def neck(sample_dir):
    ct = sitk.ReadImage(str(sample_dir / "ct.nii.gz"))
    return sitk.Cast(ct[36:92, 34:86, 40:80], sitk.sitkFloat32)


@pytest.fixture(scope="module")
def standin():
    from PRISMRTLib.weights import default_manifest, is_available

    if not is_available("teachers-standin-openkbp", default_manifest()):
        pytest.skip("the shipped stand-in teachers are not in this tree")
    return BackboneFeatures.from_model("teachers-standin-openkbp", device="cpu", channels=8, slice_step=3)


@pytest.mark.parametrize("method", ["features", "both"])
def test_a_shift_is_recovered_on_the_standin_backbone_features(neck, standin, method):
    moving = sitk.Resample(neck, neck, sitk.TranslationTransform(3, (-5.0, 0.0, 0.0)), sitk.sitkLinear, -1024.0)
    texts = []
    result = register(neck, moving, method=method, features=standin, alignment="none", settings=FAST,
                      device="cpu", progress=lambda f, t: texts.append(t))
    body = sitk.GetArrayFromImage(sitk.BinaryErode(body_mask(neck), [2, 2, 2])) > 0
    u = sitk.GetArrayFromImage(result.displacement)[body]
    np.testing.assert_allclose(np.median(u, axis=0), [5.0, 0.0, 0.0], atol=1.0)
    assert any("backbone features" in t for t in texts)
    assert result.settings["features"]["role"] == "dino"
    assert result.settings["feature_channels"] == (8 if method == "features" else 8 + 12)
