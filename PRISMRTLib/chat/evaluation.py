"""`prismrt eval-ask`: the chat scored on questions whose answers are computed here, from the masks and headers
alone (numpy and SimpleITK; none of the chat's engines), so the evaluation checks the engines rather than repeats
them.

    items = build_question_set(["../shared/data/openkbp/validation-pats", ".../LUNG1-001"])
    results = evaluate(items, session_factory)    # session_factory(case_folder, with_structures) -> .ask()
    write_report(results, "out/eval-ask")         # results.json + results.md
    run_eval(case_dirs, "out/eval-ask")           # the three, with the real ChatSession and StructureSet

A case is a folder holding ``ct.nii.gz`` and structure masks on its grid, beside it or in ``masks/`` (dose files and
OpenKBP's ``possible_dose_mask`` are not structures); a folder of such folders is expanded.

Truth conventions (what an item's ``truth`` holds is what ``Answer.value`` should hold, :mod:`.types`):

- **Slices**: ``"axial:K"``, ``"coronal:J"``, ``"sagittal:I"``: 0-based voxel index along k, j, i; a structure is
  on a slice when any of its voxels is. Plane items are made only where the index axis is the physical axis its name
  says (direction matrix), and their truth is read from the direction matrix.
- **Physical frame**: LPS, from the image's index-to-physical mapping (``origin + direction @ (spacing * ijk)``),
  never from array order: the patient's left is +x, posterior +y, superior +z.
- **Laterality** against the body midline. Midline estimates: the x centroid of the body (CT > -400 HU, largest
  connected component) over the structure's cranio-caudal range and over the whole scan, of a loaded body contour
  over that range, and of the spinal cord; none (no laterality item) where the body at that level reaches the field
  of view's sides (a crop: the sarcoma cases). For every estimate: ``left``/``right`` when >= 90 % of the voxels lie
  on that side and the centroid is >= max(15 mm, 3 voxels) from the midline; ``midline`` when the centroid is within
  5 mm and every voxel within 25 mm (asked for the cord, the brainstem and targets); ``bilateral`` when the mask is
  separate parts, each wholly >= 5 mm off the midline, >= 20 % of it on each side. A single mass straddling the
  midline (a bilateral-neck PTV, the mandible) and estimates that disagree are not asked. The screen is
  radiological (axial and coronal views show the patient's left on the screen's right); left/right on a sagittal
  slice is not answerable.
- **Volumes**: voxel count x voxel volume, cm3 (2 %). **Extents**: cranio-caudal, slices spanned x slice spacing,
  mm (within one slice spacing, so a centre-to-centre extent passes too). **Distances**: minimum Euclidean distance
  between the masks in mm, exact (the closest pair lies on both boundaries: a k-d tree over boundary voxels in
  physical space); between voxel centres and between voxel boxes (voxels that share a corner touch) are both sound,
  so any value in [box gap, centre distance] is right, +- max(0.5 mm, 2 %). Only pairs >= 1 voxel (largest spacing)
  apart as boxes are asked. Thresholds ("within 10 mm?") >= max(3 mm, 1 voxel) from both. **Relative position**:
  centroids >= 15 mm apart along the direction and medians >= 10 mm. **Closer**: both conventions agree, the two
  distances >= max(5 mm, 1.5 voxels) apart. **Overlap**: yes when >= 10 voxels and >= 0.5 cm3 are shared, no when
  >= 1 voxel apart as boxes, else not asked.
- **Lists and counts**: every loaded structure with a voxel on the slice, by id (the lexicon's concept id, else
  ``name:<Name>``), compared as sets; slices where a structure shows 1-4 voxels are not asked. PTVs: loaded names
  starting "PTV". Image-only organ questions name a lateral organ by its pair ("the parotid": either side).
- **Presence margins**: with structures, a yes slice has >= 3 voxels and is not the structure's first or last slice,
  a no slice is >= 2 slices away; image-only (the model sees pixels) a yes slice shows >= 30 % of the structure's
  largest cross-section there, a no slice is >= 3 slices and 10 mm away.
- **Header**: slice thickness = spacing along the cranio-caudal index axis; pixel size [row, column] and field of
  view [width, height] of the slice's plane (axial when no slice) as the slice array is displayed (rows along k for
  coronal and sagittal); FOV and scan length = voxels x spacing (within one voxel); slice count along the slice's
  axis; dimensions [i, j, k].
- **Not answerable** (``answerable`` False; right when ``status`` is ``cannot_tell``): a structure that is not loaded,
  a structure question without structures, left/right on a sagittal slice (image-only, or on the screen).
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import PrismRTError
from ..imaging.geometry import same_grid
from . import lexicon
from .data import eval_wordings as W
from .types import CANNOT_TELL, CLARIFY, KINDS

CATEGORIES = ("organ", "position", "size", "quantity", "plane", "modality", "target", "header", "relations")
NEEDS = ("header", "structures", "image")
AXIS_NAMES = ("sagittal", "coronal", "axial")  # by ITK index axis i, j, k
PHYSICAL_PLANE = ("sagittal", "coronal", "axial")  # the plane normal to physical x, y, z
CATEGORY_OF_KIND = {
    "modality": "modality", "plane": "plane", "slice_thickness": "header", "pixel_size": "header",
    "field_of_view": "header", "scan_length": "header", "slice_count": "header", "dimensions": "header",
    "presence": "organ", "list": "organ", "count": "quantity", "volume": "size", "extent": "size",
    "laterality": "position", "relative_position": "position", "distance": "relations", "closer": "relations",
    "overlap": "relations",
}
_NOT_STRUCTURES = re.compile(r"^(ct|image|dose.*|.*_dose|possible_dose_mask)$", re.I)
DIRECTION_VECTORS = {"left": (0, 1.0), "right": (0, -1.0), "posterior": (1, 1.0), "anterior": (1, -1.0),
                     "superior": (2, 1.0), "inferior": (2, -1.0)}
OPPOSITE = {"left": "right", "right": "left", "anterior": "posterior", "posterior": "anterior",
            "superior": "inferior", "inferior": "superior"}
LONG_STRUCTURES = ("spinal_cord", "esophagus", "trachea", "brainstem")  # "how long is X" means cranio-caudal
MISSING_POOL = ("liver", "spleen", "bladder", "stomach", "kidney_left", "kidney_right", "heart", "mandible",
                "parotid_left", "brainstem", "larynx", "trachea", "aorta")
BODY_HU = -400.0
ECE_BINS = 10


# ---- cases -----------------------------------------------------------------------------------------------------------

def find_cases(paths) -> list[Path]:
    """Case folders (holding ``ct.nii.gz``); a folder of case folders is expanded, one level."""
    out = []
    for p in paths:
        p = Path(p)
        if (p / "ct.nii.gz").is_file():
            out.append(p)
        elif p.is_dir() and (subs := sorted(q for q in p.iterdir() if (q / "ct.nii.gz").is_file())):
            out += subs
        else:
            raise PrismRTError(f"{p} is not a case: give a folder holding ct.nii.gz and structure masks (beside it or "
                               "in masks/), or a folder of such folders")
    return list(dict.fromkeys(out))


def mask_files(folder: Path) -> list[Path]:
    """The structure masks of a case: ``*.nii.gz`` beside the CT and in ``masks/``, not the CT, not dose files."""
    folder = Path(folder)
    files = sorted(folder.glob("*.nii.gz")) + sorted((folder / "masks").glob("*.nii.gz"))
    return [f for f in files if not _NOT_STRUCTURES.match(_stem(f))]


def _stem(path: Path) -> str:
    name = Path(path).name
    return name[:-7] if name.endswith(".nii.gz") else Path(name).stem


def case_name(folder: Path) -> str:
    folder = Path(folder)
    return f"{folder.parent.name}/{folder.name}"


def structure_id(name: str) -> str:
    """The id a loaded structure goes by (the lexicon's concept id, else ``name:<Name>``); target names the lexicon
    misses (``GTV_Mass_CT``) are read by their prefix."""
    concept = lexicon.concept_of_name(name)
    if concept is not None:
        return concept
    m = re.match(r"(gtv|ctv|ptv)(?=[^a-z]|$)", name.strip().lower())
    return m.group(1) if m else f"name:{name}"


def _group(sid: str) -> str:
    concept = lexicon.CONCEPTS.get(sid)
    return concept.group if concept else "other"


@dataclass
class Structure:
    name: str  # file stem
    path: Path
    sid: str
    group: str  # organ, target, body, other
    lo: np.ndarray  # (k, j, i) of the crop's first voxel
    mask: np.ndarray  # bool, cropped to the bounding box
    voxels: int
    areas: tuple  # voxels per slice index along i, j, k (full length)
    _points: np.ndarray | None = field(default=None, repr=False)
    _boundary: np.ndarray | None = field(default=None, repr=False)

    @property
    def hi(self) -> np.ndarray:
        return self.lo + np.array(self.mask.shape)


class CaseData:
    """A case's header, body and masks (cropped), with the physical mapping the truths are computed in."""

    def __init__(self, folder: Path, image: sitk.Image | None = None, masks: dict | None = None):
        """``image``/``masks`` (name -> array (k, j, i) or sitk image) for synthetic cases; else read ``folder``."""
        self.folder = Path(folder)
        self.name = case_name(self.folder)
        self.notes: list[str] = []
        ct = image if image is not None else sitk.ReadImage(str(self.folder / "ct.nii.gz"))
        self.size = np.array(ct.GetSize())  # i, j, k
        self.spacing = np.array(ct.GetSpacing(), float)
        self.origin = np.array(ct.GetOrigin(), float)
        self.direction = np.array(ct.GetDirection(), float).reshape(3, 3)
        self.m = self.direction * self.spacing[None, :]  # p = origin + m @ (i, j, k)
        self.voxel_cc = float(np.prod(self.spacing)) / 1000.0
        # the index axis that runs cranio-caudally (largest z component of its direction column)
        self.z_axis = int(np.argmax(np.abs(self.direction[2])))
        self._body(sitk.GetArrayViewFromImage(ct))
        self.structures: dict[str, Structure] = {}
        if masks is None:
            masks = {}
            for path in mask_files(self.folder):
                masks[_stem(path)] = path
        for name, source in masks.items():
            self._add(name, source, ct)

    # -- geometry --------------------------------------------------------------------------------------------------
    def physical(self, kji: np.ndarray) -> np.ndarray:
        """LPS points (N, 3) of voxel indices (N, 3) given as (k, j, i)."""
        return self.origin + np.asarray(kji, float)[:, ::-1] @ self.m.T

    def plane_of_axis(self, axis: int) -> str | None:
        """The plane a slice normal to ITK index axis ``axis`` shows, from the direction matrix (None: oblique)."""
        column = np.abs(self.direction[:, axis])
        return PHYSICAL_PLANE[int(np.argmax(column))] if column.max() > 0.9 else None

    def _body(self, ct: np.ndarray) -> None:
        from scipy import ndimage

        step = tuple(max(1, int(n // 160)) for n in ct.shape)  # a coarse grid is enough for a centroid
        coarse = np.asarray(ct[::step[0], ::step[1], ::step[2]]) > BODY_HU
        labels, n = ndimage.label(coarse)
        self.body_slices = [np.zeros(int(v), bool) for v in self.size]  # slices (along i, j, k) cutting the body
        if n == 0:
            self.body_xz = np.zeros((0, 2))
            return
        sizes = np.bincount(labels.ravel())[1:]
        body = labels == 1 + int(np.argmax(sizes))
        for itk_axis in range(3):
            ax = 2 - itk_axis
            coarse_area = body.sum(axis=tuple(a for a in range(3) if a != ax))
            full = np.arange(int(self.size[itk_axis])) // step[ax]
            self.body_slices[itk_axis] = coarse_area[np.minimum(full, len(coarse_area) - 1)] >= 20
        kji = np.argwhere(body) * np.array(step)
        p = self.physical(kji)
        self.body_xz = p[:, [0, 2]]

    def _cut_at_sides(self, x: np.ndarray) -> bool:
        """Whether body voxels at ``x`` reach the field of view's left or right edge (a crop, or arms out of view):
        the body's centroid is then no midline."""
        corners = self.physical(np.array([[k, j, i] for k in (0, self.size[2] - 1) for j in (0, self.size[1] - 1)
                                          for i in (0, self.size[0] - 1)]))
        margin = 1.5 * float(np.abs(self.m[0]).max())
        return bool(x.min() <= corners[:, 0].min() + margin or x.max() >= corners[:, 0].max() - margin)

    def _add(self, name: str, source, ct: sitk.Image) -> None:
        if isinstance(source, (str, Path)):
            image = sitk.ReadImage(str(source))
            if not same_grid(image, ct):
                self.notes.append(f"{name}: not on the CT's grid, left out")
                return
            array = sitk.GetArrayViewFromImage(image) > 0
            path = Path(source)
        else:
            array = (sitk.GetArrayViewFromImage(source) if isinstance(source, sitk.Image) else np.asarray(source)) > 0
            path = self.folder / f"{name}.nii.gz"
        nz = [np.flatnonzero(array.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
        if not len(nz[0]):
            self.notes.append(f"{name}: empty, left out")
            return
        lo = np.array([v[0] for v in nz])
        hi = np.array([v[-1] + 1 for v in nz])
        mask = np.array(array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], bool)
        areas = []
        for itk_axis in range(3):  # i, j, k = numpy axes 2, 1, 0
            ax = 2 - itk_axis
            full = np.zeros(int(self.size[itk_axis]), int)
            full[lo[ax]:hi[ax]] = mask.sum(axis=tuple(a for a in range(3) if a != ax))
            areas.append(full)
        sid = structure_id(name)
        self.structures[name] = Structure(name, path, sid, _group(sid), lo, mask, int(mask.sum()), tuple(areas))

    # -- per-structure measures -----------------------------------------------------------------------------------
    def points(self, s: Structure) -> np.ndarray:
        if s._points is None:
            s._points = self.physical(np.argwhere(s.mask) + s.lo)
        return s._points

    def coarse_points(self, s: Structure, step: int = 3) -> np.ndarray:
        """Every ``step``-th voxel in-plane (a body contour has millions of voxels; a centroid needs few)."""
        return self.physical(np.argwhere(s.mask[:, ::step, ::step]) * np.array([1, step, step]) + s.lo)

    def boundary(self, s: Structure) -> np.ndarray:
        """LPS points of the voxels with a 6-neighbour outside the mask."""
        if s._boundary is None:
            from scipy import ndimage

            inner = ndimage.binary_erosion(np.pad(s.mask, 1), ndimage.generate_binary_structure(3, 1))[1:-1, 1:-1,
                                                                                                           1:-1]
            s._boundary = self.physical(np.argwhere(s.mask & ~inner) + s.lo)
        return s._boundary

    def volume_cc(self, s: Structure) -> float:
        return s.voxels * self.voxel_cc

    def z_extent(self, s: Structure) -> float:
        """Cranio-caudal extent in mm: slices spanned along the cranio-caudal index axis x its spacing."""
        spanned = np.flatnonzero(s.areas[self.z_axis])
        return float((spanned[-1] - spanned[0] + 1) * self.spacing[self.z_axis])

    def slice_points(self, s: Structure, axis: int, index: int) -> np.ndarray:
        ax = 2 - axis
        local = index - s.lo[ax]
        if not 0 <= local < s.mask.shape[ax]:
            return np.zeros((0, 3))
        plane = np.take(s.mask, local, axis=ax)
        kji = np.insert(np.argwhere(plane), ax, local, axis=1) + s.lo
        return self.physical(kji)

    def min_distance(self, a: Structure, b: Structure) -> float:
        """Minimum distance between voxel centres of a and b, mm (0 when they share a voxel)."""
        return self.distances(a, b)[0]

    def distances(self, a: Structure, b: Structure) -> tuple[float, float]:
        """(centre, gap): the minimum distance between voxel centres of a and b, and between their voxel boxes
        (per index axis ``max(|d| - spacing, 0)``: voxels sharing a face, edge or corner touch), mm; 0 when they
        overlap. Exact: the closest pair lies on both boundaries, the box gap is within a voxel diagonal of the
        centre distance, so every pair that could hold the smallest gap is looked at."""
        if self.overlap_voxels(a, b):
            return 0.0, 0.0
        from scipy.spatial import cKDTree

        pa, pb = self.boundary(a), self.boundary(b)
        small, big = (pa, pb) if len(pa) <= len(pb) else (pb, pa)
        tree = cKDTree(big)
        nearest, which = tree.query(small, k=1)
        centre = float(nearest.min())
        rotate = self.direction  # physical differences back onto the index axes (orthonormal)

        def gap(p, q):
            d = np.abs((np.atleast_2d(q) - np.atleast_2d(p)) @ rotate)
            return np.sqrt((np.maximum(d - self.spacing, 0.0) ** 2).sum(axis=1))

        n = int(np.argmin(nearest))
        best = float(gap(small[n], big[which[n]])[0])
        reach = best + float(np.linalg.norm(self.spacing)) + 1e-6
        for n in np.flatnonzero(nearest <= reach):
            near = tree.query_ball_point(small[n], reach)
            if near:
                best = min(best, float(gap(small[n], big[near]).min()))
        return centre, best

    def overlap_voxels(self, a: Structure, b: Structure) -> int:
        lo, hi = np.maximum(a.lo, b.lo), np.minimum(a.hi, b.hi)
        if np.any(hi <= lo):
            return 0
        sa = a.mask[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, a.lo))]
        sb = b.mask[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, b.lo))]
        return int(np.count_nonzero(sa & sb))

    # -- laterality ------------------------------------------------------------------------------------------------
    def midlines(self, points: np.ndarray, itself: Structure | None = None) -> list[float]:
        """Midline x estimates (mm) for a structure at ``points`` (``itself``: not its own centroid as one): see the
        module's conventions. Several estimates, so that a truth holds whichever a sound engine uses."""
        out = []
        z0, z1 = points[:, 2].min(), points[:, 2].max()
        inside = (self.body_xz[:, 1] >= z0) & (self.body_xz[:, 1] <= z1)
        level = self.body_xz[inside, 0]
        if len(level) < 50 or self._cut_at_sides(level):  # no whole body across at this level: no midline
            return out
        out.append(float(level.mean()))
        # the midpoint of the body's left-right extent, level by level
        z = self.body_xz[inside, 1]
        order = np.argsort(z, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(z[order]) != 0])
        lo, hi = np.minimum.reduceat(level[order], starts), np.maximum.reduceat(level[order], starts)
        out.append(float(np.median((lo + hi) / 2)))
        if not self._cut_at_sides(self.body_xz[:, 0]):
            out.append(float(self.body_xz[:, 0].mean()))
        for s in self.structures.values():
            if s.group == "body":
                p = self.coarse_points(s)
                level = p[(p[:, 2] >= z0) & (p[:, 2] <= z1), 0]
                if len(level) >= 50:
                    out.append(float(level.mean()))
            elif s.sid == "spinal_cord" and s is not itself:
                out.append(float(self.points(s)[:, 0].mean()))
        return out

    def structure_side(self, s: Structure) -> str | None:
        """:meth:`side` of a whole structure, its connected parts telling bilateral from straddling."""
        from scipy import ndimage

        labels, _ = ndimage.label(s.mask, np.ones((3, 3, 3), bool))
        return self.side(self.points(s), self.midlines(self.points(s), s), parts=labels[s.mask])

    def side(self, points: np.ndarray, midlines: list[float] | None = None, *, sides_only: bool = False,
             parts: np.ndarray | None = None) -> str | None:
        """``left``/``right``/``midline``/``bilateral`` by the rule in the module's conventions, or None when any
        midline estimate disagrees or the case is borderline (a single mass straddling the midline).
        ``parts``: each point's connected component, for ``bilateral``."""
        if len(points) == 0:
            return None
        midlines = self.midlines(points) if midlines is None else midlines
        if not midlines:
            return None
        x = points[:, 0]
        clear = max(15.0, 3.0 * float(np.abs(self.m[0]).max()))  # centroid this far out: one side, on any rule
        verdicts = set()
        for mid in midlines:
            left = float(np.mean(x > mid))
            offset = float(x.mean() - mid)
            if left >= 0.9 and offset >= clear:
                verdicts.add("left")
            elif left <= 0.1 and offset <= -clear:
                verdicts.add("right")
            elif not sides_only and abs(offset) <= 5 and np.abs(x - mid).max() <= 25:
                verdicts.add("midline")
            elif not sides_only and parts is not None and self._separate_sides(x - mid, parts):
                verdicts.add("bilateral")
            else:
                verdicts.add(None)
        return verdicts.pop() if len(verdicts) == 1 else None

    @staticmethod
    def _separate_sides(offset: np.ndarray, parts: np.ndarray) -> bool:
        """Separate parts on the two sides (each part wholly 5 mm or more off the midline, each side >= 20 %)."""
        left = right = 0
        for part in np.unique(parts):
            o = offset[parts == part]
            if o.min() >= 5:
                left += len(o)
            elif o.max() <= -5:
                right += len(o)
            else:
                return False  # a part across the midline: straddling, not bilateral
        return min(left, right) >= 0.2 * len(offset)

    # -- header ----------------------------------------------------------------------------------------------------
    def plane_axes(self, axis: int) -> tuple[int, int]:
        """(row axis, column axis) in ITK index terms of a slice normal to ``axis``, as the slice array is shown."""
        return {2: (1, 0), 1: (2, 0), 0: (2, 1)}[axis]


