"""Does zooming into the region around the prompt help? Box prompts on each structure's central slice, the model
fed the whole slice (as ``prismrt segment`` does) or a square crop around the box (side = factor x the box's longer
side, letterboxed to the model's input), the mask pasted back: Dice on the slice, per case and the GTV mean.

    python -m training.litemedsam_clicks.zoom --model litemedsam docs/evaluation/cases/clinical_gtv.json \\
        docs/evaluation/cases/ts_ct_dicom.json
"""

from __future__ import annotations

import argparse

import numpy as np

from PRISMRTLib.features import open_backend
from PRISMRTLib.imaging import read_image
from PRISMRTLib.metrics import dice
from PRISMRTLib.segmentation import SegmentationSession, SlicePrompts
from PRISMRTLib.segmentation.cases import load_cases, select
from PRISMRTLib.segmentation.evaluation import central_slice
from PRISMRTLib.segmentation.prompts import bounding_box


def box_dice(session: SegmentationSession, reference: np.ndarray, factor: float | None) -> float:
    plane = session.plane
    index, _ = central_slice(session, reference)
    target = plane.extract(reference, index).astype(bool)
    r0, c0, r1, c1 = bounding_box(target)
    view, offset = (), (0, 0)
    if factor is not None:
        sr, sc = plane.pixel_spacing
        side_mm = max((r1 - r0 + 1) * sr, (c1 - c0 + 1) * sc) * factor
        h, w = side_mm / sr, side_mm / sc
        view = ((r0 + r1) / 2 - h / 2, (c0 + c1) / 2 - w / 2, int(round(h)), int(round(w)))
        offset = (int(round(view[0])), int(round(view[1])))
    features = session.volume_features.get(plane, index, view)
    mask = session.predictor.predict(features, SlicePrompts(
        box=(r0 - offset[0], c0 - offset[1], r1 - offset[0], c1 - offset[1]))).mask
    full = np.zeros(plane.slice_shape, bool)
    rs, cs = max(offset[0], 0), max(offset[1], 0)
    re, ce = min(offset[0] + mask.shape[0], full.shape[0]), min(offset[1] + mask.shape[1], full.shape[1])
    full[rs:re, cs:ce] = mask[rs - offset[0]:re - offset[0], cs - offset[1]:ce - offset[1]]
    return dice(full, target)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="+")
    p.add_argument("--model", default="litemedsam")
    p.add_argument("--factors", default="none,3,2,1.5")
    args = p.parse_args(argv)
    backend = open_backend("teachers", args.model, "cpu")
    pairs = [pair for source in args.cases for pair in select(load_cases(source), None)]
    print("| view | " + " | ".join(f"{c.id} {s}" for c, s in pairs) + " | GTV mean |")
    print("|---|" + "---|" * (len(pairs) + 1))
    for text in args.factors.split(","):
        factor = None if text == "none" else float(text)
        scores = []
        for case, structure in pairs:
            image = read_image(case.image)
            session = SegmentationSession(backend, image, "axial")
            scores.append(box_dice(session, case.reference(structure, image), factor))
        gtv = [d for (c, s), d in zip(pairs, scores) if s == "GTV"]
        label = "whole slice" if factor is None else f"crop {factor:g} x box"
        print(f"| {label} | " + " | ".join(f"{d:.3f}" for d in scores) + f" | {np.mean(gtv):.3f} |", flush=True)


if __name__ == "__main__":
    main()
