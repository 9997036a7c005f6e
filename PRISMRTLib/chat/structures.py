"""The structures the chat can measure: binary masks on the CT's voxel grid, named and mapped onto the lexicon's
concepts.

    structures = StructureSet.from_files(["PTV70.nii.gz", "masks/", "seg.nii.gz"], ct)
    structures.resolve("parotid")  # both parotids
    structures.resolve("target")   # every GTV, CTV and PTV

Files: a binary mask named after its structure (``LeftParotid.nii.gz``); a folder of them; a label map whose names
come from a sidecar JSON (``FILE.json`` beside ``FILE.nii.gz``, or a TotalSegmentator ``*classmap*.json`` in the same
folder: ``{"1": "spleen", ...}``) or from a Slicer ``.seg.nrrd``'s ``Segment{N}_Name`` / ``_LabelValue`` / ``_Layer``
fields; a label map without names gives ``label N``. Every mask must lie on the CT's grid (size, spacing, origin,
direction): a chat answer in millimetres is only exact without resampling, so an off-grid mask is refused with the
fix. The one exception is a Slicer ``.seg.nrrd`` cropped to its segments' extent on the CT's grid (what Slicer saves
by default): it is pasted back losslessly.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import PrismRTError
from ..imaging.geometry import Geometry
from ..imaging.io import read_image
from .lexicon import CONCEPTS, TARGET_IDS, concept_of_name
from .types import ChatError

MASK_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PTV_IDS = ("ptv", "ptv70", "ptv63", "ptv56")
MAX_UNNAMED_LABELS = 255  # more distinct values than this without names: an image, not a label map
BODY_HU = -400.0  # above this a voxel is tissue, not air (lung parenchyma is about -800, so lungs sit inside the body)

# grid tolerances: NIfTI stores geometry in float32 and tools round differently; far below a voxel
_SPACING_RTOL = 1e-3
_ORIGIN_TOL_VOXELS = 0.05
_DIRECTION_TOL = 1e-3

_RESAMPLE_HINT = ("resample it onto the CT with nearest-neighbour interpolation (Slicer: Resample Image (BRAINS) or "
                  "export the segmentation with the CT as reference geometry; SimpleITK: "
                  "sitk.Resample(mask, ct, sitk.Transform(), sitk.sitkNearestNeighbor)) and load it again")


@dataclass(eq=False)
class Structure:
    """One structure: ``mask`` is a bool array (k, j, i) on the reference image's grid (may be empty)."""

    name: str
    concept: str | None
    mask: np.ndarray
    source: str | None = None  # the file it came from
    label: int | None = None  # its value in a label map

    @cached_property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def empty(self) -> bool:
        return self.voxel_count == 0

    @cached_property
    def bbox(self) -> tuple[slice, slice, slice] | None:
        """Array slices (k, j, i) of the mask's bounding box; None when empty."""
        found = ndimage.find_objects(self.mask.astype(np.uint8))
        return found[0] if found else None

    @cached_property
    def voxel_indices(self) -> np.ndarray:
        """(N, 3) ITK indices (i, j, k) of the mask's voxels."""
        if self.bbox is None:
            return np.zeros((0, 3), dtype=np.int64)
        kk, jj, ii = np.nonzero(self.mask[self.bbox])
        offset = [s.start for s in self.bbox]
        return np.stack([ii + offset[2], jj + offset[1], kk + offset[0]], axis=1)

    @cached_property
    def centroid_index(self) -> np.ndarray | None:
        """Mean (i, j, k) index; the physical centroid is its image of the (affine) index-to-point map."""
        return self.voxel_indices.mean(axis=0) if self.voxel_count else None

    @property
    def is_target(self) -> bool:
        return self.concept in TARGET_IDS


def _stem(path: Path) -> str:
    name = path.name
    for suffix in MASK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_mask_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(MASK_SUFFIXES) and not path.name.startswith(".")


