"""3D Dice after one click (the structure's deepest voxel) and propagation, for several values of one of
`SegmentationSession.propagate`'s stop rules (`cross_view_margin_mm`: how far beyond the orthogonal views' extent;
`min_score`: the predicted IoU below which it stops), with the default model; prints each structure's Dice, the
slices covered against the reference's, and where and why propagation stopped.

    OMP_NUM_THREADS=1 .venv/bin/python docs/evaluation/scripts/propagation_rules.py \
        docs/evaluation/cases/propagation_validation_fine.json cross_view_margin_mm=5,10,15
"""
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.chdir(REPO)
from PRISMRTLib.features import open_backend  # noqa: E402
from PRISMRTLib.imaging import read_image  # noqa: E402
from PRISMRTLib.segmentation import SegmentationSession  # noqa: E402
from PRISMRTLib.segmentation.cases import load_cases  # noqa: E402
from PRISMRTLib.segmentation.prompts import first_click  # noqa: E402


def main(case_list: str, setting: str) -> None:
    backend = open_backend("auto", None, "cpu")
    rule, listed = setting.split("=")
    values = [float(v) for v in listed.split(",")]
    dice_by_value = {v: [] for v in values}
    for case in load_cases(case_list):
        image = read_image(case.image)
        for name in case.structures:
            reference = case.reference(name, image).astype(bool)
            k, j, i = first_click(reference, spacing=image.GetSpacing()[::-1])
            click = image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
            shared = SegmentationSession(backend, image, "axial")  # one feature cache for every value
            print(case.id, name, flush=True)
            for value in values:
                session = SegmentationSession(backend, image, "axial", features=shared.volume_features)
                session.add_point(click, positive=True)
                session.propagate(**{rule: value})
                mask = sitk.GetArrayFromImage(session.result()) != 0
                dice = 2 * np.count_nonzero(mask & reference) / (np.count_nonzero(mask) + np.count_nonzero(reference))
                dice_by_value[value].append(dice)
                ref_z, got_z = np.flatnonzero(reference.any((1, 2))), np.flatnonzero(mask.any((1, 2)))
                print(f"   {rule}={value:g}: Dice {dice:.3f}, slices {got_z.min()}-{got_z.max()} of "
                      f"{ref_z.min()}-{ref_z.max()}; {session.last_propagation.stops}", flush=True)
    for value, dice in dice_by_value.items():
        print(f"MEAN {rule}={value:g}: {np.mean(dice):.3f} over {len(dice)} structures")


if __name__ == "__main__":
    main(*sys.argv[1:3])
