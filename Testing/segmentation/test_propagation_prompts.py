"""Propagation by box and point follows the image, not the neighbour's mask (SegmentationSession._propagate_slice,
2026-12-02; the rule of the litemedsam-clicks heads, registry.propagation_rule).

The oracle here copies a mask prompt when it gets one (``echo_mask``), as the fine-tuned LiteMedSAM nearly does:
under the old rule (the neighbour's mask as a mask prompt) every propagated slice would be a copy of the seed's,
whatever the structure does along the axis. Box and point alone give each slice its own object.
"""

import numpy as np
import SimpleITK as sitk

from PRISMRTLib.segmentation import SegmentationSession, interior_point
from prismrt_testing import OracleBackend


def _cone():
    """A bright disk whose radius shrinks from 14 to 3 pixels along k, in a dark 2 mm x 1.5 mm x 1.5 mm volume."""
    k, j, i = np.mgrid[:16, :48, :48]
    radius = 14 - 0.75 * k
    obj = (j - 24) ** 2 + (i - 24) ** 2 <= radius ** 2
    image = sitk.GetImageFromArray(np.where(obj, 200, -1000).astype(np.int16))
    image.SetSpacing((1.5, 1.5, 2.0))
    return image, obj


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _seeded(session, obj, index=2):
    r, c = interior_point(obj[index])
    session.add_point(session.plane.slice_coords_to_point([index, r, c]))
    return index


def test_propagated_slices_follow_the_structure_not_the_neighbours_mask():
    image, obj = _cone()
    session = SegmentationSession(OracleBackend(echo_mask=True), image, "axial", window="soft-tissue")
    seed = _seeded(session, obj)
    session.propagate(from_index=seed, min_area_mm2=1.0, cross_views=False, carry_mask=False)
    mask = session.mask.astype(bool)
    areas = mask.sum(axis=(1, 2))
    assert areas[seed + 8] < 0.5 * areas[seed]  # the cone narrows, and so does the mask
    assert _dice(mask, obj) > 0.95
    # the old rule, still available, copies the seed's mask: this is what the new rule removed
    old = SegmentationSession(OracleBackend(echo_mask=True), image, "axial", window="soft-tissue")
    _seeded(old, obj)
    old.propagate(from_index=seed, min_area_mm2=1.0, cross_views=False, carry_mask=True)
    copied = old.mask.astype(bool)
    assert np.array_equal(copied[seed + 8], copied[seed]) and _dice(copied, obj) < 0.8


class _AddsABlobAway(SegmentationSession):
    """A model that adds a separate blob in a corner of every slice it is asked about without a mask prompt."""

    def _predict(self, index, prompts, mask_logits, plane=None):
        mask, score, logits = super()._predict(index, prompts, mask_logits, plane)
        if plane is None and prompts.box is not None:
            mask = mask.copy()
            mask[:4, :4] = True
        return mask, score, logits


def test_propagation_keeps_only_what_overlaps_the_neighbours_mask():
    image, obj = _cone()
    session = _AddsABlobAway(OracleBackend(), image, "axial", window="soft-tissue")
    seed = _seeded(session, obj)
    session.propagate(from_index=seed, min_area_mm2=1.0, cross_views=False, carry_mask=False)
    mask = session.mask.astype(bool)
    propagated = [i for i in range(16) if i != seed and mask[i].any()]
    assert len(propagated) >= 10
    assert not mask[propagated][:, :4, :4].any()
    assert _dice(mask, obj) > 0.95


def test_what_a_rule_cuts_from_the_mask_leaves_the_logits_the_next_click_refines():
    """The lone-click and overlap rules cut pieces from SAM's mask; the low-resolution logits kept for the next
    corrective click lose them too (pushed to -MASK_PROMPT_LOGIT), so the click refines the mask the user sees."""
    from PRISMRTLib.segmentation import MASK_PROMPT_LOGIT

    image, obj = _cone()
    session = SegmentationSession(OracleBackend(), image, "axial", window="soft-tissue")
    index = 2
    features = session.features(index)
    kept, removed = obj[index].copy(), np.zeros_like(obj[index])
    removed[:6, :6] = True
    grid = session.predictor.mask_prompt(features, kept).shape
    logits = session._without(index, np.full(grid, 5.0, np.float32), removed, kept)
    back = features.letterbox.resize_to_slice(logits, order=0)
    assert (back[:5, :5] <= -MASK_PROMPT_LOGIT).all()  # the cut piece (its border cells aside)
    assert (back[kept] == 5.0).all() and (back[30:40, 40:] == 5.0).all()  # the kept mask, and elsewhere, untouched
    assert session._without(index, None, removed, kept) is None


def test_each_model_propagates_by_its_own_rule():
    """With no ``carry_mask``, propagation follows the backend's rule (registry.propagation_rule): the mask prompt
    unless the SAM heads are known to do better without it."""
    image, obj = _cone()
    for rule, copies in (("mask-prompt", True), ("box-point", False)):
        backend = OracleBackend(echo_mask=True)
        backend.propagation = rule
        session = SegmentationSession(backend, image, "axial", window="soft-tissue")
        seed = _seeded(session, obj)
        session.propagate(from_index=seed, min_area_mm2=1.0, cross_views=False)
        mask = session.mask.astype(bool)
        assert np.array_equal(mask[seed + 8], mask[seed]) == copies, rule


def test_the_rule_follows_the_heads_not_only_the_encoder():
    from PRISMRTLib.models.registry import propagation_rule

    assert propagation_rule("litemedsam-clicks 2") == "box-point"
    assert propagation_rule("litemedsam 1") == "mask-prompt"  # the released, box-only heads
    assert propagation_rule("teachers-standin-openkbp 2") == "mask-prompt"
