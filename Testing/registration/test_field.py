"""Displacement fields: voxel grids <-> ITK fields in LPS mm on every direction matrix, files, composition, warping."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS, make_volume
from PRISMRTLib.errors import GeometryError, ImageWriteError, InvalidImageError
from PRISMRTLib.registration.field import (compose, field_to_transform, field_to_voxel_grid, normalized_to_voxel,
                                           read_field, read_transform_field, transform_to_field, voxel_grid_to_field,
                                           voxel_to_normalized, warp_image, warp_label, write_field, write_transform,
                                           zero_field)


def _reference(direction, size=(12, 10, 8), spacing=(2.0, 3.0, 4.0), origin=(-20.0, 35.0, 110.0)):
    return make_volume(direction, size=size, spacing=spacing, origin=origin, dtype=np.float32)


def _constant_field(reference, vector_mm):
    size = tuple(reference.GetSize())[::-1]
    field = sitk.GetImageFromArray(np.broadcast_to(np.asarray(vector_mm, float), size + (3,)).copy(), isVector=True)
    field.CopyInformation(reference)
    return field


def _blobs(reference, centres_mm, sigma=9.0):
    """A smooth image on ``reference``'s grid: Gaussian blobs at physical centres."""
    size = reference.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3).astype(float)
    m = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())[None]
    pts = idx @ m.T + np.asarray(reference.GetOrigin())
    values = sum(np.exp(-np.sum((pts - c) ** 2, 1) / (2 * sigma ** 2)) for c in centres_mm)
    image = sitk.GetImageFromArray((1000.0 * values).reshape(size).transpose(2, 1, 0).astype(np.float32))
    image.CopyInformation(reference)
    return image


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_a_voxel_step_becomes_direction_times_spacing_in_mm(name):
    ref = _reference(DIRECTIONS[name])
    d = np.zeros((3,) + tuple(ref.GetSize())[::-1])
    d[0] = 1.0  # one voxel along i
    d[2, 3, 4, 5] = -2.0  # two voxels back along k at voxel (i=5, j=4, k=3)
    field = voxel_grid_to_field(d, ref)
    direction = DIRECTIONS[name]
    np.testing.assert_allclose(field[0, 0, 0], 2.0 * direction[:, 0], atol=1e-12)
    np.testing.assert_allclose(field[5, 4, 3], 2.0 * direction[:, 0] - 8.0 * direction[:, 2], atol=1e-12)
    assert field.GetPixelID() == sitk.sitkVectorFloat64
    assert field.GetDirection() == ref.GetDirection() and field.GetOrigin() == ref.GetOrigin()
    rng = np.random.default_rng(1)
    d = rng.normal(size=d.shape)
    np.testing.assert_allclose(field_to_voxel_grid(voxel_grid_to_field(d, ref)), d, atol=1e-12)


def test_the_field_means_p_moving_equals_p_plus_u_for_itk():
    ref = _reference(DIRECTIONS["oblique"])
    rng = np.random.default_rng(2)
    field = voxel_grid_to_field(rng.normal(size=(3,) + tuple(ref.GetSize())[::-1]), ref)
    transform = field_to_transform(field)
    for index in [(0, 0, 0), (3, 7, 2), (11, 9, 7)]:
        p = np.array(ref.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(transform.TransformPoint(tuple(p)), p + np.array(field[index]), atol=1e-9)
    # the transform holds a copy: the field given to it is intact
    assert field.GetNumberOfPixels() == ref.GetNumberOfPixels()


@pytest.mark.parametrize("name", ["openkbp", "oblique"])
@pytest.mark.parametrize("suffix", ["displacement.nii.gz", "displacement.mha", "transform.h5", "transform.tfm"])
def test_field_round_trip_through_files_keeps_values_and_geometry(tmp_path, name, suffix):
    ref = _reference(DIRECTIONS[name])
    rng = np.random.default_rng(3)
    field = voxel_grid_to_field(rng.normal(size=(3,) + tuple(ref.GetSize())[::-1]), ref)
    path = tmp_path / suffix
    if suffix.startswith("transform"):
        write_transform(field, path)
        back = read_transform_field(path)
        transform = sitk.ReadTransform(str(path))
        p = np.array(ref.TransformIndexToPhysicalPoint((4, 5, 6)))
        np.testing.assert_allclose(transform.TransformPoint(tuple(p)), p + np.array(field[4, 5, 6]), atol=1e-9)
    else:
        write_field(field, path)
        back = read_field(path)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(field), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), ref.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetSpacing(), ref.GetSpacing(), atol=1e-6)


def test_file_names_and_shapes_are_checked(tmp_path):
    ref = _reference(DIRECTIONS["openkbp"])
    field = zero_field(ref)
    with pytest.raises(ImageWriteError, match="displacement field"):
        write_field(field, tmp_path / "field.png")
    with pytest.raises(ImageWriteError, match="transform"):
        write_transform(field, tmp_path / "transform.nii.gz")
    with pytest.raises(GeometryError, match="does not match"):
        voxel_grid_to_field(np.zeros((3, 2, 2, 2)), ref)
    with pytest.raises(InvalidImageError, match="shape"):
        voxel_grid_to_field(np.zeros((2,) + tuple(ref.GetSize())[::-1]), ref)
    with pytest.raises(InvalidImageError, match="3-vectors"):
        warp_image(ref, ref)
    write_transform(field, tmp_path / "t.h5")
    with pytest.raises(ImageWriteError, match="exists"):
        write_transform(field, tmp_path / "t.h5", overwrite=False)
    sitk.WriteTransform(sitk.Euler3DTransform(), str(tmp_path / "rigid.tfm"))
    with pytest.raises(InvalidImageError, match="not a displacement field"):
        read_transform_field(tmp_path / "rigid.tfm")


