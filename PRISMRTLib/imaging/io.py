"""Reading and writing volumes: NIfTI, NRRD, MHA/MHD files and DICOM series.

DICOM pixel data is decoded by SimpleITK's GDCM reader, which bundles OpenJPEG: JPEG 2000 (lossless and lossy),
JPEG and RLE series read with no extra package. pydicom reads tags only (series description, modality).

Files are checked before they are trusted: SimpleITK's NIfTI reader (nifticlib) fills a truncated file's missing
slices with zeros and turns NaN voxels into 0 without a word, so NIfTI voxel data is read once more here, whole
(see :func:`_verify_nifti_data`). ITK, GDCM and MetaIO write their warnings straight to the process's stderr; they
are caught while a file is read and reach the user only as part of an error message.
"""

from __future__ import annotations

import gzip
import os
import re
import tempfile
import threading
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import ImageReadError, ImageWriteError, InvalidImageError

READ_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")

# DICOM tags copied onto series images as SimpleITK metadata (keys as GDCM writes them).
TAG_MODALITY = "0008|0060"
TAG_SERIES_DESCRIPTION = "0008|103e"
TAG_SERIES_UID = "0020|000e"

# Phrases of ITK's readers (MetaIO, NRRD/teem, nifticlib, zlib) that mean the file ends early or is damaged.
_TRUNCATED = re.compile(r"not read completely|expected \d+ bytes but received|fread got only|unexpected end|"
                        r"premature|end of file|truncat|\bcrc\b|invalid (stored|block|distance|code)|"
                        r"incorrect (header|data)", re.IGNORECASE)
_CHUNK = 1 << 24  # bytes per read when checking voxel data: memory stays bounded on huge volumes
_SLAB_READ_BYTES = 1 << 28  # NIfTI voxel data above this is read in _SLABS slabs (see _read_nifti_in_slabs)
_SLABS = 8


class _NativeStderr:
    """What native code wrote to file descriptor 2 while it was redirected."""

    def __init__(self, file=None):
        self._file = file

    def text(self) -> str:
        if self._file is None:
            return ""
        self._file.seek(0)  # the offset is shared with fd 2: it ends at EOF again, where writes go
        return self._file.read().decode("utf-8", "replace")


_capture_lock = threading.RLock()
_capture_depth = 0


@contextmanager
def _native_stderr():
    """Redirect fd 2 to a temporary file (reentrant; one thread at a time), so that library noise stays off the
    terminal; its text is there for error messages."""
    global _capture_depth
    with _capture_lock:
        if _capture_depth:  # an outer capture already holds fd 2
            _capture_depth += 1
            try:
                yield _NativeStderr()
            finally:
                _capture_depth -= 1
            return
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all (e.g. a GUI process): nothing to keep off it
            yield _NativeStderr()
            return
        with tempfile.TemporaryFile() as tmp:
            import sys

            try:
                sys.stderr.flush()
            except (AttributeError, OSError, ValueError):
                pass
            os.dup2(tmp.fileno(), 2)
            _capture_depth = 1
            try:
                yield _NativeStderr(tmp)
            finally:
                _capture_depth = 0
                os.dup2(saved, 2)
                os.close(saved)


def nonfinite_message(bad: int, total: int) -> str:
    """The one message for NaN or infinite voxels, whichever reader or check finds them."""
    if bad == total:
        return (f"all {total} voxels are NaN or infinite: the file holds no image; check how it was made "
                "(e.g. a failed resampling or division) and export it again")
    return f"{bad} voxels are NaN or infinite: replace them (e.g. with -1024 HU for CT) and load the volume again"


