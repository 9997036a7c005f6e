"""The overview's default point, computed slab by slab (memory bounded on huge volumes), is the centroid argwhere
gives."""

import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import DIRECTIONS, make_volume
from PRISMRTLib.imaging import Geometry
from PRISMRTLib.report.overview import default_point, foreground


def _argwhere_centre(image, masks):
    """The definition: the mean voxel index of the first mask that is neither empty nor full, else of the body."""
    array = sitk.GetArrayViewFromImage(image)
    for region in [*(m > 0 for m in masks), foreground(array)]:
        voxels = np.argwhere(region)
        if 0 < len(voxels) < region.size:
            return Geometry.from_image(image).index_to_physical(voxels.mean(axis=0)[::-1])
    return Geometry.from_image(image).index_to_physical((np.array(array.shape[::-1]) - 1) / 2.0)


@pytest.mark.parametrize("seed", range(6))
def test_default_point_is_the_argwhere_centroid(seed):
    rng = np.random.default_rng(seed)
    image = make_volume(DIRECTIONS["oblique"], size=tuple(int(v) for v in rng.integers(3, 30, 3)))
    shape = sitk.GetArrayViewFromImage(image).shape
    ct = sitk.GetImageFromArray(np.where(rng.random(shape) < 0.4, 40, -1000).astype(np.int16))
    ct.CopyInformation(image)
    masks = [np.zeros(shape, np.uint8), (rng.random(shape) < rng.uniform(0.01, 0.3)).astype(np.uint8)]
    for case in ([], masks, [m.astype(bool) for m in masks], [np.ones(shape, bool)]):
        np.testing.assert_array_equal(default_point(ct, case), _argwhere_centre(ct, case))
    np.testing.assert_array_equal(default_point(image), _argwhere_centre(image, []))  # not CT: a percentile
