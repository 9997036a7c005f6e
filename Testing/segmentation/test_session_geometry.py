"""Clicks land on the right pixel and masks land on the right voxels, in all three orientations, on real OpenKBP
geometry (direction z = -1, 3.9 x 3.9 x 2.5 mm).

The backend is an oracle with SAM's interface and coordinate conventions (prismrt_testing.OracleBackend): it returns
the bright object of the slice if (and only if) the first positive point falls on it (or, for propagation, a box
holds part of it; a box alone gives the part it holds). Any flipped axis, swapped x/y, shifted letterbox or wrong
slice index makes these fail, whatever the learned weights are.
"""

import numpy as np
import pytest
import SimpleITK as sitk

from PRISMRTLib.errors import GeometryError, PrismRTError
from PRISMRTLib.imaging import Geometry, SlicePlane
from PRISMRTLib.segmentation import CrossViewGuide, SegmentationSession, interior_point
from prismrt_testing import OracleBackend, ptv_phantom


@pytest.fixture(scope="module")
def phantom():
    """The real PTV70 of OpenKBP pt_226 as a bright object in a dark volume on the real CT grid."""
    return ptv_phantom()


def _largest_slice(session, ptv):
    """The target's largest slice in the session's orientation, its display stack, and its most interior point."""
    stack = session.plane.stack_view(ptv)
    index = int(np.argmax(stack.sum(axis=(1, 2))))
    r, c = interior_point(stack[index])
    return index, stack, session.plane.slice_coords_to_point([index, r, c])


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_click_on_the_target_gives_its_slice_at_the_right_voxels(phantom, orientation):
    image, ptv = phantom
    session = SegmentationSession(OracleBackend(), image, orientation, window="soft-tissue")
    plane = session.plane
    index, stack, point = _largest_slice(session, ptv)
    result = session.add_point(point)
    assert result.index == index and result.score > 0.9
    # the 3D mask equals the target on that slice and nothing elsewhere
    mask = session.mask.astype(bool)
    assert _dice(plane.stack_view(mask)[index], stack[index]) > 0.97
    others = np.delete(plane.stack_view(mask), index, axis=0)
    assert not others.any()


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_a_box_gives_what_it_holds_at_the_right_voxels(phantom, orientation):
    """The target's bounding box on its largest slice gives the target there; the left half of that box gives only
    the target's left half (a box flipped or shifted in the slice would give the other half)."""
    image, ptv = phantom
    session = SegmentationSession(OracleBackend(), image, orientation, window="soft-tissue")
    plane = session.plane
    index, stack, _ = _largest_slice(session, ptv)
    rows, cols = np.nonzero(stack[index])
    corner = lambda r, c: plane.slice_coords_to_point([index, r, c])  # noqa: E731
    result = session.set_box(corner(rows.max(), cols.max()), corner(rows.min(), cols.min()))
    assert result.index == index
    assert _dice(plane.stack_view(session.mask.astype(bool))[index], stack[index]) > 0.97
    middle = (cols.min() + cols.max()) // 2
    half = stack[index].copy()
    half[:, middle + 1:] = False
    fresh = SegmentationSession(OracleBackend(), image, orientation, window="soft-tissue")
    fresh.set_box(corner(rows.min(), cols.min()), corner(rows.max(), middle))
    got = fresh.plane.stack_view(fresh.mask.astype(bool))[index]
    assert _dice(got, half) > 0.9 and not (got & ~half).sum() > 0.05 * half.sum()


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_a_click_beside_the_target_finds_nothing(phantom, orientation):
    """Mirror the click across the slice: if the pipeline flipped an axis it would hit the target."""
    image, ptv = phantom
    session = SegmentationSession(OracleBackend(), image, orientation, window="soft-tissue")
    plane = session.plane
    index, stack, _ = _largest_slice(session, ptv)
    rows, cols = plane.slice_shape
    candidates = [(r, c) for r, c in np.argwhere(~stack[index]) if stack[index][rows - 1 - r, cols - 1 - c]
                  and stack[index][r, cols - 1 - c] and stack[index][rows - 1 - r, c]]
    if not candidates:
        pytest.skip("the target is too symmetric in this slice for a mirrored click")
    r, c = candidates[len(candidates) // 2]
    result = session.add_point(plane.slice_coords_to_point([index, r, c]))
    assert not result.mask.any()


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_propagation_rebuilds_the_target_in_3d(phantom, orientation):
    image, ptv = phantom
    session = SegmentationSession(OracleBackend(), image, orientation, window="soft-tissue")
    plane = session.plane
    index, stack, point = _largest_slice(session, ptv)
    session.add_point(point)
    result = session.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    out = sitk.GetArrayFromImage(result).astype(bool)
    geometry_ok = Geometry.from_image(result)
    np.testing.assert_allclose(geometry_ok.index_to_physical_matrix, Geometry.from_image(image).index_to_physical_matrix)
    # every slice of the (contiguous) target is found at its own index; nothing outside it
    slices_with_target = np.flatnonzero(stack.any(axis=(1, 2)))
    slices_with_mask = np.flatnonzero(plane.stack_view(out).any(axis=(1, 2)))
    assert np.array_equal(slices_with_mask, slices_with_target)
    assert _dice(out, ptv) > 0.95
    # one slice off would cost far more than that
    assert _dice(np.roll(out, 1, axis=0), ptv) < _dice(out, ptv) - 0.03


def test_undo_redo_and_corrections(phantom):
    image, ptv = phantom
    session = SegmentationSession(OracleBackend(), image, "axial", window="soft-tissue")
    plane = session.plane
    index, stack, point = _largest_slice(session, ptv)
    session.add_point(point)
    one_slice = session.mask.copy()
    session.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    full = session.mask.copy()
    assert full.sum() > one_slice.sum()
    assert session.undo() == "propagate"
    np.testing.assert_array_equal(session.mask, one_slice)
    assert session.redo() == "propagate"
    np.testing.assert_array_equal(session.mask, full)
    # a click on a propagated slice makes it the user's; re-propagating from it keeps it
    other = index + 3
    r2, c2 = interior_point(stack[other])
    assert session.prompts[other].box is not None  # propagation prompted it with a box and a point
    session.add_point(plane.slice_coords_to_point([other, r2, c2]), positive=True)
    assert session._source[other] == "clicks"
    # the user's click replaces the propagation's prompts there (its mask is the mask input); a positive click keeps
    # the mask's most interior point as an anchor
    anchor = interior_point(stack[other])
    assert session.prompts[other].box is None and session.prompts[other].labels == [1, 1]
    np.testing.assert_allclose(session.prompts[other].points, [anchor, (r2, c2)])
    session.undo()
    assert session._source[other] == "propagated"
    session.undo()
    session.undo()
    assert not session.mask.any() and not session.can_undo()
    with pytest.raises(PrismRTError, match="nothing to undo"):
        session.undo()


def _clicked_and_propagated(phantom, session_class=SegmentationSession):
    """An axial session with a click at the target's most interior point on its largest slice, propagated (no
    cross views): the session, that slice's index and the target's display stack."""
    image, ptv = phantom
    session = session_class(OracleBackend(), image, "axial", window="soft-tissue")
    index, stack, point = _largest_slice(session, ptv)
    session.add_point(point)
    session.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    return session, index, stack


def test_a_negative_click_on_a_propagated_slice_is_its_only_point(phantom):
    """A negative click on a propagated slice goes in alone with the slice's mask as the mask input (no anchor, no
    box); its pixel is the clicked voxel's, and only that slice becomes the user's."""
    session, index, stack = _clicked_and_propagated(phantom)
    plane = session.plane
    other = index - 2
    rows, cols = np.nonzero(stack[other])
    r, c = int(rows[0]), int(cols[0])  # an edge pixel of the target
    session.add_point(plane.slice_coords_to_point([other, r, c]), positive=False)
    prompts = session.prompts[other]
    assert prompts.box is None and prompts.labels == [0]
    np.testing.assert_allclose(prompts.points, [(r, c)])
    assert [i for i, src in session._source.items() if src == "clicks"] == [index, other]


def _component(mask, pixel):
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    return labels == labels[pixel]


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_cross_views_cut_the_target_through_the_seed(phantom, orientation):
    """The two orthogonal views pass through the seed's most interior voxel and land in the volume where the target
    is; the slice range they span is the target's along those two planes (a flipped axis would cut elsewhere)."""
    image, ptv = phantom
    session = SegmentationSession(OracleBackend(), image, orientation, window="soft-tissue")
    plane = session.plane
    index, stack, point = _largest_slice(session, ptv)
    guide = session.cross_view_guide(index, stack[index])
    i, j, k = (int(v) for v in plane.slice_coords_to_index([index, *interior_point(stack[index])]))
    expected = []
    for orientation_v, slice_index, view_mask in guide.views:
        view_plane = SlicePlane.create(session.geometry, orientation_v)
        view = np.zeros_like(ptv)
        view_plane.insert(view, slice_index, view_mask)
        assert view[k, j, i]  # through the seed's interior voxel
        # one plane: constant along exactly one index axis, at the seed's voxel there
        axes = [a for a, v in zip((2, 1, 0), (i, j, k)) if np.array_equal(np.flatnonzero(view.any(
            axis=tuple(b for b in range(3) if b != a))), [v])]
        assert len(axes) == 1
        cut = tuple(slice(None) if b != axes[0] else (k, j, i)[b] for b in range(3))
        truth = np.zeros_like(ptv)
        truth[cut] = _component(ptv[cut], tuple(v for b, v in enumerate((k, j, i)) if b != axes[0]))
        assert truth.sum() > 50 and _dice(view, truth) > 0.95  # (the model grid's resampling blurs the edges)
        expected.append(truth)
    spanned = np.flatnonzero(plane.stack_view(expected[0] | expected[1]).any(axis=(1, 2)))
    assert (guide.first, guide.last) == (spanned[0], spanned[-1])
    assert guide.first <= index <= guide.last


class _FixedGuide(SegmentationSession):
    def cross_view_guide(self, index, mask, points_per_view=3):
        return CrossViewGuide(index - 3, index + 4, [])


@pytest.mark.parametrize("margin_mm, extra", [(0.0, 0), (5.0, 2), (6.0, 3)])
def test_propagation_stops_where_the_cross_views_end(phantom, margin_mm, extra):
    """Past the orthogonal views' range plus the margin (in mm, whole slices: 2.5 mm here) nothing is propagated,
    even where the model would go on (the oracle finds the target on every slice)."""
    image, ptv = phantom
    session = _FixedGuide(OracleBackend(), image, "axial", window="soft-tissue")
    index, stack, point = _largest_slice(session, ptv)
    session.add_point(point)
    session.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_view_margin_mm=margin_mm)
    filled = np.flatnonzero(session.plane.stack_view(session.mask.astype(bool)).any(axis=(1, 2)))
    assert (filled[0], filled[-1]) == (index - 3 - extra, index + 4 + extra)