@pytest.mark.parametrize("name", ["openkbp", "oblique"])
def test_a_known_translation_warps_moving_back_onto_fixed_and_the_wrong_sign_does_not(name):
    """moving = fixed moved +5 mm towards the patient's left (LPS +x): u must be (+5, 0, 0)."""
    ref = _reference(DIRECTIONS[name], size=(30, 28, 24), spacing=(2.0, 2.0, 2.5))
    centre = np.array(ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ref.GetSize()]))
    blobs = [centre + [-8.0, 4.0, 0.0], centre + [10.0, -6.0, 5.0]]
    fixed = _blobs(ref, blobs)
    moving = _blobs(ref, [c + [5.0, 0.0, 0.0] for c in blobs])
    good = warp_image(moving, _constant_field(ref, [5.0, 0.0, 0.0]))
    bad = warp_image(moving, _constant_field(ref, [-5.0, 0.0, 0.0]))
    inner = (slice(4, -4),) * 3  # fixed points whose p + 5 mm still lies in the moving grid
    f = sitk.GetArrayFromImage(fixed)[inner]
    assert np.abs(sitk.GetArrayFromImage(good)[inner] - f).max() < 0.03 * f.max()
    assert np.abs(sitk.GetArrayFromImage(bad)[inner] - f).max() > 0.5 * f.max()
    assert good.GetPixelID() == moving.GetPixelID() and good.GetDirection() == ref.GetDirection()


def test_torch_sampling_and_itk_warping_agree_on_an_oblique_grid():
    """The optimiser's grid_sample convention (components i, j, k; align_corners=True) is ITK's."""
    import torch

    from PRISMRTLib.registration.convex_adam import warp

    ref = _reference(DIRECTIONS["oblique"], size=(20, 18, 16), spacing=(2.0, 2.5, 3.0))
    centre = np.array(ref.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ref.GetSize()]))
    image = _blobs(ref, [centre + [4.0, -3.0, 2.0], centre - [6.0, 5.0, -4.0]], sigma=7.0)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in tuple(ref.GetSize())[::-1]], indexing="ij")
    disp = np.stack([1.5 * np.sin(np.pi * y), -1.0 * np.cos(np.pi * x), 0.8 * z])  # voxels, components (i, j, k)
    ours = warp(torch.from_numpy(sitk.GetArrayFromImage(image))[None, None].double(),
                torch.from_numpy(disp)[None].double())[0, 0].numpy()
    itk = sitk.GetArrayFromImage(warp_image(image, voxel_grid_to_field(disp, ref)))
    inner = (slice(3, -3),) * 3  # away from the edges, where border handling differs
    np.testing.assert_allclose(ours[inner], itk[inner], atol=1e-3 * float(itk.max()))
    # and the normalised units invert
    t = torch.from_numpy(disp)[None]
    np.testing.assert_allclose(normalized_to_voxel(voxel_to_normalized(t, disp.shape[1:]), disp.shape[1:]).numpy(),
                               disp[None], atol=1e-12)


def test_compose_applies_the_field_first_then_the_transform():
    ref = _reference(DIRECTIONS["openkbp"])
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.1))
    affine.SetTranslation((3.0, -2.0, 7.0))
    affine.SetCenter((1.0, 2.0, 3.0))
    rng = np.random.default_rng(4)
    field = voxel_grid_to_field(rng.normal(size=(3,) + tuple(ref.GetSize())[::-1]) * 0.3, ref)
    total = compose(affine, field, ref)
    inverse_order = compose(affine, field, ref, field_first=False)
    for index in [(2, 3, 4), (9, 1, 6)]:
        p = np.array(ref.TransformIndexToPhysicalPoint(index))
        expected = np.array(affine.TransformPoint(tuple(p + np.array(field[index])))) - p
        np.testing.assert_allclose(total[index], expected, atol=1e-9)
        q = np.array(affine.TransformPoint(tuple(p)))
        expected = q + np.array(field_to_transform(field).TransformPoint(tuple(q))) - q - p
        np.testing.assert_allclose(inverse_order[index], expected, atol=1e-9)
    np.testing.assert_allclose(sitk.GetArrayFromImage(compose(affine, None, ref)),
                               sitk.GetArrayFromImage(transform_to_field(affine, ref)), atol=1e-12)


def test_labels_are_warped_by_nearest_neighbour_and_stay_labels():
    ref = _reference(DIRECTIONS["oblique"], size=(16, 16, 12))
    labels = np.zeros(tuple(ref.GetSize())[::-1], np.uint8)
    labels[3:8, 4:10, 2:6] = 3
    labels[3:8, 4:10, 8:12] = 7
    label = sitk.GetImageFromArray(labels)
    label.CopyInformation(ref)
    d = np.zeros((3,) + labels.shape)
    d[0] = 2.0  # two voxels along i
    warped = warp_label(label, voxel_grid_to_field(d, ref))
    out = sitk.GetArrayFromImage(warped)
    assert warped.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(out)) <= {0, 3, 7}
    np.testing.assert_array_equal(out[:, :, :-2], labels[:, :, 2:])  # fixed voxel i reads moving voxel i + 2
