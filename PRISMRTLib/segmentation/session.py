"""Interactive delineation: clicks (and a box) on CT slices give masks at once; masks propagate into 3D.

A :class:`SegmentationSession` holds one volume, one slice orientation and one structure being drawn:

- per-slice features are computed lazily by the feature backend and kept in a bounded LRU cache (clicks on a slice
  only run the SAM teacher's prompt encoder and mask decoder); :meth:`prefetch` computes neighbours ahead;
- points are LPS millimetres, mapped exactly to the slice pixel grid (:class:`SlicePlane`) and into the model grid
  (:class:`Letterbox`); masks come back the same way and are written into the volume grid;
- :meth:`propagate` grows the mask slice by slice in both directions, each slice prompted by its neighbour's mask
  (its box and interior point; the components overlapping it kept), within the extent the two orthogonal views
  through the seed show, and stops earlier where predicted quality or area says the structure ended;
- every interaction can be undone and redone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..errors import GeometryError, PrismRTError
from ..features import FeatureBackend, SliceFeatures, VolumeFeatures
from ..imaging import Geometry, Orientation, SlicePlane, Window, check_volume, slice_intensity
from .predictor import MASK_PROMPT_LOGIT, MaskPredictor, SlicePrompts
from .prompts import bounding_box, deepest_point
from .quality import propagation_warnings, slice_warnings


@dataclass
class SliceResult:
    index: int
    mask: np.ndarray  # (rows, cols) bool, in display orientation
    score: float  # predicted IoU of the chosen mask
    area_mm2: float
    warnings: list[str] = field(default_factory=list)  # why the mask may be poor (see .quality)


@dataclass
class PropagationReport:
    """What the last propagation did: the slices it wrote, and why it stopped in each direction."""

    seed: int
    slices: list[int]  # every slice with a mask after it (the user's and propagated ones), in index order
    stops: dict  # direction (+1, -1) -> reason
    warnings: list[str] = field(default_factory=list)

    def describe(self, orientation: str = "") -> str:
        """One line for the user: which slices hold the structure and where propagation stopped, and why (a structure
        cut short is only seen by scrolling past its end otherwise)."""
        where = f"{orientation} slices" if orientation else "slices"
        span = f"{self.slices[0]}-{self.slices[-1]}" if self.slices else "none"
        why = "; ".join(f"towards {'higher' if d > 0 else 'lower'} indices {r}" for d, r in sorted(self.stops.items(),
                                                                                                 reverse=True) if r)
        return f"propagated from slice {self.seed} to {where} {span}" + (f"; it stopped {why}" if why else "")


@dataclass
class _Step:
    """What one interaction changed, for undo/redo: per slice, (mask, logits, prompts, source) before and after."""

    name: str
    before: dict
    after: dict = field(default_factory=dict)


def interior_point(mask: np.ndarray) -> tuple[int, int] | None:
    """The pixel of a 2D mask farthest from its boundary (row, col), or None for an empty mask."""
    return deepest_point(mask)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    return bounding_box(mask)


def _components_touching(mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The 8-connected components of a 2D mask that overlap ``other``; the whole mask when none does (propagation's
    overlap stop rule then decides)."""
    if not (mask & other).any():
        return mask
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    return np.isin(labels, np.setdiff1d(np.unique(labels[mask & other]), [0]))


def _component_at(mask: np.ndarray, pixel) -> np.ndarray:
    """The 8-connected component of a 2D mask containing ``pixel`` (row, col), or the largest when none does."""
    if not mask.any():
        return mask
    labels = sitk.GetArrayFromImage(sitk.RelabelComponent(  # label 1: the largest
        sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)))
    return labels == (labels[int(pixel[0]), int(pixel[1])] or 1)


@dataclass
class CrossViewGuide:
    """A structure as seen in the two planes orthogonal to the session's, through its seed mask's most interior
    point: the range of the session's slices it spans, where propagation stops."""

    first: int  # first and last slice of the session's orientation that the orthogonal masks reach
    last: int
    views: list  # per orthogonal plane: (orientation, slice index, its 2D mask in that plane's display grid)


