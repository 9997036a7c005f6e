"""BiomedCLIP-like stand-in teacher: open_clip's CLIP layout (timm ViT image tower + BERT text tower from an explicit
``BertConfig``) at 128 px, trained contrastively from scratch on OpenKBP head-and-neck CT slices against captions
generated from their labels and geometry.

Captions
    Each slice gets a :class:`SliceTruth`: the set of *facts* that hold for it (orientation, level, structures
    visible, structures known to be absent, target present/absent, side of the target). A caption is a random
    subset of those facts rendered in one of several styles (sentence, report, terse tags, single fact) with
    synonyms and abbreviations ("L parotid", "cord", "PTV"). Sides follow the labels: the image is in radiological
    convention (patient left = image right) and a mirrored sample already has its parotid labels swapped; the side
    of a target is measured from the image itself (mask centroid against the midline: the spinal cord or brainstem
    where visible, else the body), so a mirrored slice gets the mirrored side. Sagittal slices never name a side (it
    cannot be seen in them).

Loss: multi-positive CLIP InfoNCE
    Short captions are often true of several slices of a batch ("an axial CT slice", "no target"). Plain InfoNCE
    would push those apart as negatives. Because every caption is a set of facts, we know exactly which captions are
    true for which images: caption ``j`` is a positive for image ``i`` when its facts are a subset of image ``i``'s
    facts. Both directions (image->text and text->image) use cross-entropy against the uniform distribution over the
    positives (a soft-target InfoNCE, as in UniCL/SupCon), with CLIP's learnable logit scale (clamped at 100).
    Each image gets ``captions_per_image`` captions per step (the text tower is cheap; the image tower is not).

Centred features (why the towers learn at all in a few thousand steps)
    At initialisation both small towers pool nearly the same vector for every input: the ViT's CLS token averages
    patch tokens dominated by air (cosine between different slices' embeddings 0.999) and BERT's [CLS] state is
    dominated by its own embedding. Plain CLIP sits on that collapsed saddle for hundreds of steps here. The loss
    therefore compares embeddings of *batch-centred* pooled features (the batch mean, with its gradient, is
    subtracted before the projections), and after each step a fraction of the batch mean is moved into the biases
    of the LayerNorms that produce the pooled features (:func:`centering_biases`; the centred loss does not depend
    on those biases). When training ends, the exact mean over un-augmented slices is folded in (:func:`recenter`),
    so the saved model is a plain BiomedCLIP whose ``encode_image`` / ``encode_text`` need no centring.
    Likewise the image tower's patch position embeddings start from 2D sin-cos and learn 10x faster
    (:func:`init_for_training`): slice layout is most of what tells orientation and level apart.

Vocabulary (:func:`build_vocab`, shipped as ``training/standins/vocab.txt``)
    BERT's special tokens, every ASCII character and its '##' continuation (nothing is ever [UNK]), then every word
    of the caption tables and zero-shot prompts as a whole token. Deterministic; the 'standin' preset's
    ``vocab_size`` equals its length.

Evaluation (:func:`evaluate`): zero-shot on validation slices (every 2nd slice in each orientation, no
augmentation, no mirroring), balanced per question type, prompt ensembles per class (and a single prompt for
reference; the plain model's embeddings, no centring): structure visible yes/no, orientation (3-way), side of a
lone parotid, side of a lateralised target, target present, axial level.

Command line (``python -m training.standins.biomedclip --help``)::

    python -m training.standins.biomedclip vocab                      # rebuild training/standins/vocab.txt
    python -m training.standins.biomedclip train --out training/runs/biomedclip --steps 1500
    python -m training.standins.biomedclip evaluate --out training/runs/biomedclip
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import string
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from PRISMRTLib.chat.prompts import (
    ORIENTATION_PROMPTS, PAROTID_SIDE_PROMPTS, TARGET_PROMPTS, TARGET_SIDE_PROMPTS, visible_prompts,
)
from PRISMRTLib.imaging import Orientation, SlicePlane
from PRISMRTLib.imaging.intensity import Window
from PRISMRTLib.models.biomedclip import (
    BIOMEDCLIP_PRESETS, BiomedCLIP, BiomedCLIPConfig, VocabTokenizer, biomedclip_input, build_biomedclip, write_vocab,
)
from training.data import (
    MIRRORED, REPO, STRUCTURES, TRAIN_DIR, VAL_DIR, CTCase, SliceSample, SliceSampler, augment_window, cut_slice,
    load_cases,
)
from training.standins.runfiles import open_curves, save_atomic, save_curves, write_json

VOCAB_PATH = Path(__file__).with_name("vocab.txt")

WEIGHTS_NAME = "biomedclip_standin.safetensors"
CONFIG_NAME = "biomedclip_standin.json"
VOCAB_NAME = "vocab.txt"
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.json"
EVAL_NAME = "evaluation.json"
REPORT_NAME = "evaluation.md"
CURVES_NAME = "curves.png"
EVAL_WINDOW = Window(60, 350)  # the soft-tissue window augment_window jitters around

MIN_PIXELS = 10  # a structure is "visible" from this many pixels (SliceSample.visible)
OARS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
PTVS = ("PTV70", "PTV63", "PTV56")
PAROTIDS = ("LeftParotid", "RightParotid")
MIDLINE_STRUCTURES = ("SpinalCord", "Brainstem")

# ---------------------------------------------------------------------------------------------------------------------
# Phrase tables. Every word a caption or prompt can contain comes from these tables, so the vocabulary is built from
# them (plus sampled captions for word frequencies).

NAMES = {
    "Brainstem": ["brainstem", "brain stem", "brainstem", "BS"],
    "SpinalCord": ["spinal cord", "cord", "cervical spinal cord", "cervical cord", "SC", "spinal cord"],
    "LeftParotid": ["left parotid", "left parotid gland", "L parotid", "Lt parotid", "parotid (L)", "left parotid"],
    "RightParotid": ["right parotid", "right parotid gland", "R parotid", "Rt parotid", "parotid (R)", "right parotid"],
    "Esophagus": ["esophagus", "oesophagus", "cervical esophagus", "esophagus"],
    "Larynx": ["larynx", "larynx", "laryngeal box", "voice box"],
    "Mandible": ["mandible", "jaw", "lower jaw", "jawbone", "mandible"],
    "Parotid": ["parotid", "parotid gland", "parotid"],  # either side (sagittal slices cannot tell which)
    "Parotids": ["both parotids", "both parotid glands", "bilateral parotids", "left and right parotid glands",
                 "L and R parotids", "the parotid glands"],
}
PTV_NAMES = {
    "PTV70": ["PTV70", "PTV 70", "high-dose PTV", "70 Gy PTV", "high-risk PTV70", "high-dose target PTV70"],
    "PTV63": ["PTV63", "PTV 63", "intermediate-dose PTV", "63 Gy PTV", "intermediate-risk PTV63"],
    "PTV56": ["PTV56", "PTV 56", "low-dose PTV", "elective PTV", "56 Gy PTV", "elective nodal PTV56"],
}
TARGET_PRESENT = ["target present", "PTV present", "treatment target visible", "includes the planning target volume",
                  "contains target volume", "PTV in slice", "target in this slice", "with a treatment target",
                  "target volume seen"]
TARGET_ABSENT = ["no target in this slice", "no PTV", "target absent", "outside the target volumes",
                 "no planning target volume", "no treatment target", "target-free slice", "no target"]
PTV_PRESENT = ["{} present", "{} visible", "includes {}", "contains the {}", "{} in slice"]
PTV_ABSENT = ["no {}", "{} absent", "{} not in this slice", "without {}"]
SIDE_WORDS = {"left": ["left", "patient's left", "left side"], "right": ["right", "patient's right", "right side"]}
TARGET_SIDE = {
    "left": ["target on the patient's left", "left-sided target", "target left of midline", "target on the left",
             "PTV lateralised to the left", "target in the left neck", "left-sided PTV", "target on the left side"],
    "right": ["target on the patient's right", "right-sided target", "target right of midline", "target on the right",
              "PTV lateralised to the right", "target in the right neck", "right-sided PTV",
              "target on the right side"],
    "bilateral": ["bilateral target", "target crossing the midline", "targets on both sides of the midline",
                  "PTV spanning both sides", "bilateral PTV", "target on both sides"],
}
PTV70_SIDE = {
    "left": ["PTV70 on the left", "high-dose target on the left side", "left-sided PTV70", "PTV70 left of midline"],
    "right": ["PTV70 on the right", "high-dose target on the right side", "right-sided PTV70",
              "PTV70 right of midline"],
    "bilateral": ["PTV70 crossing the midline", "bilateral PTV70", "high-dose target on both sides"],
}
ORIENT_ADJ = {
    "axial": ["axial", "transverse", "transaxial", "axial", "axial (transverse)", "cross-sectional"],
    "coronal": ["coronal", "frontal", "coronal", "coronal-plane"],
    "sagittal": ["sagittal", "sagittal", "sagittal-plane", "lateral-view sagittal"],
}
ORIENT_TAG = {
    "axial": ["axial", "ax", "transverse", "axial view", "axial plane", "axial CT"],
    "coronal": ["coronal", "cor", "coronal view", "coronal plane", "coronal CT", "coronal reformat"],
    "sagittal": ["sagittal", "sag", "sagittal view", "sagittal plane", "sagittal CT", "sagittal reformat"],
}
NOUNS = ["CT slice", "CT image", "CT section", "slice", "image", "CT", "CT cut", "planning CT slice",
         "head and neck CT slice", "CT scan slice", "computed tomography slice", "view", "reconstruction"]
PLANE_WORDS = {"axial": ["axial", "transverse", "axial"], "coronal": ["coronal", "frontal", "coronal"],
               "sagittal": ["sagittal"]}
PLAIN_HEADS = ["a CT slice", "this slice", "the image", "a head and neck CT image", "CT", "slice",
               "a planning CT image",
               "this CT section"]
LEVELS = {  # prepositional phrases
    "brain": ["through the brain", "above the skull base", "at the level of the brain", "through the cranium",
              "above the brainstem"],
    "skull_base": ["at the skull base", "at the level of the skull base", "through the posterior fossa",
                   "at the level of the brainstem", "at brainstem level"],
    "parotid": ["at the level of the parotid glands", "at parotid level", "through the parotids",
                "through the upper neck", "in the upper neck at the parotids"],
    "mandible": ["at the level of the mandible", "through the oral cavity", "at the level of the jaw",
                 "through the floor of the mouth", "at mandible level"],
    "larynx": ["through the larynx", "at the level of the larynx", "at laryngeal level", "through the mid neck",
               "in the neck at the larynx"],
    "lower_neck": ["through the lower neck", "below the larynx", "at the thoracic inlet", "in the lower neck",
                   "through the low neck below the larynx"],
    "midline": ["through the midline", "in the midline", "near the midline", "through the cervical spine",
                "at the midsagittal plane"],
    "lateral": ["lateral to the midline", "off the midline", "through the side of the neck", "lateral to the spine",
                "away from the midline"],
}
LEVEL_TAGS = {
    "brain": ["brain", "cranium", "above skull base", "head"],
    "skull_base": ["skull base", "posterior fossa", "brainstem level"],
    "parotid": ["parotid level", "upper neck", "level of parotids"],
    "mandible": ["mandible level", "oral cavity", "jaw level", "floor of mouth"],
    "larynx": ["larynx level", "laryngeal level", "mid neck"],
    "lower_neck": ["lower neck", "low neck", "thoracic inlet", "below larynx"],
    "midline": ["midline", "midsagittal", "median plane"],
    "lateral": ["lateral", "parasagittal", "off midline"],
}
VISIBLE_FRAMES = ["{h}{l} showing {s}", "{h}{l} with {s} visible", "{h}{l} containing {s}", "{h}{l} that includes {s}",
                  "{s} {be} visible on {h}{l}", "{s} seen in {h}{l}", "{h}{l}: {s}", "{h}{l} depicting {s}",
                  "{s} in {h}{l}", "{h}{l} demonstrating {s}"]
ABSENT_FRAMES = ["no {a}", "without {a}", "{a} not visible", "{a} absent", "{a} not seen", "not showing {a}",
                 "{a} not in this slice"]
REPORT_KEYS = {"visible": ["Visible", "Structures", "Contains", "OARs", "Seen"],
               "absent": ["Absent", "Not seen", "Missing"],
               "target": ["Target", "PTV", "Targets"], "level": ["Level", "Location", "Region"],
               "plane": ["Plane", "View", "Orientation"]}
JOINERS = [", ", "; ", ". ", " - ", ", "]
TERSE_SEPS = [", ", " | ", "; ", " / ", " - "]
LIST_SEPS = [", ", "; ", " + ", "/"]


@dataclass(frozen=True)
class Caption:
    text: str
    facts: frozenset  # what the caption states; it is true of a slice when facts <= truth.facts


@dataclass(frozen=True)
class SliceTruth:
    orientation: str
    visible: tuple  # structures with >= MIN_PIXELS pixels
    absent: tuple  # contoured structures with no pixel in the slice
    level: "str | None"
    target_side: "str | None"  # 'left' / 'right' / 'bilateral' (patient's side; axial and coronal only)
    ptv70_side: "str | None"
    facts: frozenset


@dataclass(frozen=True)
class CaseInfo:
    """What a slice's caption needs to know about its whole case."""

    contoured: frozenset  # structures drawn in this case (absence in a slice is known only for these)
    axial_extent: dict  # structure -> (first, last) axial position (0 = most superior) where it has a voxel


