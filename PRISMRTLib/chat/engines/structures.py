"""Answers computed from the loaded structures (:class:`..structures.StructureSet`): presence on a slice or in the
scan, lists and counts, volume, cranio-caudal extent, laterality, relative position, minimum distance, which is
closer, overlap.

Everything is physical: voxel indices go through the image's direction, spacing and origin (LPS mm), so a volume
stored R->L or S->I answers as an LPS one does. A slice ``AXIS:INDEX`` is the voxel index along k (axial), j
(coronal) or i (sagittal), never a display row: the display (radiological: the patient's right on the screen's left
in axial and coronal views, anterior on the left in sagittal ones) only enters when a side is said on screen.

Rules, stated in the answers:
- laterality: each voxel against the body's midline on its own row (the midpoint of the body's chord through it;
  the body is the loaded body structure, else the largest region above -400 HU): "bilateral" when at
  least 20 % of it lies on each side and it reaches 25 mm past the midline on both, else "midline" when its centre
  is within :data:`LATERAL_MARGIN_MM` (5 mm) of the midline, else the side of its centre.
- relative position: centroids compared along the direction, with a margin of :data:`POSITION_MARGIN_MM`.
- distance: the minimum distance between the two masks' voxel centres (anisotropic spacing), 0 when they overlap
  or touch (voxels of one next to voxels of the other).
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from ...imaging.geometry import Geometry
from ...imaging.slicing import SlicePlane
from ..lexicon import display_name
from ..structures import Structure, StructureSet
from ..types import HEADER_KINDS, Answer, ChatContext, ChatError, Intent, SliceRef
from . import (AXIS_LETTERS, DIRECTION_VECTORS, EXACT, fmt_mm, fmt_num, patient_word, plane_of_index_axis,
               screen_words, si_axis, slice_name)

SOURCE = "structures"
LATERAL_MARGIN_MM = 5.0
POSITION_MARGIN_MM = 5.0
BILATERAL_FRACTION = 0.20  # bilateral: at least this share of the voxels on each side of the midline,
BILATERAL_REACH_MM = 25.0  # and reaching at least this far past it on both sides
TIED = 0.8  # confidence of "which is closer" when the candidates are at the same distance (both overlap)
MAX_NAMES = 12  # loaded names listed in a "not loaded" answer
_OPPOSITE = {"left": "right", "right": "left"}


class _NotLoaded(Exception):
    def __init__(self, structure_id: str):
        super().__init__(structure_id)
        self.structure_id = structure_id


class _Missing(Exception):
    """The question lacks something (a second structure, a slice): answered as cannot tell with this reason."""


# -- slices ----------------------------------------------------------------------------------------------------------
def check_slice(image, ref: SliceRef) -> None:
    """Refuse a slice that does not exist in ``image``: an index out of range (the valid range is given), or an
    AXIS whose index axis (axial k, coronal j, sagittal i) does not cut that plane in this image."""
    geometry = Geometry.from_image(image)
    plane = SlicePlane.create(geometry, ref.axis)
    letter = AXIS_LETTERS[ref.itk_axis]
    if plane.normal_axis != ref.itk_axis:
        actual = plane_of_index_axis(geometry, ref.itk_axis)
        raise ChatError(
            f"cannot use the slice '{ref}': {ref.axis} slices are counted along {letter}, but this image's {letter} "
            f"axis cuts {actual} slices ({geometry.orientation_text()}), so AXIS:INDEX does not fit it; reorient "
            "the image to axial LPS (Slicer: Orient Scalar Volume; SimpleITK: sitk.DICOMOrient(image, 'LPS')) or "
            "ask without a slice")
    n = geometry.size[ref.itk_axis]
    if not 0 <= ref.index < n:
        raise ChatError(f"{ref.axis} slice {ref.index} does not exist: this image has {ref.axis} slices 0..{n - 1} "
                        f"(the voxel index along {letter})")


def _on_slice(mask: np.ndarray, ref: SliceRef) -> np.ndarray:
    """The 2D part of a (k, j, i) mask on a slice: index ``ref.index`` along k, j or i (array axis 0, 1 or 2)."""
    return np.take(mask, ref.index, axis=2 - ref.itk_axis)


def _slice_range(s: Structure, itk_axis: int) -> tuple[int, int] | None:
    if s.bbox is None:
        return None
    box = s.bbox[2 - itk_axis]
    return box.start, box.stop - 1


def _central_slice(s: Structure, geometry: Geometry) -> str | None:
    """The axial slice nearest the structure's centroid that contains it (a U-shape's centre may not)."""
    if s.empty:
        return None
    axis = si_axis(geometry)
    present = np.nonzero(s.mask.any(axis=tuple(a for a in range(3) if a != 2 - axis)))[0]
    index = int(present[np.argmin(np.abs(present - s.centroid_index[axis]))])
    return slice_name(geometry, axis, index)


# -- the engine ------------------------------------------------------------------------------------------------------
def answer(intent: Intent, ctx: ChatContext) -> Answer | None:
    if ctx.structures is None or intent.kind in HEADER_KINDS or intent.kind not in _HANDLERS:
        return None
    if ctx.slice is not None:
        check_slice(ctx.image, ctx.slice)
    query = _Query(intent, ctx)
    try:
        out = _HANDLERS[intent.kind](query)
    except _NotLoaded as exc:
        out = Answer.cannot_tell(query.not_loaded(exc.structure_id), source=SOURCE, kind=intent.kind,
                                 slice=str(ctx.slice) if ctx.slice else None)
    except _Missing as exc:
        out = Answer.cannot_tell(str(exc), source=SOURCE, kind=intent.kind,
                                 slice=str(ctx.slice) if ctx.slice else None)
    out.kind, out.source = out.kind or intent.kind, SOURCE
    return out


class _Query:
    """One question's view of the structure set: resolved structures (unions cached on the set), the slice scope."""

    def __init__(self, intent: Intent, ctx: ChatContext):
        self.intent, self.ctx = intent, ctx
        self.set: StructureSet = ctx.structures
        self.geometry = self.set.geometry
        self.cache: dict = self.set.cache

    # -- structures -------------------------------------------------------------------------------------------------
    def members(self, sid: str) -> list[Structure]:
        found = self.set.resolve(sid)
        if not found and sid == "body":  # no body contour loaded: the CT's own (largest region above -400 HU)
            if "body" not in self.cache:
                self.cache["body"] = Structure("the body", "body", self.set.body_mask())
            found = [self.cache["body"]]
        if not found:
            raise _NotLoaded(sid)
        return found

    def group(self, sid: str) -> Structure:
        """One structure for an id: itself, or the union of what it stands for ("target": every GTV/CTV/PTV)."""
        members = self.members(sid)
        if len(members) == 1:
            return members[0]
        key = ("union", tuple(s.name for s in members))
        if key not in self.cache:
            mask = np.zeros(self.geometry.shape, dtype=bool)
            for s in members:
                mask |= s.mask
            self.cache[key] = Structure(_union_name(sid, members), None, mask)
        return self.cache[key]

    def ids(self, count: int | None = None) -> list[str]:
        ids = list(self.intent.structures)
        if count is not None and len(ids) < count:
            have = f"only {display_name(ids[0])}" if ids else "none"
            raise _Missing(f"the question names {have}, and this needs {count} structures: name them "
                           f"(loaded: {self.names_text()})")
        return ids

    def names_text(self) -> str:
        names = self.set.names
        shown = ", ".join(names[:MAX_NAMES])
        return shown + (f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")

    def not_loaded(self, sid: str) -> str:
        if sid == "target":
            what = "no target (GTV, CTV or PTV)"
        elif sid == "ptv":
            what = "no PTV"
        else:
            what = f"no {display_name(sid)}"
        return f"{what} is among the loaded structures ({self.names_text()})"

    # -- scope ------------------------------------------------------------------------------------------------------
    def slice_scope(self) -> SliceRef | None:
        """The slice a presence/list/count question is about (None: the volume)."""
        scope, ref = self.intent.scope, self.ctx.slice
        if scope == "slice":
            if ref is None:
                raise _Missing("the question is about 'this slice', but no slice is given: ask from a slice view or "
                               "give --slice AXIS:INDEX (e.g. axial:63)")
            return ref
        if scope == "volume":
            return None
        return ref  # unsaid: the slice when one is given (types.py)

    # -- geometry ---------------------------------------------------------------------------------------------------
    def projection(self, s: Structure, u: np.ndarray) -> np.ndarray:
        """Each voxel centre's coordinate along the LPS unit vector ``u`` (linear in the index: no (N, 3) points)."""
        g = self.geometry
        return s.voxel_indices @ ((g.direction.T @ u) * g.spacing) + float(g.origin @ u)

    def centroid(self, s: Structure) -> np.ndarray:
        return self.geometry.index_to_physical(s.centroid_index)

    @property
    def voxel_mm3(self) -> float:
        return float(np.prod(self.geometry.spacing) * abs(np.linalg.det(self.geometry.direction)))

    def volume_cm3(self, s: Structure) -> float:
        return s.voxel_count * self.voxel_mm3 / 1000.0


def _plural(sid: str) -> str:
    """What several structures of one id are called: "the targets", "the PTVs", "the parotids", "the GTVs"."""
    return "the targets" if sid == "target" else f"the {display_name(sid)}s"


def _union_name(sid: str, members: list[Structure]) -> str:
    return f"{_plural(sid)} ({_join([s.name for s in members])})"


def _cap(text: str) -> str:
    """A union's name ("the targets (...)") at the start of a sentence; loaded names stay as they were written."""
    return "The" + text[3:] if text.startswith("the ") else text


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _area_cm2(pixels: int, ref: SliceRef, geometry: Geometry) -> float:
    spacing = [geometry.spacing[a] for a in range(3) if a != ref.itk_axis]
    return pixels * spacing[0] * spacing[1] / 100.0


# -- presence, list, count -------------------------------------------------------------------------------------------
def _presence(q: _Query) -> Answer:
    ref = q.slice_scope()
    ids = q.ids()
    if not ids:  # "is there anything here?": any loaded structure but the body (which is nearly everywhere)
        return _list(q, polar=True)
    results = []
    for sid in ids:
        members = q.members(sid)
        if ref is not None:
            here = [s for s in members if _on_slice(s.mask, ref).any()]
        else:
            here = [s for s in members if not s.empty]
        results.append((sid, members, here))
    value = all(here for _, _, here in results)
    sentences = [_presence_sentence(q, sid, members, here, ref) for sid, members, here in results]
    if ref is not None:
        where = str(ref)
    else:
        first = next((h[0] for _, _, h in results if h), None)
        where = _central_slice(first, q.geometry) if first is not None else None
    return Answer(("Yes: " if value else "No: ") + " ".join(sentences), EXACT, SOURCE, value, None, slice=where,
                  details={"present": sorted(q.set.id_of(s) for _, _, h in results for s in h)})


def _presence_sentence(q: _Query, sid: str, members: list[Structure], here: list[Structure],
                       ref: SliceRef | None) -> str:
    name = _plural(sid) if len(members) > 1 else members[0].name
    if ref is None:
        if not here:
            return (f"{name} is loaded but empty: it is not in this scan." if len(members) == 1 else
                    f"none of {_join([s.name for s in members])} has any voxel in this scan.")
        axis = si_axis(q.geometry)
        spans = []
        for s in here:
            lo, hi = _slice_range(s, axis)
            spans.append(f"{s.name} on {plane_of_index_axis(q.geometry, axis)} slices {lo}..{hi}")
        return f"{name} {'are' if len(members) > 1 else 'is'} in the scan ({'; '.join(spans)})."
    letter = AXIS_LETTERS[ref.itk_axis]
    if here:
        parts = []
        for s in here:
            pixels = int(np.count_nonzero(_on_slice(s.mask, ref)))
            parts.append(f"{s.name} ({pixels} voxels, {fmt_num(_area_cm2(pixels, ref, q.geometry))} cm2)")
        missing = [s.name for s in members if s not in here]
        verb = "is" if len(here) == 1 else "are"
        text = f"{_join(parts)} {verb} on {ref.axis} slice {ref.index} ({letter} = {ref.index})"
        return text + (f"; {_join(missing)} {'is' if len(missing) == 1 else 'are'} not." if missing else ".")
    spans = []
    for s in members:
        r = _slice_range(s, ref.itk_axis)
        spans.append((f"{s.name} spans {ref.axis} slices {r[0]}..{r[1]}" if r else f"{s.name} is empty")
                     if len(members) > 1 else (f"it spans {ref.axis} slices {r[0]}..{r[1]}" if r else
                                               "it is loaded but empty"))
    verb = "are" if len(members) > 1 else "is"
    return f"{name} {verb} not on {ref.axis} slice {ref.index} ({letter} = {ref.index}): {'; '.join(spans)}."


def _candidates(q: _Query, body: bool = True) -> list[Structure]:
    """The structures a list/count question is about: those it names, else every loaded structure (the body too:
    it is one of the structure set's contours)."""
    ids = q.ids()
    if not ids:
        return [s for s in q.set if body or s.concept != "body"]
    out: list[Structure] = []
    for sid in ids:
        out += [s for s in q.members(sid) if s not in out]
    return out


def _present(q: _Query, ref: SliceRef | None, body: bool = True) -> tuple[list[Structure], list[Structure]]:
    candidates = _candidates(q, body)
    if ref is None:
        return candidates, [s for s in candidates if not s.empty]
    return candidates, [s for s in candidates if _on_slice(s.mask, ref).any()]


def _where(ref: SliceRef | None) -> str:
    return f"on {ref.axis} slice {ref.index}" if ref is not None else "in this scan"


def _list(q: _Query, polar: bool = False) -> Answer:
    ref = q.slice_scope()
    candidates, here = _present(q, ref, body=not polar)
    ids = sorted(q.set.id_of(s) for s in here)
    where = _where(ref)
    of = f"{len(here)} of the {len(candidates)} {'structures asked about' if q.intent.structures else 'loaded'}"
    if polar:
        value = bool(here)
        text = (f"Yes: {_join([s.name for s in here])} {where} ({of})." if here else
                f"No: none of the loaded structures ({q.names_text()}) is {where}.")
        return Answer(text, EXACT, SOURCE, value, None, slice=str(ref) if ref else None, details={"present": ids})
    text = (f"{where[0].upper()}{where[1:]}: {_join([s.name for s in here])} ({of})." if here else
            f"None of the {'structures asked about' if q.intent.structures else 'loaded structures'} "
            f"({_join([s.name for s in candidates]) if candidates else 'none'}) is {where}.")
    return Answer(text, EXACT, SOURCE, ids, None, slice=str(ref) if ref else None,
                  details={"names": [s.name for s in here]})


def _count(q: _Query) -> Answer:
    ref = q.slice_scope()
    candidates, here = _present(q, ref)
    n, names = len(here), (f": {_join([s.name for s in here])}" if here else "")
    verb = "is" if n == 1 else "are"
    if q.intent.structures:
        what = _join([display_name(i) for i in q.intent.structures])
        text = f"{n} of the loaded structures {verb} {what} {_where(ref)}{names}"
        if n != len(candidates):
            text += f" ({len(candidates)} loaded)"
    else:
        text = f"{n} loaded structure{'' if n == 1 else 's'} {verb} {_where(ref)}{names}"
        if n != len(candidates):
            text += f" ({len(candidates) - n} more loaded but empty)" if ref is None else f" (of {len(candidates)})"
    return Answer(text + ".", EXACT, SOURCE, n, None, slice=str(ref) if ref else None,
                  details={"present": sorted(q.set.id_of(s) for s in here)})


# -- size ------------------------------------------------------------------------------------------------------------
def _volume(q: _Query) -> Answer:
    ids = q.ids(1)
    groups = [q.group(sid) for sid in ids]
    parts, volumes = [], []
    for sid, g in zip(ids, groups):
        cm3 = q.volume_cm3(g)
        volumes.append(cm3)
        text = f"{_cap(g.name)}: {fmt_num(cm3)} cm3"
        if q.intent.unit == "ml":
            text += f" (= {fmt_num(cm3)} ml)"
        elif q.intent.unit == "mm3":
            text += f" (= {fmt_num(cm3 * 1000)} mm3)"
        if g.empty:
            text += " (it is loaded but empty: not in this scan)"
        else:
            text += f" ({g.voxel_count} voxels of {fmt_num(q.voxel_mm3)} mm3)"
        members = q.members(sid)
        if len(members) > 1:
            text += " (overlaps counted once; " + ", ".join(f"{s.name} {fmt_num(q.volume_cm3(s))} cm3"
                                                              for s in members) + ")"
        parts.append(text)
    return Answer("; ".join(parts) + ".", EXACT, SOURCE, volumes[0], "cm3", slice=_central_slice(groups[0], q.geometry),
                  details={"volumes_cm3": dict(zip(ids, volumes))})


def _asks_for_slices(intent: Intent) -> bool:
    return intent.unit in ("slice", "slices") or bool(
        re.search(r"\b(how many|number of)\b.*\bslices?\b|\bslices?\b.*\bhow many\b", intent.question.lower()))


def _extent(q: _Query) -> Answer:
    sid = q.ids(1)[0]
    g = q.group(sid)
    axis = si_axis(q.geometry)
    plane = plane_of_index_axis(q.geometry, axis)
    if g.empty:
        return Answer(f"{g.name} is loaded but empty: it is not in this scan, so it has no extent.", EXACT, SOURCE,
                      0.0, "mm")
    present = np.nonzero(g.mask.any(axis=tuple(a for a in range(3) if a != 2 - axis)))[0]
    lo, hi = int(present[0]), int(present[-1])
    z = q.projection(g, np.array([0.0, 0.0, 1.0]))  # S-I coordinate of each voxel centre
    thick = float(q.geometry.spacing[axis] * abs(q.geometry.direction[2, axis]))  # a voxel's own S-I reach
    extent = float(z.max() - z.min() + thick)
    n = len(present)
    gaps = f", present on {n} of the {hi - lo + 1} slices in that range" if n != hi - lo + 1 else ""
    details = {"extent_mm": extent, "slices": n, "first": lo, "last": hi, "index_axis": AXIS_LETTERS[axis]}
    text = (f"{_cap(g.name)} extend{'' if g.name.startswith('the ') else 's'} {fmt_mm(extent)} mm cranio-caudally"
            + (f" ({fmt_num(extent / 10)} cm)" if q.intent.unit == "cm" else "")
            + f", over {n} {plane} slices ({AXIS_LETTERS[axis]} {lo}..{hi}, {fmt_num(q.geometry.spacing[axis])} mm "
              f"apart{gaps}).")
    where = _central_slice(g, q.geometry)
    if _asks_for_slices(q.intent):
        return Answer(text, EXACT, SOURCE, n, "slices", slice=where, details=details)
    return Answer(text, EXACT, SOURCE, extent, "mm", slice=where, details=details)


# -- sides and directions --------------------------------------------------------------------------------------------
def _restricted(q: _Query, g: Structure, ref: SliceRef) -> Structure:
    mask = np.zeros_like(g.mask)
    index = [slice(None)] * 3
    index[2 - ref.itk_axis] = ref.index
    mask[tuple(index)] = g.mask[tuple(index)]
    return Structure(f"{g.name} on {ref}", g.concept, mask)


ROW_GAP_MM = 15.0  # air gaps narrower than this on a row (an open mouth, a skin fold) do not split the body


def _filled_body(q: _Query) -> tuple[np.ndarray, int, str]:
    """The body with the holes of each axial slice filled (the lungs, the airway), moved so that its last axis is
    the index axis closest to right-left; which axis that is; where the body came from."""
    if "filled_body" not in q.cache:
        body = q.set.body_mask()
        anat = q.geometry.anatomical_axes()
        lr, si = anat.index(0), anat.index(2)
        in_plane = np.ones((3, 3, 3), bool)
        keep = [slice(None)] * 3
        keep[2 - si] = 1  # connectivity within axial planes only: each slice's holes, not a 3D cavity
        plane = np.zeros((3, 3, 3), bool)
        plane[tuple(keep)] = in_plane[tuple(keep)]
        filled = ndimage.binary_fill_holes(body, structure=plane)
        loaded = any(s.concept == "body" and not s.empty for s in q.set)
        source = "the loaded body contour" if loaded else "the body (the largest region above -400 HU)"
        q.cache["filled_body"] = (np.moveaxis(filled, 2 - lr, -1), lr, source)
    return q.cache["filled_body"]


def _midline_offsets(q: _Query, g: Structure) -> tuple[np.ndarray, str]:
    """Each voxel's signed left-right distance (mm, + = the patient's left) from the body's midline on its own row:
    the midpoint of the run of body (holes filled, gaps under :data:`ROW_GAP_MM` closed, the structure itself
    included) that holds the voxel. The run, not the row's extent or a slab's centroid: a head frame, a couch rail
    or a raised shoulder on one side moves those by 5-60 mm (OpenKBP pt_201's larynx, pt_230's cord), while the
    chord through the neck or the chest stays centred on the patient."""
    body, lr, source = _filled_body(q)
    idx = g.voxel_indices
    others = [a for a in (2, 1, 0) if a != lr]  # the row's coordinates in the moved array
    keys = idx[:, others[0]].astype(np.int64) * body.shape[1] + idx[:, others[1]]
    rows, which = np.unique(keys, return_inverse=True)
    sub = body[rows // body.shape[1], rows % body.shape[1]].copy()  # (rows, positions along right-left)
    sub[which, idx[:, lr]] = True
    gap = max(1, int(np.ceil(ROW_GAP_MM / float(q.geometry.spacing[lr]))))
    sub = ndimage.binary_closing(np.pad(sub, ((0, 0), (gap, gap))), structure=np.ones((1, gap + 1), bool))[:, gap:-gap]
    sub[which, idx[:, lr]] = True
    n = sub.shape[1]
    positions = np.arange(n)
    edge = np.zeros((len(rows), 1), bool)
    starts = sub & ~np.concatenate([edge, sub[:, :-1]], axis=1)
    ends = sub & ~np.concatenate([sub[:, 1:], edge], axis=1)
    first = np.maximum.accumulate(np.where(starts, positions, -1), axis=1)  # the run's start at each position
    last = np.minimum.accumulate(np.where(ends, positions, n)[:, ::-1], axis=1)[:, ::-1]  # and its end
    mid = (first[which, idx[:, lr]] + last[which, idx[:, lr]]) / 2.0
    # x is linear in the index: from the midpoint to the voxel along the right-left axis only x's share of that
    # axis changes (direction[0, lr] * spacing[lr]; negative when i runs L->R)
    step = float(q.geometry.direction[0, lr] * q.geometry.spacing[lr])
    return (idx[:, lr] - mid) * step, source


def _laterality_of(q: _Query, g: Structure) -> dict:
    offset, origin = _midline_offsets(q, g)
    m = LATERAL_MARGIN_MM
    d = float(offset.mean())
    left, right = float(np.mean(offset > 0)), float(np.mean(offset < 0))
    x = q.projection(g, np.array([1.0, 0.0, 0.0]))
    x0 = float(np.median(x - offset))  # one midline for the reach, so it reads as a width, not row noise
    reach_right, reach_left = float(x0 - x.min()), float(x.max() - x0)
    if min(left, right) >= BILATERAL_FRACTION and min(reach_left, reach_right) >= BILATERAL_REACH_MM:
        side = "bilateral"  # a real share on each side, reaching well past the midline on both
    elif abs(d) <= m:
        side = "midline"
    else:
        side = "left" if d > 0 else "right"
    return {"side": side, "offset_mm": d, "margin_mm": m, "midline_from": origin, "left_fraction": left,
            "right_fraction": right, "reach_mm": {"right": reach_right, "left": reach_left}}


def _side_text(side: str) -> str:
    if side in ("left", "right"):
        return f"on the patient's {side}, on the screen's {_OPPOSITE[side]}"
    if side == "bilateral":
        return "on both sides of the patient (and of the screen)"
    return "on the patient's midline (centred on screen)"


def _laterality(q: _Query) -> Answer:
    # "which side of the body is X on?": the body is the reference, not the subject, unless it is all that is named
    ids = [i for i in q.intent.structures if i != "body"] or list(q.intent.structures) or ["target"]
    g = q.group(ids[0])
    ref = q.ctx.slice if q.intent.scope == "slice" else None
    if q.intent.scope == "slice" and ref is None:
        raise _Missing("the question is about 'this slice', but no slice is given: give --slice AXIS:INDEX")
    if ref is not None:
        g = _restricted(q, g, ref)
        if g.empty:
            r = _slice_range(q.group(ids[0]), ref.itk_axis)
            raise _Missing(f"{q.group(ids[0]).name} is not on {ref}" + (f" (it spans {ref.axis} slices "
                                                                        f"{r[0]}..{r[1]})" if r else ""))
    if g.empty:
        raise _Missing(f"{g.name} is loaded but empty: it is not in this scan")
    info = _laterality_of(q, g)
    side, d, m = info["side"], info["offset_mm"], info["margin_mm"]
    reach = info["reach_mm"]
    screen = _OPPOSITE.get(side, side)
    display = "axial and coronal views, radiological display"
    share = f"{100 * info['right_fraction']:.0f} % of it on the right, {100 * info['left_fraction']:.0f} % on the left"
    if side in ("left", "right"):
        how = f"its centre lies {fmt_mm(abs(d))} mm {side} of the body midline"
        beyond = reach[_OPPOSITE[side]]
        if beyond > m:
            how += f" ({share}; it crosses the midline by {fmt_mm(beyond)} mm)"
    elif side == "bilateral":
        how = (f"it spans both sides ({share}), reaching {fmt_mm(reach['right'])} mm right and "
               f"{fmt_mm(reach['left'])} mm left of the body midline")
    else:
        how = (f"its centre lies within {fmt_mm(m)} mm of the body midline ({fmt_mm(abs(d))} mm "
               f"{'left' if d > 0 else 'right'}); it reaches {fmt_mm(max(0.0, reach['right']))} mm right and "
               f"{fmt_mm(max(0.0, reach['left']))} mm left of it")
    midline = (f"the midline: the centre of the chord of {info['midline_from']} through each of its voxels; "
               f"margin {fmt_mm(m)} mm")
    where = f" {ref}" if ref is not None else ""
    verb = "are" if g.name.startswith("the ") else "is"  # a union: "the targets (PTV70 and PTV56) are"
    sentence = f"{_cap(g.name)}{where} {verb} {_side_text(side)} ({display}): {how} ({midline})."
    if q.ctx.slice is not None and q.ctx.slice.axis == "sagittal":
        sentence += " This sagittal view does not show left and right: its screen left is anterior."
    details = {"screen": screen, **info}
    slice_ = str(ref) if ref is not None else _central_slice(g, q.geometry)
    asked = q.intent.direction
    if q.intent.polar and asked in ("left", "right", "midline", "bilateral"):
        if q.intent.frame == "screen" and asked in ("left", "right"):
            if q.ctx.slice is not None and q.ctx.slice.axis == "sagittal":
                raise _Missing("in a sagittal view the screen's left and right are the patient's front and back, "
                               "not sides: ask which side in the patient's frame, or about anterior/posterior")
            asked_patient = _OPPOSITE[asked]
            said = f"the screen's {asked}"
        else:
            asked_patient, said = asked, (f"the patient's {asked}" if asked in _OPPOSITE else asked)
        value = side == asked_patient
        lead = "Yes: " if value else f"No, it is not on {said}: "
        return Answer(lead + sentence, EXACT, SOURCE, value, None, slice=slice_, details=details)
    return Answer(sentence, EXACT, SOURCE, side, None, slice=slice_, details=details)


def _direction_vector(q: _Query) -> tuple[np.ndarray, str, str | None, str | None]:
    """LPS unit vector of the asked direction, its patient-frame word, the screen word and the plane shown."""
    word, frame = q.intent.direction, q.intent.frame
    plane = q.ctx.slice.axis if q.ctx.slice is not None else None
    if word not in DIRECTION_VECTORS and word not in ("up", "down"):
        raise _Missing(f"'{word}' is not a direction I can measure: ask left/right, anterior/posterior (in front, "
                       "behind), superior/inferior (above, below), or up/down on the screen")
    if word in ("up", "down") or (frame == "screen" and word in ("left", "right")):
        if plane is None:
            if word in ("up", "down"):
                raise _Missing(f"'{word}' on screen is anterior in an axial view but superior in coronal and sagittal "
                               "ones, and no view is given: give --slice AXIS:INDEX, or ask in the patient's terms "
                               "(anterior, superior ...)")
            plane = "axial"  # left/right on screen are the same in axial and coronal views
        patient = patient_word(word, plane)
        return np.array(DIRECTION_VECTORS[patient]), patient, word, plane
    screen = screen_words(plane or "axial").get(word) if plane or word in ("left", "right") else None
    return np.array(DIRECTION_VECTORS[word]), word, screen, plane or ("axial" if screen else None)


def _relative_position(q: _Query) -> Answer:
    ids = q.ids(1)
    if q.intent.direction is None and (len(ids) == 1 or ids[1] == "body"):
        out = _laterality(q)  # "which side of the body is X on?": a side, against the body's midline
        out.kind = "laterality"
        return out
    a = q.group(ids[0])
    if len(ids) > 1 and ids[1] != "body":
        b = q.group(ids[1])
        b_name = b.name
    else:  # "is the cord posterior?", "... in the back of the body?": against the body's centre
        b, b_name = q.group("body"), "the body's centre"
    for s in (a, b):
        if s.empty:
            raise _Missing(f"{s.name} is loaded but empty: it is not in this scan")
    delta = q.centroid(a) - q.centroid(b)
    if q.intent.direction is None:
        axis = int(np.argmax(np.abs(delta)))
        word = {0: ("right", "left"), 1: ("anterior", "posterior"), 2: ("inferior", "superior")}[axis][
            int(delta[axis] > 0)]
        offsets = ", ".join(f"{fmt_mm(abs(delta[i]))} mm {w[int(delta[i] > 0)]}" for i, w in
                            enumerate((("right", "left"), ("anterior", "posterior"), ("inferior", "superior"))))
        text = (f"{a.name} lies mostly {word} of {b_name} (the patient's frame): its centre is {offsets} of "
                f"{b_name if len(ids) > 1 else 'it'}.")
        return Answer(text, EXACT, SOURCE, word, None, slice=_central_slice(a, q.geometry),
                      details={"offset_mm": delta.tolist()})
    u, patient, screen, plane = _direction_vector(q)
    along = float(delta @ u)
    value = along > POSITION_MARGIN_MM
    entirely = bool(q.projection(a, u).min() > q.projection(b, u).max())
    view = f"{'this' if q.ctx.slice is not None else 'an'} {plane} view" if plane else None
    on_screen = q.intent.frame == "screen" and view
    asked = f"{_SCREEN_RELATION[screen]} on the screen" if on_screen else _RELATION_NOUN[patient]
    verb = "are" if a.name.startswith("the ") else "is"
    if abs(along) <= POSITION_MARGIN_MM:
        text = (f"No: {_cap(a.name)} and {b_name} are level along {_AXIS_NAME[patient]}: their centres are "
                f"{fmt_mm(abs(along))} mm apart along it, within the {fmt_mm(POSITION_MARGIN_MM)} mm margin")
    else:
        actual = patient if along > 0 else _OPPOSITE_DIRECTION[patient]
        shown = screen_words(plane).get(actual) if plane else None
        text = f"{'Yes' if value else 'No'}: {_cap(a.name)} {verb} {_RELATION[actual]} {b_name}"
        if shown:
            text += f" ({_SCREEN_RELATION[shown]} on the screen of {view})"
        if not value:
            text += f", not {asked}"
        text += f": its centre lies {fmt_mm(abs(along))} mm further {actual}"
        if value and entirely:
            text += ", and all of it lies beyond"
    text += f" (centres compared in the patient's frame, margin {fmt_mm(POSITION_MARGIN_MM)} mm)."
    return Answer(text, EXACT, SOURCE, value, None, slice=_central_slice(a, q.geometry),
                  details={"offset_mm": along, "direction": patient, "screen": screen, "entirely": entirely})


_RELATION = {"left": "to the patient's left of", "right": "to the patient's right of", "anterior": "anterior to",
             "posterior": "posterior to", "superior": "superior to", "inferior": "inferior to"}
_RELATION_NOUN = {"left": "to the patient's left", "right": "to the patient's right", "anterior": "anterior",
                  "posterior": "posterior", "superior": "superior", "inferior": "inferior"}
_SCREEN_RELATION = {"left": "further left", "right": "further right", "up": "higher", "down": "lower"}
_OPPOSITE_DIRECTION = {"left": "right", "right": "left", "anterior": "posterior", "posterior": "anterior",
                       "superior": "inferior", "inferior": "superior"}
_AXIS_NAME = {"left": "right-left", "right": "right-left", "anterior": "anterior-posterior",
              "posterior": "anterior-posterior", "superior": "superior-inferior", "inferior": "superior-inferior"}


# -- distances -------------------------------------------------------------------------------------------------------
def _gap(q: _Query, a: Structure, b: Structure) -> tuple[float, tuple[int, int, int] | None, int]:
    """The minimum distance (mm) between the voxel centres of two structures, the (k, j, i) voxel of ``a`` where it
    is reached, and their overlap in voxels. 0 when they overlap or touch (a voxel of one shares a face, edge or
    corner with a voxel of the other). An anisotropic Euclidean distance transform of ``b``'s complement, read on
    ``a``, cropped to the two's bounding box (every voxel of ``b`` is in it, so the crop changes nothing)."""
    key = ("gap", a.name, b.name)  # names are unique in a set (unions are named after their members)
    if key in q.cache:
        return q.cache[key]
    shape = np.array(q.geometry.shape)
    lo = np.minimum([s.start for s in a.bbox], [s.start for s in b.bbox]) - 1
    hi = np.maximum([s.stop for s in a.bbox], [s.stop for s in b.bbox]) + 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, shape)
    box = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi))
    sub_a, sub_b = a.mask[box], b.mask[box]
    overlap = int(np.count_nonzero(sub_a & sub_b))
    touching = sub_a & ndimage.binary_dilation(sub_b, structure=np.ones((3, 3, 3), bool))
    if touching.any():
        where = np.argwhere(sub_a & sub_b)[0] if overlap else np.argwhere(touching)[0]
        result = (0.0, tuple(int(v) for v in where + lo), overlap)
    else:
        dist = ndimage.distance_transform_edt(~sub_b, sampling=q.geometry.spacing[::-1])
        dist = np.where(sub_a, dist, np.inf)
        where = np.unravel_index(int(np.argmin(dist)), dist.shape)
        result = (float(dist[where]), tuple(int(v) for v in np.array(where) + lo), overlap)
    q.cache[key] = result
    return result


