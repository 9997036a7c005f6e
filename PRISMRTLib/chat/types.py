"""The chat's contract: what a question becomes (an :class:`Intent`), which slice it is about (a :class:`SliceRef`),
and what comes back (an :class:`Answer`). The parser fills intents, the engines answer them, the CLI prints answers
as JSON, the Slicer panel shows them; none of them needs to know the others' insides.

Kinds of question (``Intent.kind``) and the engine that answers each:

========================  ====================================================================  ==================
kind                      example                                                               engine
========================  ====================================================================  ==================
``modality``              "is this a CT?", "what modality is this?"                             header (+ image)
``plane``                 "is this a sagittal view?", "which plane am I looking at?"            header (+ image)
``slice_thickness``       "what is the slice thickness?"                                        header
``pixel_size``            "what is the pixel spacing?"                                          header
``field_of_view``         "how wide is the field of view?"                                      header
``scan_length``           "how long is the scan?" (cranio-caudal extent)                        header
``slice_count``           "how many slices are there?"                                          header
``dimensions``            "what is the matrix size?"                                            header
``presence``              "is the left parotid in this slice?", "is there a target here?"       structures / image
``list``                  "which organs are on this slice?"                                     structures / image
``count``                 "how many PTVs are there?", "how many organs in this slice?"          structures
``volume``                "how big is PTV70?" (cm3)                                             structures
``extent``                "how long is the cord?", "over how many slices does PTV70 run?"       structures
``laterality``            "which side is the target on?"                                        structures / image
``relative_position``     "is the cord behind the target?", "is the mandible above the larynx"  structures
``distance``              "how far is the cord from the target?" (minimum, mm)                  structures
``closer``                "which parotid is closer to PTV70?"                                   structures
``overlap``               "does PTV70 overlap the mandible?"                                    structures
========================  ====================================================================  ==================

Structures are named by **concept ids** of :mod:`.lexicon` (``"parotid_left"``, ``"spinal_cord"``, ``"target"``,
``"ptv70"`` ...); a name the lexicon does not know, but that matches a loaded structure, is kept as ``"name:<Name>"``.

Frames: ``side`` and ``direction`` words are read in the **patient** frame ("the patient's left") unless the question
says screen/image ("on the left of the screen", "on the image's right"); the answer gives both.
Scope: ``"slice"`` when the question is about the current slice ("here", "this slice", "this image"), ``"volume"``
when about the scan ("in this scan", "at all"); ``None`` when the question does not say (the engine then uses the slice
if one is given, else the volume).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import PrismRTError

KINDS = (
    "modality", "plane", "slice_thickness", "pixel_size", "field_of_view", "scan_length", "slice_count", "dimensions",
    "presence", "list", "count", "volume", "extent", "laterality", "relative_position", "distance", "closer",
    "overlap",
)
HEADER_KINDS = ("modality", "plane", "slice_thickness", "pixel_size", "field_of_view", "scan_length", "slice_count",
                "dimensions")
# patient-frame directions (LPS: +x left, +y posterior, +z superior)
DIRECTIONS = ("left", "right", "anterior", "posterior", "superior", "inferior")
# screen-frame directions (what the user sees in the slice view: radiological display, patient's left on the right)
SCREEN_DIRECTIONS = ("left", "right", "up", "down")
FRAMES = ("patient", "screen")
SCOPES = ("slice", "volume")
AXES = {"axial": 2, "coronal": 1, "sagittal": 0}  # ITK index axis a slice index counts along: k, j, i

# Answer.status
ANSWERED, CANNOT_TELL, CLARIFY = "answered", "cannot_tell", "clarify"


class ChatError(PrismRTError):
    """A request the chat cannot take (bad slice spec, unreadable question file): says what to do."""


@dataclass(frozen=True)
class SliceRef:
    """A slice of the image: ``axis`` axial, coronal or sagittal, ``index`` the 0-based voxel index of the image
    along k, j or i (the CLI's ``--slice AXIS:INDEX``)."""

    axis: str
    index: int

    @classmethod
    def parse(cls, text: "str | SliceRef | None") -> "SliceRef | None":
        if text is None or isinstance(text, SliceRef):
            return text
        axis, sep, index = str(text).strip().partition(":")
        axis = axis.strip().lower()
        if not sep or axis not in AXES or not index.strip().lstrip("-").isdigit():
            raise ChatError(f"cannot read the slice '{text}': write AXIS:INDEX, AXIS axial, coronal or sagittal and "
                            "INDEX the 0-based voxel index along k, j or i (e.g. axial:63)")
        return cls(axis, int(index))

    @property
    def itk_axis(self) -> int:
        return AXES[self.axis]

    def __str__(self) -> str:
        return f"{self.axis}:{self.index}"


@dataclass(frozen=True)
class Intent:
    """What a question asks, as the parser read it."""

    kind: str
    structures: tuple[str, ...] = ()  # concept ids (lexicon) or "name:<Name>", in the order the question names them
    direction: str | None = None  # relative_position: DIRECTIONS (frame "patient") or SCREEN_DIRECTIONS ("screen")
    frame: str = "patient"  # FRAMES: the frame the question's side/direction words are in
    scope: str | None = None  # SCOPES, or None when the question does not say
    plane: str | None = None  # plane: the plane the question names ("is this sagittal?"), else None ("which plane?")
    modality: str | None = None  # modality: the modality the question names ("is this an MR?"), else None
    unit: str | None = None  # the unit asked for ("mm", "cm", "cm3", "ml"); None = the engine's default
    threshold: float | None = None  # "is the cord within 5 mm of the target?": 5.0 (mm), with unit
    polar: bool = False  # a yes/no question ("is ...?", "does ...?") rather than what/which/how
    confidence: float = 1.0  # the parser's probability that this reading is the right one
    question: str = ""  # the question as asked

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown intent kind '{self.kind}'")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["structures"] = list(self.structures)
        return d


@dataclass
class Answer:
    """One answer. ``answer`` is the sentence a user reads; ``confidence`` the calibrated probability that it is
    right; ``source`` names the engine (``"header"``, ``"structures"``, ``"image model (<backend/model>)"``,
    ``"parser"``). ``value`` is the machine-readable answer (bool for yes/no, a number with ``unit``, a string such
    as ``"left"`` or ``"axial"``, a list of names). ``slice`` is the slice the answer speaks of (a click on the
    answer in Slicer jumps there). ``status`` is ``answered``, ``cannot_tell`` (``answer`` then starts "I cannot tell
    from this CT because ...") or ``clarify`` (``readings`` holds the two readings to choose from)."""

    answer: str
    confidence: float
    source: str
    value: Any = None
    unit: str | None = None
    status: str = ANSWERED
    kind: str | None = None
    slice: str | None = None
    readings: list[str] = field(default_factory=list)
    intent: dict | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["confidence"] = round(float(self.confidence), 4)
        return d

    @classmethod
    def cannot_tell(cls, because: str, *, source: str, kind: str | None = None, confidence: float = 1.0,
                    slice: str | None = None, intent: dict | None = None) -> "Answer":
        """ "I cannot tell from this CT because ..." (``confidence``: that this is indeed not answerable)."""
        return cls(f"I cannot tell from this CT because {because}", confidence, source, None, None, CANNOT_TELL, kind,
                   slice, intent=intent)


@dataclass
class ChatContext:
    """What an engine may look at: the image (SimpleITK, LPS), the slice the question is about (None: no slice
    given), the loaded structures (a :class:`.structures.StructureSet`, or None) and the image model engine (or
    None when no backend is available)."""

    image: Any
    slice: SliceRef | None = None
    structures: Any = None
    image_model: Any = None


# Answer.value by kind (what eval-ask compares; units in Answer.unit):
#   presence, relative_position, overlap, and every polar question: bool
#   list: sorted list of structure ids (concept ids or "name:<Name>"); count: int
#   volume: float, "cm3"; extent, distance, scan_length, slice_thickness: float, "mm"
#   laterality: "left" | "right" | "bilateral" | "midline" (patient frame; Answer.details["screen"] the screen side)
#   closer: the structure id; modality: "CT" | "MR" | ...; plane: "axial" | "coronal" | "sagittal"
#   pixel_size: [row, column] mm of the slice's plane (axial when no slice); field_of_view: [width, height] mm of it
#   slice_count: int (slices along the slice's axis; axial when no slice); dimensions: [i, j, k] voxels
