"""Header and geometry answers: modality, plane, slice thickness, pixel size, field of view, scan length, slice count,
matrix size. Everything is read from the image's grid (spacing, size, direction) through the imaging core, so an
image stored R->L, S->I or coronal gives the same physical answer as an axial LPS one.

The plane is the view's (``ctx.slice``), not the header's: without a slice the answer is "cannot tell", and the
session may ask the image model instead.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ...imaging.geometry import Geometry
from ...imaging.intensity import ct_likelihood_problems
from ...imaging.io import image_modality
from ...imaging.slicing import SlicePlane
from ..types import HEADER_KINDS, Answer, ChatContext, Intent
from . import AXIS_LETTERS, EXACT, fmt_mm, fmt_num, plane_of_index_axis, si_axis

SOURCE = "header"
SOURCE_INTENSITIES = "header (from the intensities)"
SOURCE_VIEW = "view"
TAG_SLICE_THICKNESS = "0018|0050"
AIR_HU = (-1100.0, -900.0)  # air in CT
AIR_FRACTION = 0.005  # a CT of a body has at least this much air (outside it, in the airways, the lungs)
CT_BY_INTENSITY = 0.97
MR_BY_INTENSITY = 0.7  # "not CT in HU" is sure; that it is MR (not PET, not CT without rescale) is not
OBLIQUE_DEGREES = 1.0
_PLANE_ALIASES = {"transverse": "axial", "transaxial": "axial", "frontal": "coronal"}

_MODALITY_WORDS = {"MR": "an MR image", "CT": "a CT", "PT": "a PET image", "CR": "a radiograph",
                   "NM": "a nuclear medicine image", "US": "an ultrasound image", "RTDOSE": "a dose grid"}
_MODALITY_ALIASES = {"MRI": "MR", "MR": "MR", "CT": "CT", "CAT": "CT", "CBCT": "CT", "PET": "PT", "PT": "PT",
                     "US": "US", "ULTRASOUND": "US", "XRAY": "CR", "X-RAY": "CR", "CR": "CR", "DX": "CR"}


def answer(intent: Intent, ctx: ChatContext) -> Answer | None:
    if intent.kind not in HEADER_KINDS:
        return None
    geometry = Geometry.from_image(ctx.image)
    out = _HANDLERS[intent.kind](intent, ctx, geometry)
    out.kind = intent.kind
    return out


def _normal_modality(text: str | None) -> str | None:
    if not text:
        return None
    key = text.strip().upper().replace(" ", "")
    return _MODALITY_ALIASES.get(key, key)


def _in_cm(value_mm: float, intent: Intent) -> str:
    return f" ({fmt_num(value_mm / 10)} cm)" if intent.unit == "cm" else ""


# -- modality ---------------------------------------------------------------------------------------------------------
def _modality(intent: Intent, ctx: ChatContext, geometry: Geometry) -> Answer:
    tag = image_modality(ctx.image)
    if tag:
        found, source, confidence = _normal_modality(tag), SOURCE, EXACT
        because = f"the DICOM Modality tag (0008,0060) says {tag}"
    else:
        array = sitk.GetArrayViewFromImage(ctx.image)
        sample = array.ravel()[:: max(1, array.size // 500_000)].astype(np.float32)  # fixed stride: deterministic
        air = float(np.mean((sample >= AIR_HU[0]) & (sample <= AIR_HU[1])))
        problems = ct_likelihood_problems(sample)
        source = SOURCE_INTENSITIES
        if air >= AIR_FRACTION and not problems:
            found, confidence = "CT", CT_BY_INTENSITY
            because = (f"the file stores no modality, but the intensities are CT's Hounsfield units: air near "
                       f"-1000 HU ({100 * air:.1f} % of the voxels lie between -1100 and -900 HU)")
        else:
            found, confidence = "MR", MR_BY_INTENSITY
            why = problems[0] if problems else "hardly any voxel lies near -1000 HU, where CT shows air"
            because = (f"the file stores no modality and the intensities are not CT's Hounsfield units ({why}); "
                       "MR is the likely modality, but the intensities alone cannot prove it")
    asked = _normal_modality(intent.modality)
    name = _MODALITY_WORDS.get(found, f"a {found} image")
    if intent.polar and asked:
        value = asked == found
        text = (f"Yes, this is {name}" if value else
                f"No, this is not {_MODALITY_WORDS.get(asked, f'a {asked} image')}: it is {name}") + f" ({because})."
        return Answer(text, confidence, source, value, None)
    return Answer(f"This is {name} ({because}).", confidence, source, found, None)


# -- plane ------------------------------------------------------------------------------------------------------------
def _plane(intent: Intent, ctx: ChatContext, geometry: Geometry) -> Answer:
    if ctx.slice is None:
        return Answer.cannot_tell(
            "no slice or view is given, and the plane is the view's, not the scan's: ask from a slice view, or give "
            "--slice AXIS:INDEX (e.g. axial:63)", source=SOURCE_VIEW, kind="plane")
    plane = ctx.slice.axis
    letter = AXIS_LETTERS[ctx.slice.itk_axis]
    where = f"{ctx.slice}: the view's plane, slice {letter} = {ctx.slice.index}"
    asked = (intent.plane or "").strip().lower() or None
    asked = _PLANE_ALIASES.get(asked, asked)
    if intent.polar and asked:
        value = asked == plane
        text = (f"Yes, this is {_a(plane)} {plane} view" if value else
                f"No, this is not {_a(asked)} {asked} view: it is {_a(plane)} {plane} view")
        return Answer(f"{text} ({where}).", EXACT, SOURCE_VIEW, value, None, slice=str(ctx.slice))
    return Answer(f"This is {_a(plane)} {plane} view ({where}).", EXACT, SOURCE_VIEW, plane, None,
                  slice=str(ctx.slice))


def _a(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# -- spacing and size --------------------------------------------------------------------------------------------------
def _acquisition_note(geometry: Geometry, axis: int) -> str:
    """What a physicist needs to know when the stack is not a plain axial one."""
    notes = []
    if axis != 2:
        notes.append(f"this image is not stored as axial slices: {AXIS_LETTERS[axis]} is its axis closest to "
                     f"superior-inferior ({geometry.orientation_text()})")
    oblique = geometry.obliquity_degrees()
    if oblique > OBLIQUE_DEGREES:
        notes.append(f"the image axes are oblique by {oblique:.1f} degrees, so this is measured along the image "
                     "axis, not along the patient's axis")
    return "; ".join(notes)


def _slice_thickness(intent: Intent, ctx: ChatContext, geometry: Geometry) -> Answer:
    axis = si_axis(geometry)
    spacing = float(geometry.spacing[axis])
    note = _acquisition_note(geometry, axis)
    tag = ctx.image.GetMetaData(TAG_SLICE_THICKNESS).strip() if ctx.image.HasMetaDataKey(TAG_SLICE_THICKNESS) else ""
    try:
        tagged = float(tag) if tag else None
    except ValueError:
        tagged = None
    between = "the spacing between axial slices" if axis == 2 else f"the spacing along {AXIS_LETTERS[axis]}"
    if tagged is not None and tagged > 0:
        value = tagged
        text = f"Slice thickness {fmt_num(tagged)} mm{_in_cm(tagged, intent)} (the DICOM Slice Thickness tag"
        text += "; the slices are as far apart)" if abs(tagged - spacing) < 1e-3 else \
            f"; the slices are {fmt_num(spacing)} mm apart, so they {'overlap' if tagged > spacing else 'leave gaps'})"
    else:
        value = spacing
        text = (f"Slice thickness {fmt_num(spacing)} mm{_in_cm(spacing, intent)} ({between}; the header does not "
                "store a separate thickness)")
    return Answer(text + (f". Note: {note}." if note else "."), EXACT, SOURCE, value, "mm",
                  details={"spacing_mm": spacing, "index_axis": AXIS_LETTERS[axis]})


def _view_plane(ctx: ChatContext, geometry: Geometry) -> tuple[SlicePlane, str]:
    """The slice plane a per-slice quantity is about: the view's, else axial."""
    plane = ctx.slice.axis if ctx.slice is not None else "axial"
    default = "" if ctx.slice is not None else " (no slice given)"
    return SlicePlane.create(geometry, plane), default