def _slice_of_voxel(q: _Query, voxel) -> str | None:
    axis = si_axis(q.geometry)
    return slice_name(q.geometry, axis, voxel[2 - axis]) if voxel is not None else None


def _threshold_mm(intent: Intent) -> float | None:
    if intent.threshold is None:
        return None
    return float(intent.threshold) * {"cm": 10.0, "m": 1000.0}.get(intent.unit or "mm", 1.0)


def _pair(q: _Query) -> tuple[Structure, Structure]:
    ids = q.ids(2)
    a, b = q.group(ids[0]), q.group(ids[1])
    for s in (a, b):
        if s.empty:
            raise _Missing(f"{s.name} is loaded but empty: it is not in this scan")
    return a, b


def _distance(q: _Query) -> Answer:
    a, b = _pair(q)
    gap, voxel, overlap = _gap(q, a, b)
    spacing = " x ".join(fmt_num(s) for s in q.geometry.spacing)
    how = (f"between the nearest voxel centres, voxels {spacing} mm" if gap > 0 else
           f"they overlap by {fmt_num(overlap * q.voxel_mm3 / 1000)} cm3" if overlap else
           "they touch: voxels of one are next to voxels of the other")
    threshold = _threshold_mm(q.intent)
    where = _slice_of_voxel(q, voxel)
    details = {"distance_mm": gap, "overlap_voxels": overlap}
    if threshold is not None:
        value = gap <= threshold
        text = (f"{'Yes' if value else 'No'}: {_cap(a.name)} {'are' if a.name.startswith('the ') else 'is'} "
                f"{'' if value else 'not '}within {fmt_num(threshold)} mm of "
                f"{b.name}: the minimum distance is {fmt_mm(gap)} mm ({how}).")
        return Answer(text, EXACT, SOURCE, value, None, slice=where, details=details)
    cm = f" ({fmt_num(gap / 10)} cm)" if q.intent.unit == "cm" and gap > 0 else ""
    text = f"The minimum distance between {a.name} and {b.name} is {fmt_mm(gap)} mm{cm} ({how})."
    return Answer(text, EXACT, SOURCE, gap, "mm", slice=where, details=details)


