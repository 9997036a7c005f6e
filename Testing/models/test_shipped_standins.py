"""The stand-in teachers shipped in the package do real work on a real validation CT (OpenKBP pt_226)."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PRISMRTLib.features import open_backend
from PRISMRTLib.imaging import Geometry, SlicePlane, get_window
from PRISMRTLib.metrics import dice
from PRISMRTLib.segmentation import SegmentationSession, interior_point
from prismrt_testing import SAMPLE_DIR


@pytest.fixture(scope="module")
def backend():
    return open_backend("teachers", "teachers-standin-openkbp", device="cpu")


@pytest.fixture(scope="module")
def ct():
    return sitk.ReadImage(str(SAMPLE_DIR / "ct.nii.gz"))


def _mask(name):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_DIR / f"{name}.nii.gz"))) > 0


def test_the_shipped_standins_fill_every_role(backend):
    assert backend.roles == ("sam", "dino", "clip")
    assert [backend.teacher(r).spec.name for r in backend.roles] == ["medsam-standin", "dinov3-standin",
                                                                      "biomedclip-standin"]
    assert backend.describe() == ("teachers: sam=teachers-standin-openkbp 2, dino=teachers-standin-openkbp 2, "
                                  "clip=teachers-standin-openkbp 2")
    assert backend.default_window == "head-and-neck"  # what the stand-in was trained with


@pytest.mark.parametrize("structure", ["LeftParotid", "RightParotid"])
def test_a_click_inside_a_structure_gives_a_mask_overlapping_it(backend, ct, structure):
    truth = _mask(structure)
    session = SegmentationSession(backend, ct, "axial")
    stack = session.plane.stack_view(truth)
    index = int(np.argmax(stack.sum(axis=(1, 2))))
    r, c = interior_point(stack[index])
    result = session.add_point(session.plane.slice_coords_to_point([index, r, c]))
    assert dice(result.mask, stack[index]) > 0.4
    mirrored = stack[index][:, ::-1]  # a lateral structure: the mask is on its side, not mirrored
    assert dice(result.mask, stack[index]) > dice(result.mask, mirrored) + 0.2


def test_corrective_clicks_on_the_target_improve_its_mask(backend, ct):
    """PTV70 (a planning volume, not an anatomical boundary) is ambiguous from one click; corrective clicks at the
    centre of the largest error, as the evaluation protocol places them, must bring the slice's mask close."""
    session = SegmentationSession(backend, ct, "axial")
    stack = session.plane.stack_view(_mask("PTV70"))
    index = int(np.argmax(stack.sum(axis=(1, 2))))
    target = stack[index]
    r, c = interior_point(target)
    scores = [dice(session.add_point(session.plane.slice_coords_to_point([index, r, c])).mask, target)]
    for _ in range(2):
        mask = session.plane.extract(session.mask, index).astype(bool)
        missed, extra = target & ~mask, mask & ~target
        positive = missed.sum() >= extra.sum()
        r, c = interior_point(missed if positive else extra)
        result = session.add_point(session.plane.slice_coords_to_point([index, r, c]), positive=positive)
        scores.append(dice(result.mask, target))
    assert scores[0] > 0.3 and scores[-1] > 0.6 and scores[-1] > scores[0]


def test_the_true_structure_caption_outscores_a_wrong_one(backend, ct):
    plane = SlicePlane.create(Geometry.from_image(ct), "axial")
    stack = plane.stack_view(_mask("LeftParotid"))
    index = int(np.argmax(stack.sum(axis=(1, 2))))
    slice01 = get_window("soft-tissue").apply(plane.extract(sitk.GetArrayViewFromImage(ct), index))
    image = torch.nn.functional.normalize(backend.encode(slice01, plane.pixel_spacing).clip_embedding, dim=-1)
    texts = ["a CT slice showing the parotid gland", "a CT slice showing the larynx",
             "an axial CT slice", "a sagittal CT slice"]
    text = torch.nn.functional.normalize(backend.encode_text(texts), dim=-1)
    scores = (image @ text.T)[0]
    assert scores[0] > scores[1]
    assert scores[2] > scores[3]
