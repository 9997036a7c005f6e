"""Dense 3D features for registration from a 2D backbone: slices in three orientations, fused, PCA-reduced.

DINO-Reg's recipe (Song et al., MICCAI 2024: DINOv2 patch features of slices, PCA, ConvexAdam), on PRISM-RT's feature
backends, so registration runs on whichever backbone delineation uses:

1. Each volume (already on the working grid, see :mod:`.pipeline`) is windowed to [0, 1] and cut into its axial,
   coronal and sagittal slices (:class:`~PRISMRTLib.imaging.slicing.SlicePlane`, the display orientation the models
   were trained on); every ``slice_step``-th slice goes through the backend (``backend.encode``, one role's
   features only).
2. :meth:`BackboneFeatures.fit` fits one PCA basis on feature vectors of a few slices of *both* images (the same
   basis for both, or their channels would not correspond), inside the bodies.
3. Each slice's patch grid is projected on the basis, mapped back onto the slice's pixels through the letterbox the
   backend used (exact geometry, linear interpolation), the skipped slices are filled by linear interpolation
   along the slice axis, and the three orientations' volumes are averaged: each orientation sees in-plane context
   only, the mean sees all three.

Roles: ``"dino"`` (DINO-style dense patch features, what DINO-Reg uses), ``"sam"`` (the SAM image embedding) or
``"clip"`` (patch tokens); ``"auto"`` takes dino when the backend has one, else sam. Cost: one backbone pass per
encoded slice, ``3 * n / slice_step`` per volume of n slices a side, so it is a GPU method for the large backbones
(LiteMedSAM's encoder takes about 2 s a slice on 2 CPU cores; see BENCHMARKS.md).
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from ..errors import InvalidImageError, PrismRTError
from ..imaging.geometry import Geometry
from ..imaging.intensity import get_window
from ..imaging.slicing import SlicePlane

ORIENTATIONS = ("axial", "coronal", "sagittal")
ROLE_DENSE = {"sam": "sam_embedding", "dino": "dino_patches", "clip": "clip_patches"}
DEFAULT_CHANNELS = 12
BODY_HU = -300.0


class BackboneFeatures:
    """A feature extractor for :func:`.pipeline.register` (``method="features"`` or ``"both"``): call
    :meth:`fit` with both working-grid images, then call it on each to get a (C, Z, Y, X) float32 tensor."""

    reports_progress = True  # the pipeline passes its progress callback (which cancels by raising)

    def __init__(self, backend, *, role: str = "auto", channels: int = DEFAULT_CHANNELS,
                 orientations=ORIENTATIONS, slice_step: int = 1, window: str | None = None,
                 fit_slices: int = 6, seed: int = 0):
        self.backend = backend
        self.role = self._choose_role(backend, role)
        self.channels = int(channels)
        if self.channels < 1:
            raise ValueError(f"channels must be at least 1, got {channels}")
        self.orientations = tuple(orientations)
        for name in self.orientations:
            if name not in ORIENTATIONS:
                raise ValueError(f"unknown orientation '{name}': use some of {', '.join(ORIENTATIONS)}")
        if not self.orientations:
            raise ValueError("at least one orientation is needed")
        self.slice_step = int(slice_step)
        if self.slice_step < 1:
            raise ValueError(f"slice_step must be at least 1, got {slice_step}")
        self.window = get_window(window or getattr(backend, "default_window", "soft-tissue"))
        self.fit_slices = max(1, int(fit_slices))
        self.seed = int(seed)
        self.mean = None  # (D,) and (D, C) once fitted
        self.basis = None
        self.explained = None  # share of the variance the basis keeps
        self.timings: dict = {}

    @classmethod
    def from_model(cls, model: str | None = None, backend: str = "teachers", device: str = "auto", *,
                   progress=None, cancel=None, **kw) -> "BackboneFeatures":
        """Open a backend (:func:`PRISMRTLib.features.resolve.open_backend`: weights fetched on first use) and wrap
        it. ``model``: a manifest name or bundle folder (default: the backend's defaults)."""
        from ..features.resolve import open_backend

        return cls(open_backend(backend, model, device, progress=progress, cancel=cancel), **kw)

    @staticmethod
    def _choose_role(backend, role: str) -> str:
        roles = tuple(getattr(backend, "roles", ROLE_DENSE))
        if role == "auto":
            role = "dino" if "dino" in roles else "sam"
        if role not in ROLE_DENSE:
            raise ValueError(f"unknown feature role '{role}': use auto, {', '.join(ROLE_DENSE)}")
        if role not in roles:
            raise PrismRTError(f"the backend ({backend.describe()}) has no {role} model: choose another role "
                               f"({', '.join(roles)}) or model")
        return role

    def describe(self) -> str:
        return (f"{self.backend.describe()}, {self.role} features, {self.channels} PCA channels, "
                f"{'/'.join(self.orientations)}, every {self.slice_step} slice(s)")

    def settings(self) -> dict:
        return {"backend": self.backend.describe(), "role": self.role, "channels": self.channels,
                "orientations": list(self.orientations), "slice_step": self.slice_step,
                "window": [self.window.level, self.window.width],
                "pca_variance_kept": None if self.explained is None else round(float(self.explained), 4)}

    # ---- slices through the backbone -----------------------------------------------------------------------------
    def _values(self, image: sitk.Image) -> np.ndarray:
        if image.GetDimension() != 3:
            raise InvalidImageError(f"backbone features need a 3D image, got {image.GetDimension()}D")
        return sitk.GetArrayViewFromImage(image).astype(np.float32)

    def _encode(self, plane: SlicePlane, stack: np.ndarray, indices) -> tuple:
        """The role's patch grids (B, D, G, G) of the slices ``indices`` of a windowed (slice, row, col) stack."""
        import torch

        features = self.backend.encode(stack[list(indices)], plane.pixel_spacing, roles=(self.role,))
        grid = getattr(features, ROLE_DENSE[self.role])
        if grid is None:
            raise PrismRTError(f"the backend returned no {self.role} features")
        return torch.as_tensor(grid).float().cpu(), features.letterbox

    def fit(self, fixed: sitk.Image, moving: sitk.Image, progress=None) -> "BackboneFeatures":
        """One PCA basis from a few slices of each orientation of both images, on patches inside either body."""
        import torch

        begin = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        samples = []
        for image in (fixed, moving):
            values = self._values(image)
            geometry = Geometry.from_image(image)
            for name in self.orientations:
                plane = SlicePlane.create(geometry, name)
                stack = plane.stack_view(values)
                body = plane.stack_view(values > BODY_HU)
                filled = np.flatnonzero(body.any(axis=(1, 2)))
                if filled.size == 0:
                    raise InvalidImageError("an image shows no body (nothing above -300 HU): check the input")
                picks = np.unique(np.linspace(filled[0], filled[-1], self.fit_slices + 2)[1:-1].round().astype(int))
                grids, box = self._encode(plane, self.window.apply(stack), picks)
                if progress is not None:
                    progress(f"backbone features: fitting ({name})")
                for grid, index in zip(grids, picks):
                    inside = self._grid_mask(box, body[index], grid.shape[-1])
                    vectors = grid.reshape(grid.shape[0], -1).T[torch.from_numpy(inside.reshape(-1))]
                    if len(vectors) > 2000:
                        vectors = vectors[torch.from_numpy(rng.choice(len(vectors), 2000, replace=False))]
                    samples.append(vectors)
        data = torch.cat(samples).double()
        if len(data) < self.channels + 1:
            raise InvalidImageError("too few patches inside the bodies to fit the feature basis: the images are too "
                                    "small for backbone features; use --method mind")
        self.mean = data.mean(0)
        centred = data - self.mean
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
        k = min(self.channels, v.shape[0])
        self.basis = v[:k].T.float()  # (D, k)
        self.mean = self.mean.float()
        self.explained = float((s[:k] ** 2).sum() / (s ** 2).sum())
        self.timings["fit_s"] = time.perf_counter() - begin
        return self

    @staticmethod
    def _grid_mask(box, body_slice: np.ndarray, size: int) -> np.ndarray:
        """Which cells of a size x size patch grid cover the body (a cell counts if any of its area does)."""
        at = box.at_size(size)
        r0, c0, r1, c1 = at.content_box
        mask = np.zeros((size, size), bool)
        rows, cols = np.nonzero(body_slice)
        if rows.size:
            rc = np.floor(at.to_model(np.stack([rows, cols], 1))).astype(int).clip(0, size - 1)
            mask[rc[:, 0], rc[:, 1]] = True
        mask[:r0] = mask[r1:] = False
        mask[:, :c0] = mask[:, c1:] = False
        return mask

    def _project(self, grids):
        """(B, D, G, G) -> (B, k, G, G) on the fitted basis."""
        import torch

        b, d, g, _ = grids.shape
        flat = grids.permute(0, 2, 3, 1).reshape(-1, d) - self.mean
        return (flat @ self.basis).reshape(b, g, g, -1).permute(0, 3, 1, 2).contiguous()

    def __call__(self, image: sitk.Image, progress=None):
        """(C, Z, Y, X) float32 features on ``image``'s grid: the mean over the orientations."""
        import torch

        if self.basis is None:
            raise PrismRTError("BackboneFeatures.fit(fixed, moving) must run first (the pipeline does it)")
        begin = time.perf_counter()
        values = self._values(image)
        geometry = Geometry.from_image(image)
        total = None
        for name in self.orientations:
            plane = SlicePlane.create(geometry, name)
            stack = self.window.apply(plane.stack_view(values))
            n = stack.shape[0]
            picks = sorted(set(range(0, n, self.slice_step)) | {n - 1})
            out = np.zeros((self.channels, n) + stack.shape[1:], np.float32)
            batch = max(1, int(getattr(self.backend, "batch_size", 8)))
            for start in range(0, len(picks), batch):
                if progress is not None:
                    progress(f"backbone features: {name} slice {picks[start] + 1}/{n}")
                chunk = picks[start:start + batch]
                grids, box = self._encode(plane, stack, chunk)
                reduced = self._project(grids).numpy()
                for i, index in enumerate(chunk):
                    for c in range(reduced.shape[1]):
                        out[c, index] = box.resize_to_slice(reduced[i, c])
            _fill_between(out, picks)
            volume = np.stack([plane.stack_to_volume(out[c]) for c in range(out.shape[0])])
            total = volume if total is None else total + volume
        self.timings[f"extract_s_{len(self.timings)}"] = time.perf_counter() - begin
        return torch.from_numpy(total / len(self.orientations))


def _fill_between(out: np.ndarray, picks) -> None:
    """Linear interpolation along axis 1 of ``out`` (C, S, R, Cc) between the slices ``picks`` (sorted, in place)."""
    for a, b in zip(picks[:-1], picks[1:]):
        for index in range(a + 1, b):
            t = (index - a) / (b - a)
            out[:, index] = (1 - t) * out[:, a] + t * out[:, b]

