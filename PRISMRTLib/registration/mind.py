"""MIND-SSC: the modality independent neighbourhood descriptor with a self-similarity context (12 channels).

Heinrich M.P. et al., "Towards realtime multimodal fusion for image-guided interventions using self-similarities",
MICCAI 2013. For every voxel ``x`` the descriptor compares image patches around the six neighbours of ``x`` at
distance ``dilation`` (one step along +-i, +-j, +-k). Of the 15 pairs of neighbours, the 12 that are
``sqrt(2) * dilation`` apart (the edges of the octahedron they span; opposite neighbours are left out) give one
channel each::

    D_c(x) = mean over the (2 r + 1)^3 patch around x of (I(y + a_c) - I(y + b_c))^2
    MIND_c(x) = exp(-(D_c(x) - min_c D_c(x)) / V(x)),   V(x) = mean_c (D_c(x) - min_c D_c(x))

``V`` is clamped to [1e-3, 1e3] times its mean over the volume, so flat regions (air) do not divide by zero.
Values lie in (0, 1]; a linear change of intensities (a I + b, a != 0) leaves the descriptor unchanged, which is
what makes it usable across scanners and modalities. This is the descriptor ConvexAdam registers with
(Siebert, Hansen, Heinrich, Learn2Reg 2021); it matches the ``convexAdam`` package's ``MINDSSC`` up to the order of
the channels (see ``Testing/registration/test_convex_adam.py``).

Channel order here: the pairs ``(a, b)`` of :data:`NEIGHBOURS` with ``a < b`` in list order.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..errors import InvalidImageError

# The six neighbours as (dz, dy, dx) offsets in array order (k, j, i), in units of the dilation.
NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
# The 12 neighbour pairs sqrt(2) apart: one descriptor channel each.
PAIRS = tuple((a, b) for a, b in itertools.combinations(range(6), 2)
              if sum((p - q) ** 2 for p, q in zip(NEIGHBOURS[a], NEIGHBOURS[b])) == 2)
CHANNELS = len(PAIRS)
assert CHANNELS == 12


def as_volume_tensor(volume, device="cpu", dtype=None):
    """A (1, 1, Z, Y, X) float tensor from a SimpleITK image, a NumPy array (Z, Y, X) or a tensor of 3 or 5 dims."""
    import torch

    dtype = dtype or torch.float32
    if hasattr(volume, "GetDimension") and hasattr(volume, "GetSize"):  # SimpleITK image
        import SimpleITK as sitk

        if volume.GetNumberOfComponentsPerPixel() != 1:
            raise InvalidImageError("MIND-SSC needs a scalar (greyscale) volume, not a vector or colour image")
        volume = sitk.GetArrayFromImage(volume)
    if isinstance(volume, np.ndarray):
        volume = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    if not isinstance(volume, torch.Tensor):
        raise InvalidImageError(f"expected a SimpleITK image, NumPy array or torch tensor, got {type(volume).__name__}")
    if volume.dim() == 5 and volume.shape[:2] == (1, 1):
        volume = volume[0, 0]
    if volume.dim() != 3:
        raise InvalidImageError(
            f"MIND-SSC needs a 3D volume, got an array of shape {tuple(volume.shape)}: give one 3D volume"
        )
    if min(volume.shape) < 2:
        raise InvalidImageError(
            f"the volume of shape {tuple(volume.shape)} is too thin: it needs at least 2 voxels per axis"
        )
    volume = volume.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(volume).all()):
        raise InvalidImageError("the volume holds NaN or infinite values: fix or mask them before registration")
    return volume[None, None]


def _shifted(padded, offset, pad, shape):
    """The padded volume read at x + offset (array order), cropped back to ``shape``."""
    z, y, x = (pad + o for o in offset)
    return padded[:, :, z:z + shape[0], y:y + shape[1], x:x + shape[2]]


def _box_filter(volume, radius: int):
    """Mean over a (2 r + 1)^3 cube, edges replicated (the volume keeps its size)."""
    import torch.nn.functional as F

    if radius <= 0:
        return volume
    padded = F.pad(volume, (radius,) * 6, mode="replicate")
    return F.avg_pool3d(padded, 2 * radius + 1, stride=1)


def mind_ssc(volume, radius: int = 1, dilation: int = 2, downsample: int = 1, device="cpu", dtype=None):
    """MIND-SSC descriptors of a 3D volume: a (1, 12, Z', Y', X') tensor on ``device``.

    ``radius``: patch radius in voxels (patches of (2 r + 1)^3); ``dilation``: distance of the six neighbours in
    voxels; ``downsample``: average-pool the volume by this integer factor first (Z' = Z // downsample, ...), for
    speed on large volumes. Runs under ``torch.no_grad``; ``dtype`` defaults to float32.
    """
    import torch
    import torch.nn.functional as F

    if int(radius) < 0 or int(dilation) < 1 or int(downsample) < 1:
        raise ValueError(f"MIND-SSC needs radius >= 0, dilation >= 1 and downsample >= 1 "
                         f"(got {radius}, {dilation}, {downsample})")
    radius, dilation, downsample = int(radius), int(dilation), int(downsample)
    with torch.no_grad():
        image = as_volume_tensor(volume, device=device, dtype=torch.float32)
        if downsample > 1:
            if min(image.shape[2:]) < 2 * downsample:
                raise InvalidImageError(
                    f"the volume of shape {tuple(image.shape[2:])} is too small to downsample by {downsample}"
                )
            image = F.avg_pool3d(image, downsample, stride=downsample)
        shape = image.shape[2:]
        padded = F.pad(image, (dilation,) * 6, mode="replicate")
        offsets = [tuple(dilation * c for c in n) for n in NEIGHBOURS]
        distances = torch.cat([
            _box_filter((_shifted(padded, offsets[a], dilation, shape)
                         - _shifted(padded, offsets[b], dilation, shape)) ** 2, radius)
            for a, b in PAIRS
        ], dim=1)
        del padded
        distances = distances - distances.min(dim=1, keepdim=True).values
        variance = distances.mean(dim=1, keepdim=True)
        level = float(variance.mean())
        if level <= 0.0:
            raise InvalidImageError("the volume is constant: MIND-SSC has no structure to describe")
        variance = variance.clamp(level * 1e-3, level * 1e3)
        descriptor = torch.exp(-distances / variance)
    return descriptor.to(dtype or torch.float32)