def _closer(q: _Query) -> Answer:
    ids = q.ids(2)
    ref = q.group(ids[0])
    reference_members = {s.name for s in q.members(ids[0])}
    candidates: list[Structure] = []
    for sid in ids[1:]:
        candidates += [s for s in q.members(sid) if s not in candidates and s.name not in reference_members]
    if len(candidates) < 2:
        names = _join([s.name for s in candidates]) if candidates else "none"
        raise _Missing(f"'which is closer' needs two structures to compare with {ref.name}, and the question gives "
                       f"{names} (loaded: {q.names_text()})")
    if ref.empty:
        raise _Missing(f"{ref.name} is loaded but empty: it is not in this scan")
    rows = []
    for s in candidates:
        if s.empty:
            continue
        gap, voxel, overlap = _gap(q, s, ref)
        centre = float(np.linalg.norm(q.centroid(s) - q.centroid(ref)))
        rows.append((gap, -overlap, centre, s, voxel, overlap))
    if not rows:
        raise _Missing(f"none of {_join([s.name for s in candidates])} has any voxel in this scan")
    rows.sort(key=lambda r: r[:3])
    best = rows[0]
    listed = "; ".join(f"{r[3].name} {fmt_mm(r[0])} mm" + (f" (overlap {fmt_num(r[5] * q.voxel_mm3 / 1000)} cm3)"
                                                           if r[5] else "") for r in rows)
    tied = len(rows) > 1 and rows[1][0] == best[0]
    if tied and best[0] == 0:
        why = ("both reach it (distance 0 mm); " + ("it overlaps it more" if best[1] < rows[1][1] else
                                                   "its centre is nearer"))
    elif tied:
        why = "the distances are equal; its centre is nearer"
    else:
        why = "minimum distances"
    text = f"{best[3].name} is closer to {ref.name} ({why}: {listed})."
    return Answer(text, TIED if tied else EXACT, SOURCE, q.set.id_of(best[3]), None,
                  slice=_slice_of_voxel(q, best[4]),
                  details={"distances_mm": {q.set.id_of(r[3]): r[0] for r in rows}})


