"""2D slices along a volume's index axes, in a fixed display orientation, with the exact inverse.

Slices are always taken along the volume's own index axes (no interpolation). The slicing axis for an orientation
is the index axis closest to that orientation's normal (axial: S-I, coronal: A-P, sagittal: R-L). In-plane, rows and
columns are permuted and flipped so every slice reaches the models the same way up, in the radiological convention:

- axial:    rows anterior -> posterior, columns patient right -> left
- coronal:  rows superior -> inferior, columns patient right -> left
- sagittal: rows superior -> inferior, columns anterior -> posterior

All mappings are index permutations and flips, so they are exact: a voxel maps to one pixel and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from ..errors import GeometryError
from .geometry import Geometry


class Orientation(str, Enum):
    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"

    @classmethod
    def parse(cls, value: "str | Orientation") -> "Orientation":
        try:
            return cls(str(value.value if isinstance(value, Orientation) else value).lower())
        except ValueError:
            raise GeometryError(f"unknown orientation '{value}': use axial, coronal or sagittal") from None


# For each orientation: LPS axis of the slice normal, and the LPS unit vectors rows and columns run along.
_LAYOUT = {
    Orientation.AXIAL: (2, (0, 1, 0), (1, 0, 0)),  # rows +y (A->P), columns +x (R->L)
    Orientation.CORONAL: (1, (0, 0, -1), (1, 0, 0)),  # rows -z (S->I), columns +x (R->L)
    Orientation.SAGITTAL: (0, (0, 0, -1), (0, 1, 0)),  # rows -z (S->I), columns +y (A->P)
}


# Anatomical letters at the (top, bottom, left, right) edges of a displayed slice.
DISPLAY_EDGES = {
    Orientation.AXIAL: ("A", "P", "R", "L"),
    Orientation.CORONAL: ("S", "I", "R", "L"),
    Orientation.SAGITTAL: ("S", "I", "A", "P"),
}


def _array_axis(itk_axis: int) -> int:
    """NumPy axis of a (k, j, i) array for an ITK index axis (0=i, 1=j, 2=k)."""
    return 2 - itk_axis


@dataclass(frozen=True)
class SlicePlane:
    """How one orientation's slices are cut from a volume grid, and how to map between voxels and pixels.

    Pixel coordinates are (row, col), continuous, with pixel centres at integers (like voxel indices).
    """

    geometry: Geometry
    orientation: Orientation
    normal_axis: int  # ITK index axis held fixed by a slice
    row_axis: int  # ITK index axis along image rows (down the image)
    col_axis: int  # ITK index axis along image columns (across the image)
    row_flip: bool
    col_flip: bool

    @classmethod
    def create(cls, geometry: Geometry, orientation: "str | Orientation") -> "SlicePlane":
        orientation = Orientation.parse(orientation)
        normal_lps, row_vec, col_vec = _LAYOUT[orientation]
        anat = geometry.anatomical_axes()  # index axis a is closest to LPS axis anat[a]
        normal_axis = anat.index(normal_lps)
        in_plane = [a for a in range(3) if a != normal_axis]
        row_vec, col_vec = np.array(row_vec, float), np.array(col_vec, float)
        # Each in-plane index axis goes to rows or columns by which display vector it is closest to.
        dots_row = [float(row_vec @ geometry.direction[:, a]) for a in in_plane]
        if abs(dots_row[0]) >= abs(dots_row[1]):
            row_axis, col_axis = in_plane
        else:
            col_axis, row_axis = in_plane
        row_flip = float(row_vec @ geometry.direction[:, row_axis]) < 0
        col_flip = float(col_vec @ geometry.direction[:, col_axis]) < 0
        return cls(geometry, orientation, normal_axis, row_axis, col_axis, row_flip, col_flip)

    # ---- sizes ---------------------------------------------------------------------------------------------------
    @property
    def num_slices(self) -> int:
        return self.geometry.size[self.normal_axis]

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(rows, cols) of one slice."""
        return self.geometry.size[self.row_axis], self.geometry.size[self.col_axis]

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """(row, col) pixel size in mm."""
        s = self.geometry.spacing
        return float(s[self.row_axis]), float(s[self.col_axis])

    @property
    def slice_thickness(self) -> float:
        return float(self.geometry.spacing[self.normal_axis])

    # ---- arrays --------------------------------------------------------------------------------------------------
    def stack_view(self, volume: np.ndarray) -> np.ndarray:
        """View of a (k, j, i) array as (slice, row, col) in display orientation. Writes go through to ``volume``."""
        if volume.shape[:3] != self.geometry.shape:
            raise GeometryError(
                f"array of shape {volume.shape[:3]} does not match the volume grid {self.geometry.shape} (k, j, i)"
            )
        axes = (_array_axis(self.normal_axis), _array_axis(self.row_axis), _array_axis(self.col_axis))
        view = np.transpose(volume, axes + tuple(range(3, volume.ndim)))
        if self.row_flip:
            view = view[:, ::-1]
        if self.col_flip:
            view = view[:, :, ::-1]
        return view

    def check_slice_index(self, index: int) -> int:
        if not (0 <= int(index) < self.num_slices) or int(index) != index:
            raise GeometryError(
                f"{self.orientation.value} slice {index} does not exist: the volume has slices 0..{self.num_slices - 1}"
            )
        return int(index)

    def extract(self, volume: np.ndarray, index: int) -> np.ndarray:
        """One slice (rows, cols) as a copy."""
        return np.array(self.stack_view(volume)[self.check_slice_index(index)])

    def insert(self, volume: np.ndarray, index: int, values: np.ndarray) -> None:
        """Write a 2D slice (rows, cols) back into a (k, j, i) array in place: the exact inverse of :meth:`extract`."""
        values = np.asarray(values)
        if values.shape != self.slice_shape:
            raise GeometryError(f"slice of shape {values.shape} does not match {self.slice_shape} (rows, cols)")
        self.stack_view(volume)[self.check_slice_index(index)] = values

    def stack_to_volume(self, stack: np.ndarray) -> np.ndarray:
        """A (slice, row, col) stack back to a (k, j, i) array (a new array)."""
        out = np.empty(self.geometry.shape, dtype=stack.dtype)
        self.stack_view(out)[...] = stack
        return out

    # ---- coordinates ---------------------------------------------------------------------------------------------
    def _flip(self, value, axis: int, flip: bool):
        return (self.geometry.size[axis] - 1) - value if flip else value

    def index_to_slice_coords(self, index) -> np.ndarray:
        """Continuous voxel index (..., 3) in (i, j, k) -> (..., 3) as (slice, row, col)."""
        index = np.asarray(index, dtype=float)
        s = index[..., self.normal_axis]
        r = self._flip(index[..., self.row_axis], self.row_axis, self.row_flip)
        c = self._flip(index[..., self.col_axis], self.col_axis, self.col_flip)
        return np.stack([s, r, c], axis=-1)

    def slice_coords_to_index(self, coords) -> np.ndarray:
        """(slice, row, col) (..., 3) -> continuous voxel index (i, j, k); exact inverse of index_to_slice_coords."""
        coords = np.asarray(coords, dtype=float)
        index = np.empty(coords.shape, dtype=float)
        index[..., self.normal_axis] = coords[..., 0]
        index[..., self.row_axis] = self._flip(coords[..., 1], self.row_axis, self.row_flip)
        index[..., self.col_axis] = self._flip(coords[..., 2], self.col_axis, self.col_flip)
        return index

    def point_to_slice_coords(self, points) -> np.ndarray:
        """LPS points (..., 3) -> continuous (slice, row, col)."""
        return self.index_to_slice_coords(self.geometry.physical_to_index(points))

    def slice_coords_to_point(self, coords) -> np.ndarray:
        """Continuous (slice, row, col) (..., 3) -> LPS points."""
        return self.geometry.index_to_physical(self.slice_coords_to_index(coords))

    def locate(self, point) -> tuple[int, float, float]:
        """The slice an LPS point lies in and its (row, col) there; a clear error if it is outside the volume."""
        voxel = self.geometry.physical_to_voxel(point)  # raises for points outside
        s, r, c = self.point_to_slice_coords(point)
        return int(self.index_to_slice_coords(voxel)[0]), float(r), float(c)
