"""Imaging core: read/write, geometry, slices and their exact inverse, model-input resizing, intensities."""

from .geometry import Geometry, lps_to_ras, parse_point, ras_to_lps
from .intensity import (WINDOW_PRESETS, SliceIntensity, Window, ct_likelihood_problems, get_window,
                        normalize_percentiles, slice_intensity)
from .io import DicomSeries, image_modality, list_dicom_series, read_dicom_series, read_image, write_image
from .resize import Letterbox
from .slicing import Orientation, SlicePlane
from .validation import VolumeSummary, check_volume

__all__ = [
    "Geometry", "lps_to_ras", "ras_to_lps", "parse_point",
    "WINDOW_PRESETS", "Window", "get_window", "normalize_percentiles", "ct_likelihood_problems", "SliceIntensity",
    "slice_intensity",
    "DicomSeries", "list_dicom_series", "read_dicom_series", "read_image", "write_image", "image_modality",
    "Letterbox", "Orientation", "SlicePlane", "VolumeSummary", "check_volume",
]