def _target_concept(name: str) -> str | None:
    """GTV/CTV/PTV names the lexicon's pattern misses ("GTV_Mass_CT", "PTV high"): still a target of that kind."""
    m = re.match(r"(gtv|ctv|ptv)(?![a-z])", name.strip().lower())
    return m.group(1) if m else None


def _concept(name: str) -> str | None:
    return concept_of_name(name) or _target_concept(name)


# -- grids -----------------------------------------------------------------------------------------------------------
def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in np.asarray(values, float).ravel()) + ")"


def _grid_difference(image: sitk.Image, ref: Geometry) -> str | None:
    """What differs between an image's grid and the reference grid (None: the same grid)."""
    geo = Geometry.from_image(image)
    if geo.size != ref.size:
        return f"its size is {geo.size} voxels, the CT's is {ref.size}"
    if not np.allclose(geo.spacing, ref.spacing, rtol=_SPACING_RTOL, atol=1e-6):
        return f"its spacing is {_fmt(geo.spacing)} mm, the CT's is {_fmt(ref.spacing)} mm"
    if not np.allclose(geo.direction, ref.direction, atol=_DIRECTION_TOL):
        return f"its direction is {_fmt(geo.direction)}, the CT's is {_fmt(ref.direction)}"
    if np.max(np.abs(geo.origin - ref.origin)) > _ORIGIN_TOL_VOXELS * float(ref.spacing.min()):
        return f"its origin is {_fmt(geo.origin)} mm, the CT's is {_fmt(ref.origin)} mm"
    return None


def _subextent_offset(image: sitk.Image, ref: Geometry) -> tuple[int, int, int] | None:
    """The (i, j, k) voxel offset of an image that is an exact crop of the reference grid, else None."""
    geo = Geometry.from_image(image)
    if not (np.allclose(geo.spacing, ref.spacing, rtol=_SPACING_RTOL, atol=1e-6)
            and np.allclose(geo.direction, ref.direction, atol=_DIRECTION_TOL)):
        return None
    index = ref.physical_to_index(geo.origin)
    offset = np.round(index)
    if np.max(np.abs(index - offset)) > _ORIGIN_TOL_VOXELS:
        return None
    offset = offset.astype(int)
    if np.any(offset < 0) or np.any(offset + np.array(geo.size) > np.array(ref.size)):
        return None
    return tuple(int(v) for v in offset)


def _check_grid(image: sitk.Image, ref: Geometry, what: str, allow_crop: bool = False):
    """The image's voxel array (k, j, i[, c]) on the reference grid; a ChatError that names ``what`` otherwise."""
    if image.GetDimension() != 3:
        raise ChatError(f"{what} is {image.GetDimension()}D: a structure must be a 3D mask on the CT's grid")
    difference = _grid_difference(image, ref)
    array = sitk.GetArrayFromImage(image)
    if difference is None:
        return array
    if allow_crop:
        offset = _subextent_offset(image, ref)
        if offset is not None:  # Slicer saved the segments' extent only: paste it back where it came from
            full = np.zeros(ref.shape + array.shape[3:], dtype=array.dtype)
            i, j, k = offset
            nk, nj, ni = array.shape[:3]
            full[k:k + nk, j:j + nj, i:i + ni] = array
            return full
    raise ChatError(f"{what} is not on the CT's grid ({difference}): {_RESAMPLE_HINT}")


class NotAStructure(ChatError):
    """A file that holds an image, not a mask or label map (a folder's CT is skipped for this; a named file is not)."""