# ---- the question set ------------------------------------------------------------------------------------------------

def build_question_set(cases, seed: int = 0, max_per_case: int | None = None) -> list[dict]:
    """Questions with their exact answers for every case folder (see the module's conventions). Deterministic for
    a seed; each case's questions depend only on that case and the seed."""
    items = []
    for folder in find_cases(cases):
        items += questions_for_case(CaseData(folder), seed)
    items = balance_yes_no(items, seed)
    if max_per_case:
        items = cap_per_case(items, max_per_case, seed)
    return items


def questions_for_case(case: CaseData, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng([seed, zlib.crc32(case.name.encode())])
    items = _CaseQuestions(case, rng).build()
    for n, item in enumerate(items):
        item["id"] = f"{case.name}#{n:03d}"
    return items


def balance_yes_no(items: list[dict], seed: int = 0) -> list[dict]:
    """As many yes as no truths in each (category, needs) group of answerable closed items: the larger side is
    thinned at random, so always-yes scores 50 % there."""
    rng = np.random.default_rng(seed)
    groups = defaultdict(lambda: {True: [], False: []})
    for n, item in enumerate(items):
        if item["closed"] and item["answerable"] and isinstance(item["truth"], bool):
            groups[(item["category"], item["needs"])][item["truth"]].append(n)
    drop = set()
    for sides in groups.values():
        keep = min(len(sides[True]), len(sides[False]))
        for side in sides.values():
            if len(side) > keep:
                drop.update(rng.choice(side, len(side) - keep, replace=False).tolist())
    return [item for n, item in enumerate(items) if n not in drop]


def cap_per_case(items: list[dict], limit: int, seed: int = 0) -> list[dict]:
    """At most ``limit`` items per case, taken round-robin over (category, needs, truth) so the mix survives."""
    rng = np.random.default_rng(seed)
    by_case = defaultdict(list)
    for item in items:
        by_case[item["case"]].append(item)
    out = []
    for case_items in by_case.values():
        buckets = defaultdict(list)
        for item in case_items:
            buckets[(item["category"], item["needs"], repr(item["truth"]) if item["closed"] else "")].append(item)
        order = list(buckets.values())
        for b in order:
            rng.shuffle(b)
        rng.shuffle(order)
        chosen, depth = [], 0
        while len(chosen) < limit and any(depth < len(b) for b in order):
            chosen += [b[depth] for b in order if depth < len(b)]
            depth += 1
        keep = {id(i) for i in chosen[:limit]}
        out += [i for i in case_items if id(i) in keep]
    return out


class _CaseQuestions:
    def __init__(self, case: CaseData, rng: np.random.Generator):
        self.case, self.rng = case, rng
        self.items: list[dict] = []
        s = case.structures.values()
        self.named = [x for x in s if x.group in ("organ", "target") and x.sid in W.NAMES]
        self.organs = [x for x in self.named if x.group == "organ"]
        self.targets = [x for x in s if x.group == "target"]
        self.ids = {x.sid for x in s}
        self._distance: dict = {}

    # -- helpers ---------------------------------------------------------------------------------------------------
    def choice(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def sample(self, seq, n):
        seq = list(seq)
        if len(seq) <= n:
            return [seq[i] for i in self.rng.permutation(len(seq))]
        return [seq[i] for i in self.rng.choice(len(seq), n, replace=False)]

    def name(self, sid: str) -> str:
        return self.choice(W.NAMES[sid])

    def add(self, kind, group, truth, *, needs, slice=None, category=None, closed=False, answerable=True, unit=None,
            tolerance=None, structures=(), slots=None, left_right=False, only=None, note=""):
        templates = [t for t in W.TEMPLATES[group] if only is None or t[0] in only]
        wording, template = self.choice(templates)
        slots = dict(slots or {})
        text = {k: v for k, v in slots.items()}
        for key, sid in zip("abc", structures):
            text.setdefault(key, self.name(sid))
        if "rel" in slots:
            text["rel"] = self.choice(W.REL_WORDS[slots["rel"]])
        if "plane" in slots:
            text["plane"] = self.choice(W.PLANE_WORDS[slots["plane"]])
        if "modality" in slots:
            text["modality"] = self.choice(W.MODALITY_WORDS[slots["modality"]])
        question = template.format(**text)
        self.items.append({
            "id": None, "case": str(self.case.folder), "case_name": self.case.name, "question": question,
            "slice": slice, "kind": kind, "category": category or CATEGORY_OF_KIND[kind], "closed": closed,
            "needs": needs, "truth": _plain(truth), "unit": unit, "tolerance": tolerance, "answerable": answerable,
            "wording": wording, "slots": {k: v for k, v in slots.items() if k not in "abc"},
            "structures": list(structures), "left_right": left_right, "note": note,
        })

    def random_slice(self, axis=None) -> str:
        axis = int(self.rng.integers(3)) if axis is None else axis
        n = int(self.case.size[axis])
        lo, hi = int(0.1 * n), max(int(0.1 * n) + 1, int(0.9 * n))
        return f"{AXIS_NAMES[axis]}:{int(self.rng.integers(lo, hi))}"

    def presence_slices(self, areas: list, axis: int, strict: bool):
        """(yes index, no index) for structures with per-slice ``areas`` along ``axis``: yes where every one is
        present (with margin), no where none is near; None where there is none."""
        n = int(self.case.size[axis])
        if strict:  # image-only: clearly visible, clearly away
            gap = max(3, int(math.ceil(10.0 / self.case.spacing[axis])))
            yes = np.ones(n, bool)
            for a in areas:
                yes &= (a >= max(10, 0.3 * a.max()))
        else:
            gap = 2
            yes = np.ones(n, bool)
            for a in areas:
                occupied = np.flatnonzero(a)
                inner = np.zeros(n, bool)
                inner[occupied[0] + 1:occupied[-1]] = True
                yes &= inner & (a >= 3)
        near = np.zeros(n, bool)
        for a in areas:
            occupied = np.flatnonzero(a)
            near[max(0, occupied[0] - gap + 1):occupied[-1] + gap] = True
        no = ~near & self.case.body_slices[axis]  # through the patient, not the air around
        no[:1] = no[-1:] = False  # not the scan's first or last slice
        pick = lambda mask: int(self.choice(np.flatnonzero(mask))) if mask.any() else None  # noqa: E731
        return pick(yes), pick(no)

    def distance(self, a: Structure, b: Structure) -> tuple[float, float]:
        """(between voxel centres, between voxel boxes), mm."""
        key = tuple(sorted((a.name, b.name)))
        if key not in self._distance:
            self._distance[key] = self.case.distances(a, b)
        return self._distance[key]

    # -- the questions ---------------------------------------------------------------------------------------------
    def build(self) -> list[dict]:
        self.header()
        self.modality_and_plane()
        if self.case.structures:
            self.presence()
            self.lists_and_counts()
            self.sizes()
            self.laterality()
            self.relative_position()
            self.relations()
            self.image_only()
            self.unanswerable()
        return self.items

    def header(self):
        c, sp, size = self.case, self.case.spacing, self.case.size
        z = c.z_axis
        mm = {"rel": 0.01, "abs": 0.01}
        for sl in (None, self.random_slice(2)):
            self.add("slice_thickness", "slice_thickness", float(sp[z]), needs="header", slice=sl, unit="mm",
                     tolerance=mm)
        for axis in (2, int(self.choice([0, 1]))):
            sl = None if axis == 2 and self.rng.random() < 0.5 else self.random_slice(axis)
            row, col = c.plane_axes(axis)
            self.add("pixel_size", "pixel_size", [float(sp[row]), float(sp[col])], needs="header", slice=sl,
                     unit="mm", tolerance=mm)
        for axis in (2, int(self.choice([0, 1]))):
            sl = None if axis == 2 and self.rng.random() < 0.5 else self.random_slice(axis)
            row, col = c.plane_axes(axis)
            self.add("field_of_view", "field_of_view", [float(size[col] * sp[col]), float(size[row] * sp[row])],
                     needs="header", slice=sl, unit="mm",
                     tolerance={"rel": 0.01, "abs": float(max(sp[row], sp[col])) + 0.01})
        self.add("scan_length", "scan_length", float(size[z] * sp[z]), needs="header", unit="mm",
                 tolerance={"rel": 0.0, "abs": float(sp[z]) + 0.01})
        for axis in (2, int(self.choice([0, 1]))):
            sl = None if axis == 2 and self.rng.random() < 0.5 else self.random_slice(axis)
            # "how many images in this series" reads as axial; "in this view" needs a view
            only = (("sc1", "sc2", "sc3", "sc4", "sc5") if sl is None else None if axis == 2
                    else ("sc1", "sc3", "sc5", "sc6"))
            self.add("slice_count", "slice_count", int(size[axis]), needs="header", slice=sl,
                     tolerance={"rel": 0.0, "abs": 0.0}, only=only)
        self.add("dimensions", "dimensions", [int(v) for v in size], needs="header",
                 tolerance={"rel": 0.0, "abs": 0.0})

    def modality_and_plane(self):
        self.add("modality", "modality", "CT", needs="header", slice=self.random_slice())
        self.add("modality", "modality_polar", True, needs="header", closed=True, slice=self.random_slice(),
                 slots={"modality": "CT"})
        self.add("modality", "modality_polar", False, needs="header", closed=True, slice=self.random_slice(),
                 slots={"modality": self.choice(["MR", "PET"])})
        axes = [a for a in range(3) if self.case.plane_of_axis(a) == AXIS_NAMES[a]]
        if not axes:
            self.case.notes.append("no plane items: the index axes are not the anatomical ones")
            return
        for n in range(2):
            axis = int(self.choice(axes))
            self.add("plane", "plane", AXIS_NAMES[axis], needs="header", slice=self.random_slice(axis))
        for truth in (True, False):
            axis = int(self.choice(axes))
            named = AXIS_NAMES[axis] if truth else self.choice([p for p in AXIS_NAMES if p != AXIS_NAMES[axis]])
            self.add("plane", "plane_polar", truth, needs="header", closed=True, slice=self.random_slice(axis),
                     slots={"plane": named})

    def presence(self):
        organs = self.sample(self.organs, 4)
        targets = self.sample([s for s in self.named if s.group == "target"], 2)
        for s in organs + targets:
            axis = int(self.rng.integers(3))
            yes, no = self.presence_slices([s.areas[axis]], axis, strict=False)
            category = "target" if s.group == "target" else "organ"
            for truth, index in ((True, yes), (False, no)):
                if index is not None:
                    self.add("presence", "presence", truth, needs="structures", slice=f"{AXIS_NAMES[axis]}:{index}",
                             closed=True, structures=(s.sid,), category=category)
        if self.targets:  # "is there a target here?": every target present, or none near
            for axis in self.sample(range(3), 2):
                yes, no = self.presence_slices([t.areas[axis] for t in self.targets], axis, strict=False)
                for truth, index in ((True, yes), (False, no)):
                    if index is not None:
                        self.add("presence", "target_presence", truth, needs="structures", closed=True,
                                 slice=f"{AXIS_NAMES[axis]}:{index}", category="target", structures=())

    def clean_slice(self, axis: int, tries: int = 20):
        """A slice where every structure is clearly in (>= 5 voxels) or out, with at least two in."""
        for _ in range(tries):
            index = int(self.rng.integers(int(self.case.size[axis])))
            areas = [s.areas[axis][index] for s in self.case.structures.values()]
            if all(a == 0 or a >= 5 for a in areas) and sum(a > 0 for a in areas) >= 2:
                return index
        return None

    def on_slice(self, axis: int, index: int) -> list[str]:
        return sorted({s.sid for s in self.case.structures.values() if s.areas[axis][index] > 0})

    def lists_and_counts(self):
        exact = {"rel": 0.0, "abs": 0.0}
        for axis in self.sample(range(3), 2):
            index = self.clean_slice(axis)
            if index is not None:
                self.add("list", "list", self.on_slice(axis, index), needs="structures",
                         slice=f"{AXIS_NAMES[axis]}:{index}")
        ptvs = [s for s in self.case.structures.values() if s.name.lower().startswith("ptv")]
        if ptvs:
            self.add("count", "count_ptv", len(ptvs), needs="structures", tolerance=exact)
        self.add("count", "count_all", len(self.case.structures), needs="structures", tolerance=exact)
        axis = int(self.rng.integers(3))
        index = self.clean_slice(axis)
        if index is not None:
            self.add("count", "count_slice", len(self.on_slice(axis, index)), needs="structures", tolerance=exact,
                     slice=f"{AXIS_NAMES[axis]}:{index}")

    def sizes(self):
        for s in self.sample([s for s in self.named if self.case.volume_cc(s) >= 1.0], 3):
            self.add("volume", "volume", round(self.case.volume_cc(s), 4), needs="structures", unit="cm3",
                     tolerance={"rel": 0.02, "abs": 0.05}, structures=(s.sid,))
        z = self.case.z_axis
        for s in self.sample([s for s in self.named if np.count_nonzero(s.areas[z]) >= 3], 2):
            group = "extent_long" if s.sid in LONG_STRUCTURES and self.rng.random() < 0.5 else "extent"
            self.add("extent", group, round(self.case.z_extent(s), 3), needs="structures", unit="mm",
                     tolerance={"rel": 0.0, "abs": float(self.case.spacing[z]) + 0.01}, structures=(s.sid,))

    def sided(self):
        """(id, points, side) for named structures (and the generic target) whose side is clear."""
        out = []
        for s in self.named:
            side = self.case.structure_side(s)
            concept = lexicon.CONCEPTS.get(s.sid)
            if side == "midline" and s.group == "organ" and s.sid not in ("spinal_cord", "brainstem"):
                continue
            if side is not None and not (concept and concept.side and side != concept.side):
                out.append((s.sid, s, side))
        if self.targets:  # "the target": every target structure on the same side
            sides = {self.case.structure_side(t) for t in self.targets}
            if len(sides) == 1 and None not in sides:
                out.append(("target", None, sides.pop()))
        return out

    def laterality(self):
        sided = self.sided()
        lateral_first = sorted(sided, key=lambda x: (x[2] == "midline", self.rng.random()))
        for sid, _, side in lateral_first[:4]:
            self.add("laterality", "laterality", side, needs="structures", structures=(sid,), left_right=True,
                     category="target" if sid == "target" else None)
        clear = [x for x in sided if x[2] in ("left", "right")]
        for n, (sid, _, side) in enumerate(self.sample(clear, 2)):
            asked = side if n % 2 == 0 else OPPOSITE[side]
            self.add("laterality", "laterality_polar", asked == side, needs="structures", closed=True,
                     structures=(sid,), slots={"side": asked}, left_right=True,
                     category="target" if sid == "target" else None)
        # on the screen (radiological: the patient's left on the screen's right), on a slice through it
        for n, (sid, s, _) in enumerate(self.sample([x for x in clear if x[1] is not None], 2)):
            axis = int(self.choice([2, 1]))
            yes, _ = self.presence_slices([s.areas[axis]], axis, strict=False)
            if yes is None:
                continue
            pts = self.case.slice_points(s, axis, yes)
            side = self.case.side(pts, self.case.midlines(self.case.points(s), s), sides_only=True)
            if side is None:
                continue
            screen = OPPOSITE[side]
            asked = screen if n % 2 == 0 else side
            self.add("laterality", "laterality_screen", asked == screen, needs="structures", closed=True,
                     structures=(sid,), slots={"side": asked, "frame": "screen"}, left_right=True,
                     slice=f"{AXIS_NAMES[axis]}:{yes}")

    def relative_position(self):
        candidates = []
        pool = [s for s in self.named]
        for a in pool:
            for b in pool:
                if a is b:
                    continue
                pa, pb = self.case.points(a), self.case.points(b)
                for direction, (axis, sign) in DIRECTION_VECTORS.items():
                    d = sign * (pa[:, axis].mean() - pb[:, axis].mean())
                    dm = sign * (np.median(pa[:, axis]) - np.median(pb[:, axis]))
                    if d >= 15 and dm >= 10:
                        candidates.append((a, b, direction))
        sideways = [c for c in candidates if c[2] in ("left", "right")]
        chosen = self.sample(sideways, 2) + self.sample([c for c in candidates if c[2] not in ("left", "right")], 2)
        for n, (a, b, direction) in enumerate(chosen):
            asked = direction if n % 2 == 0 else OPPOSITE[direction]
            self.add("relative_position", "relative_position", asked == direction, needs="structures", closed=True,
                     structures=(a.sid, b.sid), slots={"rel": asked}, left_right=asked in ("left", "right"))

    def relations(self):
        c = self.case
        voxel = float(c.spacing.max())
        pairs = [(a, b) for n, a in enumerate(self.named) for b in self.named[n + 1:]]
        pairs = self.sample(pairs, 12)  # distances cost a k-d tree each: look at a few
        far = [(a, b, *self.distance(a, b)) for a, b in pairs]
        apart = [(a, b, d, g) for a, b, d, g in far if g >= voxel]  # clearly apart under either convention
        for a, b, d, g in self.sample(apart, 2):
            if self.rng.random() < 0.5:
                a, b = b, a
            # voxel centres or voxel boxes: both sound, both accepted (and 2 % / 0.5 mm beyond)
            self.add("distance", "distance", round(d, 3), needs="structures", unit="mm", structures=(a.sid, b.sid),
                     tolerance={"rel": 0.02, "abs": 0.5, "low": round(g, 3), "high": round(d, 3)},
                     note=f"voxel centres {d:.1f} mm, voxel boxes {g:.1f} mm")
        for n, (a, b, d, g) in enumerate(self.sample(apart, 2)):
            fits = [t for t in (5, 10, 15, 20, 30, 50, 80) if min(abs(t - d), abs(t - g)) >= max(3.0, voxel)
                    and (t > d) == (t > g)]
            want = [t for t in fits if (t > d) == (n % 2 == 0)] or fits
            if want:
                t = self.choice(want)
                self.add("distance", "distance_threshold", bool(d <= t), needs="structures", closed=True,
                         structures=(a.sid, b.sid), slots={"t": t}, note=f"distance {g:.1f}-{d:.1f} mm")
        # closer: left/right pairs first ("which parotid is closer to PTV70?"), else any two
        lateral = defaultdict(dict)
        for s in self.named:
            concept = lexicon.CONCEPTS.get(s.sid)
            if concept and concept.paired:
                lateral[concept.paired][concept.side] = s
        triples = []
        for group, sides in lateral.items():
            if len(sides) == 2:
                for ref in self.named:
                    if ref not in sides.values():
                        triples.append((sides["left"], sides["right"], ref, group))
        others = [(a, b, ref, None) for a, b in pairs for ref in self.named if ref is not a and ref is not b]
        triples = self.sample(triples, 6) + self.sample(others, 6)
        made = 0
        for a, b, ref, group in triples:
            if made >= 2:
                break
            (da, ga), (db, gb) = self.distance(a, ref), self.distance(b, ref)
            margin = max(5.0, 1.5 * voxel)
            if abs(da - db) < margin or abs(ga - gb) < margin or (da < db) != (ga < gb):
                continue
            truth = a.sid if da < db else b.sid
            if group is not None and self.rng.random() < 0.7:
                self.add("closer", "closer_paired", truth, needs="structures", structures=(ref.sid,),
                         slots={"group": group, "c": self.name(ref.sid)}, note=f"{da:.1f} vs {db:.1f} mm")
            else:
                if self.rng.random() < 0.5:
                    a, b = b, a
                self.add("closer", "closer", truth, needs="structures", structures=(a.sid, b.sid, ref.sid),
                         note=f"{da:.1f} vs {db:.1f} mm")
            made += 1
        overlapping, disjoint = [], []
        for n, a in enumerate(self.named):
            for b in self.named[n + 1:]:
                shared = c.overlap_voxels(a, b)
                if shared >= 10 and shared * c.voxel_cc >= 0.5:
                    overlapping.append((a, b))
                elif shared == 0:
                    disjoint.append((a, b))
        separate = [(a, b) for a, b in self.sample(disjoint, 6) if self.distance(a, b)[1] >= voxel]
        for truth, chosen in ((True, self.sample(overlapping, 2)), (False, self.sample(separate, 2))):
            for a, b in chosen:
                self.add("overlap", "overlap", truth, needs="structures", closed=True, structures=(a.sid, b.sid))

    def image_only(self):
        """Organ visibility and target presence from the pixels alone (no structure set given)."""
        groups = defaultdict(list)  # a lateral organ is asked as its pair ("the parotid"): sides are not pixels'
        for s in self.organs:
            concept = lexicon.CONCEPTS.get(s.sid)
            groups[concept.paired if concept and concept.paired else s.sid].append(s)
        groups = {k: v for k, v in groups.items() if k in W.NAMES}
        axes = list(self.rng.permutation(3))
        for n, sid in enumerate(self.sample(list(groups), 4)):
            axis = int(axes[n % 3])
            union = [np.sum([s.areas[axis] for s in groups[sid]], axis=0)]
            yes, no = self.presence_slices(union, axis, strict=True)
            for truth, index in ((True, yes), (False, no)):
                if index is not None:
                    self.add("presence", "presence", truth, needs="image", closed=True, structures=(sid,),
                             slice=f"{AXIS_NAMES[axis]}:{index}")
        if self.targets:
            for axis in self.sample(range(3), 2):
                yes, no = self.presence_slices([t.areas[axis] for t in self.targets], axis, strict=True)
                for truth, index in ((True, yes), (False, no)):
                    if index is not None:
                        self.add("presence", "target_presence", truth, needs="image", closed=True, category="target",
                                 slice=f"{AXIS_NAMES[axis]}:{index}")

    def unanswerable(self):
        missing = [m for m in MISSING_POOL if m not in self.ids and lexicon.CONCEPTS[m].paired not in self.ids
                   and not any(lexicon.CONCEPTS.get(i) and lexicon.CONCEPTS[i].paired == m for i in self.ids)]
        if missing and self.named:
            m, other = self.choice(missing), self.choice(self.named)
            kind = self.choice(["volume", "distance", "overlap"])
            why = f"no {m} contour is loaded"
            if kind == "volume":
                self.add("volume", "volume", None, needs="structures", structures=(m,), note=why, answerable=False)
            elif kind == "distance":
                self.add("distance", "distance", None, needs="structures", structures=(m, other.sid), note=why,
                         answerable=False)
            else:
                self.add("overlap", "overlap", None, needs="structures", closed=True, structures=(other.sid, m),
                         note=why, answerable=False)
        unsided = [s for s in self.named if not (lexicon.CONCEPTS.get(s.sid) and lexicon.CONCEPTS[s.sid].side)]
        if self.named:
            s = self.choice(self.named)
            self.add("volume", "volume", None, needs="image", structures=(s.sid,), answerable=False,
                     note="no structure set: a volume needs a contour")
            if len(self.named) >= 2:
                a, b = self.sample(self.named, 2)
                self.add("distance", "distance", None, needs="image", structures=(a.sid, b.sid), answerable=False,
                         note="no structure set: a distance needs contours")
        for s in self.sample(unsided, len(unsided)):  # left/right on a sagittal slice (a name with no side in it)
            yes, _ = self.presence_slices([s.areas[0]], 0, strict=False)
            if yes is not None:
                self.add("laterality", "laterality", None, needs="image", structures=(s.sid,), answerable=False,
                         slice=f"sagittal:{yes}", note="image only, sagittal slice: no left/right in it",
                         left_right=True)
                self.add("laterality", "laterality_screen", None, needs="structures", closed=True,
                         structures=(s.sid,), slots={"side": self.choice(["left", "right"]), "frame": "screen"},
                         slice=f"sagittal:{yes}", answerable=False, left_right=True,
                         note="a sagittal screen's left/right is not the patient's left/right")
                break
        if any(s.name.lower().startswith("ptv") for s in self.case.structures.values()):
            self.add("count", "count_ptv", None, needs="image", answerable=False,
                     note="no structure set: PTVs are contours, not pixels")


def _plain(value):
    """JSON-safe python values (numpy scalars and arrays out)."""
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# ---- scoring ---------------------------------------------------------------------------------------------------------

_LENGTH_MM = {"mm": 1.0, "millimetre": 1.0, "millimeter": 1.0, "cm": 10.0, "centimetre": 10.0, "centimeter": 10.0,
              "m": 1000.0, "metre": 1000.0, "meter": 1000.0}
_VOLUME_CC = {"cm3": 1.0, "cm³": 1.0, "cc": 1.0, "ml": 1.0, "millilitre": 1.0, "milliliter": 1.0, "mm3": 1e-3,
              "mm³": 1e-3, "l": 1000.0, "litre": 1000.0, "liter": 1000.0, "dm3": 1000.0}


def _convert(value, unit: str | None, want: str | None):
    """``value`` given in ``unit`` expressed in ``want`` (mm or cm3); unchanged when either is unknown."""
    if unit is None or want is None:
        return value
    unit = str(unit).strip().lower()
    table = _LENGTH_MM if want == "mm" else _VOLUME_CC if want == "cm3" else {}
    if unit not in table or want not in table:
        return value
    factor = table[unit] / table[want]
    if isinstance(value, (list, tuple)):
        return [v * factor if _is_number(v) else v for v in value]
    return value * factor if _is_number(value) else value


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _close(v, t, tol) -> bool:
    """Within ``max(abs, rel * |truth|)`` of the truth, or of the interval [low, high] when the tolerance gives one
    (a truth that two sound conventions put at two values, e.g. distances between voxel centres or voxel boxes)."""
    tol = tol or {"rel": 0.0, "abs": 1e-9}
    if not _is_number(v) or not math.isfinite(float(v)):
        return False
    v, t = float(v), float(t)
    lo, hi = float(tol.get("low", t)), float(tol.get("high", t))
    slack = max(float(tol.get("abs", 0.0)), float(tol.get("rel", 0.0)) * abs(t)) + 1e-9
    return lo - slack <= v <= hi + slack


def value_matches(truth, value, tolerance=None, unit=None, answer_unit=None) -> bool:
    """Bools equal; strings equal (case-insensitive); numbers within tolerance (``max(abs, rel * |truth|)``, after
    converting the answer's unit to the truth's); lists of names as sets, lists of numbers element by element."""
    if isinstance(truth, bool):
        return isinstance(value, (bool, np.bool_)) and bool(value) == truth
    if isinstance(truth, str):
        return isinstance(value, str) and value.strip().lower() == truth.strip().lower()
    value = _convert(_plain(value), answer_unit, unit)
    if _is_number(truth):
        return _close(value, truth, tolerance)
    if isinstance(truth, list):
        if not isinstance(value, (list, tuple)):
            return False
        if all(isinstance(t, str) for t in truth):
            return (all(isinstance(v, str) for v in value)
                    and {v.strip().lower() for v in value} == {t.lower() for t in truth})
        return len(value) == len(truth) and all(_close(v, t, tolerance) for v, t in zip(value, truth))
    return False


def is_correct(item: dict, answer) -> bool:
    """An answer (an :class:`.types.Answer` or its dict) scored against an item: unanswerable items are right when
    the chat says it cannot tell; answerable ones when it answered and the value matches."""
    get = (lambda k: answer.get(k)) if isinstance(answer, dict) else (lambda k: getattr(answer, k, None))
    if not item["answerable"]:
        return get("status") == CANNOT_TELL
    if get("status") != "answered":
        return False
    return value_matches(item["truth"], get("value"), item.get("tolerance"), item.get("unit"), get("unit"))


def expected_calibration_error(confidences, correct, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of (share of answers in the bin) x |accuracy - mean confidence|."""
    return reliability(confidences, correct, bins)["ece"]


def reliability(confidences, correct, bins: int = ECE_BINS) -> dict:
    conf = np.clip(np.asarray(confidences, float), 0.0, 1.0)
    ok = np.asarray(correct, float)
    if len(conf) == 0:
        return {"ece": float("nan"), "bins": []}
    which = np.minimum((conf * bins).astype(int), bins - 1)  # 1.0 goes in the last bin
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        acc, mean = float(ok[sel].mean()), float(conf[sel].mean())
        ece += sel.mean() * abs(acc - mean)
        rows.append({"bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}", "n": int(sel.sum()), "confidence": mean,
                     "accuracy": acc})
    return {"ece": float(ece), "bins": rows}


# ---- the evaluation --------------------------------------------------------------------------------------------------

def evaluate(items: list[dict], session_factory, progress=None) -> dict:
    """Ask every item and score it. ``session_factory(case_folder, with_structures)`` returns an object with
    ``ask(question, slice) -> Answer``; it is called once per case and setting (items with ``needs`` "structures"
    get the structure set, the others not). ``progress(done, total)`` after each item."""
    order = sorted(range(len(items)), key=lambda n: (items[n]["case"], items[n]["needs"] == "structures",
                                                      str(items[n]["slice"])))
    rows: list[dict | None] = [None] * len(items)
    sessions: dict = {}
    setup_s: dict = defaultdict(float)  # building sessions (reading masks) is not any one answer's time
    current = None
    for done, n in enumerate(order, 1):
        item = items[n]
        if item["case"] != current:  # one case's sessions at a time (memory)
            sessions, current = {}, item["case"]
        with_structures = item["needs"] == "structures"
        answer, error, seconds = None, None, 0.0
        try:
            if with_structures not in sessions:
                start = time.perf_counter()
                sessions[with_structures] = session_factory(item["case"], with_structures)
                setup_s[item["case_name"]] += time.perf_counter() - start
            start = time.perf_counter()
            answer = sessions[with_structures].ask(item["question"], item["slice"])
        except Exception as exc:  # a crash is a wrong answer, reported, not the end of the run
            error = f"{type(exc).__name__}: {exc}"
        else:
            seconds = time.perf_counter() - start
        rows[n] = _row(item, answer, error, seconds)
        if progress is not None:
            progress(done, len(items))
    return {"items": len(items), "cases": sorted({i["case_name"] for i in items}), "rows": rows,
            "metrics": metrics(rows), "baselines": baselines(rows), "session_setup_s": dict(setup_s)}


def _row(item: dict, answer, error, seconds) -> dict:
    a = answer.to_dict() if hasattr(answer, "to_dict") else (dict(answer) if isinstance(answer, dict) else {})
    row = {k: item[k] for k in ("id", "case_name", "category", "kind", "needs", "closed", "answerable", "left_right",
                                "wording", "slots", "structures", "question", "slice", "truth", "unit", "tolerance",
                                "note")}
    row.update(answer=a.get("answer"), value=_plain(a.get("value")), answer_unit=a.get("unit"),
               status=a.get("status", "error" if error else None), confidence=_confidence(a.get("confidence")),
               source=a.get("source"), answer_kind=a.get("kind"), error=error, seconds=round(seconds, 4),
               correct=bool(answer is not None and is_correct(item, a)))
    return row


def _confidence(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _acc(rows) -> float:
    return float(np.mean([r["correct"] for r in rows])) if rows else float("nan")


def groups_of(rows) -> dict[str, list]:
    """The report's row groups, in order."""
    out = {"overall": list(rows),
           "with structures": [r for r in rows if r["needs"] == "structures"],
           "header (no structures)": [r for r in rows if r["needs"] == "header"],
           "image only (no structures)": [r for r in rows if r["needs"] == "image"],
           "image only, from the pixels": [r for r in rows if r["needs"] == "image" and r["answerable"]],
           "closed (yes/no)": [r for r in rows if r["closed"]],
           "open": [r for r in rows if not r["closed"]],
           "left/right items": [r for r in rows if r["left_right"]],
           "answerable": [r for r in rows if r["answerable"]],
           "not answerable (cannot tell)": [r for r in rows if not r["answerable"]]}
    for c in CATEGORIES:
        out[f"category: {c}"] = [r for r in rows if r["category"] == c]
    return {k: v for k, v in out.items() if v}


def metrics(rows: list[dict]) -> dict:
    confident = [r for r in rows if r["confidence"] is not None]
    answerable = [r for r in rows if r["answerable"]]
    status = Counter(r["status"] for r in rows)
    return {
        "accuracy": {name: {"n": len(g), "accuracy": _acc(g)} for name, g in groups_of(rows).items()},
        "by_kind": {k: {"n": len(g), "accuracy": _acc(g),
                        "confidence": float(np.mean([r["confidence"] or 0.0 for r in g])),
                        "median_s": float(np.median([r["seconds"] for r in g]))}
                    for k in KINDS if (g := [r for r in rows if r["kind"] == k])},
        "calibration": {
            "overall": reliability([r["confidence"] for r in confident], [r["correct"] for r in confident]),
            **{needs: reliability([r["confidence"] for r in g], [r["correct"] for r in g])
               for needs in NEEDS if (g := [r for r in confident if r["needs"] == needs])}},
        "coverage": {
            "answered": sum(r["status"] == "answered" for r in rows) / len(rows) if rows else float("nan"),
            "answered_of_answerable": (sum(r["status"] == "answered" for r in answerable) / len(answerable)
                                       if answerable else float("nan")),
            "status": dict(status),
            "unparsed": sum(r["source"] == "parser" and r["status"] == CANNOT_TELL and r["answerable"]
                            for r in rows),
            "clarify": status.get(CLARIFY, 0),
            "errors": sum(r["error"] is not None for r in rows),
            "without_source": sum(not r["source"] for r in rows if r["error"] is None),
            "without_confidence": sum(r["confidence"] is None for r in rows if r["error"] is None),
            "sources": dict(Counter(r["source"] for r in rows if r["source"])),
        },
    }


# ---- baselines -------------------------------------------------------------------------------------------------------

_CANNOT = ("cannot tell",)


def _key(value):
    """A hashable form of a truth (numbers rounded), for majority votes."""
    if value is None:
        return _CANNOT
    if isinstance(value, bool):
        return ("bool", value)  # True is not the count 1
    if isinstance(value, list):
        return tuple(sorted(_key(v) for v in value)) if all(isinstance(v, str) for v in value) else tuple(
            _key(v) for v in value)
    if _is_number(value) and not isinstance(value, int):
        return round(float(value), 1)
    return value


def _majority_loco(rows, group_of) -> list:
    """Per row, the most frequent truth of its group among the other cases' rows (leave one case out, so a row
    never votes for itself); the row's own case's votes only where no other case has the group."""
    total, per_case, example = defaultdict(Counter), defaultdict(Counter), {}
    for r in rows:
        g, k = group_of(r), _key(r["truth"] if r["answerable"] else None)
        total[g][k] += 1
        per_case[(g, r["case_name"])][k] += 1
        example.setdefault((g, k), r["truth"] if r["answerable"] else None)
    out = []
    for r in rows:
        g = group_of(r)
        votes = total[g] - per_case[(g, r["case_name"])]
        if not votes:
            votes = total[g]
        best = max(votes.items(), key=lambda kv: (kv[1], repr(kv[0])))[0]  # ties: a fixed order
        out.append((best, example[(g, best)]))
    return out


def _baseline_correct(row, prediction) -> bool:
    key, value = prediction
    if not row["answerable"]:
        return key == _CANNOT
    return key != _CANNOT and value_matches(row["truth"], value, row["tolerance"], row["unit"], row["unit"])


def baselines(rows: list[dict]) -> dict:
    """Trivial answers scored like the chat's, per row group: always yes (closed items only), the majority truth per
    kind, and a question-only model (majority truth per kind, wording and the non-structure words it names: the
    plane, side, direction, modality, threshold), both voted leave-one-case-out."""
    per_kind = _majority_loco(rows, lambda r: r["kind"])
    question_only = _majority_loco(rows, lambda r: (r["kind"], r["wording"], json.dumps(r["slots"], sort_keys=True)))
    marks = {
        "always yes": [(r["truth"] is True if r["answerable"] else False) if r["closed"] else None for r in rows],
        "majority per kind": [_baseline_correct(r, p) for r, p in zip(rows, per_kind)],
        "question only": [_baseline_correct(r, p) for r, p in zip(rows, question_only)],
    }
    out = {}
    for name, flags in marks.items():
        index = {id(r): f for r, f in zip(rows, flags)}
        out[name] = {}
        for group, g in groups_of(rows).items():
            scored = [index[id(r)] for r in g if index[id(r)] is not None]
            out[name][group] = {"n": len(scored), "accuracy": float(np.mean(scored)) if scored else float("nan")}
    return out


# ---- the report ------------------------------------------------------------------------------------------------------

def _pct(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f} %"


def _short(value, width=60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return (text if len(text) <= width else text[:width - 1] + "…").replace("|", "\\|").replace("\n", " ")


def must_show(results: dict) -> list[tuple[str, str, str, bool]]:
    """(criterion, measured, required, passed) for issue #15's bar."""
    acc = results["metrics"]["accuracy"]
    cal = results["metrics"]["calibration"]
    cov = results["metrics"]["coverage"]
    rows = results["rows"]

    def a(name):
        return acc.get(name, {}).get("accuracy", float("nan"))

    header_rows = [r for r in rows if r["category"] in ("header",)]
    out = [("accuracy with the structure set given", _pct(a("with structures")), ">= 98 %",
            a("with structures") >= 0.98),
           ("header items", _pct(_acc(header_rows)), "100 %", bool(header_rows) and _acc(header_rows) == 1.0),
           ("left/right items", _pct(a("left/right items")), "100 %", a("left/right items") == 1.0),
           ("image-only items (visibility, target presence)", _pct(a("image only, from the pixels")), ">= 75 %",
            a("image only, from the pixels") >= 0.75),
           ("expected calibration error (overall)", f"{cal['overall']['ece']:.3f}", "<= 0.05",
            cal["overall"]["ece"] <= 0.05),
           ("unparsed answers on answerable items", str(cov["unparsed"]), "0", cov["unparsed"] == 0),
           ("answers without a source or a confidence", str(cov["without_source"] + cov["without_confidence"]),
            "0", cov["without_source"] + cov["without_confidence"] == 0),
           ("crashes", str(cov["errors"]), "0", cov["errors"] == 0)]
    return out


def results_markdown(results: dict) -> str:
    m, b, rows = results["metrics"], results["baselines"], results["rows"]
    lines = ["# Chat evaluation (`prismrt eval-ask`)", ""]
    if results.get("command"):
        lines += ["```bash", results["command"], "```", ""]
    lines += [f"{results['items']} questions on {len(results['cases'])} cases"
              + (f", image model backend `{results['backend']}`" if results.get("backend") else "") + ". Answers "
              "computed from the masks and headers (numpy, SimpleITK), not by the chat's engines; conventions in "
              "`PRISMRTLib/chat/evaluation.py`.", ""]
    lines += ["## Issue #15's bar", "", "| criterion | measured | required | |", "|---|---|---|---|"]
    lines += [f"| {c} | {v} | {req} | {'pass' if ok else '**FAIL**'} |" for c, v, req, ok in must_show(results)]
    lines += ["", "## Accuracy, beside the trivial baselines", "",
              "Always yes is scored on the group's yes/no items only (its n in brackets); the majority per kind and "
              "the question-only baseline (majority truth per kind and wording, seeing the question but not the "
              "image) are voted leave-one-case-out. An unanswerable item is right when the reply is \"I cannot "
              "tell\".", "",
              "| group | n | PRISM-RT chat | always yes | majority per kind | question only |",
              "|---|---|---|---|---|---|"]
    for group, v in m["accuracy"].items():
        ay = b["always yes"][group]
        always = f"{_pct(ay['accuracy'])} ({ay['n']})" if ay["n"] else "-"
        lines.append(f"| {group} | {v['n']} | **{_pct(v['accuracy'])}** | {always} | "
                     f"{_pct(b['majority per kind'][group]['accuracy'])} | "
                     f"{_pct(b['question only'][group]['accuracy'])} |")
    lines += ["", "## Per kind", "", "| kind | n | accuracy | mean confidence | median s |", "|---|---|---|---|---|"]
    for kind, v in m["by_kind"].items():
        lines.append(f"| {kind} | {v['n']} | {_pct(v['accuracy'])} | {v['confidence']:.2f} | {v['median_s']:.3f} |")
    lines += ["", "## Calibration", "",
              f"Expected calibration error ({ECE_BINS} equal-width bins of `confidence` against correctness):", "",
              "| answers | n | ECE |", "|---|---|---|"]
    for name, cal in m["calibration"].items():
        lines.append(f"| {name} | {sum(x['n'] for x in cal['bins'])} | {cal['ece']:.3f} |")
    lines += ["", "Reliability (all answers):", "", "| confidence | n | mean confidence | accuracy |",
              "|---|---|---|---|"]
    lines += [f"| {x['bin']} | {x['n']} | {x['confidence']:.3f} | {_pct(x['accuracy'])} |"
              for x in m["calibration"]["overall"]["bins"]]
    cov = m["coverage"]
    lines += ["", "## Coverage", "",
              f"- answered: {_pct(cov['answered'])} of all items, {_pct(cov['answered_of_answerable'])} of the "
              "answerable ones",
              "- status: " + ", ".join(f"{k} {v}" for k, v in sorted(cov["status"].items(), key=str)),
              f"- unparsed (answerable, the parser gave up): {cov['unparsed']}; clarifying replies: {cov['clarify']}; "
              f"crashes: {cov['errors']}; without source: {cov['without_source']}; without confidence: "
              f"{cov['without_confidence']}",
              "- sources: " + ", ".join(f"`{k}` {v}" for k, v in sorted(cov["sources"].items()))]
    wrong = sorted((r for r in rows if not r["correct"]), key=lambda r: -(r["confidence"] or 0.0))
    lines += ["", f"## Wrong answers, most confident first ({len(wrong)} wrong; 25 shown)", "",
              "| id | question | slice | truth | value | status | confidence | source |",
              "|---|---|---|---|---|---|---|---|"]
    for r in wrong[:25]:
        shown = r["value"] if r["error"] is None else r["error"]
        lines.append(f"| {r['id']} | {_short(r['question'])} | {r['slice'] or ''} | {_short(r['truth'], 30)} | "
                     f"{_short(shown, 40)} | {r['status']} | {(r['confidence'] or 0):.2f} | {r['source'] or ''} |")
    wordings = defaultdict(list)
    for r in rows:
        wordings[r["wording"]].append(r)
    templates = {i: t for group in W.TEMPLATES.values() for i, t in group}
    worst = sorted((w for w in wordings.items() if len(w[1]) >= 5), key=lambda w: _acc(w[1]))[:12]
    lines += ["", "## Wordings with the lowest accuracy (5 items or more)", "",
              "| wording | template | n | accuracy |", "|---|---|---|---|"]
    lines += [f"| {w} | {_short(templates.get(w, ''), 70)} | {len(g)} | {_pct(_acc(g))} |" for w, g in worst]
    slow = sorted(rows, key=lambda r: -r["seconds"])[:10]
    lines += ["", "## Slowest answers", "", "| id | question | slice | s | source |", "|---|---|---|---|---|"]
    lines += [f"| {r['id']} | {_short(r['question'])} | {r['slice'] or ''} | {r['seconds']:.2f} | "
              f"{r['source'] or ''} |" for r in slow]
    lines += ["", "## The question set", "", question_set_table(rows)]
    return "\n".join(lines) + "\n"


def question_set_summary(items) -> dict:
    """Items per category and needs, and the yes/no balance of the answerable closed ones."""
    table = defaultdict(Counter)
    balance = defaultdict(Counter)
    for i in items:
        table[i["category"]][i["needs"]] += 1
        if i["closed"] and i["answerable"]:
            balance[i["category"]]["yes" if i["truth"] else "no"] += 1
    return {"items": len(items), "per_category": {c: dict(table[c]) for c in CATEGORIES if c in table},
            "yes_no": {c: dict(balance[c]) for c in CATEGORIES if c in balance},
            "not_answerable": sum(not i["answerable"] for i in items),
            "wordings": len({i["wording"] for i in items})}


def question_set_table(items) -> str:
    s = question_set_summary(items)
    lines = ["| category | with structures | header | image only | yes / no |", "|---|---|---|---|---|"]
    for c, per in s["per_category"].items():
        yn = s["yes_no"].get(c, {})
        lines.append(f"| {c} | {per.get('structures', 0)} | {per.get('header', 0)} | {per.get('image', 0)} | "
                     f"{yn.get('yes', 0)} / {yn.get('no', 0)} |")
    lines.append(f"\n{s['items']} items, {s['not_answerable']} of them not answerable, {s['wordings']} wordings.")
    return "\n".join(lines)


def write_report(results: dict, out_dir) -> None:
    """``results.json`` (everything, with one row per item) and ``results.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": results.get("command", ""), **{k: v for k, v in results.items() if k != "command"},
               "must_show": [{"criterion": c, "measured": v, "required": r, "passed": bool(ok)}
                             for c, v, r, ok in must_show(results)],
               "question_set": question_set_summary(results["rows"])}
    (out / "results.json").write_text(json.dumps(_plain(payload), indent=1, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(results))


# ---- the real chat ---------------------------------------------------------------------------------------------------

class ChatSessionFactory:
    """Real sessions for :func:`evaluate`: one CT and structure set per case (the last case only is kept), one image
    model shared by every session (it is built once, on first need)."""

    def __init__(self, backend: str = "auto", device: str = "auto", model: str | None = None):
        self.backend, self.device, self.model = backend or "auto", device, model
        self._case = None
        self._image = None
        self._structures = None
        self._model = None
        self._model_error: PrismRTError | None = None

    def image_model(self):
        if self._model_error is not None:  # failed once: do not rebuild per session
            raise self._model_error
        if self._model is None:
            from .engines.image import ImageModelEngine

            try:
                self._model = ImageModelEngine.default(device=self.device, backend=self.backend, model=self.model)
            except PrismRTError as exc:
                self._model_error = exc
                raise
        return self._model

    def __call__(self, case: str, with_structures: bool):
        from .session import ChatSession
        from .structures import StructureSet

        if case != self._case:
            self._case, self._structures = case, None
            self._image = sitk.ReadImage(str(Path(case) / "ct.nii.gz"))
        structures = None
        if with_structures:
            if self._structures is None:
                paths = [p for p in mask_files(Path(case)) if _usable_mask(p, self._image)]
                self._structures = StructureSet.from_files(paths, self._image)
            structures = self._structures
        return ChatSession(self._image, structures, image_model_factory=self.image_model)


def _usable_mask(path: Path, image: sitk.Image) -> bool:
    """The masks :class:`CaseData` keeps (on the CT's grid, not empty), so truths and sessions see one set."""
    mask = sitk.ReadImage(str(path))
    return same_grid(mask, image) and bool(np.any(sitk.GetArrayViewFromImage(mask) > 0))


def run_eval(case_dirs, out, *, backend: str = "auto", max_per_case: int | None = None, progress=None,
             seed: int = 0, command: str | None = None, device: str = "auto", model: str | None = None) -> dict:
    """build_question_set -> evaluate with the real chat -> write_report; returns the results. ``backend``,
    ``device`` and ``model`` choose the image model (:meth:`.engines.image.ImageModelEngine.default`)."""
    items = build_question_set(case_dirs, seed=seed, max_per_case=max_per_case)
    results = evaluate(items, ChatSessionFactory(backend, device, model), progress=progress)
    results["backend"] = backend
    results["seed"] = seed
    results["command"] = command if command is not None else "prismrt " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    write_report(results, out)
    return results
