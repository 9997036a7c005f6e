import numpy as np
import pytest

from PRISMRTLib.metrics import dice, hd95, iou, surface_distances


def test_dice_and_iou_by_hand():
    a = np.zeros((4, 4), bool); a[:2, :2] = True  # 4 pixels
    b = np.zeros((4, 4), bool); b[:2, 1:3] = True  # 4 pixels, 2 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(2 / 6)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


def test_hd95_uses_true_anisotropic_spacing():
    a = np.zeros((20, 20, 20), bool); a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=0)  # shifted two slices along k
    assert hd95(a, b, (2.5, 1.0, 1.0)) == pytest.approx(5.0)  # 2 slices x 2.5 mm
    assert hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(a, a, (3, 1, 1)) == 0.0
    assert hd95(a, np.zeros_like(a), (1, 1, 1)) == float("inf")


def test_surface_distances_known_case():
    a = np.zeros((9, 9), bool); a[2:7, 2:7] = True
    b = np.zeros((9, 9), bool); b[3:6, 3:6] = True  # one pixel inside on every side
    d_ab, d_ba = surface_distances(a, b, (1.0, 1.0))
    assert d_ba.max() == pytest.approx(1.0) and d_ba.min() == pytest.approx(1.0)
    assert d_ab.max() == pytest.approx(np.sqrt(2)) and len(d_ab) == 16


def test_hd95_matches_monai_on_random_shapes():
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI (test extra) is the reference implementation")
    import torch

    rng = np.random.default_rng(3)
    for spacing in [(2.5, 3.9, 3.9), (1.0, 1.0, 1.0), (3.0, 0.8, 1.2)]:
        base = np.zeros((24, 28, 30), bool)
        base[6:18, 8:20, 5:25] = True
        noisy = base ^ (rng.random(base.shape) < 0.04)
        other = np.roll(base, (1, -2, 3), axis=(0, 1, 2)) | (rng.random(base.shape) < 0.01)
        ours = hd95(noisy, other, spacing)
        theirs = monai_metrics.compute_hausdorff_distance(
            torch.from_numpy(noisy)[None, None], torch.from_numpy(other)[None, None], percentile=95,
            spacing=list(spacing),
        ).item()
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5)