def _truncated_error(path: Path, detail: str) -> ImageReadError:
    return ImageReadError(f"'{path}' is truncated or damaged ({detail}): copy or export the file again")


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
    with _native_stderr():  # GDCM warns on stderr about every file that is not DICOM
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
        files = [p for p in Path(folder).iterdir() if p.is_file()]
        images = [p.name for p in files if _suffix(p) in READ_SUFFIXES and _suffix(p) != ".dcm"]
        held = ("it holds no files" if not files else f"none of its {len(files)} file(s) is DICOM"
                + (f"; to read '{images[0]}', give that file itself" if images else ""))
        raise ImageReadError(f"no DICOM image series found in '{folder}' ({held}): point to the folder that holds "
                             "the DICOM slices")
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
        with _native_stderr():
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
    """Read a NIfTI/NRRD/MHA file, a DICOM folder, or the series a single DICOM file belongs to.

    An empty, truncated or damaged file is refused (:class:`ImageReadError`), and so is a NIfTI file with NaN or
    infinite voxels (:class:`InvalidImageError`; the other formats keep them for :func:`check_volume` to refuse)."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"'{path}' does not exist: check the path")
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    if path.stat().st_size == 0:
        raise ImageReadError(f"'{path}' is empty (0 bytes): it was not written completely; copy or export it again")
    if _suffix(path) == ".dcm" or _is_dicom_file(path):
        uid = series_uid or _series_uid_of(path)
        return read_dicom_series(path.parent, uid)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _native_stderr() as native:
        try:
            reader.ReadImageInformation()
            if _suffix(path) in (".nii", ".nii.gz"):
                _verify_nifti_data(path, reader)
                return _read_nifti_in_slabs(reader)
            return reader.Execute()
        except RuntimeError as exc:
            raise _read_error(path, exc, native.text()) from None


def _read_nifti_in_slabs(reader: sitk.ImageFileReader) -> sitk.Image:
    """Read a NIfTI volume; a large 3D one slab by slab into one image, so that memory peaks near the image's size.

    ITK's NIfTI reader loads the whole file into nifticlib's buffer and then copies it into the image: twice the
    volume at its peak (2.5 GiB for a 1024 x 1024 x 600 int16 CT). Reading slabs of k-slices through the same reader
    (ITK decodes each one, rescaling included, so the voxels are the ones a whole read gives) and pasting each into
    the image in place bounds the extra memory to a slab (held twice: in ITK's buffer and as the slab's image). A
    gzipped file is decompressed from its start for every slab, so slabs are an eighth of the volume (a 1.2 GB
    volume reads in about twice the time); small volumes are read whole."""
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        return reader.Execute()  # refused later by check_volume, with its message
    size = reader.GetSize()
    pixel_bytes = sitk.Image([1, 1, 1], reader.GetPixelID()).GetSizeOfPixelComponent()  # of the output's type
    if int(np.prod(size, dtype=np.int64)) * pixel_bytes <= _SLAB_READ_BYTES:
        return reader.Execute()
    image = sitk.Image(size, reader.GetPixelID())
    step = max(1, -(-size[2] // _SLABS))
    for k0 in range(0, size[2], step):
        reader.SetExtractIndex((0, 0, k0))
        reader.SetExtractSize((size[0], size[1], min(step, size[2] - k0)))
        slab = reader.Execute()
        image[:, :, k0:k0 + step] = slab  # SimpleITK pastes in place (no copy of ``image``)
        if k0 == 0:  # the header's fields, as a whole read gives them (the reader's own list lacks ITK_original_*)
            for key in slab.GetMetaDataKeys():
                image.SetMetaData(key, slab.GetMetaData(key))
        del slab
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    return image


def _read_error(path: Path, exc: RuntimeError, native: str) -> ImageReadError:
    damaged = _gzip_stream_error(path)  # a damaged stream can make ITK fail to recognise the file at all
    if damaged:
        return _truncated_error(path, f"gzip: {damaged}")
    text = f"{exc}\n{native}"
    if _TRUNCATED.search(text):
        lines = [ln.strip() for ln in text.splitlines() if _TRUNCATED.search(ln)]
        detail = " ".join(lines[0].replace("[nrrd]", "").split()) if lines else "its data ends early"
        for ln in native.splitlines():  # MetaIO's "ideal = N : actual = M" follows on the next line
            if "ideal" in ln and "actual" in ln:
                detail += " (" + " ".join(ln.split()) + " bytes)"
        return _truncated_error(path, detail)
    return ImageReadError(f"cannot read '{path}' ({_first_line(exc)}): PRISM-RT reads NIfTI (.nii, .nii.gz), NRRD, "
                          "MHA/MHD files and DICOM series folders")


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _gzip_stream_error(path: Path) -> str | None:
    """Why a gzip file's stream is damaged (read whole: its CRC-32 is checked at the end), or None."""
    if not _is_gzip(path):
        return None
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(_CHUNK):
                pass
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        return str(exc) or type(exc).__name__
    return None


