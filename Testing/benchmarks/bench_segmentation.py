"""Interactive delineation speed, both backends side by side in one run.

    python Testing/benchmarks/bench_segmentation.py [--teachers standin|official|lite] [--student tiny|vit_small|vit_base]
        [--device cpu] [--clicks 20] [--slices 40] [--bundle-teachers NAME|FOLDER] [--bundle-student NAME|FOLDER]
        [--ct CT.nii.gz --target MASK.nii.gz]

Measures, on the shipped OpenKBP CT (axial slices, 128 x 128 at 3.9 mm) or the CT given (e.g. a clinical one at
512 x 512):
- feature latency per slice (what a click on a new slice costs once);
- click-to-mask latency with cached features (prompt encoder + mask decoder + mapping the mask back to the slice),
  median over ``--clicks`` clicks;
- propagation through ``--slices`` slices (features and decoder for every slice, plus the two orthogonal views that
  bound it; stop rules disabled).
Weights are random unless bundles (folders or model names, e.g. ``litemedsam``) are given: timing does not depend
on them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from PRISMRTLib.features import create_backend
from PRISMRTLib.features.resolve import model_folder
from PRISMRTLib.models import build_components, load_bundle, preset_configs, save_bundle
from PRISMRTLib.models.biomedclip import write_vocab
from PRISMRTLib.segmentation import SegmentationSession, interior_point

SAMPLE = Path(__file__).resolve().parents[1] / "Data" / "openkbp_pt_226"


def _bundle(kind: str, teachers: str, student: str, folder: Path) -> Path:
    configs = preset_configs(teachers, student if kind == "prismrt" else None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(["ct"], folder.parent / "vocab.txt")
    torch.manual_seed(0)
    save_bundle(folder, kind, configs, build_components(kind, configs), vocab, name=kind, version="bench")
    return folder


def measure(backend, image, ptv, clicks: int, slices: int) -> dict:
    session = SegmentationSession(backend, image, "axial")
    stack = session.plane.stack_view(ptv)
    index = int(np.argmax(stack.sum(axis=(1, 2))))
    r, c = interior_point(stack[index])
    point = session.plane.slice_coords_to_point([index, r, c])
    # features of new slices (first use of each)
    feature_times = []
    for i in range(index - 2, index + 3):
        t0 = time.perf_counter()
        session.features(i)
        feature_times.append(time.perf_counter() - t0)
    # clicks on a cached slice
    click_times = []
    session.add_point(point)  # warm-up
    for _ in range(clicks):
        session.undo()
        t0 = time.perf_counter()
        session.add_point(point)
        click_times.append(time.perf_counter() - t0)
    # propagation through a fixed number of slices, with an empty cache
    session = SegmentationSession(backend, image, "axial", cache_slices=4)
    session.add_point(point)
    t0 = time.perf_counter()
    session.propagate(min_score=-1.0, min_area_mm2=0.0, min_overlap=0.0, max_slices=slices // 2,
                      cross_view_margin_mm=1e6)  # the views are computed; their bound is lifted
    propagate_s = time.perf_counter() - t0
    done = int(np.count_nonzero(session.plane.stack_view(session.mask).any(axis=(1, 2)))) - 1
    return {
        "features_ms": statistics.median(feature_times) * 1000,
        "click_ms": statistics.median(click_times) * 1000,
        "click_p90_ms": float(np.percentile(click_times, 90)) * 1000,
        "propagate_s": propagate_s,
        "propagated_slices": done,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="standin", choices=("standin", "official", "lite", "tiny"))
    parser.add_argument("--student", default="vit_small", choices=("tiny", "vit_small", "vit_base"))
    parser.add_argument("--bundle-teachers", help="a teachers model: name or folder (default: random weights)")
    parser.add_argument("--bundle-student", help="a prismrt model: name or folder (default: random weights)")
    parser.add_argument("--ct", type=Path, default=SAMPLE / "ct.nii.gz")
    parser.add_argument("--target", type=Path, default=SAMPLE / "PTV70.nii.gz", help="the structure clicked")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    image = sitk.ReadImage(str(args.ct))
    ptv = sitk.GetArrayFromImage(sitk.ReadImage(str(args.target))) > 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {
            "teachers": model_folder(args.bundle_teachers) if args.bundle_teachers else
            _bundle("teachers", args.teachers, args.student, tmp / "t" / "b"),
            "prismrt": model_folder(args.bundle_student) if args.bundle_student else
            _bundle("prismrt", args.teachers, args.student, tmp / "s" / "b"),
        }
        rows = {name: measure(create_backend(load_bundle(folder), args.device), image, ptv, args.clicks, args.slices)
                for name, folder in folders.items()}
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; teachers "
          f"{args.bundle_teachers or args.teachers}, student {args.bundle_student or args.student}; CT {args.ct.name} "
          f"{image.GetSize()}")
    print("| backend | features / new slice (ms) | click-to-mask, cached (ms, median / p90) | "
          f"propagate {args.slices} slices (s) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['features_ms']:.0f} | {r['click_ms']:.1f} / {r['click_p90_ms']:.1f} | "
              f"{r['propagate_s']:.2f} ({r['propagated_slices']} slices) |")


if __name__ == "__main__":
    main()
