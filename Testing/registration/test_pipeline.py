"""register(): the field's sign and direction convention end to end, a known smooth deformation of a real CT
recovered, the method/feature hooks, inverse consistency, progress and cancel, repeatability, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS
from PRISMRTLib.errors import InvalidImageError
from PRISMRTLib.registration.alignment import body_mask
from PRISMRTLib.registration.convex_adam import ConvexAdamSettings
from PRISMRTLib.registration.field import compose, voxel_grid_to_field, warp_image
from PRISMRTLib.registration.pipeline import register, working_grid

FAST = ConvexAdamSettings(grid_spacing=3, search_radius=3, adam_grid_spacing=2, iterations=40)


@pytest.fixture(scope="module")
def neck(sample_dir):
    """The shipped CT cropped to 56 x 52 x 40 voxels through the neck (3.9 x 3.9 x 2.5 mm, direction diag(1, 1, -1))."""
    ct = sitk.ReadImage(str(sample_dir / "ct.nii.gz"))
    return sitk.Cast(ct[36:92, 34:86, 40:80], sitk.sitkFloat32)


def _on_grid(image, direction):
    """The same anatomy resampled onto a grid with another direction matrix (same centre, 3.5 mm voxels)."""
    size = [56, 52, 36]
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([3.5] * 3)
    grid.SetDirection(np.asarray(direction, float).ravel().tolist())
    grid.SetOrigin(tuple(centre - np.asarray(direction) @ (3.5 * (np.array(size) - 1) / 2)))
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0)


def _translated(image, shift_mm):
    """moving(q) = image(q - shift): the anatomy moved by ``shift`` (LPS mm), on the same grid."""
    return sitk.Resample(image, image, sitk.TranslationTransform(3, tuple(-np.asarray(shift_mm, float))),
                         sitk.sitkLinear, -1024.0)


def _body(image):
    return sitk.GetArrayFromImage(sitk.BinaryErode(body_mask(image), [2, 2, 2])) > 0


@pytest.mark.parametrize("name", ["openkbp", "oblique"])
def test_a_shift_of_5_mm_to_the_left_gives_u_of_plus_5_mm_in_x(neck, name):
    """Fails if the field's sign or direction convention is flipped anywhere from the optimiser to the LPS field."""
    fixed = neck if name == "openkbp" else _on_grid(neck, DIRECTIONS[name])
    moving = _translated(fixed, (5.0, 0.0, 0.0))
    result = register(fixed, moving, alignment="none", settings=FAST, device="cpu")
    u = sitk.GetArrayFromImage(result.displacement)[_body(fixed)]  # (n, 3): LPS x, y, z
    np.testing.assert_allclose(np.median(u, axis=0), [5.0, 0.0, 0.0], atol=0.6)
    assert np.mean(np.abs(u[:, 0] - 5.0)) < 1.0
    f = sitk.GetArrayFromImage(fixed)[_body(fixed)]
    w = sitk.GetArrayFromImage(result.warped)[_body(fixed)]
    before = sitk.GetArrayFromImage(moving)[_body(fixed)]
    assert np.mean(np.abs(w - f)) < 0.4 * np.mean(np.abs(before - f))
    for image in (result.displacement, result.warped):
        assert image.GetSize() == fixed.GetSize() and image.GetDirection() == fixed.GetDirection()
        assert np.allclose(image.GetOrigin(), fixed.GetOrigin()) and np.allclose(image.GetSpacing(), fixed.GetSpacing())


def _smooth_field(reference, amplitude_mm=8.0):
    """A smooth deformation (two Gaussian bumps of displacement, up to ``amplitude`` mm) on ``reference``'s grid."""
    size = reference.GetSize()
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in size], indexing="ij")
    centres = [(0.35, 0.45, 0.4), (0.65, 0.55, 0.6)]
    vectors = [np.array([1.0, -0.6, 0.4]), np.array([-0.5, 0.8, -0.7])]
    u = np.zeros((3,) + tuple(size)[::-1])
    for c, v in zip(centres, vectors):
        bump = np.exp(-(((i / size[0] - c[0]) / 0.22) ** 2 + ((j / size[1] - c[1]) / 0.22) ** 2
                        + ((k / size[2] - c[2]) / 0.3) ** 2)).transpose(2, 1, 0)
        u += (v / np.linalg.norm(v))[:, None, None, None] * bump * amplitude_mm
    m = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())[None]
    return voxel_grid_to_field(np.einsum("ab,bzyx->azyx", np.linalg.inv(m), u), reference)  # mm -> voxels -> field


