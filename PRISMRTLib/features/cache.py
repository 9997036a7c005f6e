"""Features of one volume's slices, per orientation, computed once and shared by the tasks that read them.

A :class:`VolumeFeatures` belongs to one volume, one intensity mapping (a CT window, or MR percentiles) and one
backend. Slices are cut along the volume's own axes (:class:`~PRISMRTLib.imaging.SlicePlane`); each slice's features
are computed on first request and kept in a bounded least-recently-used cache keyed by (orientation, slice index,
view), where a view is the whole slice or a crop of it (a zoomed look, letterboxed on its own). Delineation asks for
the SAM embedding only; registration and chat ask for every role's features of the same slices, which replaces the
partial entry.

Thread-safe: the lock guards the cache only, so a GUI may prefetch slices in a worker thread while the user clicks
(at worst a slice is encoded twice).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import SimpleITK as sitk

from ..imaging import Geometry, Orientation, SlicePlane
from ..imaging.intensity import SliceIntensity
from ..imaging.resize import crop_with_padding
from .backends import FeatureBackend
from .types import SliceFeatures

View = tuple  # (row0, col0, rows, cols) of a crop in slice pixels; () = the whole slice


def _complete(features: SliceFeatures) -> int:
    return sum(getattr(features, n) is not None for n in SliceFeatures.TENSORS)


class VolumeFeatures:
    def __init__(self, backend: FeatureBackend, image: sitk.Image, intensity: SliceIntensity, max_slices: int = 48,
                 fill: float | None = None):
        self.backend = backend
        self.image = image
        self.geometry = Geometry.from_image(image)
        self.intensity = intensity
        self.max_slices = max(1, int(max_slices))
        self._values = sitk.GetArrayViewFromImage(image)
        self._fill = float(self._values.min()) if fill is None else float(fill)  # outside the volume: air / background
        self._planes: dict[Orientation, SlicePlane] = {}
        self._cache: OrderedDict[tuple, SliceFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.computed = 0  # slices encoded so far (for tests and benchmarks)

    def plane(self, orientation: "str | Orientation") -> SlicePlane:
        orientation = Orientation.parse(orientation)
        with self._lock:
            if orientation not in self._planes:
                self._planes[orientation] = SlicePlane.create(self.geometry, orientation)
            return self._planes[orientation]

    def slice01(self, plane: SlicePlane, index: int, view: View = ()) -> np.ndarray:
        """A slice (or a view of it) as the models see it: mapped to [0, 1]."""
        values = plane.extract(self._values, index).astype(np.float32)
        if view:
            r0, c0, rows, cols = view
            values = crop_with_padding(values, r0, c0, (int(rows), int(cols)), self._fill)
        return self.intensity.apply(values)

    def _key(self, plane: SlicePlane, index: int, view: View) -> tuple:
        return (plane.orientation, plane.check_slice_index(index), tuple(view))

    def cached(self, plane: "SlicePlane | str", index: int, view: View = (), sam_only: bool = True) -> bool:
        plane = plane if isinstance(plane, SlicePlane) else self.plane(plane)
        with self._lock:
            hit = self._cache.get(self._key(plane, index, view))
        return hit is not None and (sam_only or _complete(hit) == len(SliceFeatures.TENSORS))

    def get(self, plane: "SlicePlane | str", index: int, view: View = (), sam_only: bool = True) -> SliceFeatures:
        """Features of slice ``index`` of ``plane`` (or of the ``view`` crop of it), cached."""
        plane = plane if isinstance(plane, SlicePlane) else self.plane(plane)
        key = self._key(plane, index, view)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and (sam_only or _complete(hit) == len(SliceFeatures.TENSORS)):
                self._cache.move_to_end(key)
                return hit
        features = self.backend.encode(self.slice01(plane, key[1], view), plane.pixel_spacing, sam_only=sam_only)
        with self._lock:
            self.computed += 1
            held = self._cache.get(key)
            if held is None or _complete(features) >= _complete(held):  # a racing partial result never replaces more
                self._cache[key] = features
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_slices:
                self._cache.popitem(last=False)
        return features

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)
