"""The question parser: a typed question becomes :class:`.types.Intent` readings, most probable first.

    parse("is the left parotid in this slice?")            -> [Intent(kind="presence", structures=("parotid_left",),
                                                                     scope="slice", polar=True, confidence=0.97)]
    parse("is the target on the left?")                    -> [laterality, frame "patient", direction "left", 0.67,
                                                               laterality, frame "screen", direction "left", 0.29]
    parse("what's the weather")                            -> []

How it reads a question (each step is plain code, so a wrong reading can be traced):

1. *Normalise*: NFKC, lower case, contractions ("what's"), British to US spelling (tumour, centre, millimetre,
   oesophagus), words and numbers split ("PTV70" -> "ptv 70", "5mm" -> "5 mm").
2. *Typos*: a word the parser does not know is replaced by the nearest known word (rapidfuzz, optimal string
   alignment distance: a swap of two letters counts as one edit, so "slcie" and "mandibel" are one edit away); at
   most 1 edit for 4-5 letters, 2 for longer words; of two equally near words the one about images or anatomy wins
   ("thik": thick, not think), else none is taken.
3. *Structures*: the longest alias of a lexicon concept or of a loaded structure name, left to right; "left parotid"
   is one structure, "to the left of" is a direction; "left and right parotid" gives both sides. Clinical side
   shorthand (lt, lft, L, rt, rgt, R, "left-sided") before a sided name is that side ("lt parotid" is the left
   parotid, never both), and a side word where the context says so ("the pt's rt", "rt of the cord", "lt or rt").
   "Patient" and "body" are frame words, not the body contour, in "which side of the body", "the patient's left",
   "the body midline", "the patient's heart", "in this patient" (also when a contour named Patient is loaded).
4. *Kind*: an ordered list of rules over the question with its structures replaced by ``S``; when no rule decides,
   the paraphrase classifier (:mod:`.paraphrase`) gives the kind (its two best, with their probabilities, shrunk,
   as confidences: the session then asks which was meant when the best is below its threshold).
5. *Slots*: direction, frame, scope, unit, threshold, polar, plane, modality.

Conventions the engines rely on:

* ``structures`` keeps the order the question names them, except ``closer``: **reference first, then the candidates**
  ("which parotid is closer to PTV70?" -> ``("ptv70", "parotid_left", "parotid_right")``; a paired concept among the
  candidates is expanded to its two sides). The candidates are the alternatives offered ("A or B", "of A and B",
  "A vs B"), so the reference is the one structure outside them ("what's nearer X: A or B?", "is X closer to A or
  to B?"); without alternatives it is the structure after "closer to / nearer / from" ("is A nearer X than B?").
  A polar ``closer`` ("is the left parotid closer to PTV70 than the right one?") asks whether the *first candidate*
  is the closest.
* ``relative_position``: ``structures == (a, b)`` and ``direction`` d ask "is a d of b?" ("is the cord behind the
  target?" -> ``("spinal_cord", "target")``, ``"posterior"``). Not polar with a direction ("which is more anterior,
  X or Y?"): which of a and b lies further in ``direction``; no direction ("where is X relative to Y?"): describe.
* ``count`` and ``list``: ``structures`` is a filter, the concepts whose structures to count or list (``("ptv",)``
  for "how many PTVs", ``("parotid",)`` for "which parotid ..."; a paired concept stands for both sides, ``"target"``
  for every target); ``()`` means every loaded structure ("how many organs are on this slice?").
* ``extent``: cranio-caudal extent; ``unit == "slices"`` when the question counts slices ("how many slices does PTV70
  span?"), else mm (or the unit named).
* ``laterality``: polar with ``direction`` "left"/"right" in ``frame``, or "midline"/"bilateral" ("is the target
  midline?", patient frame; the structure engine answers these too); "which side" is not polar (answer both frames).
* ``presence`` with several structures asks whether all of them are there; a paired concept ("are the parotids
  here?") stands for either side, as the structure set resolves it.
* Screen frame: ``direction`` is one of ``SCREEN_DIRECTIONS`` as the user sees the slice ("left", "right", "up",
  "down"); a left/right word without a frame word is read in the patient frame (radiotherapy's convention) with the
  screen reading second; "above/below" without a frame word is superior/inferior, screen up/down second.
* ``threshold`` is always in mm for distances ("within 1 cm" -> 10.0, unit "mm"); for other polar questions it is the
  number the question compares with ("is the slice thickness 3 mm?" -> 3.0, "mm"). "More than 5 mm apart" has no
  threshold field for its sense, so it is read as a plain distance question (not polar).
* "which is farther from ..." has no kind of its own: it is read as ``distance`` (same structure order as
  ``closer``) with a lower confidence.
* Not understood (``[]``): no word about images or anatomy ("what's the weather"), things no engine answers (dose,
  HU, the patient's age or name), a side or relation of nothing named ("which side are you on?").
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Sequence

from rapidfuzz import process
from rapidfuzz.distance import OSA

from . import lexicon
from .lexicon import CONCEPTS, concept_of_name, display_name, sides_of
from .types import HEADER_KINDS, Intent

MAX_CHARS = 400  # questions are short; longer text is cut (keeps parse() fast on pasted paragraphs)
SURE = 0.97  # a rule that leaves no doubt: what remains is the chance of a misread structure or typo fix
FRAME_PRIOR = 0.69  # "is the target on the left?": patient frame, as radiotherapy reads sides
ABOVE_PRIOR = 0.8  # "above" without a frame word: superior; on the screen ("up") otherwise

# -- words -------------------------------------------------------------------------------------------------------------
_CONTRACTIONS = [
    (r"\bcan'?t\b", "can not"), (r"\bwon'?t\b", "will not"), (r"n't\b", " not"),
    (r"\b(what|where|it|that|there|here|how|which|who)'s\b", r"\1 is"), (r"\bwhats\b", "what is"),
    (r"\b(i|you|we|they)'re\b", r"\1 are"), (r"\bi'm\b", "i am"), (r"'s\b", ""), (r"s'(?=\s|$)", "s"),
]
_SPELLING = {  # British -> US (and a few variants), applied to words and to aliases alike
    "tumour": "tumor", "tumours": "tumors", "oesophagus": "esophagus", "oesophageal": "esophageal",
    "centre": "center", "centred": "centered", "centres": "centers", "millimetre": "millimeter",
    "millimetres": "millimeters", "centimetre": "centimeter", "centimetres": "centimeters", "metre": "meter",
    "metres": "meters", "millilitre": "milliliter", "millilitres": "milliliters", "litre": "liter", "litres": "liters",
    "colour": "color", "grey": "gray", "oedema": "edema", "haemorrhage": "hemorrhage", "localised": "localized",
    "lateralised": "lateralized", "lateralisation": "lateralization", "visualised": "visualized",
    "visualise": "visualize", "analyse": "analyze", "recognise": "recognize", "organisation": "organization",
    "programme": "program", "favour": "favor", "neighbouring": "neighboring",
    "neighbour": "neighbor", "behaviour": "behavior", "sagital": "sagittal", "saggital": "sagittal",
    "transversal": "transverse", "mms": "mm", "cms": "cm", "ccs": "cc", "dimension": "dimensions",
    "nr": "number", "dist": "distance", "vol": "volume", "thru": "through", "infront": "in front", "ontop": "on top",
    "craniocaudally": "craniocaudal",
    "pls": "please", "plz": "please", "u": "you", "ur": "your", "abt": "about",
}
_NUMBER_WORDS = {"two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
                 "eight": "8", "nine": "9", "ten": "10", "twelve": "12", "fifteen": "15", "twenty": "20"}
_SIDES = {"left": "left", "right": "right", "l": "left", "r": "right", "lt": "left", "rt": "right", "lft": "left",
          "rgt": "right"}
# clinical shorthand for a side ("lt parotid", "the pt's rt"): read as left/right where the context says it is a side
_SIDE_ABBREV = {"lt": "left", "lft": "left", "l": "left", "rt": "right", "rgt": "right", "r": "right"}
_SIDE_LETTERS = ("l", "r")  # single letters: sides only before a structure or with "side(d)" / "patient"
_AFTER_SIDE = frozenset("side sides sided hand half halves of or and lateral laterally aspect part border edge "
                        "hemithorax lobe neck".split())
_BEFORE_SIDE = frozenset("patient pt his her their".split())
# the words "patient" and "body" name the frame, not the body contour, in "which side of the body", "the patient's
# left", "the body midline" (a loaded "Patient" or "Body" contour is still the structure elsewhere)
_FRAME_NOUNS = frozenset({("patient",), ("body",), ("patient", "body"), ("patients",)})
_FRAME_AFTER = frozenset("left right side sides sided half halves midline middle center perspective frame "
                         "orientation coordinates point own anatomy".split())
_FRAME_BEFORE_OF = frozenset("side sides half halves midline middle center centerline hemithorax part "
                             "left right".split())

# the words a question about this CT is made of; a question with none of them (and no structure) is not understood
DOMAIN_WORDS = set("""
slice slices thickness thick spacing spaced interval increment pixel pixels voxel voxels resolution in-plane
field view fov width wide diameter scan scans scanned length long coverage cover covers covered range extent extend
extends extending span spans spanning run runs reach reaches stretch stretches tall height high deep depth
matrix dimensions size sizes grid rows columns modality ct mr mri pet ultrasound cbct xray radiograph spect
imaging acquired acquisition plane planes orientation oriented axial sagittal coronal transverse frontal
cross sectional visible visibility see seen present presence contain contains containing shows shown appear
appears exist exists depicted included include captured organ organs structure structures contour contours
segment segments segmentation segmentations oar oars roi rois anatomy target targets number count
list volume volumes big bigger biggest large larger largest small smaller smallest cc ml cm mm cubic
milliliter milliliters millimeter millimeters centimeter centimeters side sides left right lateral laterality
lateralized sided midline bilateral center centered middle central half far distance close closer closest near nearer
nearest farther furthest further farthest apart gap margin separation separated clearance proximity within
overlap overlaps overlapping overlapped share intersect intersects intersection invade invades inside touch touches
touching abut abuts contact shared behind front anterior posterior superior inferior cranial caudal dorsal ventral
above below under underneath beneath over higher lower top bottom relative respect relation position located
screen display monitor viewer image images picture patient anatomical anatomically sagittally
""".split())
# everyday words: known as they are (never "corrected" into a domain word)
COMMON_WORDS = set("""
a an the this that these those it its is are was were be been being am do does did done have has had can could
would should will shall may might must not no yes and or but if whether of in on at to from by with without for
about as into onto than then so too very much more most less least any some all each every both either neither
what which who whom whose how why when where here there hi hello hey please thanks thank you me my mine i we us
our your yours they them their he she his her one two tell give let know show find say get got put look looking
looked seeing think want like need see also just only really actually maybe perhaps ok okay now today time date
weather joke name names age sex old new good bad best worst great nice well fine sure exactly approximately
roughly around about near nearly almost part parts type kind sort thing things something anything nothing way
lift life core card care cold word lord cord slide slim spice price place plan plans plain planet plant
lesson region reason season person sleep sleeve size side site sight set sat sit saw sew
weather whether other another rather mother father water winter weight light night sign line lines fine mine
day days week year years hour hours minute minutes second seconds dose doses gray gy dvh prescription fraction
fractions stage diagnosis history hounsfield hu mean max min maximum minimum average median value values
answer question questions help model models image there their they're cancer primary
""".split())
# things no engine answers (dose, demographics, intensities): the parser says it did not understand
_UNSUPPORTED = re.compile(r"\b(dose|doses|dvh|gy|prescription|prescribed|fraction|fractions|fractionation|"
                          r"hounsfield|hu|intensity|intensities|age|birthday|sex|gender|diagnosis|stage|"
                          r"weather|joke|date|patient name|name of the patient|who is|mrn|birth|slice number|"
                          r"how long (will|does|did|would) .*take|"
                          r"which slice (am i|are we|is this)|what slice (am i|are we|is this))\b")


def _split_words(text: str) -> list[str]:
    """Lower-case words and numbers of ``text`` (no typo correction): the tokens aliases and questions share."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    for pattern, repl in _CONTRACTIONS:
        text = re.sub(pattern, repl, text)
    words = re.findall(r"\d+(?:[.,]\d+)?|[a-z]+|<=?|\u2264", text)
    out = []
    for w in words:
        w = _SPELLING.get(w, w)
        out.extend(_NUMBER_WORDS.get(w, w).split())
    return out