def _pixel_size(intent: Intent, ctx: ChatContext, geometry: Geometry) -> Answer:
    plane, default = _view_plane(ctx, geometry)
    row, col = plane.pixel_spacing
    name = plane.orientation.value
    size = f"{fmt_num(row)} mm" if abs(row - col) < 1e-6 else f"{fmt_num(row)} mm (rows) x {fmt_num(col)} mm (columns)"
    text = (f"Pixel size {size} in the {name} plane{default}: {fmt_num(row)} mm between rows and "
            f"{fmt_num(col)} mm between columns" + (" (square pixels)." if abs(row - col) < 1e-6 else "."))
    return Answer(text, EXACT, SOURCE, [row, col], "mm", details={"plane": name})


def _field_of_view(intent: Intent, ctx: ChatContext, geometry: Geometry) -> Answer:
    plane, default = _view_plane(ctx, geometry)
    rows, cols = plane.slice_shape
    row, col = plane.pixel_spacing
    width, height = cols * col, rows * row
    name = plane.orientation.value
    across = {"axial": ("right-left", "anterior-posterior"), "coronal": ("right-left", "superior-inferior"),
              "sagittal": ("anterior-posterior", "superior-inferior")}[name]
    text = (f"Field of view {fmt_mm(width)} x {fmt_mm(height)} mm in the {name} plane{default}: {fmt_mm(width)} mm "
            f"wide ({across[0]}, {cols} columns x {fmt_num(col)} mm) and {fmt_mm(height)} mm high ({across[1]}, "
            f"{rows} rows x {fmt_num(row)} mm)")
    if intent.unit == "cm":
        text += f", i.e. {fmt_num(width / 10)} x {fmt_num(height / 10)} cm"
    return Answer(text + ".", EXACT, SOURCE, [width, height], "mm", details={"plane": name})