class _BlindAcross(SegmentationSession):
    """A model that finds nothing in the orthogonal views."""

    def _predict(self, index, prompts, mask_logits, plane=None):
        mask, score, logits = super()._predict(index, prompts, mask_logits, plane)
        return (np.zeros_like(mask), 0.0, logits) if plane is not None else (mask, score, logits)


def test_views_that_find_nothing_do_not_bound_propagation(phantom):
    image, ptv = phantom
    session = _BlindAcross(OracleBackend(), image, "axial", window="soft-tissue")
    index, stack, point = _largest_slice(session, ptv)
    session.add_point(point)
    assert session.cross_view_guide(index, stack[index]) is None
    session.propagate(min_area_mm2=1.0, min_overlap=0.0)
    filled = session.plane.stack_view(session.mask.astype(bool)).any(axis=(1, 2))
    np.testing.assert_array_equal(filled, stack.any(axis=(1, 2)))


def test_features_are_cached_and_bounded(phantom):
    image, _ = phantom
    backend = OracleBackend()
    session = SegmentationSession(backend, image, "axial", cache_slices=3)
    session.prefetch(60, radius=2)  # the radius is capped to what the cache holds: 59-61, not 58-62
    cache = session.volume_features
    assert backend.calls == 3 and [i for _, i, _ in cache._cache] == [60, 59, 61]  # nearest first
    session.features(61)
    assert backend.calls == 3  # from the cache
    assert session.prefetch_next(60) is None  # nothing left to compute
    session.features(64)  # the oldest (60) is evicted
    assert [i for _, i, _ in cache._cache] == [59, 61, 64]
    assert session.prefetch_next(60) == 60 and backend.calls == 5
    assert session.prefetch_next(0, radius=1) == 0 and session.prefetch_next(0, radius=1) == 1  # no slice -1