class SegmentationSession:
    """Delineate one structure in one volume. Not thread-safe for interactions; :meth:`prefetch` and
    :meth:`prefetch_next` only add to the feature cache (under its lock), so they may run in another thread while the
    user looks at the image (at worst a slice is encoded twice)."""

    def __init__(self, backend: FeatureBackend, image: sitk.Image, orientation="axial",
                 window: "Window | str | None" = None, cache_slices: int = 48,
                 features: VolumeFeatures | None = None):
        """``window``: the CT window the model sees (a preset name or a :class:`Window`; default: the one its SAM
        teacher was trained with, see the registry). MR and other images that are not CT in HU are scaled by the
        volume's percentiles instead, never windowed. ``features``: a feature cache of this volume to share (e.g. with
        registration or chat); by default the session makes its own of ``cache_slices`` slices."""
        self.summary = check_volume(image)
        self.backend = backend
        self.image = image
        self.geometry = Geometry.from_image(image)
        self.plane = SlicePlane.create(self.geometry, orientation)
        if features is None:
            window = window if window is not None else backend.default_window
            intensity = slice_intensity(sitk.GetArrayViewFromImage(image), window, self.summary.is_ct)
            features = VolumeFeatures(backend, image, intensity, max_slices=cache_slices)
        elif features.backend is not backend or features.image is not image:
            raise ValueError("the feature cache belongs to another backend or volume")
        elif window is not None and self.summary.is_ct:
            wanted = slice_intensity(sitk.GetArrayViewFromImage(image), window, True)
            if (wanted.lower, wanted.upper) != (features.intensity.lower, features.intensity.upper):
                raise ValueError(f"the feature cache was made with {features.intensity.describe()}, not the window "
                                 f"{window}: make the session without it, or with that cache's window")
        self.volume_features = features
        self.intensity = features.intensity
        self.predictor = MaskPredictor(backend)
        self._values = sitk.GetArrayViewFromImage(image)
        self.mask = np.zeros(self.geometry.shape, np.uint8)  # the 3D result, (k, j, i)
        self._logits: dict[int, np.ndarray] = {}  # low-res mask logits per slice (mask input for refinement)
        self.prompts: dict[int, SlicePrompts] = {}
        self._source: dict[int, str] = {}  # "clicks" or "propagated"
        self._undo: list[_Step] = []
        self._redo: list[_Step] = []
        self.last_propagation: PropagationReport | None = None

    # ---- features ------------------------------------------------------------------------------------------------
    def features(self, index: int, plane: SlicePlane | None = None) -> SliceFeatures:
        """Features of slice ``index`` of ``plane`` (default: the session's orientation), cached."""
        return self.volume_features.get(plane or self.plane, index)

    def prefetch_next(self, index: int, radius: int = 2) -> int | None:
        """Compute the features of the uncached slice nearest to ``index`` within ``radius`` (one slice, so that a
        caller that must stay responsive, such as a GUI's idle timer, can stop between slices). Returns its index, or
        None when all are cached. The radius is capped so that the slices fit the cache together."""
        radius = max(0, min(int(radius), (self.volume_features.max_slices - 1) // 2))
        for offset in sorted(range(-radius, radius + 1), key=abs):
            i = index + offset
            if 0 <= i < self.plane.num_slices and not self.volume_features.cached(self.plane, i):
                self.features(i)
                return i
        return None

    def prefetch(self, index: int, radius: int = 2) -> None:
        """Compute features of the slices around ``index`` (nearest first) that are not cached yet."""
        while self.prefetch_next(index, radius) is not None:
            pass

    # ---- prompts -> mask -----------------------------------------------------------------------------------------
    def locate(self, point_lps) -> tuple[int, float, float]:
        return self.plane.locate(point_lps)

    def _predict(self, index: int, prompts: SlicePrompts, mask_logits: np.ndarray | None,
                 plane: SlicePlane | None = None):
        p = self.predictor.predict(self.features(index, plane), prompts, mask_logits)
        return p.mask, p.score, p.logits

    def _mask_prompt(self, index: int, mask: np.ndarray) -> np.ndarray:
        return self.predictor.mask_prompt(self.features(index), mask)

    def _without(self, index: int, logits: np.ndarray | None, removed: np.ndarray,
                 kept: np.ndarray) -> np.ndarray | None:
        """The low-resolution logits kept for the next click, with what a rule cut from the mask (a lone click's
        islands, propagation's pieces away from the neighbour's mask) pushed to -MASK_PROMPT_LOGIT or below: a
        corrective click refines the mask the user sees, not SAM's uncut one (whose islands came back with it)."""
        if logits is None or not removed.any():
            return logits
        features = self.features(index)
        # coarse cells the cut pieces touch and the kept mask does not (the two can share a cell at their gap)
        gone = ((self.predictor.mask_prompt(features, removed) > -MASK_PROMPT_LOGIT)
                & (self.predictor.mask_prompt(features, kept) <= -MASK_PROMPT_LOGIT))
        if gone.shape != np.shape(logits):
            return logits
        return np.where(gone, np.minimum(logits, -MASK_PROMPT_LOGIT), logits).astype(np.float32)

    def slice_warnings(self, index: int, mask: np.ndarray, score: float, prompts: SlicePrompts) -> list[str]:
        """Why the mask on slice ``index`` may be poor (empty, unsure, filling its box, a click on air, ...)."""
        clicks = [(r, c, label) for (r, c), label in zip(prompts.points, prompts.labels)]
        values = []
        for r, c, _ in clicks:
            rr, cc = int(round(r)), int(round(c))
            inside = 0 <= rr < self.plane.slice_shape[0] and 0 <= cc < self.plane.slice_shape[1]
            values.append(float(self.plane.extract(self._values, index)[rr, cc]) if inside else None)
        return slice_warnings(mask, score, index=index, orientation=self.plane.orientation.value, clicks=clicks,
                              box=prompts.box, values_at_clicks=values, is_ct=self.summary.is_ct)

    def _area_mm2(self, mask: np.ndarray) -> float:
        sr, sc = self.plane.pixel_spacing
        return float(np.count_nonzero(mask)) * sr * sc

    def _state(self, index: int):
        return (self.plane.extract(self.mask, index).copy(), self._logits.get(index),
                self.prompts[index].copy() if index in self.prompts else None, self._source.get(index))

    def _restore(self, index: int, state) -> None:
        mask, logits, prompts, source = state
        self.plane.insert(self.mask, index, mask)
        for store, value in ((self._logits, logits), (self.prompts, prompts), (self._source, source)):
            if value is None:
                store.pop(index, None)
            else:
                store[index] = value

    def _write(self, index: int, mask: np.ndarray, logits: np.ndarray | None, source: str) -> None:
        self.plane.insert(self.mask, index, mask.astype(np.uint8))
        if logits is None:
            self._logits.pop(index, None)
        else:
            self._logits[index] = logits
        self._source[index] = source

    def _commit(self, step: _Step) -> None:
        step.after = {i: self._state(i) for i in step.before}
        self._undo.append(step)
        self._redo.clear()

    def _update_slice(self, index: int, prompts: SlicePrompts, name: str) -> SliceResult:
        step = _Step(name, {index: self._state(index)})
        if prompts.empty():
            mask, score, logits = np.zeros(self.plane.slice_shape, bool), 0.0, None
        else:
            previous = self._logits.get(index) if prompts.points else None
            if previous is None and prompts.points and self._source.get(index) == "edited":
                drawn = self.plane.extract(self.mask, index).astype(bool)
                previous = self._mask_prompt(index, drawn) if drawn.any() else None  # refine what the user drew
            mask, score, logits = self._predict(index, prompts, previous)
            if previous is None and prompts.box is None and list(prompts.labels) == [1]:
                # a lone click means one object: SAM's mask can add distant look-alikes (measured on the clinical
                # GTVs and organs: 1-click HD95 32 -> 19 mm, Dice 0.77 -> 0.79; docs/evaluation/delineation_clinical.md)
                kept = _component_at(mask, prompts.points[0])
                logits, mask = self._without(index, logits, mask & ~kept, kept), kept
        self.prompts[index] = prompts
        self._write(index, mask, logits, "clicks")
        self._commit(step)
        warnings = self.slice_warnings(index, mask, score, prompts) if not prompts.empty() else []
        return SliceResult(index, mask, score, self._area_mm2(mask), warnings)

    def _user_prompts(self, index: int, positive: bool | None = None) -> SlicePrompts:
        """What a new click (``positive``: its sign; None for a box) on slice ``index`` adds to: the user's earlier
        prompts there. On a propagated slice the propagation's own prompts (box and interior point) are dropped and
        its mask is the mask input: a negative click goes in alone (not outvoted by a positive point at the same
        place), a positive one with the mask's most interior point as an anchor (so it reads as "add this", not as
        the first click on another object). 3D Dice after 3 clicks, stand-in teachers, 33 validation patients:
        anchoring positive clicks raised PTV70 0.477 -> 0.549 (organs within 0.013); anchoring negative ones too
        lost LeftParotid 0.10 and Brainstem 0.07; keeping the box for positive clicks held the mask inside it
        (PTV70 0.479)."""
        if self._source.get(index) == "clicks" and index in self.prompts:
            return self.prompts[index].copy()
        if positive and self._source.get(index) in ("propagated", "edited"):
            anchor = interior_point(self.plane.extract(self.mask, index).astype(bool))
            if anchor is not None:
                return SlicePrompts([(float(anchor[0]), float(anchor[1]))], [1])
        return SlicePrompts()

    def add_point(self, point_lps, positive: bool = True) -> SliceResult:
        """A click at an LPS point (positive: include, negative: exclude); returns the slice's new mask."""
        index, row, col = self.locate(point_lps)
        prompts = self._user_prompts(index, positive)
        prompts.points.append((row, col))
        prompts.labels.append(1 if positive else 0)
        return self._update_slice(index, prompts, "positive click" if positive else "negative click")

    def set_box(self, corner_a_lps, corner_b_lps) -> SliceResult:
        """A box from two opposite corners (LPS) on the same slice."""
        ia, ra, ca = self.locate(corner_a_lps)
        ib, rb, cb = self.locate(corner_b_lps)
        if ia != ib:
            raise GeometryError(
                f"the box corners are on different {self.plane.orientation.value} slices ({ia} and {ib}): "
                "draw the box on one slice"
            )
        prompts = self._user_prompts(ia)
        prompts.box = (min(ra, rb), min(ca, cb), max(ra, rb), max(ca, cb))
        return self._update_slice(ia, prompts, "box")

    def _user_owned(self, index: int) -> bool:
        """Slice ``index`` was drawn by the user (clicks, or edited by hand): propagation keeps it and stops there."""
        return self._source.get(index) in ("clicks", "edited")

    def adopt(self, mask: np.ndarray, name: str = "edits made by hand", undoable: bool = True) -> list[int]:
        """Make the user's own edits of the result theirs in the session: ``mask`` is the whole 3D mask on the
        volume's grid ((k, j, i), non-zero inside), e.g. the segment as painted or erased in Slicer's Segment Editor.
        Each slice where it differs from the session's mask takes it and counts as drawn by the user: its earlier
        prompts are dropped, the next click there refines what the user drew (it is the click's mask input),
        propagation keeps it and stops at it, and a slice erased by hand ends the structure. One undoable step
        (``undoable=False``: the starting point, e.g. a segment drawn before the session; nothing to undo to).
        Returns the slices changed (none: no step)."""
        mask = np.asarray(mask)
        if mask.shape != self.mask.shape:
            raise GeometryError(f"the edited mask has shape {mask.shape}, not the volume's {self.mask.shape}: "
                                "it must be on the delineated volume's grid")
        differs = self.plane.stack_view((mask != 0) != (self.mask != 0))  # (slice, row, col)
        changed = [int(i) for i in np.flatnonzero(differs.any(axis=(1, 2)))]
        if not changed:
            return []
        step = _Step(name, {i: self._state(i) for i in changed})
        for i in changed:
            self._write(i, self.plane.extract(mask, i) != 0, None, "edited")
            self.prompts.pop(i, None)
        if undoable:
            self._commit(step)
        return changed

    def clear_slice(self, index: int) -> None:
        self._update_slice(self.plane.check_slice_index(index), SlicePrompts(), "clear slice")

    # ---- propagation ---------------------------------------------------------------------------------------------
    def cross_view_guide(self, index: int, mask: np.ndarray, points_per_view: int = 3) -> CrossViewGuide | None:
        """Segment the structure in the two planes orthogonal to this session's, through the most interior point of
        ``mask`` (on slice ``index``), each prompted by ``points_per_view`` positive points spread along the line
        where ``mask`` crosses that plane. A 2D model sees where a structure ends in those views, which it cannot
        tell from one slice to the next along the propagation axis. None for an empty mask, and when neither view
        finds the structure (no evidence either way: propagation then relies on its other stop rules)."""
        centre = interior_point(mask)
        if centre is None:
            return None
        pixels = np.argwhere(mask)
        seed_voxels = self.plane.slice_coords_to_index(np.column_stack([np.full(len(pixels), index), pixels]))
        centre_voxel = self.plane.slice_coords_to_index([index, *centre])
        views, reach = [], [index]
        for orientation in Orientation:
            if orientation == self.plane.orientation:
                continue
            plane = SlicePlane.create(self.geometry, orientation)
            slice_index, row, col = (int(round(v)) for v in plane.index_to_slice_coords(centre_voxel))
            seed = np.rint(plane.index_to_slice_coords(seed_voxels)).astype(int)
            seed = seed[seed[:, 0] == slice_index]
            cut = np.zeros(plane.slice_shape, bool)
            cut[seed[:, 1], seed[:, 2]] = True
            line = np.argwhere(_component_at(cut, (row, col)))
            picks = np.linspace(0, len(line) - 1, points_per_view + 2)[1:-1].round().astype(int)
            prompts = SlicePrompts([tuple(float(v) for v in line[p]) for p in picks], [1] * len(picks))
            view_mask, _, _ = self._predict(slice_index, prompts, None, plane)
            view_mask = _component_at(view_mask, (row, col))
            views.append((orientation, slice_index, view_mask))
            found = np.argwhere(view_mask)
            if len(found):
                voxels = plane.slice_coords_to_index(np.column_stack([np.full(len(found), slice_index), found]))
                slices = np.rint(self.plane.index_to_slice_coords(voxels)[:, 0]).astype(int)
                reach += [int(slices.min()), int(slices.max())]
        if len(reach) == 1:
            return None
        return CrossViewGuide(min(reach), max(reach), views)

    def _propagate_slice(self, index: int, previous: np.ndarray, carry_mask: bool = False):
        """Slice ``index``'s mask from its neighbour's mask ``previous``: (prompts, mask, score, logits).

        The prompts are the neighbour's box and most interior point; the neighbour's mask is not a mask prompt
        (unless ``carry_mask``, the rule before 2026-12-02), and only the components of the new mask that overlap
        the neighbour's are kept. Fed the neighbour's mask, the fine-tuned LiteMedSAM copies it: the area stayed
        within a few % of the seed's over whole GTVs while the tumour grew or tapered (STS_002: 2340 px on a slice
        with no tumour, 2272 px where it has 721), so the seed's error reached every slice. Box and point alone let
        the model follow the image; the overlap rule drops what it adds away from the structure (LUNG1-001 without
        it: a 12,000 px leak at the tumour's end, HD95 171 mm). docs/evaluation/delineation_clinical.md."""
        r0, c0, r1, c1 = mask_box(previous)
        prompts = SlicePrompts(points=[interior_point(previous)], labels=[1], box=(r0, c0, r1, c1))
        mask, score, logits = self._predict(index, prompts, self._mask_prompt(index, previous) if carry_mask else None)
        if carry_mask:
            return prompts, mask, score, logits
        kept = _components_touching(mask, previous)
        return prompts, kept, score, self._without(index, logits, mask & ~kept, kept)

    def propagate(self, from_index: int | None = None, *, min_score: float = 0.5, min_area_mm2: float = 20.0,
                  min_overlap: float = 0.2, max_slices: int | None = None, cross_views: bool = True,
                  cross_view_margin_mm: float = 5.0, carry_mask: bool | None = None, progress=None) -> sitk.Image:
        """Grow the mask from a drawn slice outward in both directions until the structure ends.

        Each new slice is prompted with its neighbour's box and most interior point, and keeps the components of its
        mask that overlap the neighbour's (:meth:`_propagate_slice`). ``carry_mask``: the neighbour's mask as
        +-MASK_PROMPT_LOGIT logits too, under which the fine-tuned LiteMedSAM copies the seed's error on; None
        (default): the backend's rule (``registry.propagation_rule``: box and point for the ``litemedsam-clicks``
        heads and students that carry them; the mask prompt for the released LiteMedSAM and the OpenKBP stand-in,
        which do worse without it: the stand-in's PTV70 demo 3D Dice 0.77 -> 0.59).
        With ``cross_views`` the structure is first segmented in the two orthogonal planes through the seed
        (:meth:`cross_view_guide`) and propagation goes no further than the slices they reach plus
        ``cross_view_margin_mm``: the 2D model sees a structure's ends there, but not from one slice to the next (the
        stand-in's masks otherwise run on along the neck: PTV70 3D Dice 0.47 -> 0.66 from a perfect seed slice).
        Propagation stops at a slice whose predicted IoU is below ``min_score``, whose area is below ``min_area_mm2``,
        whose overlap (Dice) with the neighbour is below ``min_overlap``, or at a slice drawn with clicks (which
        the user owns). Slices propagated before are replaced where this propagation reaches them and kept where
        it stops short: they came from the user's other clicks, and a correction that the model turns into a
        poorer mask should not take the rest of the structure with it (3D Dice after 3 clicks on the 33
        validation patients, clearing -> keeping them: PTV70 0.549 -> 0.569, RightParotid 0.440 -> 0.527, Larynx
        0.550 -> 0.599). Once the structure has been propagated, a re-propagation stays within the slices it spans or
        the user clicked (:meth:`_extent`). Only a slice the user erased ends the structure: what was propagated
        beyond it is cleared.
        ``progress(index)`` is called with the seed's index once the views are segmented, with each slice's index
        once it is written, and with the seed's again before the result is committed; an exception it raises cancels
        the propagation and leaves the session as it was. Returns the 3D mask.
        """
        if carry_mask is None:
            carry_mask = getattr(self.backend, "propagation", "mask-prompt") == "mask-prompt"
        seeds = [i for i in self._source if self._user_owned(i) and self.plane.extract(self.mask, i).any()]
        if from_index is None:
            if not seeds:
                raise PrismRTError("nothing to propagate: click on the structure in one slice first")
            from_index = seeds[-1] if len(seeds) == 1 else max(seeds, key=lambda i: self._area_mm2(
                self.plane.extract(self.mask, i)))
        from_index = self.plane.check_slice_index(from_index)
        seed_mask = self.plane.extract(self.mask, from_index).astype(bool)
        if not seed_mask.any():
            raise PrismRTError(f"slice {from_index} has no mask to propagate from: click on the structure there first")
        limit = self.plane.num_slices if max_slices is None else int(max_slices)
        extent = self._extent()
        guide = self.cross_view_guide(from_index, seed_mask) if cross_views else None
        if progress:  # nothing written yet: a cancel here costs only the views
            progress(from_index)
        margin = int(np.ceil(cross_view_margin_mm / self.plane.slice_thickness - 1e-6))
        # the slices this propagation writes or clears, as they were (for undo)
        step = _Step("propagate", {})
        stops, written = {}, []
        try:
            for direction in (+1, -1):
                previous, index, done, erased = seed_mask, from_index + direction, 0, None
                stops[direction] = "at the end of the volume"
                while 0 <= index < self.plane.num_slices and done < limit:
                    if self._user_owned(index):
                        # a drawn slice is the user's and so is what was propagated beyond it; an erased one ends the
                        # structure there
                        erased = None if self.plane.extract(self.mask, index).any() else index
                        stops[direction] = f"at slice {index}, drawn by you"
                        break
                    if extent is not None and not extent[0] <= index <= extent[1]:
                        stops[direction] = (f"at slice {index}, beyond where the structure reached before; click on a "
                                            "slice further out to take it further")
                        break
                    if guide is not None and not guide.first - margin <= index <= guide.last + margin:
                        stops[direction] = (f"at slice {index}, beyond where the orthogonal views show the structure "
                                            f"(plus {cross_view_margin_mm:g} mm)")
                        break
                    if index not in step.before:
                        step.before[index] = self._state(index)
                    prompts, mask, score, logits = self._propagate_slice(index, previous, carry_mask)
                    area = self._area_mm2(mask)
                    overlap = 2 * np.count_nonzero(mask & previous) / max(
                        1, np.count_nonzero(mask) + np.count_nonzero(previous))
                    if score < min_score or area < min_area_mm2 or overlap < min_overlap:
                        stops[direction] = (
                            f"at slice {index}: " + (f"predicted IoU {score:.2f} < {min_score:g}" if score < min_score
                                                     else f"area {area:.0f} mm2 < {min_area_mm2:g}" if area < min_area_mm2
                                                     else f"overlap with the slice before {overlap:.2f} < {min_overlap:g}"))
                        break
                    self._write(index, mask, logits, "propagated")
                    written.append(index)
                    self.prompts[index] = prompts  # what made this slice (a click here starts from its mask instead)
                    if progress:
                        progress(index)
                    previous = mask
                    index += direction
                    done += 1
                if done >= limit:
                    stops[direction] = f"after {limit} slices (the limit)"
                # what was propagated beyond a slice the user erased is cleared
                index = -1 if erased is None else erased + direction
                while 0 <= index < self.plane.num_slices and self._source.get(index) == "propagated":
                    step.before.setdefault(index, self._state(index))
                    self._write(index, np.zeros(self.plane.slice_shape, bool), None, "propagated")
                    self._source.pop(index, None)
                    self.prompts.pop(index, None)
                    index += direction
            if progress:  # the last chance to cancel: after this the propagation is one undo step
                progress(from_index)
        except BaseException:  # cancelled through ``progress`` (or failed): the session is as it was
            for index, state in step.before.items():
                self._restore(index, state)
            raise
        self._commit(step)
        slices = [int(i) for i in np.flatnonzero(self.plane.stack_view(self.mask).any(axis=(1, 2)))]
        self.last_propagation = PropagationReport(from_index, slices, stops, propagation_warnings(
            [from_index, *written], from_index, self.plane.orientation.value, stops))
        return self.result()

    # ---- history and result --------------------------------------------------------------------------------------
    def can_undo(self) -> bool:
        return bool(self._undo)

    def can_redo(self) -> bool:
        return bool(self._redo)

    def _extent(self) -> tuple[int, int] | None:
        """Once the structure has been propagated, the slices it spans (clicked slices included): a re-propagation
        after a correction fills in within them and goes further only where the user clicked further. Otherwise a
        correction near the structure's end (a negative click leaving a sliver) would propagate the sliver on into
        the neighbouring anatomy (LUNG1-001: 3D Dice 0.69 -> 0.50 after three clicks)."""
        occupied = [i for i in self._source if self.plane.extract(self.mask, i).any()]
        if not any(self._source[i] == "propagated" for i in occupied):
            return None
        return min(occupied), max(occupied)

    def undo(self) -> str:
        if not self._undo:
            raise PrismRTError("nothing to undo")
        step = self._undo.pop()
        for index, state in step.before.items():
            self._restore(index, state)
        self._redo.append(step)
        return step.name

    def redo(self) -> str:
        if not self._redo:
            raise PrismRTError("nothing to redo")
        step = self._redo.pop()
        for index, state in step.after.items():
            self._restore(index, state)
        self._undo.append(step)
        return step.name

    def result(self) -> sitk.Image:
        """The 3D mask as a uint8 image on the volume's grid (same size, spacing, origin, direction)."""
        out = sitk.GetImageFromArray(self.mask)  # copies the array (a .copy() first would cost another volume)
        out.CopyInformation(self.image)
        return out
