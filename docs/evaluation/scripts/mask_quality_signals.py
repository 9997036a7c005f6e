"""Which signal tells a poor single-click mask: the model's predicted IoU or the mask's stability (SAM's automatic
mask generator's filter: IoU of the mask thresholded at logit +1 and at -1)? Measured on structures that are not the
evaluation's (OpenKBP validation patients' organs and PTV70 at 3.9 mm, LUNG1-002's heart / oesophagus / cord, the
TotalSegmentator abdomen example's organs), one click at the deepest point of slices at 30 / 50 / 70 % of each
structure's extent, through `SegmentationSession.add_point` (the lone-click rule included), with the default model.
Writes one row per click (JSON) and prints rank correlations and the detection of poor masks (Dice < 0.7).

    OMP_NUM_THREADS=1 .venv/bin/python docs/evaluation/scripts/mask_quality_signals.py --out OUT.json
    .venv/bin/python docs/evaluation/scripts/mask_quality_signals.py --gtv --out OUT_GTV.json   # the clinical GTVs
"""
import argparse, json, os, sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.chdir(REPO)
from PRISMRTLib.features import open_backend  # noqa: E402
from PRISMRTLib.imaging import read_image  # noqa: E402
from PRISMRTLib.segmentation import SegmentationSession  # noqa: E402
from PRISMRTLib.segmentation.cases import Case, StructureRef, load_cases  # noqa: E402
from PRISMRTLib.segmentation.prompts import deepest_point, first_click  # noqa: E402
from PRISMRTLib.segmentation.quality import LOW_SCORE, stability_score  # noqa: E402

DATA = REPO.parent / "shared" / "data"
OPENKBP_ORGANS = ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid", "Mandible", "Larynx", "Esophagus", "PTV70")
ABDOMEN = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
           7: "pancreas", 21: "urinary_bladder"}


def validation_structures(patients: int):
    """(case id, image path, structure name, reference loader) for the validation structures."""
    for pt in sorted((DATA / "openkbp" / "validation-pats").iterdir())[:patients]:
        for organ in OPENKBP_ORGANS:
            if (pt / f"{organ}.nii.gz").exists():
                yield pt.name, pt / "ct.nii.gz", organ, _reference(organ, pt / f"{organ}.nii.gz")
    lung = DATA / "clinical" / "nsclc_radiomics_lung1" / "LUNG1-002"
    for organ in ("Heart", "Esophagus", "Spinal_cord"):
        yield "LUNG1-002", lung / "ct.nii.gz", organ, _reference(organ, lung / "masks" / f"{organ}.nii.gz")
    abdomen = DATA / "samples" / "ts_abdomen_ct"
    for value, organ in ABDOMEN.items():
        yield "ts_abdomen_ct", abdomen / "example_ct.nii.gz", organ, _reference(
            organ, abdomen / "example_seg_fast_force_split.nii.gz", value)


def _reference(name, path, value=None):
    """A loader of the structure on a CT's grid, as the evaluation's case lists load it (resampled when on another)."""
    case = Case(name, Path(), {name: StructureRef(name, Path(path), value)})
    return lambda image: case.reference(name, image)


def gtv_structures():
    for case in load_cases("docs/evaluation/cases/clinical_gtv.json"):
        yield case.id, case.image, "GTV", (lambda image, c=case: c.reference("GTV", image))


def clicks_on(backend, case_id, image_path, name, reference, fractions, three_d_click):
    image = read_image(image_path)
    a = reference(image).astype(bool)
    zs = np.flatnonzero(a.any(axis=(1, 2)))
    if len(zs) == 0:
        return []
    rows = []
    session = None
    slices = sorted({int(zs[min(len(zs) - 1, int(round(f * (len(zs) - 1))))]) for f in fractions})
    if three_d_click:  # the CLI's and the evaluation's first click: the structure's deepest voxel
        k, j, i = first_click(a, spacing=image.GetSpacing()[::-1])
        slices = [int(k)]
    for k in slices:
        if not three_d_click:
            j, i = deepest_point(a[k])
        session = SegmentationSession(backend, image, "axial", features=None if session is None else session.volume_features)
        result = session.add_point(image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))), positive=True)
        mask = session.plane.extract(session.mask, result.index).astype(bool)
        ref = session.plane.extract(a.astype(np.uint8), result.index).astype(bool)
        dice = 2 * np.count_nonzero(mask & ref) / max(1, np.count_nonzero(mask) + np.count_nonzero(ref))
        rows.append({"case": case_id, "structure": name, "slice": int(result.index), "dice": float(dice),
                     "predicted_iou": float(result.score),
                     "stability": float(stability_score(session._logits[result.index]))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _auc(signal, poor):
    """Probability that a poor mask has a lower signal than a good one (ties count half): Mann-Whitney U / n1 n2."""
    from scipy.stats import mannwhitneyu
    s, p = np.asarray(signal), np.asarray(poor, bool)
    if p.all() or not p.any():
        return float("nan")
    return float(mannwhitneyu(s[~p], s[p]).statistic / (p.sum() * (~p).sum()))


def summarise(rows, poor_below=0.7):
    from scipy.stats import spearmanr
    dice = np.array([r["dice"] for r in rows])
    poor = dice < poor_below
    print(f"{len(rows)} clicks, {poor.sum()} poor (Dice < {poor_below})")
    warned = np.array([r["predicted_iou"] for r in rows]) < LOW_SCORE
    print(f"the shipped warning (predicted IoU < {LOW_SCORE}): {warned.sum()} of {len(rows)} masks, {(warned & poor).sum()} "
          f"of them poor; mean Dice of the warned {dice[warned].mean():.3f}, of the others {dice[~warned].mean():.3f}")
    for key in ("predicted_iou", "stability"):
        s = np.array([r[key] for r in rows])
        rho = spearmanr(s, dice).statistic
        print(f"{key}: Spearman {rho:.3f}, AUC for poor masks {_auc(s, poor):.3f}")
        for t in np.quantile(s, [0.1, 0.2, 0.3]):
            flagged = s < t
            print(f"   below {t:.3f}: flags {flagged.sum()}, of them poor {(flagged & poor).sum()}, "
                  f"poor missed {(~flagged & poor).sum()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--gtv", action="store_true", help="the clinical GTVs, one click at the 3D deepest voxel")
    ap.add_argument("--patients", type=int, default=12, help="OpenKBP validation patients (default 12)")
    ap.add_argument("--summarise", type=Path, help="only summarise an earlier --out file")
    args = ap.parse_args()
    if args.summarise:
        summarise(json.loads(args.summarise.read_text()))
        return
    backend = open_backend("auto", None, "cpu")
    rows = []
    for case_id, path, name, ref in (gtv_structures() if args.gtv else validation_structures(args.patients)):
        rows += clicks_on(backend, case_id, path, name, ref, (0.3, 0.5, 0.7), args.gtv)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    summarise(rows)


if __name__ == "__main__":
    main()
