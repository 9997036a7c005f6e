"""A registration's files and its QA, as `prismrt register` writes them into one folder:

- ``displacement.nii.gz``: the fixed -> moving displacement (fixed grid, LPS mm, ``p_moving = p + u(p)``);
- ``transform.h5``: the same as an ITK displacement-field transform (Slicer, 3D Slicer's Transforms module, ITK);
- ``warped.nii.gz``: the moving image on the fixed grid;
- ``warped_segmentations/NAME.nii.gz``: each moving structure on the fixed grid (nearest neighbour);
- ``qa.md``, ``qa.json``, ``checkerboard.png``, ``difference.png``, ``jacobian.png``: the QA report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import SimpleITK as sitk

from ..errors import PrismRTError
from .alignment import body_mask
from .field import warp_label, write_field, write_transform
from .qa import Tolerances, jacobian_determinant, registration_qa
from .qa_report import write_qa_report

REGISTRATION_FILES = ("displacement.nii.gz", "transform.h5", "warped.nii.gz", "qa.md", "qa.json",
                      "checkerboard.png", "difference.png", "jacobian.png")
WARPED_DIR = "warped_segmentations"


def _safe_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._")
    if not cleaned:
        raise PrismRTError(f"the structure name '{name}' gives no usable file name: rename its file")
    return cleaned


def write_registration(result, out_dir: "str | os.PathLike", *, fixed: sitk.Image, moving: sitk.Image,
                       fixed_structures: Mapping[str, sitk.Image] | None = None,
                       moving_structures: Mapping[str, sitk.Image] | None = None,
                       fixed_landmarks=None, moving_landmarks=None, tolerances: Tolerances | None = None,
                       inputs: Mapping | None = None, overwrite: bool = False):
    """Write ``result`` (a :class:`~.pipeline.RegistrationResult`) and its QA into ``out_dir``. The Jacobian and
    inverse-consistency statistics are taken inside the fixed image's body (CT: above -300 HU; else its
    foreground). Returns the :class:`~.qa.QAReport`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    field = result.displacement
    write_field(field, out / "displacement.nii.gz", overwrite=overwrite)
    write_transform(field, out / "transform.h5", overwrite=overwrite)
    sitk.WriteImage(result.warped, str(out / "warped.nii.gz"), True)
    for name, mask in (moving_structures or {}).items():
        (out / WARPED_DIR).mkdir(exist_ok=True)
        sitk.WriteImage(warp_label(mask, field), str(out / WARPED_DIR / f"{_safe_name(name)}.nii.gz"), True)
    body = body_mask(fixed)
    jacobian = jacobian_determinant(field)
    report = registration_qa(
        field, fixed=fixed, mask=body, mask_name="body", backward_field=result.inverse_displacement,
        fixed_structures=fixed_structures, moving_structures=moving_structures,
        fixed_landmarks=fixed_landmarks, moving_landmarks=moving_landmarks, tolerances=tolerances,
        inputs=inputs, jacobian=jacobian)
    write_qa_report(report, out, fixed=fixed, field=field, moving=moving, warped=result.warped, jacobian=jacobian,
                    mask=body, overwrite=True)
    return report
