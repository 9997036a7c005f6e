"""What a click costs the Slicer module beyond the model: writing the session's mask into the segment, and reading
the segment back before the next click (to adopt the user's own edits), against slicer-core on a CT-sized volume.

    python Testing/benchmarks/bench_module.py [--size 512 512 150] [--repeat 5]

The backend is the test oracle (no model), so only the module's MRML work is timed. Rows: a write (bounding box of
the structure only), the read-back when the segment is unchanged since the last write (skipped by its fingerprint),
the read-back after an edit by hand (read + adopt), and, for scale, the whole-grid copies the module used before
(a full-volume labelmap write, a resampled read).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "PRISMRT"), str(REPO / "Testing")]


def _time(f, repeat):
    f()  # warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs=3, default=(512, 512, 150), metavar=("I", "J", "K"))
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)

    import numpy as np
    import SimpleITK as sitk
    import vtk
    from vtk.util import numpy_support

    from prismrt_testing import OracleBackend, slicer_core_or_skip

    slicer = slicer_core_or_skip()
    from PRISMRTModule import conversions
    from PRISMRTModule.delineation import DelineationLogic

    ni, nj, nk = args.size
    scene = slicer.vtkMRMLScene()
    ct = np.full((nk, nj, ni), -1000, np.int16)
    ct[:, nj // 5: 4 * nj // 5, ni // 5: 4 * ni // 5] = 40
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((0.98, 0.98, 2.0))
    volume = conversions.imageToVolumeNode(image, "CT", scene=scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = DelineationLogic()
    logic.start(volume, segmentation, "GTV", backend=OracleBackend(), window="soft-tissue")
    k0, c = nk // 3, ni // 2
    logic.session.mask[k0:k0 + 30, c - 30:c + 30, c - 30:c + 30] = 1  # a 60 x 60 x 30 voxel tumour
    logic.writeSegment("x")

    def edited_read_back():
        mask = conversions.segmentToMask(segmentation, "GTV", volume)
        mask[k0 + 5, c, c + 31] ^= 1  # one voxel painted or erased
        result = sitk.GetImageFromArray(mask)
        result.CopyInformation(image)
        conversions.maskToSegment(result, segmentation, "GTV")
        logic.syncFromSegment()

    def full_grid_write():  # what the module did before: the whole grid as the labelmap
        labelmap = slicer.vtkOrientedImageData()
        labelmap.SetDimensions(ni, nj, nk)
        labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = logic.session.mask.ravel() != 0
        labelmap.SetImageToWorldMatrix(conversions.imageIjkToRasMatrix(image))
        modes = slicer.vtkSlicerSegmentationsModuleLogic
        modes.SetBinaryLabelmapToSegment(labelmap, segmentation, logic._segmentId(), modes.MODE_REPLACE)

    rows = [
        ("write (structure's bounding box)", _time(lambda: logic.writeSegment("x"), args.repeat)),
        ("read-back, segment unchanged", _time(logic.syncFromSegment, args.repeat)),
        ("read-back after an edit (edit + read + adopt)", _time(edited_read_back, args.repeat)),
        ("for scale: write of the whole grid", _time(full_grid_write, args.repeat)),
    ]
    base = rows[0][1]
    print(f"volume {ni} x {nj} x {nk}, tumour 60 x 60 x 30 voxels, median of {args.repeat}\n")
    print("| step | ms | / write |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