def _scan_length(intent: Intent, ctx: ChatContext, geometry: Geometry) -> Answer:
    axis = si_axis(geometry)
    n, spacing = geometry.size[axis], float(geometry.spacing[axis])
    coverage, centres = n * spacing, (n - 1) * spacing
    note = _acquisition_note(geometry, axis)
    slices = "axial slices" if axis == 2 else f"slices along {AXIS_LETTERS[axis]}"
    text = (f"The scan covers {fmt_mm(coverage)} mm{_in_cm(coverage, intent)} cranio-caudally: {n} {slices} x "
            f"{fmt_num(spacing)} mm (the first and last slice centres are {fmt_mm(centres)} mm apart, (n - 1) x "
            f"spacing; the voxels reach half a slice beyond each)")
    return Answer(text + (f". Note: {note}." if note else "."), EXACT, SOURCE, coverage, "mm",
                  details={"slice_centres_mm": centres, "slices": n, "spacing_mm": spacing})


def _slice_count(intent: Intent, ctx: ChatContext, geometry: Geometry) -> Answer:
    plane, _ = _view_plane(ctx, geometry)
    letter = AXIS_LETTERS[plane.normal_axis]
    name = plane.orientation.value
    text = (f"{plane.num_slices} {name} slices (along {letter}, {fmt_num(plane.slice_thickness)} mm "
            f"apart; indices 0..{plane.num_slices - 1}).")
    return Answer(text, EXACT, SOURCE, int(plane.num_slices), None, details={"plane": name, "index_axis": letter})


def _dimensions(intent: Intent, ctx: ChatContext, geometry: Geometry) -> Answer:
    i, j, k = geometry.size
    planes = [plane_of_index_axis(geometry, a) for a in range(3)]
    if planes == ["sagittal", "coronal", "axial"]:
        layout = f"{k} axial slices of {j} rows x {i} columns"
    else:
        layout = geometry.orientation_text()
    s = geometry.spacing
    text = (f"Matrix {i} x {j} x {k} voxels (i x j x k: {layout}), voxel size {fmt_num(s[0])} x {fmt_num(s[1])} x "
            f"{fmt_num(s[2])} mm.")
    return Answer(text, EXACT, SOURCE, [int(i), int(j), int(k)], "voxels")


_HANDLERS = {
    "modality": _modality, "plane": _plane, "slice_thickness": _slice_thickness, "pixel_size": _pixel_size,
    "field_of_view": _field_of_view, "scan_length": _scan_length, "slice_count": _slice_count,
    "dimensions": _dimensions,
}