def _name_words(name: str) -> list[str]:
    """A loaded structure's name as words: ``LeftParotid`` -> left parotid, ``1_SUV_primair`` -> 1 suv primair."""
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", str(name))
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", name)
    return _split_words(name)


# -- the structure phrase table ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _concept_phrases() -> dict[tuple[str, ...], str]:
    phrases: dict[tuple[str, ...], str] = {}

    def add(words, cid):
        words = tuple(words)
        if not words:
            return
        forms = [words]
        last = words[-1]
        if last.isalpha() and len(last) > 1:  # plurals: "ptvs", "lungs", "tumors"
            forms.append(words[:-1] + (last + ("es" if last.endswith(("x", "ch", "sh")) else "s"),))
        if len(words) > 1 and all(w.isalpha() for w in words):  # typed without spaces: "leftparotid"
            forms.append(("".join(words),))
        for f in forms:
            phrases.setdefault(f, cid)

    for c in CONCEPTS.values():
        for alias in c.aliases:
            words = _split_words(alias)
            if words == ["patient"]:  # "the patient's left" is a frame, not the body: only "patient outline" is
                continue
            add(words, c.id)
        if c.side:  # "Parotid_L" typed as a name: parotid l
            base = CONCEPTS[c.paired]
            for alias in base.aliases:
                for letter in (c.side[0], *(k for k, v in _SIDE_ABBREV.items() if v == c.side and len(k) > 1)):
                    add(_split_words(alias) + [letter], c.id)
    for words in (["patient", "outline"], ["patient", "contour"], ["patient", "body"], ["external", "contour"],
                  ["body", "contour"], ["outline", "of", "the", "body"]):
        add(words, "body")
    return phrases


@lru_cache(maxsize=64)
def _known_phrases(known: tuple[str, ...]) -> dict[tuple[str, ...], str]:
    """Phrases of the loaded names. A loaded name gives its concept id unless several loaded names share that
    concept (PTV60 and PTV54 are both "ptv"): then each keeps its own ``name:<Name>`` so they stay apart."""
    ids = {}
    for name in known:
        if not isinstance(name, str) or not name.strip():
            continue
        ids[name] = concept_of_name(name)
    shared = {cid for cid in ids.values() if cid is not None and list(ids.values()).count(cid) > 1}
    phrases: dict[tuple[str, ...], str] = {}
    cores: dict[tuple[str, ...], list[str]] = {}
    for name, cid in ids.items():
        sid = cid if cid is not None and cid not in shared else f"name:{name}"
        words = tuple(_name_words(name))
        if not words or all(w.isdigit() or w in COMMON_WORDS for w in words):
            continue
        forms = {words, ("".join(words),)}
        if cid is None and len(words) > 1:
            side = None
            if words[0] in _SIDES:
                side, core = _SIDES[words[0]], words[1:]
            elif words[-1] in _SIDES:
                side, core = _SIDES[words[-1]], words[:-1]
            if side:  # "OpticNerve_L" asked as "left optic nerve", "optic nerve lt"
                forms |= {(side,) + core, (side[0],) + core}
                forms |= {core + (a,) for a, v in _SIDE_ABBREV.items() if v == side}
            stripped = tuple(w for w in words if not w.isdigit())
            if stripped and stripped != words:  # "1_SUV_primair" asked as "suv primair"
                cores.setdefault(stripped, []).append(sid)
        for f in forms:
            phrases[f] = sid
    for core, sids in cores.items():
        if len(set(sids)) == 1 and not all(w in COMMON_WORDS for w in core):
            phrases.setdefault(core, sids[0])
    return phrases


@lru_cache(maxsize=64)
def _phrase_table(known: tuple[str, ...]) -> tuple[dict, int, frozenset[str]]:
    """(phrases, longest phrase, words of the loaded names): loaded names win over lexicon aliases."""
    kphrases = _known_phrases(known)
    phrases = {**_concept_phrases(), **kphrases}
    return phrases, max(len(p) for p in phrases), frozenset(w for p in kphrases for w in p if w.isalpha())


# -- typo correction ---------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _rule_words() -> frozenset[str]:
    """Every word the rules look for (read from their patterns, so a new rule's words are known words at once)."""
    texts = []
    for value in globals().values():
        if isinstance(value, re.Pattern):
            texts.append(value.pattern)
        elif isinstance(value, list) and value and isinstance(value[0], tuple) and isinstance(value[0][0], str):
            texts.extend(v[0] for v in value if "\\b" in v[0])
    words = set()
    for text in texts:
        words.update(re.findall(r"[a-z]{3,}", re.sub(r"\\[bwdsSB]", " ", text)))
    return frozenset(words)


@lru_cache(maxsize=1)
def _domain_words() -> frozenset[str]:
    return frozenset(DOMAIN_WORDS | (_rule_words() - COMMON_WORDS))


@lru_cache(maxsize=1)
def _base_vocabulary() -> frozenset[str]:
    words = set(_domain_words()) | set(COMMON_WORDS)
    for phrase in _concept_phrases():
        words.update(w for w in phrase if w.isalpha())
    return frozenset(words)


@lru_cache(maxsize=64)
def _choices(extra: frozenset[str]) -> list[str]:
    return sorted(_base_vocabulary() | extra)


@lru_cache(maxsize=4096)
def _correct(word: str, extra: frozenset[str]) -> str | None:
    """The known word ``word`` is a typo of, or None (unknown, or two known words equally near)."""
    choices = _choices(extra)
    max_edits = 1 if len(word) <= 5 else 2
    found = process.extract(word, choices, scorer=OSA.distance, score_cutoff=max_edits, limit=6)
    if not found:
        return None
    best = min(d for _, d, _ in found)
    near = [w for w, d, _ in found if d == best]
    if best == 2 and len(word) < 8:  # two edits in a short word: only when it keeps the first letter
        near = [w for w in near if w[0] == word[0]]
    if len(word) <= 4:
        near = [w for w in near if w[0] == word[0]]
    if len(near) > 1:  # a question here is about the CT: "thik" is thick rather than think
        domain = [w for w in near if w in _domain_words() or w in extra]
        near = domain if domain else near
    if len(near) > 1:  # "sise": size or side? do not guess
        keep = [w for w in near if w[0] == word[0] and w[-1] == word[-1]]
        near = keep if len(keep) == 1 else []
    return near[0] if near else None


