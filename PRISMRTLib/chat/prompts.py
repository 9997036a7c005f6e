"""Zero-shot prompt ensembles for the questions the image model answers, keyed by lexicon concept ids.

The image-text model (the BiomedCLIP-like stand-in) cannot read a user's question: it can only score canonical
prompts. Each question below is a set of classes, each class an ensemble of prompts whose mean text embedding is
compared with the slice's image embedding. The stand-in's own zero-shot evaluation
(``training/standins/biomedclip.py``) imports these tables, so its reported accuracy is that of exactly these
strings; they are in its caption vocabulary (words outside it would split into characters and score poorly).

Question keys (also the names of the trained heads, :mod:`training.chat_head`):

- ``visible:<concept>``: classes ``yes`` / ``no``, one per organ the stand-in was trained on (:data:`VISIBLE`);
- ``target``: ``yes`` / ``no``, any planning target (OpenKBP's PTVs together) on the slice;
- ``target_side``: ``left`` / ``right`` / ``bilateral`` (patient frame; axial and coronal slices only);
- ``plane``: ``axial`` / ``coronal`` / ``sagittal``.
"""

from __future__ import annotations

# The stand-in's structure names (OpenKBP's) and the name its prompts use for each (the first of its caption names).
PROMPT_NAMES = {
    "Brainstem": "brainstem", "SpinalCord": "spinal cord", "LeftParotid": "left parotid",
    "RightParotid": "right parotid", "Esophagus": "esophagus", "Larynx": "larynx", "Mandible": "mandible",
    "Parotid": "parotid",  # either side (a sagittal slice cannot tell which)
}


def visible_prompts(structure: str) -> tuple[list[str], list[str]]:
    """(yes, no) prompt ensembles for "is ``structure`` (an OpenKBP name, or "Parotid") visible on the slice"."""
    name = PROMPT_NAMES[structure]
    yes = [f"a CT slice showing the {name}", f"{name} visible", f"a CT slice with the {name}",
           f"the {name} is visible in this slice"]
    no = [f"a CT slice without the {name}", f"no {name}", f"{name} not visible", f"no {name} in this slice"]
    return yes, no


ORIENTATION_PROMPTS = {
    "axial": ["an axial CT slice", "a transverse CT image", "axial view", "CT slice in the axial plane"],
    "coronal": ["a coronal CT slice", "a coronal CT image", "coronal view", "CT slice in the coronal plane"],
    "sagittal": ["a sagittal CT slice", "a sagittal CT image", "sagittal view", "CT slice in the sagittal plane"],
}
PAROTID_SIDE_PROMPTS = {
    "left": ["a CT slice showing the left parotid", "left parotid visible", "L parotid"],
    "right": ["a CT slice showing the right parotid", "right parotid visible", "R parotid"],
}
TARGET_SIDE_PROMPTS = {
    "left": ["a CT slice with the target on the patient's left", "left-sided target", "target left of midline"],
    "right": ["a CT slice with the target on the patient's right", "right-sided target", "target right of midline"],
}
TARGET_PROMPTS = {
    "yes": ["a CT slice with a treatment target", "target present", "PTV in slice"],
    "no": ["a CT slice with no target", "no target in this slice", "no PTV"],
}
# the chat's third side class; phrases from the stand-in's caption table (TARGET_SIDE["bilateral"])
TARGET_BILATERAL_PROMPTS = ["bilateral target", "target crossing the midline", "PTV spanning both sides"]

# lexicon concept id -> the stand-in's structure name, for each organ it can be asked about
VISIBLE = {
    "brainstem": "Brainstem", "spinal_cord": "SpinalCord", "parotid_left": "LeftParotid",
    "parotid_right": "RightParotid", "esophagus": "Esophagus", "larynx": "Larynx", "mandible": "Mandible",
    "parotid": "Parotid",
}
# the organs a "which organs are on this slice?" answer considers (the paired "parotid" replaces both sides on
# sagittal slices)
LIST_ORGANS = ("brainstem", "spinal_cord", "parotid_left", "parotid_right", "esophagus", "larynx", "mandible")
SIDED = {"parotid_left": "parotid", "parotid_right": "parotid"}
# concepts answered by the "target" question: the stand-in's target is OpenKBP's PTVs together
TARGETS = ("target", "ptv")
# classes whose meaning swaps under a left-right mirror (the side question is made mirror-consistent with them)
MIRROR_CLASSES = {"left": "right", "right": "left"}


def questions() -> dict[str, dict[str, list[str]]]:
    """Every question: key -> class -> prompt ensemble (class order is the order of the heads' outputs)."""
    out: dict[str, dict[str, list[str]]] = {}
    for concept, structure in VISIBLE.items():
        yes, no = visible_prompts(structure)
        out[f"visible:{concept}"] = {"yes": yes, "no": no}
    out["target"] = dict(TARGET_PROMPTS)
    out["target_side"] = {**TARGET_SIDE_PROMPTS, "bilateral": list(TARGET_BILATERAL_PROMPTS)}
    out["plane"] = dict(ORIENTATION_PROMPTS)
    return out


QUESTIONS = questions()
