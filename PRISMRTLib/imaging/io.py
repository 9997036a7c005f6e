"""Reading and writing volumes: NIfTI, NRRD, MHA/MHD files and DICOM series.

DICOM pixel data is decoded by SimpleITK's GDCM reader, which bundles OpenJPEG: JPEG 2000 (lossless and lossy),
JPEG and RLE series read with no extra package. pydicom reads tags only (series description, modality).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from ..errors import ImageReadError, ImageWriteError

READ_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")

# DICOM tags copied onto series images as SimpleITK metadata (keys as GDCM writes them).
TAG_MODALITY = "0008|0060"
TAG_SERIES_DESCRIPTION = "0008|103e"
TAG_SERIES_UID = "0020|000e"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


@dataclass(frozen=True)
class DicomSeries:
    uid: str
    files: tuple[str, ...]
    modality: str
    description: str


def list_dicom_series(folder: "str | os.PathLike") -> list[DicomSeries]:
    """The DICOM image series in a folder (not recursive), largest first."""
    folder = str(folder)
    reader = sitk.ImageSeriesReader()
    series = []
    for uid in reader.GetGDCMSeriesIDs(folder):
        files = tuple(reader.GetGDCMSeriesFileNames(folder, uid))
        modality, description = _read_tags(files[0])
        series.append(DicomSeries(uid, files, modality, description))
    return sorted(series, key=lambda s: -len(s.files))


def _read_tags(path: str) -> tuple[str, str]:
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality", "SeriesDescription"])
        return str(ds.get("Modality", "")), str(ds.get("SeriesDescription", ""))
    except Exception:  # tags are informative only; the pixel reader reports real problems
        return "", ""


def read_dicom_series(folder: "str | os.PathLike", series_uid: str | None = None) -> sitk.Image:
    """Read one DICOM series as a 3D image (the largest series in the folder unless ``series_uid`` is given)."""
    series = list_dicom_series(folder)
    if not series:
        raise ImageReadError(f"no DICOM image series found in '{folder}': point to the folder that holds the slices")
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise ImageReadError(
                f"series {series_uid} is not in '{folder}'; it holds: " + ", ".join(s.uid for s in series)
            )
        picked = chosen[0]
    else:
        picked = series[0]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(picked.files))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(
            f"cannot decode the DICOM series in '{folder}' ({_first_line(exc)}): "
            "the transfer syntax may be unsupported; convert it to uncompressed DICOM or NIfTI and try again"
        ) from None
    if image.HasMetaDataKey("ITK_non_uniform_sampling_deviation"):
        raise ImageReadError(
            f"the DICOM series in '{folder}' has missing or unevenly spaced slices "
            f"(deviation {image.GetMetaData('ITK_non_uniform_sampling_deviation')} mm): "
            "check that the whole series was exported, or resample it in Slicer first"
        )
    image.SetMetaData(TAG_MODALITY, picked.modality)
    image.SetMetaData(TAG_SERIES_DESCRIPTION, picked.description)
    image.SetMetaData(TAG_SERIES_UID, picked.uid)
    return image


def read_image(path: "str | os.PathLike", series_uid: str | None = None) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file, a DICOM folder, or the series a single DICOM file belongs to."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"'{path}' does not exist: check the path")
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    if _suffix(path) == ".dcm" or _is_dicom_file(path):
        uid = series_uid or _series_uid_of(path)
        return read_dicom_series(path.parent, uid)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImageReadError(
            f"cannot read '{path}' ({_first_line(exc)}): PRISM-RT reads NIfTI (.nii, .nii.gz), NRRD, "
            "MHA/MHD files and DICOM series folders"
        ) from None


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _series_uid_of(path: Path) -> str | None:
    try:
        import pydicom

        return str(pydicom.dcmread(str(path), stop_before_pixels=True).SeriesInstanceUID)
    except Exception:
        return None


def image_modality(image: sitk.Image) -> str | None:
    """The DICOM modality of an image read from a series ("CT", "MR", ...), or None if unknown."""
    if image.HasMetaDataKey(TAG_MODALITY):
        return image.GetMetaData(TAG_MODALITY).strip() or None
    return None


def write_image(image: sitk.Image, path: "str | os.PathLike", *, overwrite: bool = False) -> Path:
    """Write an image as NIfTI, NRRD or MHA (compressed). Refuses to replace a file unless ``overwrite``.

    Writes to a temporary file first and renames it, so an interrupted write never leaves a broken file.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise ImageWriteError(f"cannot write '{path}': use one of {', '.join(WRITE_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise ImageWriteError(f"'{path}' already exists: choose another name or allow overwriting")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=".prismrt-", dir=path.parent)
        os.close(fd)
        try:
            sitk.WriteImage(image, tmp, True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except (OSError, RuntimeError) as exc:
        raise ImageWriteError(f"cannot write '{path}': {_first_line(exc)}") from None
    return path


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file/line location; the description is the most useful part.
    for ln in lines:
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__