def case_info(case: CTCase) -> CaseInfo:
    plane = SlicePlane.create(case.geometry, Orientation.AXIAL)
    stack = plane.stack_view(case.labels)
    occupied = np.bitwise_or.reduce(stack.reshape(stack.shape[0], -1), axis=1)
    extent = {}
    for s, name in enumerate(STRUCTURES):
        idx = np.flatnonzero(occupied & np.uint16(1 << s))
        if len(idx):
            pos = sorted(_axial_position(plane, int(i)) for i in (idx[0], idx[-1]))
            extent[name] = (pos[0], pos[1])
    contoured = frozenset(STRUCTURES[s] for s in range(len(STRUCTURES)) if case.present >> s & 1)
    return CaseInfo(contoured, extent)


def _axial_position(plane: SlicePlane, index: int) -> float:
    """As :func:`training.data.cut_slice` defines ``position`` (0 = most superior axial slice)."""
    n = plane.num_slices
    display = plane.index_to_slice_coords(np.eye(3)[plane.normal_axis] * index)[0]
    step = plane.slice_coords_to_point([1, 0, 0]) - plane.slice_coords_to_point([0, 0, 0])
    ascending = step @ np.array([0.0, 0.0, -1.0]) > 0
    return float((display if ascending else (n - 1 - display)) / max(n - 1, 1))