def _overlap(q: _Query) -> Answer:
    a, b = _pair(q)
    gap, voxel, overlap = _gap(q, a, b)
    cm3 = overlap * q.voxel_mm3 / 1000
    details = {"overlap_cm3": cm3, "percent_of": {a.name: 100.0 * overlap / a.voxel_count,
                                                   b.name: 100.0 * overlap / b.voxel_count}, "distance_mm": gap}
    if overlap:
        both = a.mask & b.mask
        s = Structure("overlap", None, both)
        share = details["percent_of"]
        text = (f"Yes: {_cap(a.name)} and {b.name} overlap by {fmt_num(cm3)} cm3 ({fmt_num(share[a.name])} % of "
                f"{a.name}, {fmt_num(share[b.name])} % of {b.name}).")
        return Answer(text, EXACT, SOURCE, True, None, slice=_central_slice(s, q.geometry), details=details)
    text = (f"No: {_cap(a.name)} and {b.name} do not overlap" +
            (" (they touch)." if gap == 0 else f" (minimum distance {fmt_mm(gap)} mm)."))
    return Answer(text, EXACT, SOURCE, False, None, slice=_slice_of_voxel(q, voxel), details=details)


_HANDLERS = {
    "presence": _presence, "list": _list, "count": _count, "volume": _volume, "extent": _extent,
    "laterality": _laterality, "relative_position": _relative_position, "distance": _distance, "closer": _closer,
    "overlap": _overlap,
}
