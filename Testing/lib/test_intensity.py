import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.errors import InvalidImageError
from PRISMRTLib.imaging import WINDOW_PRESETS, Window, ct_likelihood_problems, get_window, normalize_percentiles


def test_window_maps_level_and_edges():
    w = Window(level=40, width=400)  # -160 .. 240 HU
    out = w.apply([-1000, -160, 40, 240, 3000, 140])
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0, 0.75])
    assert out.dtype == np.float32


def test_presets_are_the_usual_reading_windows():
    assert (WINDOW_PRESETS["lung"].lower, WINDOW_PRESETS["lung"].upper) == (-1350, 150)
    assert (WINDOW_PRESETS["brain"].lower, WINDOW_PRESETS["brain"].upper) == (0, 80)
    assert set(WINDOW_PRESETS) == {"soft-tissue", "lung", "bone", "brain", "head-and-neck"}
    with pytest.raises(InvalidImageError, match="choose one of"):
        get_window("liver")
    with pytest.raises(InvalidImageError, match="positive width"):
        Window(40, 0)


def test_percentile_normalisation_ignores_background_and_outliers():
    rng = np.random.default_rng(0)
    img = np.zeros((20, 20, 20), np.float32)
    img[5:15, 5:15, 5:15] = rng.normal(300, 50, size=(10, 10, 10))
    img[10, 10, 10] = 1e6  # a hot voxel must not set the scale
    out = normalize_percentiles(img)
    assert out.min() == 0.0 and out.max() == 1.0
    fg = out[5:15, 5:15, 5:15]
    assert 0.4 < np.median(fg) < 0.6
    assert (fg >= 1.0).mean() < 0.01
    with pytest.raises(InvalidImageError, match="no intensity contrast"):
        normalize_percentiles(np.full((4, 4), 7.0))


def test_ct_plausibility_on_real_ct_and_mr(sample_ct, shared_data):
    assert ct_likelihood_problems(sitk.GetArrayViewFromImage(sample_ct)) == []
    mr = sitk.ReadImage(str(shared_data / "samples" / "mr_brain_tumor_pair" / "MRBrainTumor1.nii.gz"))
    problems = ct_likelihood_problems(sitk.GetArrayViewFromImage(mr))
    assert any("no air" in p for p in problems)