def _midline_column(sample: SliceSample, visible: set) -> float | None:
    """The patient's midline in the slice: the spinal cord / brainstem centre where visible, else the body's."""
    for name in MIDLINE_STRUCTURES:
        if name in visible:
            return float(np.argwhere(sample.mask(name))[:, 1].mean())
    body = sample.hu > -400
    if body.sum() < 200:
        return None
    return float(np.argwhere(body)[:, 1].mean())


def _side(mask: np.ndarray, midline: float) -> str | None:
    """Patient side of a mask in a radiological axial/coronal image (patient left = image right)."""
    if mask.sum() < 20:
        return None
    left = float((np.argwhere(mask)[:, 1] > midline).mean())
    if left > 0.85:
        return "left"
    if left < 0.15:
        return "right"
    if 0.3 <= left <= 0.7:
        return "bilateral"
    return None


def _level(orientation: str, visible: set, position: float, info: CaseInfo) -> str | None:
    margin = 2.0 / 127
    if orientation == "axial":
        if "Larynx" in visible:
            return "larynx"
        if visible & set(PAROTIDS):
            return "parotid"
        if "Brainstem" in visible:
            return "skull_base"
        if "Mandible" in visible:
            return "mandible"
        oars_seen = visible & set(OARS)
        if not oars_seen and "Brainstem" in info.axial_extent and position < info.axial_extent["Brainstem"][0] - margin:
            return "brain"
        if (not oars_seen - {"SpinalCord", "Esophagus"} and "Larynx" in info.axial_extent
                and position > info.axial_extent["Larynx"][1] + margin):
            return "lower_neck"
        return None
    if orientation == "sagittal":
        if visible & {"SpinalCord", "Brainstem", "Larynx", "Esophagus"}:
            return "midline"
        if visible & set(PAROTIDS):
            return "lateral"
    return None


def slice_truth(sample: SliceSample, info: CaseInfo, min_pixels: int = MIN_PIXELS) -> SliceTruth:
    """Everything a caption may say about a slice, as facts."""
    counts = {name: int(np.count_nonzero(sample.labels & np.uint16(1 << s))) for s, name in enumerate(STRUCTURES)}
    contoured = set(info.contoured)
    if sample.mirrored:  # the sample's labels are swapped; so is what was contoured
        contoured = {MIRRORED.get(n, n) for n in contoured}
    visible = {n for n, c in counts.items() if c >= min_pixels}
    absent = {n for n, c in counts.items() if c == 0 and n in contoured}
    o = sample.orientation
    facts = {("orient", o)}
    facts |= {("vis", n) for n in visible}
    facts |= {("no", n) for n in absent}
    if visible & set(PAROTIDS):
        facts.add(("vis", "Parotid"))
    if set(PAROTIDS) <= absent:
        facts.add(("no", "Parotid"))
    ptvs_contoured = contoured & set(PTVS)
    if visible & set(PTVS):
        facts.add(("vis", "Target"))
    if ptvs_contoured and all(counts[p] == 0 for p in PTVS):
        facts.add(("no", "Target"))
    level = _level(o, visible, sample.position, info)
    if level:
        facts.add(("level", level))
    target_side = ptv70_side = None
    if o in ("axial", "coronal") and visible & set(PTVS):
        midline = _midline_column(sample, visible)
        if midline is not None:
            union = np.zeros(sample.labels.shape, bool)
            for p in PTVS:
                union |= sample.mask(p)
            target_side = _side(union, midline)
            if "PTV70" in visible:
                ptv70_side = _side(sample.mask("PTV70"), midline)
    if target_side:
        facts.add(("side", "Target", target_side))
    if ptv70_side:
        facts.add(("side", "PTV70", ptv70_side))
    order = list(STRUCTURES)
    return SliceTruth(o, tuple(sorted(visible, key=order.index)), tuple(sorted(absent, key=order.index)), level,
                      target_side, ptv70_side, frozenset(facts))


# ---------------------------------------------------------------------------------------------------------------------
# Caption rendering


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _the(name: str, natural: bool) -> str:
    """'the left parotid' in sentences; abbreviations ('L parotid', 'PTV70', 'SC') and terse styles go bare."""
    first = name.split()[0]
    bare = not natural or first[:1].isupper() or first.startswith("the") or first.startswith("both") \
        or first in ("bilateral", "left-sided", "right-sided")
    return name if bare else "the " + name


def _join(items: list[str], rng: np.random.Generator, natural: bool) -> str:
    if len(items) == 1:
        return items[0]
    if natural:
        return ", ".join(items[:-1]) + _pick(rng, [" and ", ", and ", " and "]) + items[-1]
    return _pick(rng, LIST_SEPS).join(items)


def _structure_items(names: list[str], orientation: str, rng: np.random.Generator, natural: bool,
                     negated: bool = False) -> tuple[list[str], set]:
    """Names of structures as rendered items plus the facts they state (parotids merged or made side-less)."""
    kind = "no" if negated else "vis"
    names = list(names)
    items, facts = [], set()
    parotids = [n for n in names if n in PAROTIDS]
    if orientation == "sagittal" and parotids:  # no side in sagittal slices
        names = [n for n in names if n not in PAROTIDS]
        if not negated or len(parotids) == 2:
            names.insert(0, "Parotid")
    elif len(parotids) == 2 and not negated and rng.random() < 0.6:
        names = [n for n in names if n not in PAROTIDS]
        names.insert(0, "Parotids")
    for n in names:
        if n == "Parotids":
            items.append(_the(_pick(rng, NAMES["Parotids"]), natural))
            facts |= {(kind, p) for p in PAROTIDS}
        else:
            items.append(_the(_pick(rng, NAMES[n]), natural))
            facts.add((kind, n))
    return items, facts


def _subset(rng: np.random.Generator, items, k_max: int) -> list:
    items = list(items)
    if not items:
        return []
    k = int(rng.integers(1, min(k_max, len(items)) + 1))
    chosen = set(rng.choice(len(items), size=k, replace=False).tolist())
    return [x for i, x in enumerate(items) if i in chosen]