# NIfTI datatype codes of floating-point voxels (complex ones as pairs of floats), as numpy types.
_NIFTI_FLOATS = {16: "f4", 32: "f4", 64: "f8", 1792: "f8"}


def _verify_nifti_data(path: Path, reader: sitk.ImageFileReader) -> None:
    """Read a NIfTI file's voxel data whole, before SimpleITK does: refuse a file that ends early or whose gzip stream
    is damaged (gzip's CRC-32 and length trailer cover every byte, so a full read catches truncation and corruption
    alike, where the header's sizes alone only catch truncation), and float voxels that are NaN or infinite (which
    nifticlib silently sets to 0). The header's fields come from SimpleITK; only the byte order is read here."""
    def meta(key, default="0"):
        return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else default

    if meta("nifti_type") not in ("1", "4"):  # Analyze, or a .hdr/.img pair: the voxels are in another file
        return
    ndim = int(meta("dim[0]"))
    count = int(np.prod([max(int(meta(f"dim[{i}]", "1")), 1) for i in range(1, ndim + 1)], dtype=np.int64))
    offset = int(float(meta("vox_offset")))
    nbytes = count * int(meta("bitpix")) // 8
    float_type = _NIFTI_FLOATS.get(int(meta("datatype")))
    compressed = _is_gzip(path)
    stream = gzip.open(path, "rb") if compressed else open(path, "rb")
    bad = 0
    try:
        with stream:
            header = stream.read(offset)
            if len(header) < min(offset, 4):
                raise _truncated_error(path, "its header is incomplete")
            little = int.from_bytes(header[:4], "little") in (348, 540)  # sizeof_hdr: NIfTI-1 or NIfTI-2
            dtype = np.dtype(float_type).newbyteorder("<" if little else ">") if float_type else None
            left = nbytes
            while left > 0:
                chunk = stream.read(min(_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                if dtype is not None:
                    values = np.frombuffer(chunk[: len(chunk) - len(chunk) % dtype.itemsize], dtype)
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
            if left > 0:
                raise _truncated_error(path, f"it holds {nbytes - left} of the {nbytes} bytes of voxel data its "
                                             "header declares")
            if compressed:  # the CRC-32 is checked only at the end of the stream
                while stream.read(_CHUNK):
                    pass
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise _truncated_error(path, f"gzip: {exc}") from None
    if bad:
        raise InvalidImageError(f"'{path}': " + nonfinite_message(bad, count))


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


def check_image_suffix(path: "str | os.PathLike") -> str:
    """The suffix of a file :func:`write_image` can write; refused before any work is done for it."""
    suffix = _suffix(Path(path))
    if suffix not in WRITE_SUFFIXES:
        raise ImageWriteError(f"cannot write '{path}': use one of {', '.join(WRITE_SUFFIXES)}")
    return suffix


def write_image(image: sitk.Image, path: "str | os.PathLike", *, overwrite: bool = False) -> Path:
    """Write an image as NIfTI, NRRD or MHA (compressed). Refuses to replace a file unless ``overwrite``.

    Writes to a temporary file first and renames it, so an interrupted write never leaves a broken file.
    """
    path = Path(path)
    suffix = check_image_suffix(path)
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
