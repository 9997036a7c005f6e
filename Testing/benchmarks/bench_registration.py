"""Inter-patient registration on OpenKBP validation pairs: organ Dice at each step, folding, CPU time.

    OMP_NUM_THREADS=1 python Testing/benchmarks/bench_registration.py [--pairs 3] [--smoothness 1]
        [--inverse-consistency] [--device cpu] [--threads 1] [--reference] [--data ../shared/data/openkbp]

Pairs are consecutive patients of ``validation-pats`` (sorted): fixed pt_A, moving pt_B. The moving patient's organ
masks (Brainstem, SpinalCord, parotids, Esophagus, Larynx, Mandible; those both patients have) are warped with
nearest-neighbour lookup and compared with the fixed patient's: mean organ Dice with no registration (identity),
after the initial alignment (affine) and after the deformable step. Folding is the share of fixed voxels with
det(J) <= 0, from a direction-aware Jacobian (``qa.jacobian_determinant``), over the whole grid and inside the fixed
body; SimpleITK's DisplacementFieldJacobianDeterminant (which ignores the direction, diag(1, 1, -1) here) is shown
beside it. CPU time is process time (all threads) of the whole ``register`` call.

``--reference`` also runs the ``convexAdam`` package (0.2.0, its defaults: MIND-SSC, grid 6, search 4, Adam at
half resolution, inverse consistency) on the same pairs after the same alignment, as the peer this is checked against.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from PRISMRTLib.registration.alignment import body_mask
from PRISMRTLib.registration.field import compose, voxel_grid_to_field, warp_label
from PRISMRTLib.registration.pipeline import register

ORGANS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "openkbp"


def _jacobian(field: sitk.Image) -> np.ndarray:
    try:
        from PRISMRTLib.registration.qa import jacobian_determinant
    except ImportError:  # the same formula, for a tree without qa.py
        u = sitk.GetArrayFromImage(field)
        m = np.asarray(field.GetDirection()).reshape(3, 3) * np.asarray(field.GetSpacing())[None]
        g = np.stack(np.gradient(u, axis=(2, 1, 0)), -1)
        return np.linalg.det(np.eye(3) + g @ np.linalg.inv(m))
    return sitk.GetArrayFromImage(jacobian_determinant(field))


def _dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = sitk.GetArrayViewFromImage(a) > 0, sitk.GetArrayViewFromImage(b) > 0
    total = int(x.sum()) + int(y.sum())
    return 2.0 * float(np.logical_and(x, y).sum()) / total if total else float("nan")


def _load(folder: Path):
    organs = {o: sitk.ReadImage(str(folder / f"{o}.nii.gz")) for o in ORGANS if (folder / f"{o}.nii.gz").is_file()}
    return sitk.ReadImage(str(folder / "ct.nii.gz")), organs


def _scores(fixed_organs, moving_organs, fixed, transform=None, field=None) -> float:
    common = [o for o in ORGANS if o in fixed_organs and o in moving_organs]
    out = []
    for organ in common:
        if field is not None:
            warped = warp_label(moving_organs[organ], field)
        else:
            warped = sitk.Resample(moving_organs[organ], fixed, transform or sitk.Transform(), sitk.sitkNearestNeighbor,
                                   0, moving_organs[organ].GetPixelID())
        out.append(_dice(fixed_organs[organ], warped))
    return float(np.mean(out))


def _folding(field: sitk.Image, body: np.ndarray) -> tuple[float, float, float]:
    det = _jacobian(field)
    itk = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    return 100.0 * float((det <= 0).mean()), 100.0 * float((det[body] <= 0).mean()), 100.0 * float((itk <= 0).mean())


def _reference(fixed, moving, transform):
    """The convexAdam package on the fixed grid, moving resampled through the same alignment; field in LPS mm."""
    from convexAdam.convex_adam_MIND import convex_adam_pt

    aligned = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    start = time.process_time()
    disp = convex_adam_pt(sitk.GetArrayFromImage(fixed).astype(np.float32), sitk.GetArrayFromImage(aligned),
                          device=torch.device("cpu"))
    seconds = time.process_time() - start
    voxels = np.moveaxis(disp, -1, 0)[::-1]  # its components follow the array axes (k, j, i)
    return compose(transform, voxel_grid_to_field(np.ascontiguousarray(voxels), fixed), fixed), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--smoothness", type=float, default=1.0)
    parser.add_argument("--inverse-consistency", action="store_true")
    parser.add_argument("--method", choices=("mind", "features", "both"), default="mind")
    parser.add_argument("--model", default="teachers-standin-openkbp",
                        help="features/both: the backbone's model (teachers backend)")
    parser.add_argument("--role", default="auto", help="features/both: sam, dino, clip or auto")
    parser.add_argument("--slice-step", type=int, default=1, help="features/both: encode every n-th slice")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (ITK alignment runs on 1 thread)")
    parser.add_argument("--reference", action="store_true", help="also run the convexAdam package on the same pairs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    patients = sorted(p for p in (args.data / "validation-pats").iterdir() if (p / "ct.nii.gz").is_file())
    pairs = [(patients[2 * i], patients[2 * i + 1]) for i in range(min(args.pairs, len(patients) // 2))]
    print(f"# OpenKBP inter-patient pairs, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} torch thread(s), device {args.device}, method {args.method}, smoothness {args.smoothness}, "
          f"inverse consistency {'on' if args.inverse_consistency else 'off'}, {time.strftime('%Y-%m-%d')}")
    header = ("| fixed | moving | identity | affine | deformable | folding % (grid / body / sitk) | "
              "CPU s (align / deform / total) |")
    if args.reference:
        header += " convexAdam pkg Dice | its folding % | its CPU s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    extractor = None
    if args.method != "mind":
        from PRISMRTLib.registration.backbone import BackboneFeatures

        extractor = BackboneFeatures.from_model(args.model, device=args.device, role=args.role,
                                                slice_step=args.slice_step)
        print(f"# features: {extractor.describe()}")
    rows = []
    for fixed_dir, moving_dir in pairs:
        fixed, fixed_organs = _load(fixed_dir)
        moving, moving_organs = _load(moving_dir)
        body = sitk.GetArrayFromImage(body_mask(fixed)) > 0
        start = time.process_time()
        result = register(fixed, moving, method=args.method, smoothness=args.smoothness, device=args.device,
                          inverse_consistency=args.inverse_consistency, features=extractor)
        cpu = time.process_time() - start
        identity = _scores(fixed_organs, moving_organs, fixed)
        affine = _scores(fixed_organs, moving_organs, fixed, transform=result.affine)
        deformable = _scores(fixed_organs, moving_organs, fixed, field=result.displacement)
        fold_grid, fold_body, fold_itk = _folding(result.displacement, body)
        t = result.timings
        align_s = t["alignment_s"]
        deform_s = t["features_s"] + t["deformable_s"]
        row = [identity, affine, deformable, fold_grid, fold_body, cpu]
        line = (f"| {fixed_dir.name} | {moving_dir.name} | {identity:.3f} | {affine:.3f} | {deformable:.3f} | "
                f"{fold_grid:.3f} / {fold_body:.3f} / {fold_itk:.3f} | {align_s:.0f} / {deform_s:.0f} / {cpu:.0f} |")
        if args.reference:
            field, seconds = _reference(fixed, moving, result.affine)
            ref_dice = _scores(fixed_organs, moving_organs, fixed, field=field)
            ref_fold = _folding(field, body)[0]
            row += [ref_dice, ref_fold, seconds]
            line += f" {ref_dice:.3f} | {ref_fold:.3f} | {seconds:.0f} |"
        rows.append(row)
        print(line, flush=True)
    mean = np.mean(np.array(rows), axis=0)
    line = (f"| **mean** ({len(rows)} pairs) | | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} | "
            f"{mean[3]:.3f} / {mean[4]:.3f} / | {mean[5]:.0f} |")
    if args.reference:
        line += f" {mean[6]:.3f} | {mean[7]:.3f} | {mean[8]:.0f} |"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
