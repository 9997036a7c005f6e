"""The itk-elastix peer of `prismrt eval-reg`, run as a child process (evaluation only; needs itk-elastix):

    python -m PRISMRTLib.registration.elastix_peer KIND FIXED MOVING FIELD_OUT THREADS

KIND: ``elastix-affine`` (elastix's default affine map, centre-of-gravity initialisation), ``elastix-bspline``
(that, then its default B-spline map, final grid spacing 10 mm), ``elastix-bspline-from-affine`` (the B-spline map
alone: the caller has aligned MOVING already) or ``elastix-bspline-tuned`` (the preset tuned for inter-patient CT,
also on the caller's alignment: a body mask on the fixed CT with sparse-mask sampling, a 20 mm final grid over 3
levels, mutual information plus bending energy at 5x its weight). Writes transformix's displacement field on FIXED's grid (ITK's
convention, LPS mm). A process of its own: itk's ITK and SimpleITK's ITK in one process crashed.
"""

from __future__ import annotations

import sys

import numpy as np

CT_OFFSET = 1024.0


def _read(path: str, offset: float):
    import itk

    image = itk.imread(path, itk.F)
    array = np.maximum(itk.array_from_image(image), -CT_OFFSET) + np.float32(offset)
    out = itk.image_from_array(array.astype(np.float32))
    out.CopyInformation(image)
    return out


def main(argv) -> int:
    import itk

    kind, fixed_path, moving_path, out_path, threads = argv
    fixed_raw = itk.array_from_image(itk.imread(fixed_path, itk.F))
    is_ct = float(np.percentile(fixed_raw, 1)) < -500
    # centre-of-gravity initialisation weighs voxels by intensity: CT is shifted so that air is 0, not -1024
    offset = CT_OFFSET if is_ct else 0.0
    fixed, moving = _read(fixed_path, offset), _read(moving_path, offset)
    params = itk.ParameterObject.New()
    if kind in ("elastix-affine", "elastix-bspline"):
        affine = params.GetDefaultParameterMap("affine", 4)
        affine["AutomaticTransformInitialization"] = ["true"]
        affine["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        params.AddParameterMap(affine)
    if kind in ("elastix-bspline", "elastix-bspline-from-affine"):
        params.AddParameterMap(params.GetDefaultParameterMap("bspline", 4, 10.0))
    mask = None
    if kind == "elastix-bspline-tuned":
        bspline = params.GetDefaultParameterMap("bspline", 3, 20.0)
        bspline["Metric"] = ["AdvancedMattesMutualInformation", "TransformBendingEnergyPenalty"]
        bspline["Metric0Weight"] = ["1.0"]
        bspline["Metric1Weight"] = ["5.0"]
        if is_ct:  # the body (above -500 HU): samples where the anatomy is, not in air and couch-free corners
            bspline["ImageSampler"] = ["RandomSparseMask"]
            body = (fixed_raw > -500).astype(np.uint8)
            mask = itk.image_from_array(body)
            mask.CopyInformation(fixed)
        params.AddParameterMap(bspline)
    if params.GetNumberOfParameterMaps() == 0:
        print(f"unknown peer '{kind}'", file=sys.stderr)
        return 2
    params.SetParameter("DefaultPixelValue", "0")
    params.SetParameter("WriteResultImage", "false")
    extra = {"fixed_mask": mask} if mask is not None else {}
    _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False,
                                                   number_of_threads=int(threads), **extra)
    field = itk.transformix_deformation_field(moving, transform)
    itk.imwrite(field, out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
