import numpy as np
import pytest

from PRISMRTLib.errors import GeometryError
from PRISMRTLib.imaging import Letterbox


def test_fit_makes_pixels_square_and_fills_the_longer_side():
    # a coronal OpenKBP slice: 128 rows of 2.5 mm (320 mm) x 128 columns of 3.90625 mm (500 mm)
    box = Letterbox.fit((128, 128), (2.5, 3.90625), 1024)
    assert box.scale[1] == 8.0  # 500 mm -> 1024 px
    assert round(128 * box.scale[0]) == 655  # 320 mm at 500/1024 mm per pixel = 655.4 -> 655 rows
    assert box.content_box == (0, 0, 655, 1024)
    mm_per_px = (2.5 / box.scale[0], 3.90625 / box.scale[1])
    assert mm_per_px[0] == pytest.approx(mm_per_px[1], rel=1e-3)
    centred = Letterbox.fit((128, 128), (2.5, 3.90625), 1024, placement="center")
    assert centred.content_box == (184, 0, 839, 1024)


def test_point_mapping_follows_the_half_pixel_convention():
    box = Letterbox.fit((100, 50), (1.0, 1.0), 200)  # scale 2 both ways, content in the left half
    np.testing.assert_allclose(box.to_model([0, 0]), [0.5, 0.5])  # pixel 0 covers model pixels 0 and 1
    np.testing.assert_allclose(box.to_model([-0.5, -0.5]), [-0.5, -0.5])  # outer edges coincide
    np.testing.assert_allclose(box.to_model([99.5, 49.5]), [199.5, 99.5])
    rng = np.random.default_rng(1)
    pts = rng.uniform(-0.5, 99.5, size=(50, 2))
    np.testing.assert_allclose(box.to_slice(box.to_model(pts)), pts, atol=1e-12)


def test_at_size_is_the_same_field_of_view():
    box = Letterbox.fit((128, 96), (2.5, 3.9), 1024, placement="center")
    low = box.at_size(256)
    pts = np.array([[3.0, 7.0], [120.0, 90.0]])
    # low-res coordinates are the high-res ones scaled by 1/4 in the half-pixel convention
    np.testing.assert_allclose(low.to_model(pts), (box.to_model(pts) + 0.5) / 4 - 0.5, atol=1e-9)


def test_linear_resize_samples_a_ramp_at_the_mapped_coordinates():
    rows, cols = 30, 20
    ramp = (np.arange(rows)[:, None] * 10.0 + np.arange(cols)[None, :]).astype(np.float32)
    box = Letterbox.fit((rows, cols), (1.0, 1.5), 90, placement="center")
    out = box.resize_to_model(ramp, antialias=False, pad_value=-1)
    r0, c0, r1, c1 = box.content_box
    rr, cc = np.mgrid[r0 + 2: r1 - 2, c0 + 2: c1 - 2]
    src = box.to_slice(np.stack([rr, cc], axis=-1).astype(float))
    np.testing.assert_allclose(out[rr, cc], src[..., 0] * 10 + src[..., 1], atol=1e-3)
    assert (out[:r0] == -1).all() and (out[r1:] == -1).all()  # letterbox padding


def test_mask_round_trip_through_the_model_grid_is_exact_when_upsampling():
    rng = np.random.default_rng(2)
    mask = (rng.random((40, 33)) > 0.6).astype(np.uint8)
    box = Letterbox.fit(mask.shape, (2.5, 3.9), 256)
    big = box.resize_to_model(mask, order=0)
    np.testing.assert_array_equal(box.resize_to_slice(big, order=0), mask)
    # linear on a float mask (what a model's logits/probabilities look like) then thresholding, too
    back = box.resize_to_slice(box.resize_to_model(mask.astype(np.float32), antialias=False)) > 0.5
    np.testing.assert_array_equal(back, mask.astype(bool))


def test_downsampling_is_antialiased():
    stripes = np.tile(np.array([0.0, 0.0, 1.0], np.float32), (66, 22))  # period-3 stripes, 66 x 66
    box = Letterbox.fit(stripes.shape, (1.0, 1.0), 16)
    aliased = box.resize_to_model(stripes, antialias=False)
    smooth = box.resize_to_model(stripes)
    assert np.ptp(aliased[2:-2, 2:-2]) > 0.4  # plain sampling beats against the stripes
    assert np.ptp(smooth[2:-2, 2:-2]) < 0.1  # smoothing first gives their mean
    assert smooth[2:-2, 2:-2].mean() == pytest.approx(1 / 3, abs=0.03)


def test_letterbox_errors():
    with pytest.raises(GeometryError):
        Letterbox.fit((0, 10), (1, 1), 64)
    with pytest.raises(GeometryError):
        Letterbox.fit((10, 10), (0, 1), 64)
    with pytest.raises(GeometryError, match="placement"):
        Letterbox.fit((10, 10), (1, 1), 64, placement="middle")
    box = Letterbox.fit((10, 10), (1, 1), 64)
    with pytest.raises(GeometryError, match="does not match"):
        box.resize_to_model(np.zeros((9, 10)))
    with pytest.raises(GeometryError, match="square"):
        box.resize_to_slice(np.zeros((64, 32)))