def _target_clause(truth: SliceTruth, rng: np.random.Generator) -> tuple[str, set] | None:
    """One statement about the target (present / absent / which PTV / side), or None when nothing is known."""
    facts = truth.facts
    options = []
    if ("vis", "Target") in facts:
        options.append("present")
        if any(("vis", p) in facts for p in PTVS):
            options.append("ptv")
        if truth.target_side:
            options += ["side", "side"]
        if truth.ptv70_side:
            options.append("ptv70_side")
    if ("no", "Target") in facts:
        options += ["absent", "absent", "absent"]
    if any(("no", p) in facts for p in PTVS) and ("vis", "Target") in facts:
        options.append("ptv_absent")
    if not options:
        return None
    kind = _pick(rng, options)
    if kind == "present":
        return _pick(rng, TARGET_PRESENT), {("vis", "Target")}
    if kind == "absent":
        return _pick(rng, TARGET_ABSENT), {("no", "Target")}
    if kind == "side":
        return _pick(rng, TARGET_SIDE[truth.target_side]), {("vis", "Target"), ("side", "Target", truth.target_side)}
    if kind == "ptv70_side":
        return _pick(rng, PTV70_SIDE[truth.ptv70_side]), {("vis", "PTV70"), ("side", "PTV70", truth.ptv70_side)}
    if kind == "ptv":
        ptvs = [p for p in PTVS if ("vis", p) in facts]
        ptvs = _subset(rng, ptvs, 3)
        text = _join([_pick(rng, PTV_NAMES[p]) for p in ptvs], rng, True)
        return _pick(rng, PTV_PRESENT).format(text), {("vis", p) for p in ptvs} | {("vis", "Target")}
    ptvs = [p for p in PTVS if ("no", p) in facts]
    p = _pick(rng, ptvs)
    return _pick(rng, PTV_ABSENT).format(_pick(rng, PTV_NAMES[p])), {("no", p)}


def _head(truth: SliceTruth, rng: np.random.Generator, with_orientation: bool) -> str:
    if not with_orientation:
        return _pick(rng, PLAIN_HEADS)
    adj, noun = _pick(rng, ORIENT_ADJ[truth.orientation]), _pick(rng, NOUNS)
    form = int(rng.integers(4))
    if form == 0:
        return f"{noun} in the {_pick(rng, PLANE_WORDS[truth.orientation])} plane"
    if form == 1:
        return f"{adj} {noun}"
    return _article(f"{adj} {noun}")


def make_caption(truth: SliceTruth, rng: np.random.Generator) -> Caption:
    """One caption of a slice, in a random style, stating a random subset of its facts."""
    o = truth.orientation
    oars_visible = [n for n in truth.visible if n in OARS]
    oars_absent = [n for n in truth.absent if n in OARS]
    style = _pick(rng, ["single", "single", "single", "sentence", "sentence", "sentence", "sentence", "report",
                        "terse", "terse"])
    if style == "single":
        return _single_fact(truth, rng)
    natural = style == "sentence"
    facts = set()
    use_orient = rng.random() < 0.75
    use_level = truth.level is not None and rng.random() < 0.45
    vis = _subset(rng, oars_visible, 4) if oars_visible and rng.random() < 0.85 else []
    absent = _subset(rng, oars_absent, 2) if oars_absent and rng.random() < 0.35 else []
    target = _target_clause(truth, rng) if rng.random() < 0.6 else None
    if use_orient:
        facts.add(("orient", o))
    if use_level:
        facts.add(("level", truth.level))
    vis_items, f = _structure_items(vis, o, rng, natural)
    facts |= f
    abs_items, f = _structure_items(absent, o, rng, False, negated=True)  # bare: "no larynx", "cord not seen"
    facts |= f
    if target:
        facts |= target[1]

    if style == "sentence":
        head = _head(truth, rng, use_orient)
        lvl = " " + _pick(rng, LEVELS[truth.level]) if use_level else ""
        if vis_items:
            frame = _pick(rng, VISIBLE_FRAMES)
            text = frame.format(h=head, l=lvl, s=_join(vis_items, rng, True), be="are" if len(vis_items) > 1 else "is")
        else:
            text = head + lvl
        clauses = []
        if abs_items:
            clauses.append(_pick(rng, ABSENT_FRAMES).format(a=_join(abs_items, rng, False if len(abs_items) < 2
                                                                    else True).replace(" and ", " or ")))
        if target:
            clauses.append(target[0])
        rng.shuffle(clauses)
        for c in clauses:
            j = _pick(rng, JOINERS)
            text += j + (c[:1].upper() + c[1:] if j == ". " else c)
        text = text[:1].upper() + text[1:]
        return Caption(text + _pick(rng, [".", "", "."]), frozenset(facts))

    if style == "report":
        parts = []
        if use_orient:
            parts.append(f"{_pick(rng, REPORT_KEYS['plane'])}: {_pick(rng, ORIENT_TAG[o])}")
        if use_level:
            parts.append(f"{_pick(rng, REPORT_KEYS['level'])}: {_pick(rng, LEVEL_TAGS[truth.level])}")
        if vis_items:
            parts.append(f"{_pick(rng, REPORT_KEYS['visible'])}: {_join(vis_items, rng, False)}")
        if abs_items:
            parts.append(f"{_pick(rng, REPORT_KEYS['absent'])}: {_join(abs_items, rng, False)}")
        if target:
            parts.append(f"{_pick(rng, REPORT_KEYS['target'])}: {target[0]}")
        if not parts:
            parts.append(f"{_pick(rng, REPORT_KEYS['plane'])}: {_pick(rng, ORIENT_TAG[o])}")
            facts.add(("orient", o))
        rng.shuffle(parts)
        return Caption(". ".join(parts) + ".", frozenset(facts))

    # terse tags
    parts = []
    if use_level:
        parts.append(_pick(rng, LEVEL_TAGS[truth.level]))
    parts += vis_items
    parts += [f"no {a}" for a in abs_items]
    if target:
        parts.append(target[0])
    rng.shuffle(parts)
    if use_orient or not parts:
        parts.insert(0, _pick(rng, ORIENT_TAG[o]))
        facts.add(("orient", o))
    return Caption(_pick(rng, TERSE_SEPS).join(parts), frozenset(facts))


def _single_fact(truth: SliceTruth, rng: np.random.Generator) -> Caption:
    """Short captions stating one fact, close to the zero-shot prompts ('a CT slice showing the larynx')."""
    o = truth.orientation
    kinds = ["orient", "orient"]
    if any(n in OARS for n in truth.visible):
        kinds += ["vis"] * 3
    if any(n in OARS for n in truth.absent):
        kinds += ["no"] * 2
    if ("vis", "Target") in truth.facts or ("no", "Target") in truth.facts:
        kinds += ["target"] * 2
    if truth.level:
        kinds.append("level")
    kind = _pick(rng, kinds)
    head = _pick(rng, PLAIN_HEADS)
    if kind == "orient":
        adj, noun = _pick(rng, ORIENT_ADJ[o]), _pick(rng, NOUNS)
        text = _pick(rng, [_article(f"{adj} {noun}"), f"{adj} {noun}",
                           f"{noun} in the {_pick(rng, PLANE_WORDS[o])} plane",
                           f"{_pick(rng, ORIENT_TAG[o])}"])
        return Caption(text, frozenset({("orient", o)}))
    if kind == "level":
        return Caption(f"{head} {_pick(rng, LEVELS[truth.level])}", frozenset({("level", truth.level)}))
    if kind == "vis":
        n = _pick(rng, [n for n in truth.visible if n in OARS])
        items, facts = _structure_items([n], o, rng, True)
        frame = _pick(rng, ["{h} showing {s}", "{s} visible", "{h} with {s}", "{s} present", "{h} through {s}",
                            "{s} is visible in {h}", "{h} containing {s}"])
        return Caption(frame.format(h=head, s=items[0]), frozenset(facts))
    if kind == "no":
        n = _pick(rng, [n for n in truth.absent if n in OARS])
        items, facts = _structure_items([n], o, rng, True, negated=True)
        if not items:  # one absent parotid in a sagittal slice cannot be named
            return Caption(_pick(rng, TARGET_ABSENT) if ("no", "Target") in truth.facts else _pick(rng, ORIENT_TAG[o]),
                           frozenset({("no", "Target")} if ("no", "Target") in truth.facts else {("orient", o)}))
        frame = _pick(rng, ["{h} without {s}", "no {s}", "{s} not visible", "no {s} in this slice",
                            "{h} not showing {s}", "{s} absent"])
        return Caption(frame.format(h=head, s=items[0]), frozenset(facts))
    clause = _target_clause(truth, rng)
    return Caption(clause[0], frozenset(clause[1]))


