"""Training data: CT volumes with structure masks, cut into model-ready slices the same way inference cuts them.

- Volumes are read once (OpenKBP: ``ct.nii.gz`` + one mask per structure) and kept as int16 HU plus a uint16 bit
  field of structures per voxel.
- Slices come from :class:`PRISMRTLib.imaging.SlicePlane` (axial, coronal, sagittal; radiological orientation) and
  are letterboxed to the model size with :class:`PRISMRTLib.imaging.Letterbox` (square pixels), so training sees
  exactly what inference will.
- Sampling is counter-based: sample ``n`` of a run with seed ``s`` depends only on ``(s, n)``, so a run that stops
  can resume at any step and produce the same batches.
- Augmentation: window level/width jitter, gamma, noise; left-right mirroring in axial and coronal slices (the only
  flip anatomy allows), which swaps left and right structures.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRISMRTLib.imaging import Geometry, Letterbox, Orientation, SlicePlane, read_image
from PRISMRTLib.imaging.intensity import Window

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PRISMRT_SHARED_DATA", REPO.parent / "shared" / "data"))
TRAIN_DIR = SHARED_DATA / "openkbp" / "train-pats"
VAL_DIR = SHARED_DATA / "openkbp" / "validation-pats"

STRUCTURES = (
    "Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible",
    "PTV56", "PTV63", "PTV70",
)
MIRRORED = {"RightParotid": "LeftParotid", "LeftParotid": "RightParotid"}
AIR_HU = -1024.0
DEFAULT_SIZE = 128  # OpenKBP's native in-plane grid


@dataclass
class CTCase:
    name: str
    hu: np.ndarray  # (k, j, i) int16
    labels: np.ndarray  # (k, j, i) uint16, bit s set where STRUCTURES[s] is
    geometry: Geometry

    def has(self, structure: str) -> bool:
        return bool(self.present >> STRUCTURES.index(structure) & 1)

    @functools.cached_property
    def present(self) -> int:
        """Bit field of the structures present in the case (computed once)."""
        return int(np.bitwise_or.reduce(self.labels, axis=None))


def load_case(folder: "str | Path") -> CTCase:
    folder = Path(folder)
    ct = read_image(folder / "ct.nii.gz")
    hu = sitk.GetArrayFromImage(ct).astype(np.int16)
    labels = np.zeros(hu.shape, np.uint16)
    for s, name in enumerate(STRUCTURES):
        path = folder / f"{name}.nii.gz"
        if path.exists():
            # a copy, not a view: a view of a temporary image would outlive the image's memory
            labels |= (sitk.GetArrayFromImage(read_image(path)) > 0).astype(np.uint16) << s
    return CTCase(folder.name, hu, labels, Geometry.from_image(ct))


def load_cases(split_dir: "str | Path", limit: int | None = None) -> list[CTCase]:
    """All patients of a split (``pt_*`` folders), in a stable order."""
    folders = sorted(Path(split_dir).glob("pt_*"), key=lambda p: int(p.name.split("_")[1]))
    if not folders:
        raise FileNotFoundError(f"no pt_* patient folders in {split_dir}")
    return [load_case(f) for f in folders[:limit]]


@dataclass
class SliceSample:
    """One letterboxed slice and what it shows."""

    case: str
    orientation: str
    index: int  # slice index along the volume's index axis
    position: float  # 0 = first slice, 1 = last, along the anatomical direction (top of the head -> down, etc.)
    hu: np.ndarray  # (S, S) float32 HU, AIR_HU outside the slice
    labels: np.ndarray  # (S, S) uint16 structure bits
    mirrored: bool
    letterbox: Letterbox

    def mask(self, structure: str) -> np.ndarray:
        return (self.labels >> STRUCTURES.index(structure) & 1).astype(bool)

    def visible(self, min_pixels: int = 10) -> list[str]:
        return [s for i, s in enumerate(STRUCTURES) if np.count_nonzero(self.labels & (1 << i)) >= min_pixels]


def _mirror_labels(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    for a, b in (("RightParotid", "LeftParotid"),):
        ia, ib = STRUCTURES.index(a), STRUCTURES.index(b)
        bit_a, bit_b = (labels >> ia) & 1, (labels >> ib) & 1
        out &= ~np.uint16((1 << ia) | (1 << ib))
        out |= (bit_a << ib) | (bit_b << ia)
    return out


def cut_slice(case: CTCase, orientation: "str | Orientation", index: int, size: int = DEFAULT_SIZE,
              mirror: bool = False) -> SliceSample:
    """A slice of a case, letterboxed at the top-left of a ``size`` square (as the feature backends do)."""
    plane = SlicePlane.create(case.geometry, orientation)
    box = Letterbox.fit(plane.slice_shape, plane.pixel_spacing, size)
    hu = box.resize_to_model(plane.extract(case.hu, index).astype(np.float32), pad_value=AIR_HU)
    labels = box.resize_to_model(plane.extract(case.labels, index), order=0)
    if mirror:
        if plane.orientation == Orientation.SAGITTAL:
            raise ValueError("sagittal slices cannot be mirrored left-right")
        # flip the content only (columns of the letterboxed content), keeping it at the top-left
        c1 = box.content_box[3]
        hu[:, :c1] = hu[:, :c1][:, ::-1]
        labels[:, :c1] = _mirror_labels(labels[:, :c1][:, ::-1])
    # position along the anatomical direction the slices are numbered in display order
    n = plane.num_slices
    display = plane.index_to_slice_coords(np.eye(3)[plane.normal_axis] * index)[0]
    step = plane.slice_coords_to_point([1, 0, 0]) - plane.slice_coords_to_point([0, 0, 0])
    ascending = step @ {Orientation.AXIAL: [0, 0, -1], Orientation.CORONAL: [0, 1, 0],
                        Orientation.SAGITTAL: [1, 0, 0]}[plane.orientation] > 0
    position = (display if ascending else (n - 1 - display)) / max(n - 1, 1)
    return SliceSample(case.name, plane.orientation.value, int(index), float(position), hu, labels, mirror, box)


def augment_window(hu: np.ndarray, rng: np.random.Generator, base: Window = Window(60, 350),
                   strength: float = 1.0) -> np.ndarray:
    """Window with jittered level/width, then gamma and noise; float32 in [0, 1]."""
    level = base.level + rng.normal(0, 40 * strength)
    width = base.width * float(np.exp(rng.normal(0, 0.25 * strength)))
    x = Window(level, max(width, 50.0)).apply(hu)
    gamma = float(np.exp(rng.normal(0, 0.15 * strength)))
    x = x ** gamma
    if strength > 0:
        x = x + rng.normal(0, 0.02 * strength, size=x.shape).astype(np.float32)
    return np.clip(x, 0, 1).astype(np.float32)


class SliceSampler:
    """Counter-based random slices: ``sample(n)`` is the same for the same seed and ``n``, in any order.

    Slices are drawn from every orientation; with probability ``structure_bias`` the slice is chosen to cut a
    structure present in the case (so small organs are seen often), otherwise uniformly.
    """

    def __init__(self, cases: list[CTCase], seed: int = 0, size: int = DEFAULT_SIZE,
                 orientations=("axial", "coronal", "sagittal"), structure_bias: float = 0.7, mirror_prob: float = 0.5):
        if not cases:
            raise ValueError("no cases to sample from")
        self.cases, self.seed, self.size = cases, int(seed), int(size)
        self.orientations = tuple(Orientation.parse(o) for o in orientations)
        self.structure_bias, self.mirror_prob = structure_bias, mirror_prob
        self._by_name = {c.name: c for c in cases}
        self._planes = {}
        self._occupied = {}  # (case, orientation, structure) -> slice indices where it appears

    def rng(self, n: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(n)])

    def _plane(self, case: CTCase, orientation: Orientation) -> SlicePlane:
        key = (case.name, orientation)
        if key not in self._planes:
            self._planes[key] = SlicePlane.create(case.geometry, orientation)
        return self._planes[key]

    def _slices_with(self, case: CTCase, orientation: Orientation, s: int) -> np.ndarray:
        key = (case.name, orientation, s)
        if key not in self._occupied:
            stack = self._plane(case, orientation).stack_view(case.labels)
            self._occupied[key] = np.flatnonzero(np.any(stack & np.uint16(1 << s), axis=(1, 2)))
        return self._occupied[key]

    def sample(self, n: int) -> SliceSample:
        rng = self.rng(n)
        case = self.cases[rng.integers(len(self.cases))]
        orientation = self.orientations[rng.integers(len(self.orientations))]
        plane = self._plane(case, orientation)
        index = None
        if rng.random() < self.structure_bias:
            present = [s for s in range(len(STRUCTURES)) if case.present >> s & 1]
            if present:
                candidates = self._slices_with(case, orientation, present[rng.integers(len(present))])
                if len(candidates):
                    index = int(candidates[rng.integers(len(candidates))])
        if index is None:
            index = int(rng.integers(plane.num_slices))
        mirror = orientation != Orientation.SAGITTAL and rng.random() < self.mirror_prob
        return cut_slice(case, orientation, index, self.size, mirror)

    def neighbour(self, sample: SliceSample, offset: int) -> SliceSample | None:
        """The slice ``offset`` indices away from ``sample`` in the same case, orientation and mirroring (what
        propagation sees next); None beyond the volume."""
        case = self._by_name[sample.case]
        index = sample.index + int(offset)
        if not 0 <= index < self._plane(case, Orientation.parse(sample.orientation)).num_slices:
            return None
        return cut_slice(case, sample.orientation, index, self.size, sample.mirrored)

    def last_slice(self, sample: SliceSample, structure: str, step: int, min_pixels: int = 10) -> SliceSample:
        """The slice of ``sample``'s case (same orientation and mirroring) where ``structure`` is last visible going in
        direction ``step`` (+1 or -1); ``sample`` itself when none of the last few slices shows it."""
        raw = MIRRORED.get(structure, structure) if sample.mirrored else structure  # the case's are not mirrored
        case = self._by_name[sample.case]
        indices = self._slices_with(case, Orientation.parse(sample.orientation), STRUCTURES.index(raw))
        for index in (indices[::-1] if step > 0 else indices)[:4]:
            candidate = self.neighbour(sample, int(index) - sample.index)
            if candidate is not None and structure in candidate.visible(min_pixels):
                return candidate
        return sample

    def batch(self, step: int, batch_size: int) -> list[SliceSample]:
        """Batch ``step`` of a run: samples ``step * batch_size ... + batch_size - 1``."""
        return [self.sample(step * batch_size + i) for i in range(batch_size)]
