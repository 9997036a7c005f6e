"""MIND-SSC and the ConvexAdam optimiser on feature volumes: sign, recovery, inverse consistency, cancel, repeats."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PRISMRTLib.errors import InvalidImageError
from PRISMRTLib.registration.convex_adam import (ConvexAdamSettings, combine_features, convex_adam,
                                                 inverse_consistency_error, normalise_features, symmetrise)
from PRISMRTLib.registration.mind import CHANNELS, mind_ssc

FAST = dict(grid_spacing=3, search_radius=3, adam_grid_spacing=2, iterations=40)


@pytest.fixture(scope="module")
def ct_block(sample_dir):
    """A 48 x 48 x 40 block of the shipped CT through the neck (HU, float32), array order (k, j, i)."""
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_dir / "ct.nii.gz"))).astype(np.float32)
    return ct[40:80, 40:88, 40:88].copy()


def _shift(volume, voxels_i):
    """moving(x) = volume(x - t e_i) for an integer t: fixed(x) = moving(x + t e_i), so u = +t along i."""
    return np.ascontiguousarray(np.roll(volume, voxels_i, axis=2))


def test_mind_has_12_channels_in_0_1_and_ignores_linear_intensity_changes(ct_block):
    mind = mind_ssc(ct_block)
    assert mind.shape == (1, CHANNELS, *ct_block.shape) and CHANNELS == 12
    assert float(mind.min()) > 0 and float(mind.max()) <= 1.0 + 1e-6
    scaled = mind_ssc(ct_block * 0.01 + 30.0)
    torch.testing.assert_close(scaled, mind, atol=2e-4, rtol=0)
    assert mind_ssc(ct_block, downsample=2).shape == (1, 12, 20, 24, 24)


def test_mind_matches_the_convexadam_package_up_to_channel_order(ct_block):
    reference = pytest.importorskip("convexAdam.convex_adam_utils")
    ours = mind_ssc(ct_block, radius=1, dilation=2)[0].reshape(12, -1)
    theirs = reference.MINDSSC(torch.from_numpy(ct_block)[None, None], 1, 2, device="cpu")[0].reshape(12, -1)
    for channel in range(12):  # every channel of ours is one of theirs
        assert float((ours[channel][None] - theirs).abs().max(dim=1).values.min()) < 1e-5


def test_mind_refuses_bad_volumes(ct_block):
    with pytest.raises(InvalidImageError, match="3D"):
        mind_ssc(ct_block[0])
    with pytest.raises(InvalidImageError, match="constant"):
        mind_ssc(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(InvalidImageError, match="NaN"):
        mind_ssc(np.full((8, 8, 8), np.nan, np.float32))


def test_a_translation_along_i_is_found_with_the_right_sign(ct_block):
    moving = _shift(ct_block, 4)
    found = convex_adam(mind_ssc(ct_block), mind_ssc(moving), ConvexAdamSettings(**FAST))
    u = found.forward[0]
    assert u.shape == (3, *ct_block.shape)
    inner = (slice(8, -8),) * 3
    assert float(u[0][inner].median()) == pytest.approx(4.0, abs=0.5)  # +4 voxels along i, not -4
    assert abs(float(u[1][inner].median())) < 0.5 and abs(float(u[2][inner].median())) < 0.5


def test_inverse_consistency_gives_an_inverse_pair(ct_block):
    moving = _shift(ct_block, -3)
    found = convex_adam(mind_ssc(ct_block), mind_ssc(moving), ConvexAdamSettings(**FAST, inverse_consistency=True))
    inner = (slice(8, -8),) * 3
    assert float(found.forward[0, 0][inner].median()) == pytest.approx(-3.0, abs=0.5)
    assert float(found.backward[0, 0][inner].median()) == pytest.approx(3.0, abs=0.5)
    assert inverse_consistency_error(found.forward, found.backward) < 0.3
    assert found.losses["inverse_consistency_voxels"] < 0.3


def test_symmetrise_makes_two_displacements_inverse():
    z, y, x = torch.meshgrid(*[torch.linspace(0, 1, 20)] * 3, indexing="ij")
    forward = torch.stack([1.5 * torch.sin(3 * y), 0.8 * torch.cos(2 * x), 0.5 * z])[None].double()
    backward = -forward + 0.3  # a poor inverse
    before = inverse_consistency_error(forward, backward)
    f, b = symmetrise(forward, backward, 20)
    assert inverse_consistency_error(f, b) < 0.2 * before


def test_features_of_any_width_are_put_on_one_scale(ct_block):
    fixed, moving = mind_ssc(ct_block), mind_ssc(_shift(ct_block, 2))
    a, _ = normalise_features(fixed, moving)
    b, _ = normalise_features(fixed * 40.0 + 3.0, moving * 40.0 + 3.0)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    wide_f, wide_m = combine_features([(fixed, moving), (fixed[:, :3].repeat(1, 20, 1, 1, 1),
                                                          moving[:, :3].repeat(1, 20, 1, 1, 1))])
    assert wide_f.shape[1] == 72
    total = float(torch.cat((wide_f.flatten(2), wide_m.flatten(2)), 2)[0].var(dim=1).sum())
    assert total == pytest.approx(1.0, rel=0.05)
    found = convex_adam(wide_f, wide_m, ConvexAdamSettings(**FAST))
    assert float(found.forward[0, 0][(slice(8, -8),) * 3].median()) == pytest.approx(2.0, abs=0.5)


def test_more_smoothness_gives_a_smoother_field(ct_block):
    fixed = mind_ssc(ct_block)
    moving = mind_ssc(ct_block[:, :, ::-1].copy())  # mirrored: no smooth exact answer, so the penalty decides
    rough = convex_adam(fixed, moving, ConvexAdamSettings(**FAST, smoothness=0.25))
    smooth = convex_adam(fixed, moving, ConvexAdamSettings(**FAST, smoothness=8.0))
    assert smooth.losses["diffusion"] < 0.5 * rough.losses["diffusion"]
    assert smooth.losses["data"] > rough.losses["data"]


def test_runs_repeat_exactly_on_the_cpu(ct_block):
    fixed, moving = mind_ssc(ct_block), mind_ssc(_shift(ct_block, 3))
    settings = ConvexAdamSettings(**FAST, inverse_consistency=True)
    first = convex_adam(fixed, moving, settings)
    second = convex_adam(fixed, moving, settings)
    assert torch.equal(first.forward, second.forward) and torch.equal(first.backward, second.backward)


def test_raising_in_progress_cancels_the_adam_step(ct_block):
    fixed, moving = mind_ssc(ct_block), mind_ssc(_shift(ct_block, 3))
    seen = []

    class Cancelled(Exception):
        pass

    def progress(fraction, text):
        seen.append(fraction)
        if "Adam step 10/" in text:
            raise Cancelled()

    with pytest.raises(Cancelled):
        convex_adam(fixed, moving, ConvexAdamSettings(**FAST), progress=progress)
    assert seen == sorted(seen) and 0.2 < seen[-1] < 0.5


def test_bad_inputs_are_refused_with_a_reason(ct_block):
    fixed = mind_ssc(ct_block)
    with pytest.raises(InvalidImageError, match="differ in shape"):
        convex_adam(fixed, fixed[:, :, :-2])
    with pytest.raises(InvalidImageError, match="shape"):
        convex_adam(fixed[0, 0], fixed[0, 0])
    with pytest.raises(InvalidImageError, match="mask is empty"):
        convex_adam(fixed, fixed, ConvexAdamSettings(**FAST), mask=torch.zeros(ct_block.shape))
    with pytest.raises(InvalidImageError, match="does not match"):
        convex_adam(fixed, fixed, ConvexAdamSettings(**FAST), mask=torch.ones(4, 4, 4))
    with pytest.raises(InvalidImageError, match="too small"):
        convex_adam(fixed[:, :, :6, :6, :6], fixed[:, :, :6, :6, :6], ConvexAdamSettings(**FAST))
    with pytest.raises(InvalidImageError, match="constant"):
        convex_adam(torch.ones(1, 2, 16, 16, 16), torch.ones(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="smoothness"):
        ConvexAdamSettings(smoothness=-1)
    with pytest.raises(ValueError, match="grid_spacing"):
        ConvexAdamSettings(grid_spacing=0)