def _normalise(text: str, known_words: frozenset[str]) -> tuple[list[str], int]:
    """Words of the question with typos corrected; also how many words were corrected."""
    vocab = _base_vocabulary()
    out, fixed = [], 0
    for w in _split_words(text):
        if not w.isalpha() or len(w) < 4 or w in vocab or w in known_words:
            out.append(w)
            continue
        if w.endswith("s") and (w[:-1] in vocab or w[:-1] in known_words):  # plurals are known words too
            out.append(w)
            continue
        fix = _correct(w, known_words)
        if fix is not None:
            out.append(fix)
            fixed += 1
        else:
            out.append(w)
    return out, fixed


# -- structures --------------------------------------------------------------------------------------------------------
def _match(words: list[str], i: int, phrases: dict, max_len: int) -> tuple[str, int] | None:
    """The longest phrase at ``words[i]``: (id, its length)."""
    for length in range(min(max_len, len(words) - i), 0, -1):
        cid = phrases.get(tuple(words[i:i + length]))
        if cid is not None:
            return cid, length
    return None


_REWRITES = {("body", "axis"): ("z", "axis"), ("long", "axis"): ("z", "axis"),
             ("organs", "at", "risk"): ("organs",), ("organ", "at", "risk"): ("organ",)}


def _rewrite(words: list[str]) -> list[str]:
    """Fixed phrases that would otherwise read as a structure ("along the body axis")."""
    out, i = [], 0
    while i < len(words):
        for k, v in _REWRITES.items():
            if tuple(words[i:i + len(k)]) == k:
                out.extend(v)
                i += len(k)
                break
        else:
            out.append(words[i])
            i += 1
    return out


def _expand_sides(words: list[str], phrases: dict, max_len: int) -> list[str]:
    """Side shorthand as side words: "lt parotid" / "L parotid" / "left-sided parotid" -> "left parotid" (when the
    side and what follows name a sided structure); "the pt's rt", "rt side", "lt or rt" -> right / left. A bare
    "rt" or "l" elsewhere is left alone ("RT structure set", "5 l")."""
    out: list[str] = []
    i, n = 0, len(words)
    named = set()  # words already inside a structure's name ("parotid lt", "Lt_Lung" loaded as "lt lung")
    k = 0
    while k < n:
        found = _match(words, k, phrases, max_len)
        if found:
            named.update(range(k, k + found[1]))
        k += found[1] if found else 1
    while i < n:
        w = words[i]
        side = _SIDE_ABBREV.get(w) or (w if w in ("left", "right") else None)
        if side is None or i in named:
            out.append("patient" if w in ("pt", "pts") and i + 1 < n and (words[i + 1] in _SIDES) else w)
            i += 1
            continue
        j = i + 2 if i + 1 < n and words[i + 1] == "sided" else i + 1  # "right-sided parotid"
        if side != w or j > i + 1:
            found = _match([side] + words[j:j + max_len], 0, phrases, max_len)
            if found and found[1] >= 2:  # the side word and at least one word of a sided structure's name
                out.append(side)
                i = j
                continue
        if side != w:
            nxt = words[i + 1] if i + 1 < n else None
            prev = out[-1] if out else None
            if w in _SIDE_LETTERS:
                ok = nxt in ("side", "sided") or prev in _BEFORE_SIDE
            else:
                ok = (nxt is None or nxt in _AFTER_SIDE or prev in _BEFORE_SIDE
                      or (prev in ("or", "and") and len(out) > 1 and out[-2] in ("left", "right")))
            if ok:
                out.append(side)
                i += 1
                continue
        out.append(w)
        i += 1
    return out


def _frame_noun(words: list[str], i: int, length: int, phrases: dict, max_len: int) -> bool:
    """Whether the mention of "patient"/"body" at ``words[i:i+length]`` names the frame or the person ("which side
    of the body", "the patient's left", "the body midline", "in this patient", "the patient's heart", "does this
    patient have"), not the body contour."""
    if tuple(words[i:i + length]) not in _FRAME_NOUNS:
        return False
    nxt = words[i + length] if i + length < len(words) else None
    if nxt in _FRAME_AFTER or nxt in _SIDE_ABBREV or nxt in ("has", "have", "had"):
        return True
    if nxt is not None and words[i] in ("patient", "patients") and _match(words, i + length, phrases, max_len):
        return True  # "the patient's heart": whose heart, not a second structure
    before = words[max(0, i - 4):i]
    while before and before[-1] in ("the", "this", "a", "its", "my"):
        before = before[:-1]
    if before and before[-1] in ("does", "did", "do", "has", "had") and words[i] == "patient":
        return True  # "how many PTVs does this patient have?"
    if len(before) >= 2 and before[-1] == "of" and before[-2] in _FRAME_BEFORE_OF:
        return True
    if len(before) >= 3 and before[-1] == "of" and before[-2] in ("side", "half") and before[-3] in ("left", "right"):
        return True
    if len(before) >= 4 and before[-1] == "of" and before[-3:-1] == ["hand", "side"]:
        return True
    if before and before[-1] in ("in", "for") and words[i - 1] in ("the", "this"):  # "in this patient": scope
        return True
    return False


def _find_structures(words: list[str], phrases: dict, max_len: int) -> tuple[list[str], list[str]]:
    """(skeleton, ids): the words with each structure mention replaced by ``S``, and the mentions' ids in order."""
    words = _expand_sides(words, phrases, max_len)
    skel, ids = [], []
    i, n = 0, len(words)
    while i < n:
        # "left and right parotid(s)": both sides, in the order named
        if (i + 3 < n and words[i] in ("left", "right") and words[i + 1] in ("and", "or", "vs", "versus")
                and words[i + 2] in ("left", "right") and words[i + 2] != words[i]):
            found = _match(words, i + 3, phrases, max_len)
            if found and sides_of(found[0]):
                ids += [f"{found[0]}_{words[i]}", f"{found[0]}_{words[i + 2]}"]
                skel += ["S", words[i + 1], "S"]
                i += 3 + found[1]
                continue
        found = _match(words, i, phrases, max_len)
        if found and _frame_noun(words, i, found[1], phrases, max_len):
            skel.append("patient")  # a frame word: "side of the patient" reads as the patient frame
            i += found[1]
        elif found:
            ids.append(found[0])
            skel.append("S")
            i += found[1]
        else:
            skel.append(words[i])
            i += 1
    return skel, ids