def test_a_known_smooth_deformation_of_a_real_ct_is_recovered(neck):
    truth = _smooth_field(neck)
    fixed = warp_image(neck, truth)  # fixed(p) = neck(p + u_true(p)): registering fixed to neck must find u_true
    result = register(fixed, neck, alignment="none", device="cpu",
                      settings=ConvexAdamSettings(grid_spacing=3, search_radius=3, adam_grid_spacing=2, iterations=60))
    body = _body(fixed)
    true_u = sitk.GetArrayFromImage(truth)[body]
    found = sitk.GetArrayFromImage(result.displacement)[body]
    error = np.linalg.norm(found - true_u, axis=1)
    magnitude = np.linalg.norm(true_u, axis=1)
    moved = magnitude > 2.0
    assert magnitude.max() > 7.0
    # measured: 1.2 mm where the truth moves more than 2 mm (mean 3.8 mm); 0.56 mm mean, 2.9 mm max in the body
    assert error[moved].mean() < 0.4 * magnitude[moved].mean(), (error[moved].mean(), magnitude[moved].mean())
    assert error.mean() < 1.0 and error.max() < 4.0  # TG-132's deformable tolerances are 2 mm mean, 5 mm max


def test_features_and_both_plug_in_and_coarse_features_are_resized(neck):
    moving = _translated(neck, (0.0, 6.0, 0.0))  # 6 mm posterior
    calls = []

    def features(image):
        # a stand-in backbone: two smoothed intensity channels at half resolution, as an array (C, Z, Y, X)
        calls.append(image.GetSize())
        values = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, 4.0))[::2, ::2, ::2]
        return np.stack([np.clip(values, -200, 300), np.clip(values, 100, 1500)])

    for method in ("features", "both"):
        result = register(neck, moving, method=method, features=features, alignment="none", settings=FAST,
                          device="cpu")
        u = sitk.GetArrayFromImage(result.displacement)[_body(neck)]
        np.testing.assert_allclose(np.median(u, axis=0), [0.0, 6.0, 0.0], atol=1.0)
        assert result.settings["method"] == method
        assert result.settings["feature_channels"] == (2 if method == "features" else 14)
    assert len(calls) == 4 and calls[0] == tuple(working_grid(neck).GetSize())
    with pytest.raises(ValueError, match="feature extractor"):
        register(neck, moving, method="features")
    with pytest.raises(ValueError, match="unknown registration method"):
        register(neck, moving, method="elastix")
    with pytest.raises(InvalidImageError, match="returned"):
        register(neck, moving, method="features", features=lambda image: "no", alignment="none", settings=FAST)


def test_inverse_consistency_gives_the_inverse_on_the_moving_grid(neck):
    moving = _translated(neck, (-4.0, 0.0, 3.0))
    result = register(neck, moving, alignment="moments", inverse_consistency=True, settings=FAST, device="cpu")
    inverse = result.inverse_displacement
    assert inverse.GetSize() == moving.GetSize() and inverse.GetDirection() == moving.GetDirection()
    # p -> p + u(p) -> back with v: u(p) + v(p + u(p)) ~ 0 inside the body
    round_trip = compose(None, result.displacement, neck)
    from PRISMRTLib.registration.field import field_to_transform

    forward, backward = field_to_transform(result.displacement), field_to_transform(inverse)
    points = np.argwhere(_body(neck))[::97][:, ::-1]
    errors = []
    for index in points:
        p = np.array(neck.TransformIndexToPhysicalPoint(tuple(int(v) for v in index)))
        errors.append(np.linalg.norm(np.array(backward.TransformPoint(forward.TransformPoint(tuple(p)))) - p))
    assert np.mean(errors) < 1.0, np.mean(errors)
    assert round_trip.GetSize() == neck.GetSize()
    u = sitk.GetArrayFromImage(result.displacement)[_body(neck)]
    np.testing.assert_allclose(np.median(u, axis=0), [-4.0, 0.0, 3.0], atol=0.7)
    assert result.affine is not None and result.alignment.stages[0].name == "moments"