# -- label names -----------------------------------------------------------------------------------------------------
def _names_from_json(data, path: Path) -> dict[int, str]:
    """{label: name} from the sidecar forms in use: {"1": "spleen"}, {"spleen": 1}, nnU-Net's {"labels": {...}},
    a list indexed by label, values that are {"name": ...}."""
    if isinstance(data, dict) and "labels" in data and isinstance(data["labels"], (dict, list)):
        data = data["labels"]
    out: dict[int, str] = {}
    items = enumerate(data) if isinstance(data, list) else data.items() if isinstance(data, dict) else None
    if items is None:
        raise ChatError(f"cannot read label names from '{path}': write {{\"1\": \"spleen\", \"2\": \"liver\"}}")
    for key, value in items:
        if isinstance(value, dict):
            value = value.get("name", value.get("Name"))
        if isinstance(key, int) or str(key).strip().lstrip("-").isdigit():
            label, name = int(key), value
        elif isinstance(value, (int, float)) or str(value).strip().isdigit():
            label, name = int(value), key
        else:
            raise ChatError(f"cannot read label names from '{path}': the entry {key!r}: {value!r} has no label "
                            "number; write {\"1\": \"spleen\", \"2\": \"liver\"}")
        if label != 0 and name is not None and str(name).strip().lower() != "background":
            out[label] = str(name).strip()
    return out


def _sidecar(path: Path, binary: bool) -> Path | None:
    """The label-name JSON of a label map: FILE.json or FILE.nii.gz.json beside it, else the one
    TotalSegmentator-style ``*classmap*.json`` in the same folder; that one not for a 0/1 file, which is a mask
    named after itself (PTV70.nii.gz in a folder that also holds a TotalSegmentator map)."""
    for candidate in (path.with_name(_stem(path) + ".json"), path.with_name(path.name + ".json")):
        if candidate.is_file():
            return candidate
    classmaps = sorted(path.parent.glob("*classmap*.json"))
    return classmaps[0] if len(classmaps) == 1 and not binary else None