def test_bad_clicks_and_boxes_are_refused(phantom):
    image, _ = phantom
    session = SegmentationSession(OracleBackend(), image, "axial")
    with pytest.raises(GeometryError, match="outside the volume"):
        session.add_point([-50.0, 10.0, -10.0])
    plane = session.plane
    with pytest.raises(GeometryError, match="different axial slices"):
        session.set_box(plane.slice_coords_to_point([10, 5, 5]), plane.slice_coords_to_point([12, 20, 20]))
    with pytest.raises(PrismRTError, match="nothing to propagate"):
        session.propagate()


class _LosesItAbove(SegmentationSession):
    """A model that, once ``lost_above`` is set, finds nothing on the slices above it."""

    lost_above = None

    def _predict(self, index, prompts, mask_logits, plane=None):
        mask, score, logits = super()._predict(index, prompts, mask_logits, plane)
        if plane is None and self.lost_above is not None and index > self.lost_above:
            return np.zeros_like(mask), 0.0, logits
        return mask, score, logits


def test_a_propagation_that_stops_short_keeps_what_was_propagated_before(phantom):
    """Re-propagating from a corrected slice replaces the slices it reaches; where the model loses the structure,
    the slices propagated earlier (from the first click) stay as they were, and undo restores the rest."""
    session, index, stack = _clicked_and_propagated(phantom, _LosesItAbove)
    plane, before = session.plane, session.mask.copy()
    other = index + 3
    assert plane.stack_view(before.astype(bool))[other + 1:].any()
    session.add_point(plane.slice_coords_to_point([other, *interior_point(stack[other])]), positive=True)
    session.lost_above = other
    session.propagate(from_index=other, min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    np.testing.assert_array_equal(session.mask, before)
    assert all(session._source[i] == "propagated" for i in range(other + 1, len(stack)) if stack[i].any())
    assert session.undo() == "propagate"
    np.testing.assert_array_equal(session.mask, before)


def test_an_erased_slice_ends_the_propagation_there(phantom):
    """Emptying a propagated slice and propagating again clears what had been propagated through it (and only on
    that side); a drawn, non-empty slice keeps what lies beyond it."""
    image, ptv = phantom
    session = SegmentationSession(OracleBackend(), image, "axial", window="soft-tissue")
    plane = session.plane
    index, stack, point = _largest_slice(session, ptv)
    session.add_point(point)
    session.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    full = plane.stack_view(session.mask.astype(bool)).any(axis=(1, 2))
    cut = index + 3
    assert full[cut + 1:].any() and full[:index].any()
    session.clear_slice(cut)
    session.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    now = plane.stack_view(session.mask.astype(bool)).any(axis=(1, 2))
    assert not now[cut:].any()  # the erased slice and everything beyond it
    np.testing.assert_array_equal(now[:cut], full[:cut])  # the seed's side is unchanged
    assert session.undo() == "propagate"
    np.testing.assert_array_equal(plane.stack_view(session.mask.astype(bool)).any(axis=(1, 2))[cut + 1:],
                                  full[cut + 1:])


class _Cancelled(Exception):
    pass


def _corrected_session(phantom):
    """Clicked, propagated, then a click on a propagated slice: (session, that slice's index)."""
    image, ptv = phantom
    session = SegmentationSession(OracleBackend(), image, "axial", window="soft-tissue")
    index, stack, point = _largest_slice(session, ptv)
    session.add_point(point)
    session.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    other = index + 3
    session.add_point(session.plane.slice_coords_to_point([other, *interior_point(stack[other])]))
    return session, other


def _snapshot(session):
    return (session.mask.copy(), dict(session._source), {i: p.copy() for i, p in session.prompts.items()},
            dict(session._logits), len(session._undo))


@pytest.mark.parametrize("cancel_at", ["first", "middle", "last"])
def test_a_cancelled_propagation_leaves_the_session_as_it_was(phantom, cancel_at):
    """``progress`` raising (the panel's cancel, or the session replaced while the propagation ran) restores every
    slice it touched, also slices propagated before (from the first click) that it was replacing: the mask, the
    slices' sources, prompts and mask logits, and the history are those before it. ``progress`` sees the seed, each
    written slice, then the seed again."""
    session, other = _corrected_session(phantom)
    calls = []
    session.propagate(from_index=other, min_area_mm2=1.0, min_overlap=0.0, cross_views=False, progress=calls.append)
    assert calls[0] == calls[-1] == other and len(calls) > 4
    assert all(0 <= i < session.plane.num_slices and session._source[i] == "propagated" for i in calls[1:-1])

    session, other = _corrected_session(phantom)
    before = _snapshot(session)
    stop = {"first": 1, "middle": len(calls) // 2, "last": len(calls)}[cancel_at]
    seen = []

    def progress(i):
        seen.append(i)
        if len(seen) == stop:
            raise _Cancelled

    with pytest.raises(_Cancelled):
        session.propagate(from_index=other, min_area_mm2=1.0, min_overlap=0.0, cross_views=False, progress=progress)
    after = _snapshot(session)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1] == before[1] and after[4] == before[4] and not session.can_redo()
    assert after[2].keys() == before[2].keys() and all(after[2][i] == before[2][i] for i in before[2])
    assert after[3].keys() == before[3].keys() and all(after[3][i] is before[3][i] for i in before[3])
    assert session.undo() == "positive click"  # the propagation left no step behind


class _WideGuide(SegmentationSession):
    """Orthogonal views that reach 3 slices down and 4 up from the slice they are cut through (wherever that is)."""

    def cross_view_guide(self, index, mask, points_per_view=3):
        return CrossViewGuide(index - 3, index + 4, [])


def test_a_correction_fills_in_the_structure_but_grows_it_only_as_far_as_the_user_clicked(phantom):
    """After a first propagation, re-propagating from a corrected slice stays within the slices the structure
    spanned (here the views through the corrected slice would reach further); a click on a slice beyond them
    takes it that far, and no further."""
    image, ptv = phantom
    session = _WideGuide(OracleBackend(), image, "axial", window="soft-tissue")
    plane = session.plane
    index, stack, point = _largest_slice(session, ptv)
    session.add_point(point)
    session.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_view_margin_mm=0.0)

    def span():
        filled = np.flatnonzero(plane.stack_view(session.mask.astype(bool)).any(axis=(1, 2)))
        return int(filled[0]), int(filled[-1])

    assert span() == (index - 3, index + 4)
    inside = index + 3
    session.add_point(plane.slice_coords_to_point([inside, *interior_point(stack[inside])]))
    session.propagate(from_index=inside, min_area_mm2=1.0, min_overlap=0.0, cross_view_margin_mm=0.0)
    assert span() == (index - 3, index + 4)  # the views through slice index + 3 reach index + 7: not taken
    assert "beyond where the structure reached before" in session.last_propagation.stops[+1]
    beyond = index + 6
    assert stack[beyond].any()
    session.add_point(plane.slice_coords_to_point([beyond, *interior_point(stack[beyond])]))
    session.propagate(from_index=beyond, min_area_mm2=1.0, min_overlap=0.0, cross_view_margin_mm=0.0)
    assert span() == (index - 3, beyond)
    assert session.plane.stack_view(session.mask.astype(bool))[index + 5].any()  # filled in between
    session.undo()
    session.undo()
    assert span() == (index - 3, index + 4)


