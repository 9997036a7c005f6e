"""Evaluation cases: a CT and the reference masks of its structures, from a folder or a case list.

Three layouts are read:

- a folder of ``CASE/ct.nii.gz`` + ``CASE/STRUCTURE.nii.gz`` (OpenKBP's);
- a folder of ``CASE/ct.nii.gz`` + ``CASE/masks/STRUCTURE.nii.gz``, at any depth (the clinical/ data's);
- a case list (``.json``)::

    {"name": "clinical-gtv", "description": "...",
     "cases": [{"id": "LUNG1-001", "image": "path/to/ct.nii.gz or a DICOM folder",
                "structures": {"GTV": "path/to/mask.nii.gz",
                               "liver": {"labels": "path/to/labelmap.nii.gz", "value": 5}},
                "group": "GTV"}]}

  Paths are relative to the list's folder. A mask or label map on another grid is resampled onto the CT's (nearest
  neighbour, no transform: it must cover the same physical space; one stored with flipped axes is fine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import PrismRTError
from ..imaging import read_image

MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass
class StructureRef:
    name: str
    path: Path
    value: int | None = None  # a label value in a label map; None: any non-zero voxel


@dataclass
class Case:
    id: str
    image: Path
    structures: dict[str, StructureRef] = field(default_factory=dict)
    group: str = ""

    def reference(self, name: str, ct: sitk.Image) -> np.ndarray:
        """The structure as a (k, j, i) bool array on the CT's grid."""
        ref = self.structures[name]
        mask = read_image(ref.path)
        if not _same_grid(mask, ct):
            mask = sitk.Resample(mask, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
        array = sitk.GetArrayFromImage(mask)
        return array == ref.value if ref.value is not None else array > 0


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _mask_name(path: Path) -> str | None:
    name = path.name
    for suffix in MASK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _folder_cases(folder: Path) -> list[Case]:
    cases = []
    for ct in sorted(folder.rglob("ct.nii.gz")):
        case_dir = ct.parent
        if "crop" in case_dir.relative_to(folder).parts:  # clinical/'s tumour-centred crops repeat their case
            continue
        masks_dir = case_dir / "masks" if (case_dir / "masks").is_dir() else case_dir
        structures = {}
        for path in sorted(masks_dir.iterdir()):
            name = _mask_name(path)
            if name and path.is_file() and path != ct and name not in ("ct", "dose", "possible_dose_mask", "dose_native"):
                structures[name] = StructureRef(name, path)
        rel = case_dir.relative_to(folder)
        cases.append(Case(str(rel) if str(rel) != "." else case_dir.name, ct, structures))
    return cases


def _list_cases(path: Path) -> list[Case]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PrismRTError(f"case list {path} cannot be read as JSON ({exc})") from None
    root = path.parent
    cases = []
    for i, item in enumerate(data.get("cases", [])):
        try:
            structures = {}
            for name, ref in item["structures"].items():
                if isinstance(ref, str):
                    structures[name] = StructureRef(name, root / ref)
                else:
                    structures[name] = StructureRef(name, root / ref["labels"], int(ref["value"]))
            cases.append(Case(str(item["id"]), root / item["image"], structures, str(item.get("group", ""))))
        except (KeyError, TypeError, ValueError) as exc:
            raise PrismRTError(f"case list {path}: case {i} is malformed ({type(exc).__name__}: {exc}); each case "
                               "needs 'id', 'image' and 'structures'") from None
    return cases


def load_cases(source: "str | Path") -> list[Case]:
    """The cases of a folder or a case list (see the module docstring); an error says what was expected."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".json":
        cases = _list_cases(source)
    elif source.is_dir():
        cases = _folder_cases(source)
    else:
        raise PrismRTError(f"'{source}' is neither a folder of cases nor a case list (.json)")
    if not cases:
        raise PrismRTError(f"no case in '{source}': expected CASE/ct.nii.gz with CASE/STRUCTURE.nii.gz or "
                           "CASE/masks/STRUCTURE.nii.gz, or a case list (.json)")
    missing = [str(p) for c in cases for p in [c.image, *(r.path for r in c.structures.values())] if not p.exists()]
    if missing:
        raise PrismRTError(f"{len(missing)} file(s) named by '{source}' do not exist (e.g. {missing[0]}): is the data "
                           "folder where the case list expects it?")
    return cases


def select(cases: list[Case], structures: list[str] | None) -> list[tuple[Case, str]]:
    """(case, structure) pairs: each case's structures, or only the named ones where the case has them."""
    pairs = []
    for case in cases:
        names = structures or list(case.structures)
        pairs += [(case, n) for n in names if n in case.structures]
    return pairs
