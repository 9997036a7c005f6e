"""The CT volumes LiteMedSAM's prompt heads are fine-tuned on, and those held out of training.

Every source becomes a :class:`Volume`: int16 HU on its grid, plus named structures, each a (layer, value) pair in
integer label layers on the same grid (OpenKBP's overlapping masks are one binary layer each; TotalSegmentator's
disjoint labels share one layer). Nothing here is specific to a model.

Training sources (``../shared/data``, see its README for licences):

- ``openkbp``: OpenKBP ``train-pats`` (170 head-and-neck CTs at 3.9 mm; ten organs and targets);
- ``lung1``: the NSCLC-Radiomics planning CTs LUNG1-001/002 at 0.98 mm, **organs only** (lungs, heart, oesophagus,
  spinal cord): their GTV, CTV, PTV and PET contour are the evaluation's targets and stay out;
- ``ts_abdomen``: TotalSegmentator's abdomen-pelvis example (3 mm, its 117-label map; model outputs, not manual);
- ``ts_aorta``: TotalSegmentator's contrast chest CT at 1.5 mm (aorta, its lumens and branches, T12).

Held out (evaluation only): OpenKBP ``validation-pats``, every clinical/ GTV (LUNG1 GTV-1, STS_001/002, PAT1, which
is a crop of LUNG1-002), and the ``ts_ct_dicom`` CT (a different patient from ``ts_abdomen``, checked by eye).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PRISMRTLib.imaging import Geometry, read_image

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("PRISMRT_SHARED_DATA", REPO.parent / "shared" / "data"))

OPENKBP_STRUCTURES = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible",
                      "PTV56", "PTV63", "PTV70")
LUNG1_ORGANS = ("Lung_L", "Lung_R", "Heart", "Esophagus", "Spinal_cord")
LUNG1_HELD_OUT = ("GTV-1", "CTV-1", "PTV-1", "1_SUV_primair")  # the tumour and its expansions
TS_AORTA_MASKS = ("aorta", "aorta_true_lumen", "aorta_false_lumen", "brachiocephalic_trunk", "celiac_trunk",
                  "common_carotid_artery_left", "subclavian_artery_left", "vertebrae_T12")
TS_MIN_VOXELS = 200  # TotalSegmentator labels smaller than this (a few voxels of a neighbouring organ) are skipped


@dataclass
class Volume:
    name: str
    source: str
    hu: np.ndarray  # (k, j, i) int16
    geometry: Geometry
    layers: list[np.ndarray] = field(default_factory=list)  # integer label layers on the grid
    structures: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (layer, value)

    def mask(self, name: str) -> np.ndarray:
        layer, value = self.structures[name]
        return self.layers[layer] == value


def _hu(image: sitk.Image) -> np.ndarray:
    return np.clip(sitk.GetArrayFromImage(image), -1024, 3071).astype(np.int16)


def _on_grid(mask: sitk.Image, ct: sitk.Image) -> np.ndarray:
    """A label image as an array on the CT's grid (resampled, nearest neighbour, when its grid differs)."""
    same = (mask.GetSize() == ct.GetSize() and np.allclose(mask.GetSpacing(), ct.GetSpacing())
            and np.allclose(mask.GetOrigin(), ct.GetOrigin()) and np.allclose(mask.GetDirection(), ct.GetDirection()))
    if not same:
        mask = sitk.Resample(mask, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
    return sitk.GetArrayFromImage(mask)


def load_openkbp(folder: Path) -> Volume:
    ct = read_image(folder / "ct.nii.gz")
    volume = Volume(folder.name, "openkbp", _hu(ct), Geometry.from_image(ct))
    for name in OPENKBP_STRUCTURES:
        _add_mask(volume, name, folder / f"{name}.nii.gz", ct)
    return volume


def _add_mask(volume: Volume, name: str, path: Path, ct) -> None:
    """One structure's mask file, resampled onto the CT grid, as a layer of its own (skipped if absent or empty)."""
    if path.exists():
        layer = (_on_grid(read_image(path), ct) > 0).astype(np.uint8)
        if layer.any():
            volume.structures[name] = (len(volume.layers), 1)
            volume.layers.append(layer)


def load_masks_folder(folder: Path, source: str, names: tuple[str, ...]) -> Volume:
    """``folder/ct.nii.gz`` with ``folder/masks/NAME.nii.gz`` (the clinical/ layout) or ``folder/NAME.nii.gz``."""
    ct = read_image(folder / "ct.nii.gz") if (folder / "ct.nii.gz").exists() else read_image(folder / "ct_cropped.nii.gz")
    volume = Volume(folder.name, source, _hu(ct), Geometry.from_image(ct))
    for name in names:
        path = folder / "masks" / f"{name}.nii.gz"
        _add_mask(volume, name, path if path.exists() else folder / f"{name}.nii.gz", ct)
    return volume


def load_ts_abdomen(folder: Path) -> Volume:
    ct = read_image(folder / "example_ct.nii.gz")
    labels = _on_grid(read_image(folder / "example_seg_fast_force_split.nii.gz"), ct).astype(np.uint8)
    names = json.loads((folder / "totalsegmentator_total_classmap.json").read_text())
    volume = Volume("ts_abdomen", "ts_abdomen", _hu(ct), Geometry.from_image(ct), [labels])
    counts = np.bincount(labels.ravel(), minlength=256)
    for value, name in names.items():
        if int(value) < len(counts) and counts[int(value)] >= TS_MIN_VOXELS:
            volume.structures[name] = (0, int(value))
    return volume


def training_volumes(data: Path = SHARED_DATA, openkbp_limit: int | None = None) -> dict[str, list[Volume]]:
    """The training volumes by source (see the module docstring); sources whose data is absent are left out."""
    out: dict[str, list[Volume]] = {}
    train = data / "openkbp" / "train-pats"
    if train.is_dir():
        folders = sorted(train.glob("pt_*"), key=lambda p: int(p.name.split("_")[1]))[:openkbp_limit]
        out["openkbp"] = [load_openkbp(f) for f in folders]
    lung = data / "clinical" / "nsclc_radiomics_lung1"
    if lung.is_dir():
        out["lung1"] = [load_masks_folder(f, "lung1", LUNG1_ORGANS) for f in sorted(lung.glob("LUNG1-*"))]
    if (data / "samples" / "ts_abdomen_ct").is_dir():
        out["ts_abdomen"] = [load_ts_abdomen(data / "samples" / "ts_abdomen_ct")]
    if (data / "samples" / "ts_chest_cta_aorta").is_dir():
        out["ts_aorta"] = [load_masks_folder(data / "samples" / "ts_chest_cta_aorta", "ts_aorta", TS_AORTA_MASKS)]
    return {k: v for k, v in out.items() if v}


HELD_OUT = {
    "openkbp": "validation-pats (33 patients)",
    "clinical": "every GTV, CTV, PTV and PET contour (LUNG1-001/002), STS_001, STS_002, PAT1 (a crop of LUNG1-002)",
    "samples": "ts_ct_dicom (the liver / spleen click test), mr_brain_tumor_pair",
}
