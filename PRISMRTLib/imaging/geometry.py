"""Volume geometry: LPS/RAS, physical points <-> continuous voxel indices.

Conventions (as ITK/SimpleITK): physical points are LPS millimetres; a voxel index is (i, j, k) along the
image's index axes, with voxel centres at integer indices, so
``point = origin + direction @ (spacing * index)``. NumPy arrays from SimpleITK are ordered (k, j, i).
Slicer works in RAS; conversion happens only at the module boundary, with :func:`lps_to_ras` / :func:`ras_to_lps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import GeometryError, InvalidImageError

_LPS_RAS_FLIP = np.array([-1.0, -1.0, 1.0])

# Anatomical directions of the LPS axes, for messages and orientation codes.
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))


def lps_to_ras(points) -> np.ndarray:
    """Convert points (..., 3) from LPS to RAS millimetres (the conversion is its own inverse)."""
    return np.asarray(points, dtype=float) * _LPS_RAS_FLIP


ras_to_lps = lps_to_ras


def parse_point(text: str) -> np.ndarray:
    """Parse "x,y,z" (millimetres) into a float array; raise a clear error otherwise."""
    parts = [p for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or not np.all(np.isfinite(values)):
        raise GeometryError(f"'{text}' is not a point: give three numbers in millimetres, like 12.5,-40,101")
    return np.array(values)


@dataclass(frozen=True)
class Geometry:
    """The sampling grid of a 3D image: size (i, j, k), spacing, origin and direction (columns = index axes in LPS)."""

    size: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Geometry":
        if image.GetDimension() != 3:
            raise InvalidImageError(
                f"expected a 3D image, got {image.GetDimension()}D: load the whole series (3D) and try again"
            )
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=np.array(image.GetSpacing(), dtype=float),
            origin=np.array(image.GetOrigin(), dtype=float),
            direction=np.array(image.GetDirection(), dtype=float).reshape(3, 3),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """NumPy array shape (k, j, i)."""
        return self.size[::-1]

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction * self.spacing[None, :]
        m[:3, 3] = self.origin
        return m

    def index_to_physical(self, index) -> np.ndarray:
        """Continuous index (..., 3) in (i, j, k) order -> LPS points (..., 3)."""
        index = np.asarray(index, dtype=float)
        return self.origin + (index * self.spacing) @ self.direction.T

    def physical_to_index(self, points) -> np.ndarray:
        """LPS points (..., 3) -> continuous index (..., 3) in (i, j, k) order; exact inverse of index_to_physical."""
        points = np.asarray(points, dtype=float)
        return np.linalg.solve(self.direction, (points - self.origin).T).T / self.spacing

    def contains_index(self, index) -> np.ndarray:
        """True where a continuous index lies inside the volume (voxel extents, i.e. within half a voxel of the edge)."""
        index = np.asarray(index, dtype=float)
        size = np.array(self.size, dtype=float)
        return np.all((index >= -0.5) & (index <= size - 0.5), axis=-1)

    def physical_to_voxel(self, point) -> tuple[int, int, int]:
        """The (i, j, k) voxel containing an LPS point; a clear error if the point is outside the volume."""
        point = np.asarray(point, dtype=float)
        index = self.physical_to_index(point)
        if not self.contains_index(index):
            lo, hi = self.bounds()
            raise GeometryError(
                "the point ({:.1f}, {:.1f}, {:.1f}) mm (LPS) is outside the volume, which spans "
                "x {:.1f}..{:.1f}, y {:.1f}..{:.1f}, z {:.1f}..{:.1f} mm: click inside the image".format(
                    *point, lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]
                )
            )
        size = np.array(self.size)
        return tuple(int(v) for v in np.clip(np.floor(index + 0.5), 0, size - 1))

    def corners(self) -> np.ndarray:
        """The 8 outer corners (voxel edges, not centres) in LPS, shape (8, 3)."""
        size = np.array(self.size, dtype=float)
        grid = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij")).reshape(3, -1).T
        return self.index_to_physical(grid * size - 0.5)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned LPS bounding box (min, max) of the voxel extents."""
        c = self.corners()
        return c.min(axis=0), c.max(axis=0)

    def is_orthonormal(self, tol: float = 1e-4) -> bool:
        return bool(np.allclose(self.direction.T @ self.direction, np.eye(3), atol=tol))

    def anatomical_axes(self) -> tuple[int, int, int]:
        """For each index axis (i, j, k), the LPS axis (0=x R-L, 1=y A-P, 2=z I-S) it is closest to.

        Chosen as the permutation that best matches the direction matrix, so every anatomical axis is used once.
        """
        best, best_score = (0, 1, 2), -1.0
        for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
            score = sum(abs(self.direction[perm[a], a]) for a in range(3))
            if score > best_score:
                best, best_score = perm, score
        return best

    def obliquity_degrees(self) -> float:
        """Largest angle between an index axis and the anatomical axis it is closest to."""
        axes = self.anatomical_axes()
        cosines = [abs(self.direction[axes[a], a]) / np.linalg.norm(self.direction[:, a]) for a in range(3)]
        return float(np.degrees(np.arccos(np.clip(min(cosines), -1.0, 1.0))))

    def orientation_text(self) -> str:
        """Where each index axis runs, e.g. "i: R->L, j: A->P, k: S->I"."""
        parts = []
        for a, name in enumerate("ijk"):
            lps_axis = self.anatomical_axes()[a]
            low, high = _AXIS_LETTERS[lps_axis]
            if self.direction[lps_axis, a] < 0:
                low, high = high, low
            parts.append(f"{name}: {low}->{high}")
        return ", ".join(parts)


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tol``, relative for mm)."""
    if tuple(a.GetSize()) != tuple(b.GetSize()):
        return False
    scale = max(1.0, float(np.max(np.abs(a.GetSpacing()))))
    return (np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol * scale)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * scale * 10)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))