# -- rules -------------------------------------------------------------------------------------------------------------
def _rx(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _any(*alternatives: str) -> re.Pattern:
    """One pattern matching any of ``alternatives`` (one phrase each, so rules read as lists)."""
    return re.compile("|".join(alternatives))


_NUM = r"(\d+(?:[.,]\d+)?|one|a)"
_MM = r"(mm|millimeters?|cm|centimeters?)"
_THRESHOLD = _rx(rf"\b(within|less than|closer than|nearer than|under|below|at most|no more than|not more than|"
                 rf"inside|up to|maximum|max|<=?|\u2264|no further than|not further than|no farther than) "
                 rf"(a |about |approximately )?{_NUM} ?{_MM}")
_FAR_THRESHOLD = _rx(rf"\b(more than|further than|farther than|at least|over|beyond|greater than|>) "
                     rf"(a |about )?{_NUM} ?{_MM}")
_COMPARE_NUMBER = _rx(r"(\d+(?:[.,]\d+)?) ?(mm 3|cm 3|mm|millimeters?|cm|centimeters?|cc|ml|milliliters?|slices?|"
                      r"images?|pixels?|voxels?|S|organs?|structures?|targets?|contours?)?\b")
_UNITS = [  # longest first
    (r"\bcubic (centimeters?|cm)\b|\bcm 3\b|\bccm\b", "cm3"), (r"\bcubic (millimeters?|mm)\b|\bmm 3\b", "mm3"),
    (r"\bml\b|\bmilliliters?\b", "ml"), (r"\bcc\b", "cc"), (r"\bmm\b|\bmillimeters?\b", "mm"),
    (r"\bcm\b|\bcentimeters?\b", "cm"), (r"\b(in|as|of|how many) (slices|images|sections)\b", "slices"),
]

# scope
_SLICE_SCOPE = _any(
    r"\b(this|the current|current|the present|the displayed|displayed|the shown|the visible|that|the same|my) "
      r"(axial |sagittal |coronal |transverse )?(slice|image|view|cut|section|frame|level|picture|screen|plane|"
      r"window)\b",
    r"\bon (the )?screen\b", r"\bin view\b", r"\b(on|in|at) the (slice|cut|section|level)\b",
    r"\bthe slice (i am|we are|you are|i|we) ?(looking at|viewing|on|seeing)?\b", r"\bvisible now\b", r"\bright now\b",
)
_VOLUME_SCOPE = _any(
    r"\b(in|on|across|throughout|within|of) (this|the) (whole |entire |full |complete )?(scan|ct|ct scan|volume|"
      r"study|series|exam|examination|dataset|data set|stack|3d|image volume|image stack)\b",
    r"\bin (the|this) patient\b",
    r"\b(the|this) (whole|entire|full|complete) (scan|ct|volume|study|series|stack|image|dataset)\b", r"\bat all\b",
    r"\banywhere\b", r"\bsomewhere\b", r"\bin total\b",
    r"\b(any|all|every) (slice|slices|image|images|level|levels|section|sections)\b", r"\bthroughout\b", r"\bin 3d\b",
    r"\bin (the|this) (scan|ct|volume|study|series|exam|dataset)\b", r"\bthis (scan|ct|volume|study|series|exam)\b",
    r"\boverall\b", r"\bloaded\b", r"\bsegmented\b", r"\bcontoured\b", r"\bdelineated\b",
)
_HERE = _any(
    r"\bhere\b", r"\bcurrently\b",
)

# frame
_PATIENT_FRAME = _any(
    r"\bpatient (left|right|side)\b", r"\b(left|right) (side |hand side )?of the patient\b",
    r"\b(patient|anatomical|anatomic) (frame|coordinates|orientation|terms|perspective|sense|convention)\b",
    r"\banatomically\b", r"\b(his|her|their) (left|right)\b", r"\bpatient\b",
    r"\b(left|right) sided\b", r"\bmidline\b",  # anatomical terms: "left-sided", "left of the midline"
)
_SCREEN_FRAME = _any(
    r"\b(screen|display|displayed|monitor|viewer|picture|viewport|window|image|view|shown|radiological|as seen|as "
      r"i see it|my (left|right)|top|bottom|upper half|lower half)\b",
)

# plane, modality
_PLANE_WORDS = [(r"\baxial\b|\btransverse\b|\bcross sectional\b|\bcross section\b|\btransaxial\b|\bhorizontal\b",
                 "axial"),
                (r"\bsagittal\b|\bsagittally\b|\bside view\b|\bprofile\b|\blateral view\b", "sagittal"),
                (r"\bcoronal\b|\bfrontal\b|\bcoronally\b", "coronal")]
_MODALITY_WORDS = [(r"\bcone beam( ct)?\b|\bcbct\b|\bct\b|\bcat scan\b|\bcomputed tomography\b|\bcomputer tomography\b",
                    "CT"),
                   (r"\bmri\b|\bmr\b|\bmagnetic resonance\b|\bnmr\b", "MR"),
                   (r"\bpet\b|\bpositron\b", "PT"), (r"\bspect\b|\bnuclear medicine\b", "NM"),
                   (r"\bultrasound\b|\bsonography\b|\bus scan\b|\becho\b", "US"),
                   (r"\bx ray\b|\bxray\b|\bradiograph\b|\bplain film\b", "DX")]

# header kinds (strongest phrases first)
_SLICE_THICKNESS = _any(
    r"\b(slice|section|cut)s? (thickness|spacing|interval|increment|distance|gap|width|separation|resolution)\b",
    r"\bthickness of (the |each |a |one |every )?(slice|section|cut|image)",
    r"\bhow thick (is|are) (the |each |a |one |every |these |those )?(slice|section|cut|image)",
    r"\b(spacing|distance|gap|interval) between (the |two |adjacent |consecutive |neighboring )?(slice|section|"
      r"cut|image)",
    r"\bz (spacing|resolution|step)\b", r"\b(spacing|step|distance) (along|in) (the )?z\b",
    r"\bthrough plane (resolution|spacing)\b", r"\b(slice|section|cut)s? (are|is) (how|what) thick\b",
    r"\bthick (are|is) the (slice|section|cut)", r"\b(slice|section|cut)s? thick\b", r"\bslice to slice\b",
    r"\bthickness\b", r"\bfar apart (are|is) (the )?(slices|images|sections|cuts)\b",
    r"\bbetween (the )?(slices|sections|cuts)\b",
)
_PIXEL_SIZE = _any(
    r"\b(pixel|voxel|pixels|voxels) (spacing|size|sizes|dimensions|width|resolution)\b",
    r"\bin plane (resolution|spacing|pixel)", r"\bsize of (a |the |each |one )?(pixel|voxel)(?! grid| array| matrix)",
    r"\bhow (big|large|small) (is|are) (the |a |each |one )?(pixel|voxel)", r"\b(row|column) spacing\b",
    r"\bspatial resolution\b", r"\b(x|y) spacing\b", r"\bmm per pixel\b", r"\bin plane (sampling|resolution)\b",
    r"\bsampling distance\b", r"\bhow fine\b",
)
_PIXEL_WEAK = _any(
    r"\bpixels?\b", r"\bvoxels?\b", r"\bresolution\b",
)
_FIELD_OF_VIEW = _any(
    r"\bfield of view\b", r"\b(area|region) (is |was )?(displayed|shown|covered|visible|imaged)\b", r"\bfov\b",
    r"\breconstruction (diameter|field)\b",
    r"\bhow wide is (the |this )?(image|scan|view|picture|slice|reconstruction)\b",
    r"\b(width|extent|size) of the (field|reconstruction)\b", r"\bwidth of (the |this )?(image|scan|picture|slice)\b",
    r"\bimage width\b", r"\bhow (big|large) is the (field|area)\b", r"\bdisplay field\b",
    r"\bwide is (the |this )?(image|scan|view|picture|slice)\b",
    r"\b(extent|size) of the (image|slice|picture) in plane\b", r"\bin plane (extent|size)\b",
    r"\barea (does|is) (the |this )?(slice|image) (cover|covered|shown)\b",
)
_DIMENSIONS = _any(
    r"\bmatrix\b", r"\barray\b", r"\bdimensions\b", r"\b(voxel|pixel|image) (grid|array)\b", r"\bimage size\b",
    r"\bgrid size\b", r"\b(size|shape) of (the |this )?(image|volume|scan|grid|array|data|ct)\b",
    r"\bhow many (voxels|pixels|rows|columns)\b", r"\bnumber of (voxels|pixels|rows|columns)\b",
    r"\bhow (big|large) is (the |this )?(image|volume|array|grid|ct)\b", r"\b(image|volume|array|ct) (shape|size)\b",
    r"\b\d+ (by|x) \d+\b", r"\bin pixels\b", r"\bvoxel count\b",
)
_SCAN_LENGTH = _any(
    r"\bscan (length|range|extent|coverage)\b", r"\bfrom where to where\b", r"\bhead to (toe|feet)\b",
    r"\b(length|extent|coverage|range) of (the |this )?(scan|image|volume|series|ct|study|acquisition|scanned "
      r"region)\b",
    r"\bhow long (is|was) (the |this )?(scan|image|volume|series|ct|study|acquisition|stack)\b", r"\bcoverage\b",
    r"\bhow (far|much) does (the |this )?(scan|image|ct|volume) (cover|extend|go|reach|span)\b",
    r"\bhow much of the (patient|body) (is|was) (scanned|covered|imaged|included)\b",
    r"\b(craniocaudal|cranio caudal|longitudinal|z|superior inferior) (extent|length|coverage|range)\b",
    r"\bscanned (length|range|region|area)\b", r"\bscan (cover|covers|span|spans)\b", r"\bhow long\b", r"\blength\b",
    r"\bhow tall (is|was) (the |this )?(scan|image|volume)\b",
    r"\blong is (the |this )?(scan|image|ct|volume|series|stack)\b", r"\b(imaged|scanned) (length|region)\b",
    r"\blength of (the )?(body|patient) (is |was )?(imaged|scanned|covered)\b",
)
_SLICE_COUNT = _any(
    r"\bhow many (slices|images|sections|cuts|axial slices|frames|levels|pictures)\b",
    r"\bnumber of (slices|images|sections|cuts|frames)\b", r"\bslice count\b", r"\bcount (the )?(slices|images)\b",
    r"\b(slices|images) (are there|in total|does (it|the scan|this scan|the ct|this ct) have)\b",
    r"\bhow many (axial |sagittal |coronal )?(slices|images)\b",
)
_MODALITY = _any(
    r"\bmodality\b", r"\bmodalities\b",
    r"\b(what|which) (kind|type|sort) of (scan|image|imaging|study|acquisition|picture|exam)\b",
    r"\bimaging (technique|method|type|modality)\b", r"\bacquired (with|by|on)\b", r"\bscanner type\b",
    r"\b(what|which) scanner\b",
    r"\b(machine|device|scanner|equipment) (was |were )?(made|used|took|taken|produced|acquired)\b",
    r"\b(made|taken|acquired|produced) (with|by|on) (what|which)\b", r"\b(taken|made|acquired) with\b",
)
_PLANE = _any(
    r"\bplane\b", r"\bplanes\b", r"\borientation\b", r"\boriented\b",
    r"\b(which|what) (view|slice direction|direction)\b", r"\bview (is|type)\b", r"\bwhat view\b",
    r"\bkind of (view|slice|section)\b", r"\btype of (view|slice|section)\b",
    r"\bhow is (this|the) (slice|image|view) (cut|oriented)\b", r"\blooking (at|from) (which|what) direction\b",
    r"\bhow (are|am) (we|you|i) looking\b",
)

# structure kinds
_CLOSER = _any(
    r"\b(closer|closest|nearer|nearest|more close|less far)\b",
    r"\b(shortest|smallest|least|minimum) (distance|gap|separation)\b.*\bwhich\b",
    r"\bwhich\b.*\b(shortest|smallest|least) (distance|gap)\b",
)
_FARTHER = _any(
    r"\b(farther|further|farthest|furthest|more distant|most distant|further away|farther away)\b",
)
_OVERLAP = _any(
    r"\boverlap\w*", r"\bintersect\w*", r"\binvad\w*", r"\binfiltrat\w*", r"\bencroach\w*", r"\bextends? into\b",
    r"\bgo(es)? into\b", r"\binside\b", r"\bin common\b", r"\bshared?\b", r"\bshares\b", r"\btouch\w*", r"\babut\w*",
    r"\bin contact\b", r"\bcontact\b", r"\bwithin (the |a )?S\b", r"\bpart of (the )?S\b", r"\bcontained in\b",
    r"\bcommon (volume|voxels)\b", r"\bcoincide\b", r"\bcollide\b", r"\bcross(es)?\b",
)
_DISTANCE = _any(
    r"\bhow far\b", r"\bdistance\b", r"\bdistances\b", r"\bfar apart\b", r"\bapart\b", r"\bhow close\b",
    r"\bhow near\b", r"\bgap\b", r"\bmargin\b", r"\bseparation\b", r"\bseparated\b", r"\bclearance\b",
    r"\bproximity\b", r"\bwithin N\b", r"\bnear\b", r"\bclose (to|by)\b", r"\bfrom each other\b",
    r"\bhow many (mm|cm|millimeters|centimeters)\b", r"\bspace between\b", r"\bfar (is|are)\b", r"\bfar from\b",
    r"\bspacing between\b", r"\bspace\b.*\bbetween\b", r"\bhow much room\b",
)
_RELATIONS = [  # phrase -> (patient direction, screen direction or None)
    (r"\bbehind\b|\bposterior(ly)?\b|\bdorsal(ly)?\b|\bin back of\b|\bat the back of\b|\bback of\b", "posterior", None),
    (r"\bin front of\b|\banterior(ly)?\b|\bventral(ly)?\b|\bahead of\b|\bfront of\b", "anterior", None),
    (r"\bsuperior(ly)?\b|\bcranial(ly)?\b|\bcraniad\b|\bcephalad\b|\bcranially\b|\bheadward\b", "superior", None),
    (r"\binferior(ly)?\b|\bcaudal(ly)?\b|\bcaudad\b|\bfootward\b", "inferior", None),
    (r"\babove\b|\bhigher( up)?( than)?\b|\bover\b|\bon top of\b|\bupper\b|\bup from\b", "superior", "up"),
    (r"\bbelow\b|\bunder\b|\bunderneath\b|\bbeneath\b|\blower( than)?\b|\bdown from\b", "inferior", "down"),
    (r"\b(to|on|at) the (patient )?left (side |hand side )?of\b|\bleft of\b|\bleftward\b|\bmore (to the )?left\b|"
     r"\bfurther left\b", "left", "left"),
    (r"\b(to|on|at) the (patient )?right (side |hand side )?of\b|\bright of\b|\brightward\b|\bmore (to the )?right\b|"
     r"\bfurther right\b", "right", "right"),
]
_RELATIVE_ANY = _any(
    r"\brelative to\b", r"\bwith respect to\b", r"\bin relation to\b", r"\bcompared (to|with)\b",
    r"\bposition of S (relative|with respect)\b", r"\bwhere is S (relative|compared|with respect|in relation)\b",
    r"\b(which|what) side of (the )?S\b", r"\bspatial relation\b", r"\brelationship between\b",
    r"\brelation between\b", r"\bwhich (is|lies|sits) more\b",
)
_COUNT = _any(
    r"\bhow many (S|organs?|structures?|oars?|contours?|segments?|segmentations?|rois?|regions?|targets?|"
      r"different|distinct|separate|objects?|things|labels?|volumes?|masks?|delineations?|of|are|is|other)\b",
    r"\bnumber of (S|organs?|structures?|oars?|contours?|segments?|segmentations?|rois?|targets?|labels?|volumes?|"
      r"masks?|objects?|different|distinct)\b",
    r"\bcount (the )?(S|organs?|structures?|oars?|contours?|segments?|targets?|labels?)\b",
    r"\b(S|organs?|structures?|contours?|segments?|targets?) count\b", r"\bhow many\b",
    r"\b(are|is) there (\d+|several|multiple|many|more than \d+|fewer than \d+) (S|organs?|structures?|targets?|"
      r"contours?)\b",
)
_COUNT_NOT = _any(
    r"\bhow many (slices|images|sections|cuts|levels|frames|mm|cm|cc|ml|milliliters?|millimeters?|centimeters?|"
      r"cubic|liters?|voxels|pixels|axial|coronal|sagittal|rows|columns)\b",
)
_LIST = _any(
    r"\b(which|what) (S|organs?|structures?|oars?|contours?|segments?|segmentations?|rois?|targets?|anatomy|"
      r"anatomical structures?|labels?|things|objects?|else|organs? at risk)\b",
    r"\blist\b", r"\bname (the|all|every|each)\b", r"\bwhat (can|do|does|could) (you|i|we|one) see\b",
    r"\bwhat (is|are) (visible|shown|seen|present|depicted|displayed|there|contoured|segmented|here|in|on|included)\b",
    r"\benumerate\b", r"\bidentify (the|all)\b", r"\bwhat (is|are) (in|on) (the|this)\b", r"\bwhat do we have\b",
    r"\bwhat (s|is) on\b", r"\bwhich (are|ones|one)\b", r"\bwhat (organs?|structures?) (are|is|do|can)\b",
    r"\bwhat (is|are) there\b",
)
_EXTENT = _any(
    r"\bhow long\b", r"\bfrom where to where\b", r"\blength\b", r"\bextent\b", r"\bextend\w*\b", r"\bspan\w*\b",
    r"\bhow tall\b", r"\bheight\b", r"\bhow wide\b", r"\bwidth\b", r"\bhow deep\b", r"\bdepth\b", r"\bhow thick\b",
    r"\bthickness\b", r"\bcover\w*\b", r"\bruns?\b", r"\bgo(es)? from\b", r"\breach\w*\b", r"\brange\b",
    r"\bcraniocaudal\b", r"\bcranio caudal\b", r"\bsuperior inferior\b", r"\bfrom which slice\b",
    r"\b(first|last|top|bottom|lowest|highest|uppermost) (slice|image|section)\b",
    r"\b(which|what) (slices|images|sections|levels)\b", r"\bhow many (slices|images|sections|levels|cuts)\b",
    r"\bnumber of (slices|images|sections)\b", r"\bstretch\w*\b", r"\bhow far (up|down)\b", r"\bon how many\b",
    r"\bhow many axial\b", r"\bdiameter\b", r"\bdimensions?\b", r"\bmeasure\b",
)
_VOLUME = _any(
    r"\bvolumes?\b", r"\bhow (big|large|small|huge|sizable)\b", r"\bsize\b", r"\bsizes\b", r"\bcc\b", r"\bml\b",
    r"\bcm 3\b", r"\bcubic\b", r"\bmilliliters?\b", r"\bbigger\b", r"\blarger\b", r"\bsmaller\b", r"\blargest\b",
    r"\bbiggest\b", r"\bsmallest\b", r"\bhow much (space|room|volume|tissue)\b", r"\bcapacity\b", r"\bwhat size\b",
    r"\bbig is\b", r"\blarge is\b", r"\bhow many (cc|ml|cubic)\b", r"\bccm\b", r"\bmm 3\b",
)
_LATERALITY = _any(
    r"\b(which|what) (side|half|hemithorax|hemisphere)\b", r"\bleft or right\b", r"\bright or left\b",
    r"\blaterali\w*", r"\blaterality\b", r"\b(left|right) sided\b", r"\b(left|right) side\b",
    r"\bon the (left|right)\b", r"\bmidline\b", r"\bbilateral\w*", r"\bunilateral\b", r"\bone side\b",
    r"\bboth sides\b", r"\bside (is|of)\b", r"\bsided\b", r"\bcenter(ed)?\b", r"\bmiddle\b", r"\bcentral(ly)?\b",
    r"\bsides?\b", r"\b(left|right)\b",
)
_WHERE = _any(
    r"\bwhere\b", r"\blocation\b", r"\blocated\b", r"\blocate\b", r"\bposition\b", r"\bsituated\b", r"\blies\b",
    r"\blie\b",
)
_PRESENCE = _any(
    r"\bvisible\b", r"\bvisualized\b", r"\bsee\b", r"\bseen\b", r"\bpresent\b", r"\bpresence\b", r"\bcontain\w*",
    r"\bshow\w*", r"\bthere\b", r"\bappear\w*", r"\bexist\w*", r"\bincluded?\b", r"\bdepicted\b", r"\bcaptured\b",
    r"\bin view\b", r"\bany\b", r"\bdetect\w*", r"\bfind\b", r"\bspot\b", r"\bidentif\w*", r"\bin S?\b", r"\bon\b",
    r"\bdisplayed\b", r"\bpictured\b", r"\bimaged\b", r"\bcut through\b", r"\bhit\b", r"\bHERE\b", r"\bSCAN\b",
)
_GROUP_WORD = _any(
    r"\b(organs?|structures?|oars?|contours?|segments?|segmentations?|rois?|labels?|anatomy|objects?|things|"
      r"masks?|delineations?)\b",
)
_AUX = ("is", "are", "does", "do", "did", "was", "were", "can", "could", "has", "have", "will", "would", "should",
        "am", "shall", "may", "might", "isnt", "any")
_WH = ("what", "which", "how", "where", "when", "who", "why", "whose", "whats", "list", "name", "give", "show",
       "tell", "measure", "compute", "calculate", "count", "find", "describe", "estimate", "report", "identify",
       "enumerate", "determine")
_PREPOSITIONS = ("on", "in", "from", "over", "at", "for", "across", "within", "looking", "here", "now", "so")
_LEADING = _any(
    r"^((please|hey|hi|hello|so|ok|okay|and|now|then|also|quick question|question|one more|well) )+",
)
_ASK_PREFIX = _any(
    r"^((can|could|would|will) you (please )?(tell|show|give|let) (me|us)( know)?|(please )?(tell|show|give) me|i "
      r"(want|would like|need|d like) to know|do you know|i wonder|i am wondering|(can|could) i (ask|know)|let me "
      r"know) ?",
)
_OR = _any(
    r"\bor\b(?! not\b)",
)

_STRUCTURE_KINDS = ("presence", "list", "count", "volume", "extent", "laterality", "relative_position", "distance",
                    "closer", "overlap")
_PAIR_KINDS = ("relative_position", "distance", "closer", "overlap")


def _first(patterns, text):
    for pattern, value in patterns:
        if re.search(pattern, text):
            return value
    return None


def _number(text: str) -> float:
    return 1.0 if text in ("one", "a") else float(text.replace(",", "."))


class _Read:
    """Everything the rules found in one question (the slots shared by all its readings)."""

    def __init__(self, question: str, known: Sequence[str]):
        self.question = question
        phrases, max_len, known_words = _phrase_table(tuple(k for k in (known or ()) if isinstance(k, str)))
        words, self.fixed = _normalise(question[:MAX_CHARS], known_words)
        words = _rewrite(words)
        self.words = words
        skel, self.ids = _find_structures(words, phrases, max_len)
        text = " ".join(skel)
        # a tag question ("..., right?") or "right now" is not a side
        if re.search(r",\s*right\s*\??\s*$", question.strip().lower()):
            text = re.sub(r" right$", "", text)
        text = re.sub(r"\b(right|just) (now|away)\b", "now", text)
        text = re.sub(r"\ball right\b", "fine", text)
        # the number a polar question compares with ("is the slice thickness 3 mm?", "are there 2 PTVs?")
        m = _COMPARE_NUMBER.search(text)
        self.compare = (_number(m.group(1)), m.group(2) or "") if m else None
        self.threshold = self.unit_from_threshold = None
        self.far = False
        m = _THRESHOLD.search(text)
        if m:
            value = _number(m.group(3))
            self.threshold = value * 10.0 if m.group(4).startswith("c") else value
            self.unit_from_threshold = "mm"
            text = text[:m.start()] + "within N" + text[m.end():]
        else:
            m = _FAR_THRESHOLD.search(text)
            if m:
                self.far = True
                text = text[:m.start()] + "far N" + text[m.end():]
        self.text = text
        self.unit = _first(_UNITS, text)
        # scope: an explicit slice phrase beats "anywhere"/"in the scan", which beat a bare "here"
        if _SLICE_SCOPE.search(text):
            self.scope = "slice"
        elif _VOLUME_SCOPE.search(text):
            self.scope = "volume"
        elif _HERE.search(text):
            self.scope = "slice"
        else:
            self.scope = None
        # the text the structure cues read: scope phrases out (so "in the volume" is not a volume question)
        cue = _VOLUME_SCOPE.sub(" SCAN ", text)
        cue = _SLICE_SCOPE.sub(" HERE ", cue)
        self.cue = re.sub(r"\s+", " ", cue).strip()
        # polar: yes/no unless it opens with a wh-word or offers alternatives
        lead = _LEADING.sub("", text)
        asked = _ASK_PREFIX.match(lead)
        self.polar_hint: bool | None
        if asked:
            rest = lead[asked.end():]
            self.polar_hint = rest.startswith(("if ", "whether "))
        else:
            tokens = lead.split()
            first = tokens[0] if tokens else ""
            if first not in _AUX and first not in _WH:  # "from where I sit, is ...": the clause after a comma
                head, comma, tail = question.partition(",")
                clause = _split_words(tail)[:1] if comma and len(head.split()) <= 6 else []
                if clause and (clause[0] in _AUX or clause[0] in _WH):
                    first = clause[0]
            if first in _PREPOSITIONS:  # "on the image, is the target ...", "on how many slices ..."
                first = next((w for w in tokens[1:7] if w in _AUX or w in _WH), first)
            if first in _AUX:
                self.polar_hint = True
            elif first in _WH:
                self.polar_hint = False
            elif re.search(r"\b(whether|if)\b", lead):
                self.polar_hint = True
            else:
                self.polar_hint = None  # a fragment: "cord here?"
        self.alternatives = bool(_OR.search(text))
        self.plane = _first(_PLANE_WORDS, text)
        self.modality = _first(_MODALITY_WORDS, " ".join(words))
        self.patient_frame = bool(_PATIENT_FRAME.search(text))
        self.screen_frame = bool(_SCREEN_FRAME.search(text))
        domain = _domain_words()
        self.has_domain = bool(self.ids) or any(w in domain or w.rstrip("s") in domain for w in words)
        self.unsupported = bool(_UNSUPPORTED.search(text))

    @property
    def n(self) -> int:
        return len(self.ids)


# -- the kind ----------------------------------------------------------------------------------------------------------
def _rule_kind(r: _Read) -> tuple[str, float] | None:
    """(kind, confidence) when a rule settles the kind, else None."""
    t, cue, n = r.text, r.cue, r.n
    has_paired = any(sides_of(i) for i in r.ids)
    if n >= 2 or (n == 1 and has_paired):
        if _CLOSER.search(cue) and not (re.search(r"\b(closest|nearest|shortest|smallest) (distance|approach|gap|"
                                                  r"point)\b", cue) and not re.search(r"\bwhich\b", cue)):
            return "closer", SURE
        if _FARTHER.search(cue) and (n >= 2 or has_paired) and re.search(r"\b(which|is|are|who)\b", cue):
            return "distance", 0.6
    if n >= 2:
        if _OVERLAP.search(cue):
            return "overlap", SURE if not re.search(r"\btouch|\babut|\bcontact", cue) else 0.85
        if _DISTANCE.search(cue) or r.far:
            return "distance", SURE
        if any(re.search(p, cue) for p, _, _ in _RELATIONS) or _RELATIVE_ANY.search(cue):
            return "relative_position", SURE
        if re.search(r"\bbetween (the )?S and (the )?S\b", cue):  # "how much tissue lies between ..."
            return "distance", 0.85
        if re.search(r"\b(lateral|medial)(ly)? (to|of|from)\b", cue):  # no direction for it: where, not yes/no
            return "relative_position", 0.8
    # header: the strongest phrases first, structures or not ("each axial slice" reads as "each slice")
    t = re.sub(r"\b(axial|sagittal|coronal|transverse) (?=(slices?|images?|sections?|cuts?)\b)", "", t)
    if _SLICE_THICKNESS.search(t) and not (n and re.search(r"\bthick", t) and not re.search(r"\bslice|\bsection|"
                                                                                             r"\bcut", t)):
        if n == 0 or re.search(r"\bslice (thickness|spacing|interval)|\bbetween (the )?slices", t):
            return "slice_thickness", SURE if re.search(r"\bslice|\bsection|\bcut|\bz ", t) else 0.85
    if _PIXEL_SIZE.search(t) and n == 0:
        return "pixel_size", SURE
    if _DIMENSIONS.search(t) and n == 0:
        return "dimensions", SURE
    if _FIELD_OF_VIEW.search(t) and n == 0:
        return "field_of_view", SURE
    if _PIXEL_WEAK.search(t) and n == 0:
        return "pixel_size", SURE if re.search(r"\bpixel|\bvoxel|\bin plane", t) else 0.85
    if r.ids == ["body"] and re.search(r"\b(imaged|scanned|covered|included)\b", t) and _SCAN_LENGTH.search(t):
        return "scan_length", 0.9
    if n == 0 and _SCAN_LENGTH.search(t) and not re.search(r"\bhow long (did|does|will|to)\b|\btake\b", t):
        return "scan_length", SURE
    if n == 0 and _SLICE_COUNT.search(t):
        return "slice_count", SURE
    if n == 0 and (r.plane or _PLANE.search(t)) and not re.search(r"\bpixel|\bspacing\b", t):
        return "plane", SURE if (r.plane or re.search(r"\bplane|\borient|\bview\b", t)) else 0.85
    if n == 0 and (r.modality or _MODALITY.search(t)):
        return "modality", SURE
    if n >= 1:
        counted = _COUNT.search(cue)
        if counted and not _COUNT_NOT.search(cue):
            return "count", SURE
        if _EXTENT.search(cue) and not (_DISTANCE.search(cue) and re.search(r"\b(from|to) (the )?(S|HERE|it)\b|"
                                                                            r"\bbetween\b", cue)):
            return "extent", SURE
        if _VOLUME.search(cue) or r.unit in ("ml", "cc", "cm3", "mm3"):
            return "volume", SURE
        if n >= 2 and (has_paired or re.search(r"\bwhich\b", cue)) and re.search(r"\bbig|\blarg|\bsmall", cue):
            return "volume", 0.9
        if re.search(r"\b(left|right)\b", cue) or _LATERALITY.search(cue):
            return "laterality", SURE
        if _LIST.search(cue) and (has_paired or re.search(r"\b(which|what) S\b", cue)) \
                and any(i in lexicon.TARGET_IDS or sides_of(i) for i in r.ids) and not r.polar_hint:
            return "list", 0.93
        if _DISTANCE.search(cue):
            return "distance", 0.7
        if _WHERE.search(cue) and not r.polar_hint:
            return "laterality", 0.62
        if _PRESENCE.search(cue) or r.polar_hint:
            return "presence", SURE if (r.polar_hint is not False) else 0.8
        if r.polar_hint is None and n == 1 and len(cue.split()) <= 3:  # a bare name: "parotid?", "the cord"
            return "presence", 0.75 if r.question.rstrip().endswith("?") else 0.6
        return None
    if _COUNT.search(cue) and not _COUNT_NOT.search(cue):
        return "count", SURE if _GROUP_WORD.search(cue) else 0.85
    if _LIST.search(cue):
        return "list", SURE if (_GROUP_WORD.search(cue) or re.search(r"\bsee|\bvisible|\bshown", cue)) else 0.85
    return None


# -- the classifier fallback -------------------------------------------------------------------------------------------
def classifier_text(question: str, known: Sequence[str] = ()) -> str:
    """What the paraphrase classifier reads: the normalised question with each structure as ``xstructx``."""
    r = _Read(str(question or ""), known)
    return _classifier_text(r)


def _classifier_text(r: _Read) -> str:
    return " ".join("xstructx" if w == "S" else w for w in r.text.split())


@lru_cache(maxsize=1)
def _classifier():
    from .paraphrase import ParaphraseClassifier, default_classifier

    try:
        return default_classifier()
    except (OSError, ValueError, KeyError):  # the question file missing or damaged: the rules still work
        return ParaphraseClassifier()


def _fallback(r: _Read) -> list[tuple[str, float]]:
    """Kinds from the classifier, reweighted by what the question names (no structure: header kinds, two: pairs).
    Nothing when its best kind needs a structure the question does not name ("which side are you on?")."""
    probs = _classifier().predict_proba(_classifier_text(r), prepared=True)
    top = max(probs, key=probs.get) if probs else None
    if top is None or (r.n == 0 and top in _STRUCTURE_KINDS and top not in ("list", "count")):
        return []
    if r.n == 0 and re.search(r"\b(left|right|sides?|behind|above|below|closer|far|overlap\w*)\b", r.cue):
        return []  # a side or relation of nothing named
    weights = {}
    for kind, p in probs.items():
        w = 1.0
        if r.n == 0 and kind in _STRUCTURE_KINDS and kind not in ("list", "count"):
            w = 0.25
        if r.n >= 1 and kind in HEADER_KINDS:
            w = 0.25
        if r.n < 2 and kind in _PAIR_KINDS:
            w = 0.3
        weights[kind] = p * w
    total = sum(weights.values()) or 1.0
    ranked = sorted(((k, v / total) for k, v in weights.items()), key=lambda kv: -kv[1])
    # the classifier is right less often than its softmax says on wordings no rule knows: shrink
    return [(k, 0.85 * p) for k, p in ranked[:2]]


# -- slots -------------------------------------------------------------------------------------------------------------
def _closer_structures(r: _Read) -> tuple[str, ...]:
    """Reference first, then the candidates (a paired concept among the candidates becomes its two sides)."""
    words = r.cue.split()
    positions = [i for i, w in enumerate(words) if w == "S"]
    ids = list(r.ids)
    ref = None
    # the candidates offered as alternatives ("A or B", "of A and B", "A vs B"): the one structure outside them is
    # the reference ("what's nearer X: A or B?", "is X closer to A or to B?", "which of A and B is nearer X?")
    offered = set()
    for k in range(len(positions) - 1):
        between = words[positions[k] + 1:positions[k + 1]]
        if between and between[0] in ("or", "and", "vs", "versus") and \
                all(w in ("or", "and", "vs", "versus", "to", "from", "the", "a") for w in between):
            offered |= {k, k + 1}
    outside = [k for k in range(len(positions)) if k not in offered]
    if len(offered) >= 2 and len(outside) == 1:
        ref = outside[0]
    if ref is None:  # "closer to X than B", "nearer X than B", "is A closer to X than to B?"
        after = [k for k, pos in enumerate(positions)
                 if re.search(r"\b(to|from|than to|nearest|closest|nearer|closer|near|of|towards|toward|with)"
                              r"( the| a)?$", " ".join(words[max(0, pos - 3):pos]))
                 and re.search(r"\b(closer|closest|nearer|nearest|farther|further|farthest|furthest|distance|away|"
                               r"gap|close|near|far)\b", " ".join(words[:pos]))]
        if len(after) >= 2 and len(positions) == len(after) + 1:  # both compared against the remaining one
            ref = next(k for k in range(len(positions)) if k not in after)
        elif after:
            ref = after[0]
    if ref is None:
        paired = [k for k, i in enumerate(ids) if sides_of(i)]
        others = [k for k in range(len(ids)) if k not in paired]
        ref = others[-1] if paired and others else len(ids) - 1
    reference = ids[ref]
    candidates = []
    for k, i in enumerate(ids):
        if k == ref:
            continue
        sides = sides_of(i)
        candidates.extend(sides if sides else (i,))
    if len(candidates) == 1 and CONCEPTS.get(candidates[0]) and CONCEPTS[candidates[0]].side:
        # "is the right parotid closer to the PTV than the left one?": the other side is the other candidate
        concept = CONCEPTS[candidates[0]]
        candidates.append(f"{concept.paired}_{'right' if concept.side == 'left' else 'left'}")
    return (reference, *dict.fromkeys(c for c in candidates if c != reference))


def _structures(r: _Read, kind: str) -> tuple[str, ...]:
    if kind == "closer" or (kind == "distance" and _FARTHER.search(r.cue)):
        return _closer_structures(r) if r.ids else ()
    if kind == "volume" and r.n == 1 and sides_of(r.ids[0]) and re.search(r"\b(which|bigger|larger|smaller)\b",
                                                                          r.cue):
        return sides_of(r.ids[0])
    if kind == "relative_position" and r.n == 2 and re.search(r"\b(which|what) side of (the )?S\b", r.cue):
        return r.ids[1], r.ids[0]  # "which side of the mandible is the parotid on": the parotid first
    return tuple(dict.fromkeys(r.ids))


def _direction(r: _Read, kind: str) -> list[tuple[str | None, str, float]]:
    """(direction, frame, share) readings of the side/direction words."""
    cue = r.cue
    if kind == "relative_position":
        for pattern, patient, screen in _RELATIONS:
            if re.search(pattern, cue):
                if screen is None:
                    return [(patient, "patient", 1.0)]
                if r.patient_frame and not re.search(r"\b(screen|display|monitor|viewer)\b", cue):
                    return [(patient, "patient", 1.0)]
                if r.screen_frame:
                    return [(screen, "screen", 0.9), (patient, "patient", 0.1)]
                if patient in ("left", "right"):
                    return [(patient, "patient", FRAME_PRIOR), (screen, "screen", 1.0 - FRAME_PRIOR - 0.01)]
                return [(patient, "patient", ABOVE_PRIOR), (screen, "screen", 1.0 - ABOVE_PRIOR - 0.01)]
        return [(None, "screen" if r.screen_frame and not r.patient_frame else "patient", 1.0)]
    if kind == "laterality":
        side = None
        m = re.findall(r"\b(left|right)\b", cue)
        if m and not r.alternatives and not re.search(r"\bleft or right\b|\bright or left\b|\bwhich side\b", cue):
            side = m[-1]
        if side is None and not r.alternatives:  # the engine also answers "is it midline / bilateral?"
            if re.search(r"\bbilateral\w*|\b(both|two) sides\b|\bboth halves\b", cue):
                return [("bilateral", "patient", 1.0)]
            if re.search(r"\bmidline\b|\bcenter(ed)?\b|\bcentral(ly)?\b|\bmiddle\b", cue):
                return [("midline", "patient", 1.0)]
        explicit_screen = r.screen_frame and not re.search(r"\bpatient (left|right|side)\b|\b(of|to) the patient\b|"
                                                           r"\banatomical|\b(his|her|their) (left|right)\b", cue)
        if explicit_screen:
            return [(side, "screen", 0.95 if side else 1.0)] + ([(side, "patient", 0.05)] if side else [])
        if r.patient_frame or side is None:
            return [(side, "patient", 1.0)]
        return [(side, "patient", FRAME_PRIOR), (side, "screen", 1.0 - FRAME_PRIOR - 0.01)]
    return [(None, "patient", 1.0)]


def _polar(r: _Read, kind: str, direction: str | None) -> bool:
    if r.alternatives and kind in ("laterality", "plane", "modality", "closer", "relative_position", "volume"):
        return False
    if kind == "relative_position" and direction is None:
        return False
    if kind == "distance" and r.far:
        return False
    if r.polar_hint is not None:
        if kind == "laterality" and direction is None:
            return False
        if kind == "closer" and not re.search(r"\bthan\b", r.cue):
            return False
        if kind == "list":
            return False
        return r.polar_hint
    # fragments: "cord here?", "sagittal?", "left parotid in this slice?"
    if kind in ("presence", "overlap", "relative_position"):
        return True
    if kind == "laterality":
        return direction is not None
    if kind == "plane":
        return r.plane is not None
    if kind == "modality":
        return r.modality is not None
    return False


def _unit(r: _Read, kind: str) -> str | None:
    if r.unit_from_threshold and kind == "distance":
        return "mm"
    unit = r.unit
    if kind == "extent" and re.search(r"\b(slices|images|sections|levels|cuts)\b", r.cue) and \
            re.search(r"\bhow many\b|\bnumber of\b|\bwhich\b|\bwhat\b|\bon how\b|\bfrom\b|\bslices (does|is|are)\b",
                      r.cue):
        return "slices"
    if unit == "slices" and kind != "extent":
        return None
    if kind in ("volume",) and unit in ("mm", "cm"):
        return None
    if kind in ("extent", "distance", "scan_length", "slice_thickness", "pixel_size", "field_of_view") and \
            unit in ("ml", "cc", "cm3", "mm3"):
        return None
    if kind in ("presence", "list", "count", "laterality", "relative_position", "closer", "overlap", "modality",
                "plane", "slice_count", "dimensions") and not (kind == "overlap" and unit in ("cc", "ml", "cm3")):
        return None
    return unit


_LENGTH_KINDS = ("extent", "scan_length", "slice_thickness", "pixel_size", "field_of_view")


def _threshold(r: _Read, kind: str, polar: bool) -> tuple[float | None, str | None]:
    """(threshold, its unit): distances always in mm; other polar questions the number they compare with."""
    if kind == "distance":
        return r.threshold, ("mm" if r.threshold is not None else None)
    if not polar or r.compare is None or kind in ("presence", "laterality", "relative_position", "closer",
                                                     "overlap", "plane", "modality", "list"):
        return None, None
    value, unit = r.compare
    unit = _compare_unit(unit)
    if kind in _LENGTH_KINDS and unit in ("mm", "cm"):
        return (value * 10.0 if unit == "cm" else value), "mm"
    if kind == "volume" and unit in ("ml", "cc", "cm3", "mm3"):
        return value, unit
    if kind in ("count", "slice_count", "dimensions") and unit in (None, "slices", "S"):
        return value, None
    if kind == "extent" and unit == "slices":
        return value, "slices"
    return None, None


def _build(r: _Read, kind: str, conf: float) -> list[Intent]:
    structures = _structures(r, kind) if kind in _STRUCTURE_KINDS else ()
    readings = []
    for direction, frame, share in _direction(r, kind):
        polar = _polar(r, kind, direction)
        unit = _unit(r, kind)
        threshold, threshold_unit = _threshold(r, kind, polar)
        unit = threshold_unit or unit
        readings.append(Intent(
            kind=kind, structures=structures, direction=direction, frame=frame, scope=r.scope,
            plane=r.plane if kind == "plane" and not r.alternatives else None,
            modality=r.modality if kind == "modality" and not r.alternatives else None,
            unit=unit, threshold=threshold, polar=polar, confidence=round(conf * share, 4), question=r.question))
    return readings


def _compare_unit(unit: str) -> str | None:
    if not unit or unit in ("S",) or unit.startswith(("organ", "structure", "target", "contour", "pixel", "voxel")):
        return None
    return {"millimeter": "mm", "millimeters": "mm", "centimeter": "cm", "centimeters": "cm", "milliliter": "ml",
            "milliliters": "ml", "cm 3": "cm3", "mm 3": "mm3", "slice": "slices", "image": "slices",
            "images": "slices"}.get(unit, unit)


# -- API ---------------------------------------------------------------------------------------------------------------
def parse(question: str, known: Sequence[str] = ()) -> list[Intent]:
    """The readings of ``question``, most probable first, each with its ``confidence``; [] when not understood.
    ``known``: the names of the loaded structures (a mention of one gives its concept id, or ``name:<Name>``)."""
    if question is None:
        return []
    if not isinstance(question, str):
        question = str(question)
    question = question.strip()
    if not question:
        return []
    if isinstance(known, str):  # one name passed bare, not its letters
        known = (known,)
    try:
        known = tuple(known or ())
    except TypeError:
        known = ()
    r = _Read(question[:2000], known)
    ruled = _rule_kind(r)
    if not r.has_domain and ruled is None:
        return []
    if r.unsupported and (ruled is None or ruled[0] not in HEADER_KINDS):  # "what is the dose to the cord?"
        return []
    if ruled is not None:
        kind, conf = ruled
        conf *= max(0.9, 0.98 ** r.fixed)  # each typo fix is a small chance the question meant another word
        readings = _build(r, kind, conf)
    else:
        ranked = _fallback(r)
        if not ranked or ranked[0][1] < 0.3 or (r.n == 0 and ranked[0][1] < 0.4):
            return []
        readings = []
        for kind, p in ranked:
            if p >= 0.08:
                readings.extend(_build(r, kind, p))
    readings.sort(key=lambda i: -i.confidence)
    return readings


_DIR_WORDS = {"left": "left", "right": "right", "anterior": "anterior to (in front of)",
              "posterior": "posterior to (behind)", "superior": "superior to (above)",
              "inferior": "inferior to (below)", "up": "above", "down": "below"}
_HEADER_TEXT = {"slice_thickness": "the slice thickness", "pixel_size": "the pixel size (in-plane spacing)",
                "field_of_view": "the field of view", "scan_length": "the scan length (cranio-caudal coverage)",
                "slice_count": "the number of slices", "dimensions": "the image dimensions (matrix size)"}


def _names(ids) -> str:
    names = [display_name(i) if i.startswith("name:") or display_name(i)[:1].isupper() else f"the {display_name(i)}"
             for i in ids]
    if not names:
        return "the structures"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _kinds_of(ids) -> str:
    """'PTV structures', 'target structures': the filter of a count or list."""
    return " or ".join(display_name(i) for i in ids) + " structures" if ids else "structures"


def _where(intent: Intent) -> str:
    return {"slice": " on this slice", "volume": " in the scan"}.get(intent.scope or "", "")


def describe(intent: Intent) -> str:
    """A short reading of ``intent`` for a clarifying reply ("the side of the target in the patient's frame")."""
    k, s = intent.kind, intent.structures
    if k in _HEADER_TEXT:
        return _HEADER_TEXT[k]
    if k == "modality":
        return f"whether this is {'an' if intent.modality in ('MR',) else 'a'} {intent.modality} image" \
            if intent.polar and intent.modality else "the imaging modality"
    if k == "plane":
        if intent.polar and intent.plane:
            return f"whether this is {'an' if intent.plane == 'axial' else 'a'} {intent.plane} view"
        return "the plane of this view"
    if k == "presence":
        verb = "are" if len(s) > 1 else "is"
        return f"whether {_names(s or ('target',))} {verb} present{_where(intent) or ' (this slice, else the scan)'}"
    if k == "list":
        return f"which {_kinds_of(s)} are present{_where(intent)}"
    if k == "count":
        return f"the number of {_kinds_of(s)}{_where(intent)}"
    if k == "volume":
        return f"the volume of {_names(s)}"
    if k == "extent":
        return f"the extent of {_names(s)}" + (" in slices" if intent.unit == "slices" else "")
    if k == "laterality":
        frame = "on the screen" if intent.frame == "screen" else "in the patient's frame"
        if intent.polar and intent.direction in ("midline", "bilateral"):
            where = "on the patient's midline" if intent.direction == "midline" else "on both sides (bilateral)"
            return f"whether {_names(s[:1] or ('target',))} is {where}"
        if intent.polar and intent.direction:
            side = f"the screen's {intent.direction}" if intent.frame == "screen" else \
                f"the patient's {intent.direction}"
            return f"whether {_names(s[:1] or ('target',))} is on {side}"
        return f"the side of {_names(s[:1] or ('target',))} {frame}"
    if k == "relative_position":
        a, b = (_names(s[:1]), _names(s[1:2])) if len(s) >= 2 else (_names(s), "the other structure")
        rel = _DIR_WORDS.get(intent.direction or "", "placed relative to")
        frame = " on the screen" if intent.frame == "screen" else ""
        if intent.polar:
            return f"whether {a} is {rel}{' of' if intent.direction in ('left', 'right') else ''} {b}{frame}"
        if intent.direction:
            return f"which of {a} and {b} is further {intent.direction}{frame}"
        return f"where {a} lies relative to {b}{frame}"
    if k == "distance":
        if intent.threshold is not None:
            return f"whether {_names(s)} are within {intent.threshold:g} mm of each other"
        return f"the minimum distance between {_names(s)}"
    if k == "closer":
        ref, cands = (s[0], s[1:]) if s else ("target", ())
        if intent.polar and len(cands) >= 2:
            return f"whether {_names(cands[:1])} is closer to {_names((ref,))} than {_names(cands[1:])}"
        return f"which of {_names(cands)} is closer to {_names((ref,))}"
    if k == "overlap":
        return f"whether {_names(s)} overlap"
    return k