def test_progress_runs_from_0_to_1_and_raising_cancels(neck):
    moving = _translated(neck, (3.0, 0.0, 0.0))
    seen = []
    register(neck, moving, alignment="moments", settings=FAST, device="cpu",
             progress=lambda fraction, text: seen.append((fraction, text)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert any("Adam" in t for _, t in seen) and any("features" in t for _, t in seen)

    class Cancelled(Exception):
        pass

    def cancel(fraction, text):
        if "Adam step" in text:
            raise Cancelled()

    with pytest.raises(Cancelled):
        register(neck, moving, alignment="none", settings=FAST, device="cpu", progress=cancel)


def test_the_same_call_gives_the_same_field(neck):
    moving = _translated(neck, (2.0, -3.0, 1.0))
    first = register(neck, moving, alignment="translation", settings=FAST, device="cpu")
    second = register(neck, moving, alignment="translation", settings=FAST, device="cpu")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(first.displacement),
                                  sitk.GetArrayFromImage(second.displacement))
    summary = first.to_dict()
    assert summary["settings"]["convex_adam"]["iterations"] == 40 and summary["timings_s"]["total_s"] > 0


def test_bad_input_is_refused_with_a_reason(neck):
    with pytest.raises(InvalidImageError, match="2D"):
        register(neck[:, :, 5], neck)
    constant = sitk.Image(neck.GetSize(), sitk.sitkFloat32)
    constant.CopyInformation(neck)
    with pytest.raises(InvalidImageError, match="constant"):
        register(neck, constant)
    with pytest.raises(InvalidImageError, match="grid"):
        register(neck, neck, fixed_mask=sitk.Image([8, 8, 8], sitk.sitkUInt8) + 1)
    empty = sitk.Image(neck.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(neck)
    with pytest.raises(InvalidImageError, match="empty"):
        register(neck, neck, fixed_mask=empty)
    with pytest.raises(ValueError, match="alignment"):
        register(neck, neck, alignment="bspline")
    with pytest.raises(ValueError, match="smoothness"):
        register(neck, neck, smoothness=-2, alignment="none")


def _mr_like(ct, band=4):
    """The neck CT's values mapped to an MR-like positive range, with zero-filled bands in the first and last
    ``band`` x columns (outside a reconstructed field of view) and a zero pocket inside the volume."""
    values = np.clip(sitk.GetArrayFromImage(ct) + 1000.0, 0, 2000) * 0.2 + 5.0
    values[:, :, :band] = 0.0
    values[:, :, -band:] = 0.0
    values[20, 26, 28] = 0.0  # a lone zero inside: not padding
    mr = sitk.GetImageFromArray(values.astype(np.float32))
    mr.CopyInformation(ct)
    return mr


def test_on_mr_zero_filled_bands_are_left_out_of_the_data_terms_and_ct_is_unchanged(neck, monkeypatch):
    from PRISMRTLib.registration import pipeline

    assert pipeline.no_signal_mask(neck) is None  # CT: its lowest value is air, a cue
    mr = _mr_like(neck)
    blank = sitk.GetArrayFromImage(pipeline.no_signal_mask(mr)) > 0
    expected = np.zeros(blank.shape, bool)
    expected[:, :, :4] = expected[:, :, -4:] = True
    assert np.array_equal(blank, expected)  # the bands, not the pocket inside

    seen = {}

    def capture(feat_f, feat_m, settings, mask=None, moving_mask=None, **kw):
        seen["mask"], seen["moving_mask"] = mask, moving_mask
        raise RuntimeError("captured")

    monkeypatch.setattr(pipeline, "convex_adam", capture)
    with pytest.raises(RuntimeError, match="captured"):
        pipeline.register(mr, mr, alignment="none", settings=FAST, device="cpu", working_spacing=3.9)
    for weight in (seen["mask"].numpy(), seen["moving_mask"].numpy()):  # on the working grid, same extent
        x = weight.shape[2]
        assert weight[:, :, : x * 2 // 56].max() == 0 and weight[:, :, x - x * 2 // 56:].max() == 0
        assert weight[:, :, x // 4: 3 * x // 4].min() == 1
    with pytest.raises(RuntimeError, match="captured"):
        pipeline.register(neck, neck, alignment="none", settings=FAST, device="cpu", working_spacing=3.9)
    assert seen["mask"] is None and seen["moving_mask"].numpy().min() == 1  # CT: nothing left out