def test_edits_made_by_hand_are_adopted_and_refined_by_the_next_click(phantom):
    """The mask as the user edited it (painted, erased) becomes the session's: a hand-painted voxel survives the next
    click on its slice and is the click's mask input; a slice erased by hand ends propagation; one undo step."""
    image, ptv = phantom
    session = SegmentationSession(OracleBackend(echo_mask=True), image, "axial", window="soft-tissue")
    plane = session.plane
    index, stack, point = _largest_slice(session, ptv)
    session.add_point(point)  # no mask input yet: the oracle's object
    np.testing.assert_array_equal(plane.extract(session.mask, index).astype(bool), stack[index])
    assert session.adopt(session.mask) == []  # nothing changed, no step
    steps = len(session._undo)

    edited = session.mask.copy()
    painted = plane.stack_view(edited)
    rows, cols = np.nonzero(~stack[index])
    far = int(np.argmax((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    pr, pc = int(rows[far]), int(cols[far])  # a background pixel far from the target
    painted[index, pr, pc] = 1
    painted[index + 5] = 0  # nothing there before: unchanged
    assert session.adopt(edited) == [index]
    assert len(session._undo) == steps + 1 and session._source[index] == "edited" and index not in session.prompts

    # the next positive click elsewhere on the slice refines what the user drew: the painted pixel survives
    r, c = interior_point(stack[index])
    result = session.add_point(plane.slice_coords_to_point([index, r, c]))
    assert result.mask[pr, pc] and plane.stack_view(session.mask)[index, pr, pc]
    assert session.undo() == "positive click"
    assert session.undo() == "edits made by hand"
    assert not plane.stack_view(session.mask)[index, pr, pc]

    # a slice erased by hand ends the structure: propagation stops there
    session.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    full = plane.stack_view(session.mask.astype(bool)).any(axis=(1, 2))
    cut = index + 2
    assert full[cut + 1]
    erased = session.mask.copy()
    plane.stack_view(erased)[cut] = 0
    assert session.adopt(erased) == [cut]
    session.propagate(min_area_mm2=1.0, min_overlap=0.0, cross_views=False)
    assert not plane.stack_view(session.mask.astype(bool)).any(axis=(1, 2))[cut:].any()

    with pytest.raises(GeometryError, match="volume's grid"):
        session.adopt(np.zeros((3, 4, 5), np.uint8))


class _AddsALookAlike(SegmentationSession):
    """A model whose mask holds the clicked object plus a separate blob in a corner of the slice."""

    def _predict(self, index, prompts, mask_logits, plane=None):
        mask, score, logits = super()._predict(index, prompts, mask_logits, plane)
        mask = mask.copy()
        mask[:4, :4] = True
        return mask, score, logits


def test_a_lone_click_keeps_only_the_object_under_it(phantom):
    """SAM can add distant look-alikes to a single click's mask: a lone positive click keeps the component under
    it; a second click (here negative, elsewhere) lets the model's mask stand as it is."""
    image, ptv = phantom
    session = _AddsALookAlike(OracleBackend(), image, "axial", window="soft-tissue")
    index, stack, point = _largest_slice(session, ptv)
    session.add_point(point)
    drawn = session.plane.stack_view(session.mask.astype(bool))[index]
    assert not drawn[:4, :4].any() and _dice(drawn, stack[index]) > 0.95
    corner = session.plane.slice_coords_to_point([index, stack.shape[1] - 2, stack.shape[2] - 2])
    session.add_point(corner, positive=False)
    assert session.plane.stack_view(session.mask.astype(bool))[index][:4, :4].all()
