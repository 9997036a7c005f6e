"""The itk-elastix peer of `prismrt eval-reg`, run as a child process (evaluation only; needs itk-elastix):

    python -m PRISMRTLib.registration.elastix_peer KIND FIXED MOVING FIELD_OUT THREADS

KIND: ``elastix-affine`` (elastix's default affine map, centre-of-gravity initialisation), ``elastix-bspline``
(that, then its default B-spline map, final grid spacing 10 mm) or ``elastix-bspline-from-affine`` (the B-spline map
alone: the caller has aligned MOVING already). Writes transformix's displacement field on FIXED's grid (ITK's
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
    if params.GetNumberOfParameterMaps() == 0:
        print(f"unknown peer '{kind}'", file=sys.stderr)
        return 2
    params.SetParameter("DefaultPixelValue", "0")
    params.SetParameter("WriteResultImage", "false")
    _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False,
                                                   number_of_threads=int(threads))
    field = itk.transformix_deformation_field(moving, transform)
    itk.imwrite(field, out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