def captions(truth: SliceTruth, rng: np.random.Generator, n: int = 8) -> list[Caption]:
    """Several captions of one slice (training samples one per step)."""
    return [make_caption(truth, rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Zero-shot prompts (evaluation; a downstream VQA can use the same). Each class is a prompt ensemble; the first prompt
# of each class is the single prompt also reported. The tables live in PRISMRTLib/chat/prompts.py (the chat scores the
# same prompts); only the level prompts, built from the caption tables, are defined here.

LEVEL_PROMPTS = {lv: [f"an axial CT slice {LEVELS[lv][0]}", f"a CT slice {LEVELS[lv][1]}", LEVEL_TAGS[lv][0]]
                 for lv in ("brain", "skull_base", "parotid", "mandible", "larynx", "lower_neck")}


def all_prompts() -> list[str]:
    out = []
    for s in OARS + ("Parotid",):
        if s in NAMES:
            yes, no = visible_prompts(s)
            out += yes + no
    for table in (ORIENTATION_PROMPTS, PAROTID_SIDE_PROMPTS, TARGET_SIDE_PROMPTS, TARGET_PROMPTS, LEVEL_PROMPTS):
        for v in table.values():
            out += v
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ALPHABET = list(string.ascii_lowercase + string.digits + string.punctuation)


def _table_strings() -> list[str]:
    out = []

    def walk(x):
        if isinstance(x, str):
            out.append(x.replace("{}", "").replace("{h}", "").replace("{l}", "").replace("{s}", "")
                       .replace("{a}", "").replace("{be}", "is are"))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk([NAMES, PTV_NAMES, TARGET_PRESENT, TARGET_ABSENT, PTV_PRESENT, PTV_ABSENT, SIDE_WORDS, TARGET_SIDE,
          PTV70_SIDE, ORIENT_ADJ, PLANE_WORDS, ORIENT_TAG, NOUNS, PLAIN_HEADS, LEVELS, LEVEL_TAGS, VISIBLE_FRAMES,
          ABSENT_FRAMES,
          REPORT_KEYS, ["a", "an", "the", "and", "or", "in", "on", "this", "plane", "through", "showing", "with",
                        "present", "without", "visible", "containing", "not", "no", "is", "of", "are"]])
    return out + all_prompts()


def random_truth(rng: np.random.Generator) -> SliceTruth:
    """A plausible random slice truth (for the vocabulary corpus and tests; no data needed)."""
    o = _pick(rng, ["axial", "coronal", "sagittal"])
    visible = {n for n in STRUCTURES if rng.random() < 0.35}
    absent = {n for n in STRUCTURES if n not in visible and rng.random() < 0.6}
    facts = {("orient", o)} | {("vis", n) for n in visible} | {("no", n) for n in absent}
    if visible & set(PTVS):
        facts.add(("vis", "Target"))
    elif set(PTVS) <= absent:
        facts.add(("no", "Target"))
    level = _pick(rng, list(LEVELS)) if rng.random() < 0.7 else None
    if level:
        facts.add(("level", level))
    ts = _pick(rng, ["left", "right", "bilateral"]) if visible & set(PTVS) and o != "sagittal" else None
    p7 = _pick(rng, ["left", "right", "bilateral"]) if "PTV70" in visible and o != "sagittal" else None
    if ts:
        facts.add(("side", "Target", ts))
    if p7:
        facts.add(("side", "PTV70", p7))
    order = list(STRUCTURES)
    return SliceTruth(o, tuple(sorted(visible, key=order.index)), tuple(sorted(absent, key=order.index)), level, ts, p7,
                      frozenset(facts))


def caption_corpus(n: int = 20000, seed: int = 0) -> list[str]:
    """Every table phrase and prompt, plus ``n`` captions of random slice truths."""
    rng = np.random.default_rng(seed)
    return _table_strings() + [make_caption(random_truth(rng), rng).text for _ in range(n)]


def build_vocab(path: "str | Path" = VOCAB_PATH, n_captions: int = 5000) -> Path:
    """A WordPiece vocabulary for the captions, built deterministically: BERT's special tokens, every ASCII character
    and its '##' continuation (so no text is ever [UNK]; unseen words split into known pieces, e.g. 'parotids' ->
    'parotid' '##s'), then every word of the caption corpus as a whole token, most frequent first. Words are split
    as BERT's tokenizer splits them (lower case, accents stripped, punctuation apart)."""
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm, pre = BertNormalizer(lowercase=True, strip_accents=True, clean_text=True), BertPreTokenizer()
    counts = Counter()
    for text in caption_corpus(n_captions):
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = ALPHABET + ["##" + c for c in ALPHABET]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in chars]
    return write_vocab(chars + words, path)


def vocab_size(path: "str | Path" = VOCAB_PATH) -> int:
    return sum(1 for line in Path(path).read_text().splitlines() if line)


def load_tokenizer(path: "str | Path" = VOCAB_PATH, context_length: int | None = None) -> VocabTokenizer:
    return VocabTokenizer(path, context_length or BIOMEDCLIP_PRESETS["standin"].context_length)


# ---------------------------------------------------------------------------------------------------------------------
# Training


def standin_config(preset: "str | BiomedCLIPConfig" = "standin", vocab: "str | Path" = VOCAB_PATH) -> BiomedCLIPConfig:
    """The preset with its text tower's vocabulary sized to the vocab file (the 'standin' preset must already match)."""
    config = BIOMEDCLIP_PRESETS[preset] if isinstance(preset, str) else preset
    n = vocab_size(vocab)
    if config.text_bert["vocab_size"] != n:
        if preset == "standin":
            raise ValueError(f"BIOMEDCLIP_PRESETS['standin'] has vocab_size {config.text_bert['vocab_size']}, "
                             f"the vocabulary {vocab} has {n} tokens")
        config = dataclasses.replace(config, text_bert=dict(config.text_bert, vocab_size=n))
    return config


def multi_positive_clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                             positives: torch.Tensor) -> torch.Tensor:
    """CLIP InfoNCE with soft targets: ``positives[i, j]`` is True when caption ``j`` is true of image ``i``.

    ``image`` (B, E) and ``text`` (T, E) are L2-normalised; ``positives`` (B, T) has a True in every row and
    column; each row of the target is uniform over its positives."""
    logits = logit_scale.exp() * image @ text.t()
    pos = positives.float()
    i2t = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    t2i = -(pos.t() / pos.t().sum(1, keepdim=True) * F.log_softmax(logits.t(), 1)).sum(1).mean()
    return (i2t + t2i) / 2