def _read_sidecar(path: Path) -> dict[int, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ChatError(f"cannot read the label names in '{path}' ({exc}): fix or remove the file") from None
    return _names_from_json(data, path)


def _slicer_segments(image: sitk.Image) -> list[tuple[str, int, int]]:
    """(name, label value, layer) of each segment in a Slicer .seg.nrrd's metadata."""
    keys = set(image.GetMetaDataKeys())
    numbers = sorted({int(m.group(1)) for k in keys if (m := re.fullmatch(r"Segment(\d+)_Name", k))})
    out = []
    for n in numbers:
        meta = {f: image.GetMetaData(f"Segment{n}_{f}") for f in ("Name", "LabelValue", "Layer")
                if f"Segment{n}_{f}" in keys}
        # Slicer before 4.11 wrote one binary layer per segment, without LabelValue/Layer
        out.append((meta["Name"], int(meta.get("LabelValue", 1)), int(meta.get("Layer", n))))
    return out


def _label_values(array: np.ndarray, what: str) -> np.ndarray:
    """The nonzero labels present in an integer-valued array; a ChatError if it is not a mask or label map."""
    if array.dtype == bool:
        return np.array([1]) if array.any() else np.array([], dtype=int)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise NotAStructure(f"{what} has non-integer values: a structure file must be a binary mask or a label "
                                "map (integers, 0 = background), not an image or a dose")
    lo, hi = (array.min(), array.max()) if array.size else (0, 0)
    if lo < 0:
        raise NotAStructure(f"{what} has negative values (down to {lo:g}): it looks like an image, not a mask or "
                            "label map (integers, 0 = background)")
    if hi < 1 << 16:
        counts = np.bincount(array.ravel().astype(np.int64, copy=False), minlength=1)
        values = np.nonzero(counts)[0]
        return values[values != 0]
    values = np.unique(array)
    return values[values != 0].astype(np.int64)


# -- the set ---------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class StructureSet:
    """The loaded structures of one image. ``reference`` is the image they lie on; ``skipped`` lists
    (file, why) for files in a folder that were not structures (the CT itself, a dose)."""

    structures: list[Structure]
    reference: sitk.Image
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.geometry = Geometry.from_image(self.reference)
        used: set[str] = set()
        for s in self.structures:
            if s.mask.shape != self.geometry.shape:
                raise ChatError(f"the structure '{s.name}' has shape {s.mask.shape}, the CT {self.geometry.shape} "
                                "(k, j, i)")
            name, n = s.name, 1
            while name.lower() in used:  # names must be unique: a "name:<Name>" id points at one structure
                n += 1
                name = f"{s.name} {n}"
            s.name = name
            used.add(name.lower())
        counts: dict[str, int] = {}
        for s in self.structures:
            if s.concept:
                counts[s.concept] = counts.get(s.concept, 0) + 1
        # a concept shared by two loaded structures (GTV-1, GTV-2) cannot name one of them: those go by name
        self._ids = {id(s): s.concept if s.concept and counts[s.concept] == 1 else f"name:{s.name}"
                     for s in self.structures}
        self._body_cache: np.ndarray | None = None
        # the engines' memo for this set (unions, distances, the body's midline), keyed by structure names
        self.cache: dict = {}

    # -- construction -----------------------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, paths, reference: sitk.Image) -> "StructureSet":
        """Mask files, folders of them (not recursive; images and dose files in a folder are skipped and listed in
        ``skipped``), label maps with a sidecar JSON or a Slicer .seg.nrrd; all on ``reference``'s grid."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        ref = Geometry.from_image(reference)
        structures, skipped = [], []
        for path in map(Path, paths):
            if path.is_dir():
                files = sorted(p for p in path.iterdir() if _is_mask_file(p))
                for file in files:
                    if "dose" in file.name.lower():  # a dose grid, or OpenKBP's possible_dose_mask: not anatomy
                        skipped.append((str(file), "a dose file, not a structure"))
                        continue
                    try:
                        structures += _load_file(file, ref)
                    except NotAStructure as exc:  # the CT itself, another image: skipped, said in .skipped
                        skipped.append((str(file), str(exc)))
                if not files:
                    raise ChatError(f"the folder '{path}' holds no mask files ({', '.join(MASK_SUFFIXES)})")
            elif path.exists():
                structures += _load_file(path, ref)
            else:
                raise ChatError(f"'{path}' does not exist: check the path of the segmentation")
        if not structures:
            why = "; ".join(f"{Path(f).name}: {w}" for f, w in skipped[:3])
            raise ChatError(f"no structures found in {', '.join(map(str, paths))}" + (f" ({why})" if why else ""))
        return cls(structures, reference, skipped)

    @classmethod
    def from_masks(cls, masks: dict, reference: sitk.Image) -> "StructureSet":
        """``{name: sitk.Image or ndarray (k, j, i)}``, nonzero = inside; images must be on the reference grid."""
        ref = Geometry.from_image(reference)
        structures = []
        for name, mask in masks.items():
            if isinstance(mask, sitk.Image):
                array = _check_grid(mask, ref, f"the mask '{name}'")
            else:
                array = np.asarray(mask)
                if array.shape != ref.shape:
                    raise ChatError(f"the mask '{name}' has shape {array.shape}, the CT {ref.shape} (k, j, i): "
                                    f"{_RESAMPLE_HINT}")
            structures.append(Structure(str(name), _concept(str(name)), array != 0))
        return cls(structures, reference)

    # -- access -----------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.structures]

    def __iter__(self):
        return iter(self.structures)

    def __len__(self) -> int:
        return len(self.structures)

    def id_of(self, structure: Structure) -> str:
        """The structure id answers use: its concept id when no other loaded structure has it, else "name:<Name>"."""
        return self._ids[id(structure)]

    def by_name(self, name: str) -> Structure | None:
        key = name.strip()
        for match in (lambda s: s.name == key, lambda s: s.name.lower() == key.lower(),
                      lambda s: _normal(s.name) == _normal(key)):
            for s in self.structures:
                if match(s):
                    return s
        return None

    def resolve(self, structure_id: str) -> list[Structure]:
        """The loaded structures a structure id stands for: "name:<Name>" that one; "target" every GTV/CTV/PTV;
        "ptv" every PTV (PTV70/63/56 too); a paired concept ("parotid") both sides; any concept id the structures
        with it. [] when none is loaded."""
        sid = structure_id.strip()
        if sid.startswith("name:"):
            s = self.by_name(sid[5:])
            return [s] if s is not None else []
        if sid == "target":
            return [s for s in self.structures if s.concept in TARGET_IDS]
        if sid == "ptv":
            return [s for s in self.structures if s.concept in PTV_IDS]
        if sid in CONCEPTS:
            return [s for s in self.structures if s.concept == sid
                    or (s.concept in CONCEPTS and CONCEPTS[s.concept].paired == sid)]
        s = self.by_name(sid)  # a bare loaded name
        if s is not None:
            return [s]
        concept = _concept(sid)
        return self.resolve(concept) if concept and concept != sid else []

    # -- the body ---------------------------------------------------------------------------------------------------
    def body_mask(self) -> np.ndarray:
        """The patient's body (k, j, i): the loaded body structure, else the largest connected region above
        -400 HU of the reference image."""
        loaded = [s for s in self.structures if s.concept == "body" and not s.empty]
        if loaded:
            return max(loaded, key=lambda s: s.voxel_count).mask
        if self._body_cache is None:
            self._body_cache = body_from_image(self.reference)
        return self._body_cache


def _normal(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", name.lower())


def body_from_image(image: sitk.Image) -> np.ndarray:
    """The largest connected component above -400 HU (the couch and air excluded; lungs are holes, which no
    caller needs filled: only the body's left-right centre is used)."""
    array = sitk.GetArrayViewFromImage(image)
    tissue = array > BODY_HU
    labels, n = ndimage.label(tissue)
    if n == 0:
        return tissue
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _load_file(path: Path, ref: Geometry) -> list[Structure]:
    what = f"the segmentation '{path}'"
    if not path.name.lower().endswith(MASK_SUFFIXES):
        raise ChatError(f"{what} is not a mask or label map file ({', '.join(MASK_SUFFIXES)}); a DICOM RTSTRUCT is "
                        "not read yet: export its structures on the CT's grid (Slicer: Segmentations > Export to "
                        "files, or a .seg.nrrd)")
    try:
        image = read_image(path)
    except ChatError:
        raise
    except PrismRTError as exc:
        raise ChatError(f"cannot read {what}: {exc}") from None
    slicer = path.name.lower().endswith(".seg.nrrd") or any(k.startswith("Segment0_") for k in image.GetMetaDataKeys())
    if image.GetNumberOfComponentsPerPixel() > 1 and not slicer:
        raise ChatError(f"{what} has {image.GetNumberOfComponentsPerPixel()} values per voxel: give a binary mask "
                        "or a label map (one value per voxel), or a Slicer .seg.nrrd")
    array = _check_grid(image, ref, what, allow_crop=slicer)
    source = str(path)
    if slicer:
        segments = _slicer_segments(image)
        if segments:
            out = []
            for name, value, layer in segments:
                data = array[..., layer] if array.ndim == 4 else array
                if array.ndim == 3 and layer != 0:
                    raise ChatError(f"{what}: segment '{name}' is on layer {layer}, but the file has one layer")
                out.append(Structure(name, _concept(name), data == value, source, value))
            return out
        if array.ndim == 4:
            raise ChatError(f"{what} has several layers but no Segment{{N}}_Name fields: save it again from Slicer")
    labels = _label_values(array, what)
    sidecar = _sidecar(path, binary=len(labels) == 0 or list(labels) == [1])
    if sidecar is not None:
        names = _read_sidecar(sidecar)
        # every named label is a structure (absent ones empty: the map says they are not in this scan)
        values = sorted(set(names) | set(int(v) for v in labels))
        return [Structure(names.get(v, f"label {v}"), _concept(names.get(v, "")) if v in names else None,
                          array == v, source, v) for v in values]
    if len(labels) <= 1:  # a binary mask (0/1, 0/255, or one label): named after the file
        name = _stem(path)
        return [Structure(name, _concept(name), array != 0, source, int(labels[0]) if len(labels) else None)]
    if len(labels) > MAX_UNNAMED_LABELS:
        raise NotAStructure(f"{what} has {len(labels)} distinct values and no label names: it looks like an image; "
                            "a label map needs names in FILE.json beside it (or is a Slicer .seg.nrrd)")
    return [Structure(f"label {v}", None, array == v, source, int(v)) for v in labels]
