"""Structure concepts: one id per anatomical structure or target the chat can talk about, the words users write for
it, and how loaded structure names (file names, Slicer segment names: ``LeftParotid``, ``Parotid_L``, ``GTV-1``,
``Lung_L``, ``Spinal_cord``, TotalSegmentator's ``kidney_left``) map onto those ids. The question parser and the
structure set both read this table, so a name is understood the same way in a question and in a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Concept:
    id: str
    name: str  # how answers name it
    aliases: tuple[str, ...]  # lower-case words users write (question side); the name is always one
    group: str  # "organ", "target", "body"
    side: str | None = None  # "left" / "right" for lateral organs
    paired: str | None = None  # the concept id of both sides together ("parotid" for parotid_left)


def _c(id, name, aliases=(), group="organ", side=None, paired=None):
    return Concept(id, name, tuple(dict.fromkeys((name.lower(), *aliases))), group, side, paired)


def _lateral(base: str, name: str, aliases: tuple[str, ...]) -> list[Concept]:
    out = [_c(base, name, aliases + tuple(a + "s" for a in aliases if not a.endswith("s")))]
    for side in ("left", "right"):
        letter = side[0]
        words = tuple(f"{s} {a}" for a in (name.lower(),) + aliases for s in (side, letter))
        out.append(_c(f"{base}_{side}", f"{side} {name.lower()}", words, side=side, paired=base))
    return out


CONCEPTS: dict[str, Concept] = {c.id: c for c in [
    # head and neck (OpenKBP)
    *_lateral("parotid", "parotid", ("parotid gland", "parotis")),
    _c("spinal_cord", "spinal cord", ("cord", "spinal canal", "myelon", "spinalcord", "medulla spinalis")),
    _c("brainstem", "brainstem", ("brain stem", "brain-stem")),
    _c("mandible", "mandible", ("lower jaw", "jaw", "jawbone", "jaw bone", "mandibula", "mandibular bone")),
    _c("larynx", "larynx", ("voice box", "laryngeal", "voicebox")),
    _c("esophagus", "oesophagus", ("esophagus", "oesophagus", "gullet", "food pipe", "oesophageal", "esophageal",
                                     "foodpipe")),
    # thorax and abdomen (clinical/, TotalSegmentator)
    *_lateral("lung", "lung", ()),
    _c("heart", "heart", ("cardiac",)),
    _c("liver", "liver", ("hepatic",)),
    _c("spleen", "spleen", ("splenic",)),
    *_lateral("kidney", "kidney", ("renal",)),
    _c("stomach", "stomach", ("gastric",)),
    _c("aorta", "aorta", ("aortic",)),
    _c("trachea", "trachea", ("windpipe",)),
    _c("bladder", "bladder", ("urinary bladder",)),
    _c("body", "body", ("patient", "external", "body outline", "skin"), group="body"),
    # targets
    _c("target", "target", ("treatment target", "tumour", "tumor", "lesion", "boost", "target volume", "boost volume",
                           "cancer", "neoplasm", "primary tumour", "primary tumor", "treatment volume"),
       group="target"),
    _c("gtv", "GTV", ("gross tumour volume", "gross tumor volume", "gross target", "gross tumour", "gross tumor",
                     "gtvp", "gtvn", "gtv primary", "gtv nodal"), group="target"),
    _c("ctv", "CTV", ("clinical target volume",), group="target"),
    _c("ptv", "PTV", ("planning target volume",), group="target"),
    _c("ptv70", "PTV70", ("ptv 70", "ptv-70", "high dose ptv", "high-dose ptv", "70 gy ptv", "ptv 7000"),
       group="target"),
    _c("ptv63", "PTV63", ("ptv 63", "ptv-63", "63 gy ptv", "ptv 6300"), group="target"),
    _c("ptv56", "PTV56", ("ptv 56", "ptv-56", "56 gy ptv", "low dose ptv", "low-dose ptv", "ptv 5600"), group="target"),
]}

TARGET_IDS = tuple(c.id for c in CONCEPTS.values() if c.group == "target")
_SIDE_PREFIX = re.compile(r"^(left|right|l|r|lt|rt|lft|rgt)(?=[^a-z]|$)|^(left|right)(?=[a-z])")
_SIDE_SUFFIX = re.compile(r"(?:^|[^a-z])(left|right|l|r|lt|rt|lft|rgt)$|(?<=[a-z])(left|right)$")
_SIDE_WORD = {"left": "left", "l": "left", "lt": "left", "lft": "left", "right": "right", "r": "right", "rt": "right",
              "rgt": "right"}

# loaded names that are not the concept's display name, normalised (lower case, separators removed, side stripped)
_NAME_FORMS = {
    "parotid": "parotid", "parotidgland": "parotid",
    "spinalcord": "spinal_cord", "cord": "spinal_cord", "spinal": "spinal_cord",
    "brainstem": "brainstem", "mandible": "mandible", "larynx": "larynx",
    "esophagus": "esophagus", "oesophagus": "esophagus",
    "lung": "lung", "lungs": "lung", "heart": "heart", "liver": "liver", "spleen": "spleen", "kidney": "kidney",
    "stomach": "stomach", "aorta": "aorta", "trachea": "trachea", "urinarybladder": "bladder", "bladder": "bladder",
    "body": "body", "external": "body", "patient": "body", "skin": "body", "bodycontour": "body",
    "gtv": "gtv", "ctv": "ctv", "ptv": "ptv",
}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", name.lower())


def concept_of_name(name: str) -> str | None:
    """The concept id of a loaded structure's name (``"LeftParotid"`` -> ``"parotid_left"``, ``"GTV-1"`` ->
    ``"gtv"``, ``"PTV70"`` -> ``"ptv70"``, ``"Lung_L"`` -> ``"lung_left"``), or None when the name is not one the
    lexicon knows (the structure is still usable by its own name)."""
    text = name.strip().lower().replace("-", "_").replace(" ", "_")
    target = re.fullmatch(r"(gtv|ctv|ptv)_?(\d+(?:\.\d+)?)?(?:_\d+)?(?:_?[a-z]+)?", text)
    if target:
        kind, number = target.group(1), target.group(2)
        if kind == "ptv" and number in ("70", "63", "56"):
            return f"ptv{number}"
        return kind
    side = None
    core = text
    m = re.match(r"^(left|right)(?=[a-z_])", core) or re.match(r"^(l|r|lt|rt|lft|rgt)_", core)
    if m:
        side, core = _SIDE_WORD[m.group(1)], core[m.end():]
    else:
        m = re.search(r"(?:_|(?<=[a-z]))(left|right)$", core) or re.search(r"_(l|r|lt|rt|lft|rgt)$", core)
        if m:
            side, core = _SIDE_WORD[m.group(1)], core[:m.start()]
    base = _NAME_FORMS.get(_normalise(core))
    if base is None:
        return None
    if side and f"{base}_{side}" in CONCEPTS:
        return f"{base}_{side}"
    return base if not side else None


def display_name(concept_or_name: str) -> str:
    """How answers name a concept id or a ``name:<Name>`` structure."""
    if concept_or_name.startswith("name:"):
        return concept_or_name[5:]
    concept = CONCEPTS.get(concept_or_name)
    return concept.name if concept else concept_or_name


def sides_of(concept_id: str) -> tuple[str, str] | None:
    """The (left, right) concept ids of a paired concept (``"parotid"`` -> ``("parotid_left", "parotid_right")``),
    or None when the concept has no sides."""
    left, right = f"{concept_id}_left", f"{concept_id}_right"
    if left in CONCEPTS and CONCEPTS[left].paired == concept_id and right in CONCEPTS:
        return left, right
    return None