@dataclass
class TrainSettings:
    steps: int
    seed: int = 0
    batch_size: int = 48
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    warmup: int = 100
    weight_decay: float = 0.05
    clip_grad: float = 1.0
    augment: float = 1.0
    structure_bias: float = 0.7
    captions_per_image: int = 2  # the text tower is cheap: more captions per image forward give more signal
    center_rate: float = 0.2  # how fast the pooled-feature means are folded into the LayerNorm biases


def _lr_factor(step: int, s: TrainSettings) -> float:
    warm = min(s.warmup, max(s.steps // 10, 1))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(s.steps - warm, 1)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def make_batch(sampler: SliceSampler, infos: dict, tokenizer: VocabTokenizer, step: int, s: TrainSettings):
    """Batch ``step``: images (B, 3, S, S), token ids (B * K, L) of K captions per image (caption ``k * B + i`` is
    of image ``i``), positives (B, B * K), captions. Depends only on (seed, step)."""
    samples = sampler.batch(step, s.batch_size)
    images, truths, caps = [], [], [[] for _ in range(s.captions_per_image)]
    for i, sample in enumerate(samples):
        rng = np.random.default_rng([s.seed, 104729, step, i])
        images.append(augment_window(sample.hu, rng, base=EVAL_WINDOW, strength=s.augment))
        truth = slice_truth(sample, infos[sample.case])
        truths.append(truth)
        for k in range(s.captions_per_image):
            caps[k].append(make_caption(truth, rng))
    caps = [c for per_k in caps for c in per_k]
    positives = torch.tensor([[c.facts <= t.facts for c in caps] for t in truths])
    own = torch.arange(len(caps)) % len(samples)
    assert bool(positives[own, torch.arange(len(caps))].all()), "a caption must be true of its own slice"
    ids = _trim(tokenizer([c.text for c in caps]))
    return biomedclip_input(torch.from_numpy(np.stack(images))), ids, positives, caps


def pooled_features(model: BiomedCLIP, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and text features just before their projections (what ``encode_image`` / ``encode_text`` project)."""
    pre_image = model.visual.pre_projection(model.visual.tokens(images))
    mask = (ids != model.text.config.pad_token_id).long()
    pre_text = model.text.pooler(model.text.transformer(input_ids=ids, attention_mask=mask), mask)
    return pre_image, pre_text


def centered_embeddings(model: BiomedCLIP, pre_image: torch.Tensor, pre_text: torch.Tensor):
    """Normalised embeddings of the batch-centred pooled features, and the (detached) batch means."""
    mi, mt = pre_image.mean(0, keepdim=True), pre_text.mean(0, keepdim=True)
    image = F.normalize(model.visual.head(pre_image - mi), dim=-1)
    text = F.normalize(model.text.proj(pre_text - mt), dim=-1)
    return image, text, (mi.detach()[0], mt.detach()[0])


def centering_biases(model: BiomedCLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """The biases of the LayerNorms whose outputs are pooled: the ViT's final norm (CLS token) and the last BERT
    layer's output norm ([CLS] hidden state). Shifting them shifts the pooled features and nothing else the heads
    use."""
    return model.visual.trunk.norm.bias, model.text.transformer.encoder.layer[-1].output.LayerNorm.bias


@torch.no_grad()
def recenter(model: BiomedCLIP, sampler: SliceSampler, infos: dict, tokenizer: VocabTokenizer, s: TrainSettings,
             batches: int = 8) -> None:
    """Fold the exact mean pooled features of ``batches`` un-augmented batches into the LayerNorm biases."""
    model.eval()
    pre_i, pre_t = [], []
    for b in range(batches):
        images, ids, _, _ = make_batch(sampler, infos, tokenizer, b, s)
        a, t = pooled_features(model, images, ids)
        pre_i.append(a)
        pre_t.append(t)
    for bias, feats in zip(centering_biases(model), (pre_i, pre_t)):
        bias.sub_(torch.cat(feats).mean(0))


def _trim(ids: torch.Tensor) -> torch.Tensor:
    """Drop all-padding columns (the text tower masks padding, so this changes nothing but speed)."""
    used = int((ids != 0).any(0).nonzero().max()) + 1
    return ids[:, :used]


def init_for_training(model: BiomedCLIP) -> None:
    """Start the image tower's patch position embeddings from 2D sin-cos (as MAE does) instead of noise of std 0.02.

    A ViT trained from scratch on few steps otherwise sees a bag of patches for its first hundreds of steps (the
    position signal is ~50x weaker than the patch embeddings), and slice layout is most of what tells orientation and
    level apart. Only the initial values change; the architecture and state dict are the same."""
    from timm.layers import build_sincos2d_pos_embed

    trunk = model.visual.trunk
    grid = trunk.patch_embed.grid_size
    with torch.no_grad():
        pe = build_sincos2d_pos_embed(list(grid), trunk.pos_embed.shape[-1])
        trunk.pos_embed[0, trunk.num_prefix_tokens if not trunk.no_embed_class else 0:] = pe


POS_EMBED_LR = 10.0  # learning-rate multiplier of the image position embeddings (they must grow from small values)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay, pos = [], [], []
    for name, p in model.named_parameters():
        if name == "visual.trunk.pos_embed":
            pos.append(p)
        elif p.ndim < 2 or "cls_token" in name or "embeddings" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
            {"params": pos, "weight_decay": 0.0, "lr_mult": POS_EMBED_LR}]




def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(out_dir, steps: int, seed: int = 0, batch_size: int = 48, threads: int = 1, resume: bool = True, *,
          cases: list[CTCase] | None = None, config: "str | BiomedCLIPConfig" = "standin", lr: float = 1e-3,
          warmup: int = 100, checkpoint_every: int = 100, log_every: int = 10, stop_after: int | None = None,
          vocab: "str | Path" = VOCAB_PATH, augment: float = 1.0, captions_per_image: int = 2, prefetch: bool = True,
          verbose: bool = True) -> BiomedCLIP:
    """Train (or resume) the stand-in; writes a checkpoint every ``checkpoint_every`` steps, the loss log and, when
    ``steps`` are done, the final weights. ``stop_after`` ends the call early at that step (as an interruption would),
    keeping the schedule of ``steps``. Returns the model (train mode off)."""
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = standin_config(config, vocab)
    settings = TrainSettings(steps=steps, seed=seed, batch_size=batch_size, lr=lr, warmup=warmup, augment=augment,
                             captions_per_image=captions_per_image)
    tokenizer = VocabTokenizer(vocab, config.context_length)
    if cases is None:
        t0 = time.time()
        cases = load_cases(TRAIN_DIR)
        if verbose:
            print(f"loaded {len(cases)} training cases in {time.time() - t0:.0f} s", flush=True)
    infos = {c.name: case_info(c) for c in cases}
    sampler = SliceSampler(cases, seed=seed, size=config.image_size, structure_bias=settings.structure_bias)

    torch.manual_seed(seed)
    model = build_biomedclip(config)
    init_for_training(model)
    optimizer = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    step, log = 0, []
    ckpt = out / CHECKPOINT_NAME
    meta = {"seed": seed, "batch_size": batch_size, "captions_per_image": captions_per_image, "lr": lr,
            "config": config.to_dict()}
    if resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        saved = json.loads(state["meta"])
        if {k: saved[k] for k in meta} != meta:
            raise ValueError(f"checkpoint {ckpt} was made with other settings: {saved} (now {meta}); "
                             "use another out_dir or resume=False")
        if saved.get("steps") != steps:
            warnings.warn(f"resuming a run of {saved.get('steps')} steps with steps={steps}: the schedule changes")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, log = int(state["step"]), json.loads(state["log"])
        if verbose:
            print(f"resumed at step {step}", flush=True)
    meta["steps"] = steps

    def save_checkpoint():
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": torch.tensor(step),
                     "meta": json.dumps(meta), "log": json.dumps(log)}, ckpt, torch.save)
        write_json(out / LOG_NAME, {"meta": meta, "log": log})

    end = steps if stop_after is None else min(steps, stop_after)
    pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch else None
    fetch = (lambda n: pool.submit(make_batch, sampler, infos, tokenizer, n, settings)) if pool else None
    pending = fetch(step) if (pool and step < end) else None
    model.train()
    t_start, window = time.time(), []
    try:
        while step < end:
            t0 = time.time()
            images, ids, positives, _ = pending.result() if pool else make_batch(sampler, infos, tokenizer, step,
                                                                                   settings)
            if pool and step + 1 < end:
                pending = fetch(step + 1)
            t_data = time.time() - t0
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_mult"] * _lr_factor(step, settings)
            torch.manual_seed(seed * 1_000_003 + step)  # dropout, reproducible on resume
            img, txt, means = centered_embeddings(model, *pooled_features(model, images, ids))
            loss = multi_positive_clip_loss(img, txt, model.logit_scale, positives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
                for bias, mean in zip(centering_biases(model), means):
                    bias.sub_(settings.center_rate * mean)
                hit = positives[torch.arange(len(img)), (img @ txt.t()).argmax(1)].float().mean()
            step += 1
            window.append((float(loss.detach()), float(hit), time.time() - t0, t_data))
            if step % log_every == 0 or step == end:
                a = np.array(window)
                log.append({"step": step, "loss": float(a[:, 0].mean()), "i2t_top1": float(a[:, 1].mean()),
                            "lr": optimizer.param_groups[0]["lr"],
                            "logit_scale": float(model.logit_scale.detach().exp()),
                            "s_per_step": float(a[:, 2].mean()), "data_s_per_step": float(a[:, 3].mean())})
                window = []
                if verbose:
                    e = log[-1]
                    print(f"step {step}/{steps} loss {e['loss']:.3f} i2t@1 {e['i2t_top1']:.2f} "
                          f"scale {e['logit_scale']:.1f} {e['s_per_step']:.2f} s/step (data {e['data_s_per_step']:.2f})"
                          f" elapsed {time.time() - t_start:.0f} s", flush=True)
            if step % checkpoint_every == 0 and step < end:
                save_checkpoint()
    except KeyboardInterrupt:
        save_checkpoint()
        raise
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
    save_checkpoint()
    model.eval()
    if step >= steps:
        recenter(model, SliceSampler(cases, seed=seed + 1, size=config.image_size, structure_bias=0.0), infos,
                 tokenizer, dataclasses.replace(settings, augment=0.0))
        save_trained(model, out, {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
                                  "cases": len(cases), "vocab_size": vocab_size(vocab)}, vocab)
        plot_curves(out)
    return model


def save_trained(model: BiomedCLIP, out_dir, metadata: dict | None = None, vocab: "str | Path" = VOCAB_PATH) -> Path:
    out = Path(out_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_atomic(state, out / WEIGHTS_NAME, lambda s, p: save_file(s, str(p)))
    write_json(out / CONFIG_NAME, {"config": model.config.to_dict(), "training": metadata or {},
                                    "description": "BiomedCLIP-like stand-in trained on OpenKBP head-and-neck CT "
                                                   "slices with generated captions; not for clinical use"})
    (out / VOCAB_NAME).write_text(Path(vocab).read_text())
    return out / WEIGHTS_NAME


def load_trained(out_dir, device: str = "cpu") -> BiomedCLIP:
    out = Path(out_dir)
    config = BiomedCLIPConfig.from_dict(json.loads((out / CONFIG_NAME).read_text())["config"])
    model = build_biomedclip(config)
    model.load_state_dict(load_file(str(out / WEIGHTS_NAME)))
    return model.to(device).eval()


def load_trained_tokenizer(out_dir) -> VocabTokenizer:
    out = Path(out_dir)
    config = json.loads((out / CONFIG_NAME).read_text())["config"]
    return VocabTokenizer(out / VOCAB_NAME, config["context_length"])


def plot_curves(out_dir) -> Path | None:
    opened = open_curves(Path(out_dir) / LOG_NAME, figsize=(9, 3.2))
    if opened is None:
        return None
    fig, ax, log, steps = opened
    ax[0].plot(steps, [e["loss"] for e in log])
    ax[0].set(xlabel="step", ylabel="multi-positive InfoNCE", title="BiomedCLIP stand-in: loss")
    ax[1].plot(steps, [e["i2t_top1"] for e in log])
    ax[1].set(xlabel="step", ylabel="fraction", ylim=(0, 1), title="image->text top-1 is a true caption")
    return save_curves(fig, Path(out_dir) / CURVES_NAME)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def _encode_texts(model: BiomedCLIP, tokenizer: VocabTokenizer, texts: list[str]) -> torch.Tensor:
    return model.encode_text(_trim(tokenizer(texts)), normalize=True)


@torch.inference_mode()
def _class_embeddings(model, tokenizer, classes: dict, single: bool) -> tuple[list, torch.Tensor]:
    names, embs = list(classes), []
    for name in names:
        prompts = classes[name][:1] if single else classes[name]
        e = _encode_texts(model, tokenizer, prompts).mean(0)
        embs.append(F.normalize(e, dim=0))
    return names, torch.stack(embs)


def evaluation_pool(val_cases: list[CTCase], stride: int = 2, size: int = 128,
                    window: Window = EVAL_WINDOW) -> tuple[np.ndarray, list[SliceTruth]]:
    """Every ``stride``-th slice of each case in each orientation (no mirroring), with some body in it."""
    images, truths = [], []
    for case in val_cases:
        info = case_info(case)
        for o in ("axial", "coronal", "sagittal"):
            n = SlicePlane.create(case.geometry, o).num_slices
            for index in range(stride // 2, n, stride):
                sample = cut_slice(case, o, index, size)
                if np.count_nonzero(sample.hu > -400) < 0.05 * size * size:
                    continue
                images.append(window.apply(sample.hu))
                truths.append(slice_truth(sample, info))
    return np.stack(images), truths


def _balanced(groups: dict, rng: np.random.Generator) -> dict:
    """Each class subsampled to the size of the smallest (classes with no member are dropped)."""
    groups = {k: v for k, v in groups.items() if len(v)}
    if len(groups) < 2:
        return {}
    n = min(len(v) for v in groups.values())
    return {k: sorted(rng.choice(v, size=n, replace=False).tolist()) for k, v in groups.items()}


def evaluate(model: BiomedCLIP, tokenizer: VocabTokenizer, val_cases: list[CTCase], *, stride: int = 2, seed: int = 0,
             batch_size: int = 128, pool=None) -> dict:
    """Zero-shot accuracy per question type on validation slices (balanced classes; chance = 1 / classes).

    Returns ``{"questions": {type: {"n", "classes", "chance", "accuracy", "accuracy_single_prompt"}},
    "visible_per_structure": {...}, "slices": N, "table": markdown}``."""
    model.eval()
    size = model.config.image_size
    images, truths = pool if pool is not None else evaluation_pool(val_cases, stride, size)
    with torch.inference_mode():
        feats = torch.cat([model.encode_image(biomedclip_input(torch.from_numpy(images[i:i + batch_size])),
                                              normalize=True) for i in range(0, len(images), batch_size)])
    rng = np.random.default_rng(seed)

    def classify(groups: dict, classes: dict) -> dict:
        groups = _balanced(groups, rng)
        if not groups:
            return {"n": 0, "classes": len(classes), "chance": 1 / len(classes), "accuracy": float("nan"),
                    "accuracy_single_prompt": float("nan")}
        result = {"n": sum(len(v) for v in groups.values()), "classes": len(groups), "chance": 1 / len(groups)}
        for key, single in (("accuracy", False), ("accuracy_single_prompt", True)):
            names, text = _class_embeddings(model, tokenizer, {k: classes[k] for k in groups}, single)
            correct = 0
            for label, idx in groups.items():
                pred = (feats[idx] @ text.t()).argmax(1)
                correct += int((pred == names.index(label)).sum())
            result[key] = correct / result["n"]
        return result

    questions, per_structure = {}, {}
    totals = {"n": 0, "accuracy": 0.0, "accuracy_single_prompt": 0.0}
    for s in OARS:
        yes = [i for i, t in enumerate(truths) if ("vis", s) in t.facts]
        no = [i for i, t in enumerate(truths) if ("no", s) in t.facts]
        p_yes, p_no = visible_prompts(s)
        r = classify({"yes": yes, "no": no}, {"yes": p_yes, "no": p_no})
        per_structure[s] = r
        if r["n"]:
            for k in ("accuracy", "accuracy_single_prompt"):
                totals[k] += r[k] * r["n"]
            totals["n"] += r["n"]
    questions["structure visible (7 OARs, yes/no)"] = {
        "n": totals["n"], "classes": 2, "chance": 0.5,
        "accuracy": totals["accuracy"] / max(totals["n"], 1),
        "accuracy_single_prompt": totals["accuracy_single_prompt"] / max(totals["n"], 1)}
    questions["orientation (axial/coronal/sagittal)"] = classify(
        {o: [i for i, t in enumerate(truths) if t.orientation == o] for o in ORIENTATION_PROMPTS}, ORIENTATION_PROMPTS)
    lone = {side: [i for i, t in enumerate(truths) if t.orientation != "sagittal"
                   and ("vis", f"{side.capitalize()}Parotid") in t.facts
                   and ("no", f"{'Right' if side == 'left' else 'Left'}Parotid") in t.facts]
            for side in ("left", "right")}
    questions["side of a lone parotid (L/R)"] = classify(lone, PAROTID_SIDE_PROMPTS)
    questions["side of a lateralised target (L/R)"] = classify(
        {side: [i for i, t in enumerate(truths) if t.target_side == side] for side in ("left", "right")},
        TARGET_SIDE_PROMPTS)
    questions["target present (yes/no)"] = classify(
        {"yes": [i for i, t in enumerate(truths) if ("vis", "Target") in t.facts],
         "no": [i for i, t in enumerate(truths) if ("no", "Target") in t.facts]}, TARGET_PROMPTS)
    questions["axial level (6-way)"] = classify(
        {lv: [i for i, t in enumerate(truths) if t.orientation == "axial" and t.level == lv] for lv in LEVEL_PROMPTS},
        LEVEL_PROMPTS)
    result = {"slices": len(truths), "cases": len(val_cases), "questions": questions,
              "visible_per_structure": per_structure}
    result["table"] = accuracy_table(result)
    return result


def accuracy_table(result: dict) -> str:
    lines = ["| question | n (balanced) | chance | accuracy (prompt ensemble) | accuracy (single prompt) |",
             "|---|---:|---:|---:|---:|"]
    for name, r in result["questions"].items():
        lines.append(f"| {name} | {r['n']} | {r['chance']:.2f} | {r['accuracy']:.3f} | "
                     f"{r['accuracy_single_prompt']:.3f} |")
    lines += ["", "| structure visible | n (balanced) | accuracy (prompt ensemble) | accuracy (single prompt) |",
              "|---|---:|---:|---:|"]
    for name, r in result["visible_per_structure"].items():
        lines.append(f"| {name} | {r['n']} | {r['accuracy']:.3f} | {r['accuracy_single_prompt']:.3f} |")
    return "\n".join(lines)


def _write_report(out: Path, result: dict) -> None:
    write_json(out / EVAL_NAME, {k: v for k, v in result.items() if k != "table"})
    (out / REPORT_NAME).write_text(
        f"# BiomedCLIP-like stand-in: zero-shot accuracy on OpenKBP validation-pats\n\n"
        f"{result['cases']} patients, {result['slices']} slices (every 2nd slice in each orientation, soft-tissue "
        f"window, no augmentation); classes balanced by subsampling; chance = 1 / classes.\n\n{result['table']}\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.standins.biomedclip", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vocab", help="rebuild the WordPiece vocabulary from the caption corpus")
    v.add_argument("--out", default=str(VOCAB_PATH))
    t = sub.add_parser("train", help="train (resuming when a checkpoint exists), then evaluate on validation-pats")
    t.add_argument("--out", default=str(REPO / "training" / "runs" / "biomedclip"))
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=48)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--limit", type=int, default=None, help="use only the first N training patients")
    t.add_argument("--no-resume", action="store_true")
    e = sub.add_parser("evaluate", aliases=["eval"], help="zero-shot evaluation of a trained run on validation-pats")
    e.add_argument("--out", default=str(REPO / "training" / "runs" / "biomedclip"))
    e.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.cmd == "vocab":
        path = build_vocab(a.out)
        print(f"wrote {path} ({vocab_size(path)} tokens)")
        return
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.cmd == "train":
        t0 = time.time()
        cases = load_cases(TRAIN_DIR, a.limit)
        model = train(out, a.steps, a.seed, a.batch_size, a.threads, resume=not a.no_resume, cases=cases, lr=a.lr)
        print(f"trained in {time.time() - t0:.0f} s; {count_parameters(model) / 1e6:.2f} M parameters")
    model, tokenizer = load_trained(out), load_trained_tokenizer(out)
    t0 = time.time()
    result = evaluate(model, tokenizer, load_cases(VAL_DIR))
    _write_report(out, result)
    print(result["table"])
    print(f"evaluated in {time.time() - t0:.0f} s; report in {out / REPORT_NAME}")


if __name__ == "__main__":
    main()
