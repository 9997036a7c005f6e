"""The image model as a chat engine: what only the pixels of a slice can tell (organ visibility, target presence, the
target's side, the plane), through the backbone's CLIP-space image embedding, on either backend.

    engine = ImageModelEngine.default()           # the default backend's CLIP role, and its trained head if any
    engine.answer(Intent("presence", ("mandible",)), ChatContext(ct, SliceRef("axial", 63)))

Each question (:mod:`..prompts`) is scored zero-shot (cosine to prompt ensembles, times the model's logit scale) or,
when a head trained for this exact model ships in ``PRISMRTLib/chat/heads/`` (``training/chat_head``), by a logistic
regression on the frozen embedding; either way the probabilities are temperature-calibrated on held-out training
patients, and ``Answer.confidence`` is that probability. The slice is cut, letterboxed and windowed exactly as the
CLIP stand-in was trained (``training.data.cut_slice`` + its soft-tissue window), and its features are cached per
slice, so many questions on one slice cost one backbone pass.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ...errors import PrismRTError
from ...imaging.geometry import Geometry
from ...imaging.intensity import Window
from ...imaging.resize import Letterbox
from ...imaging.slicing import Orientation, SlicePlane
from .. import prompts
from ..lexicon import display_name
from ..types import Answer, ChatContext, Intent, SliceRef

log = logging.getLogger("prismrt")

# what the CLIP stand-in was trained on (training/standins/biomedclip.py: EVAL_WINDOW, training.data.AIR_HU)
WINDOW = Window(60, 350)
AIR_HU = -1024.0
HEADS_DIR = Path(__file__).resolve().parents[1] / "heads"
ECE_BINS = 10
KINDS = ("presence", "list", "laterality", "plane")
NO_CLIP_MODEL = ("no image-text (CLIP) model is available for the image model: install the stand-in teachers with "
                 "'prismrt models download teachers-standin-openkbp', or pass --model with a bundle that has a CLIP "
                 "teacher (see 'prismrt models list'); questions the header and structures answer still work")


# ---- calibration ----------------------------------------------------------------------------------------------------
def softmax(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of integer ``labels`` under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(z)), np.asarray(labels)].mean())


def fit_temperature(logits, labels, lo: float = 1e-2, hi: float = 1e2) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (golden-section search on log T; the NLL is
    unimodal in T). Temperature scaling keeps every decision and only fixes the confidence."""
    if not len(labels):
        raise ValueError("no labelled rows to fit a temperature on")
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, labels, math.exp(c)), nll(logits, labels, math.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, labels, math.exp(d))
    return float(math.exp((a + b) / 2))


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float:
    """ECE of the predicted class: predictions binned by confidence (``bins`` equal bins on [0, 1], the last closed),
    sum over bins of (bin share) x |accuracy - mean confidence|."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if not len(probs):
        return float("nan")
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == labels).astype(np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


# ---- the slice as the model was trained to see it -------------------------------------------------------------------
def plane_of(geometry: Geometry, itk_axis: int) -> SlicePlane:
    """The display plane whose slices are cut along ITK index axis ``itk_axis`` (for usual CTs: k axial, j coronal,
    i sagittal; for another acquisition the plane the pixels really show)."""
    for o in Orientation:
        plane = SlicePlane.create(geometry, o)
        if plane.normal_axis == itk_axis:
            return plane
    raise PrismRTError(f"no display plane is cut along index axis {itk_axis}")  # cannot happen: one plane per axis


def slice_input(volume: np.ndarray, geometry: Geometry, ref: SliceRef, size: int,
                window: Window = WINDOW) -> tuple[np.ndarray, int, str]:
    """Slice ``ref`` of a (k, j, i) HU array as the CLIP stand-in was trained on it: cut in radiological display
    orientation, letterboxed at the top-left of a ``size`` square in HU (air outside), then windowed to [0, 1]
    (``training.data.cut_slice`` + the training window). Returns (image, content columns, plane shown)."""
    plane = plane_of(geometry, ref.itk_axis)
    index = plane.check_slice_index(ref.index)
    box = Letterbox.fit(plane.slice_shape, plane.pixel_spacing, size)
    hu = box.resize_to_model(plane.extract(volume, index).astype(np.float32), pad_value=AIR_HU)
    return window.apply(hu), box.content_box[3], plane.orientation.value


def mirror(image: np.ndarray, content_cols: int) -> np.ndarray:
    """The slice mirrored left-right inside its letterbox (as the stand-in's training mirrored it): the patient's
    left becomes the right."""
    out = image.copy()
    out[:, :content_cols] = image[:, :content_cols][:, ::-1]
    return out


# ---- trained heads --------------------------------------------------------------------------------------------------
@dataclass
class QuestionHead:
    """A calibrated linear head for one question: logits = weight @ features + bias, probabilities softmax(logits / T).
    ``features``: "embedding" (the L2-normalised CLIP image embedding) or "embedding+mirror" (that of the slice and of
    its mirror image, concatenated; its outputs are made mirror-consistent at use)."""

    classes: list[str]
    weight: np.ndarray = field(repr=False)  # (C, D)
    bias: np.ndarray = field(repr=False)  # (C,)
    temperature: float = 1.0
    features: str = "embedding"

    def logits(self, emb: np.ndarray, emb_mirror: np.ndarray | None = None) -> np.ndarray:
        if self.features == "embedding+mirror":
            return self.weight @ np.concatenate([emb, emb_mirror]) + self.bias
        return self.weight @ emb + self.bias


@dataclass
class ChatHead:
    """The trained heads of one CLIP model, plus the zero-shot temperatures fitted on the same held-out patients.
    Stored as ``<folder>/<bundle name>.safetensors`` (weights) + ``.json`` (model, fingerprint, classes,
    temperatures, metrics); used only when ``model`` and ``fingerprint`` match the backend's CLIP model."""

    model: str  # the CLIP model's bundle name and version, e.g. "teachers-standin-openkbp 2"
    fingerprint: str  # SHA-256 of its image projection's weights (a retrained model of the same name differs)
    questions: dict[str, QuestionHead] = field(default_factory=dict)
    zero_shot_temperature: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def path_for(model: str, folder: "str | Path" = HEADS_DIR) -> Path:
        stem = model.split(" ")[0].replace("/", "_")
        return Path(folder) / f"{stem}.safetensors"

    def save(self, path: "str | Path") -> Path:
        from safetensors.numpy import save_file

        path = Path(path).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, q in self.questions.items():
            tensors[f"{name}.weight"] = np.ascontiguousarray(q.weight, dtype=np.float32)
            tensors[f"{name}.bias"] = np.ascontiguousarray(q.bias, dtype=np.float32)
        save_file(tensors, str(path))
        path.chmod(0o644)  # safetensors writes 0600; the file ships in the package
        info = {"model": self.model, "fingerprint": self.fingerprint,
                "questions": {n: {"classes": q.classes, "temperature": q.temperature, "features": q.features}
                              for n, q in self.questions.items()},
                "zero_shot_temperature": self.zero_shot_temperature, "meta": self.meta}
        path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: "str | Path") -> "ChatHead":
        from safetensors.numpy import load_file

        path = Path(path).with_suffix(".safetensors")
        info = json.loads(path.with_suffix(".json").read_text())
        tensors = load_file(str(path))
        questions = {n: QuestionHead(list(q["classes"]), tensors[f"{n}.weight"].astype(np.float64),
                                     tensors[f"{n}.bias"].astype(np.float64), float(q["temperature"]),
                                     q.get("features", "embedding"))
                     for n, q in info["questions"].items()}
        return cls(info["model"], info["fingerprint"], questions,
                   {k: float(v) for k, v in info.get("zero_shot_temperature", {}).items()}, info.get("meta", {}))

    @classmethod
    def for_backend(cls, backend, folder: "str | Path" = HEADS_DIR) -> "ChatHead | None":
        """The head trained for the backend's CLIP model, or None (then the engine is zero-shot, uncalibrated)."""
        name = clip_model_name(backend)
        path = cls.path_for(name, folder)
        if not path.exists() or not path.with_suffix(".json").exists():
            return None
        try:
            head = cls.load(path)
        except Exception as exc:  # a damaged file must not take the chat down: zero-shot still answers
            log.warning("PRISM-RT: the chat head %s cannot be read (%s); the image model answers zero-shot", path, exc)
            return None
        if head.model != name or head.fingerprint != clip_fingerprint(backend):
            log.info("PRISM-RT: the chat head %s was trained for '%s', not this CLIP model '%s': zero-shot", path,
                     head.model, name)
            return None
        return head


def clip_model_name(backend) -> str:
    """The bundle (name and version) the backend's CLIP features come from."""
    if hasattr(backend, "teacher"):
        return backend.teacher("clip").model
    bundle = backend.bundle
    return f"{bundle.name} {bundle.version}".rstrip()


def clip_fingerprint(backend) -> str:
    from ...models.registry import tensor_digest

    return tensor_digest(dict(backend.clip_visual_proj.state_dict()))


def clip_input_size(backend) -> int:
    if hasattr(backend, "teacher"):
        return backend.teacher("clip").spec.input_size
    return int(backend.input_size)


# ---- the engine -----------------------------------------------------------------------------------------------------
@dataclass
class _SliceFeatures:
    plane: str  # the plane the pixels show
    emb: np.ndarray  # (E,) L2-normalised CLIP image embedding
    emb_mirror: np.ndarray | None  # of the mirrored slice (axial and coronal only)


class ImageModelEngine:
    """Answers presence, list, laterality (of the target) and plane from a slice's pixels.

    ``backend``: a feature backend with a CLIP role. ``head``: a :class:`ChatHead` for its model (its trained heads
    and zero-shot temperatures), or None (zero-shot with the model's own logit scale: uncalibrated).
    ``use_head=False`` keeps the head's zero-shot temperatures but not its trained heads (for comparisons)."""

    def __init__(self, backend, head: ChatHead | None = None, *, use_head: bool = True, window: Window = WINDOW):
        self.backend = backend
        self.head = head
        self.use_head = use_head
        self.window = window
        self.size = clip_input_size(backend)
        self.encode_calls = 0  # backbone passes so far (one per distinct slice)
        self._text: dict[str, tuple[list[str], np.ndarray]] | None = None
        self._scale: float | None = None
        self._image = None  # the image the cache is for (kept referenced, so its id cannot be reused)
        self._volume: np.ndarray | None = None
        self._geometry: Geometry | None = None
        self._features: dict[str, _SliceFeatures] = {}

    @classmethod
    def default(cls, device: str = "auto", backend: str = "auto", model: str | None = None) -> "ImageModelEngine":
        """The default backend's CLIP role (only that role is loaded), with the head trained for its model when
        one ships. With ``backend`` "auto" and no ``model``, a default whose CLIP features have no trained head (the
        distilled student, until one is trained for it) gives way to the teachers' CLIP model when that one has
        its calibrated head. Raises :class:`PrismRTError` saying what to install when no CLIP model is available."""
        from ...features.backends import TeacherBackend
        from ...features.resolve import open_backend

        def clip_only(b):
            if isinstance(b, TeacherBackend):
                # a CLIP-only backend: encode() would otherwise load the SAM teacher just for its letterbox size
                b = TeacherBackend({"clip": b.teacher("clip")}, b.device)
            b.tokenizer, b.clip_text, b.clip_visual_proj  # noqa: B018 (fail now, not at the first question)
            return b

        try:
            b = clip_only(open_backend(backend, model, device))
        except PrismRTError as exc:
            raise PrismRTError(f"{NO_CLIP_MODEL} ({exc})") from exc
        head = ChatHead.for_backend(b)
        if head is None and backend == "auto" and model is None and not isinstance(b, TeacherBackend):
            try:
                teachers = clip_only(open_backend("teachers", None, device))
            except PrismRTError:
                teachers = None
            if teachers is not None and ChatHead.for_backend(teachers) is not None:
                log.info("PRISM-RT chat: %s has no trained chat head; using %s, which has one",
                         b.describe(), teachers.describe())
                b, head = teachers, ChatHead.for_backend(teachers)
        return cls(b, head)

    # ---- what it is -----------------------------------------------------------------------------------------------
    def method(self, question: str) -> str:
        return "trained head" if self._trained(question) is not None else "zero-shot"

    def source(self, question: str | None = None) -> str:
        method = self.method(question) if question else ("trained head" if self.head and self.use_head
                                                         else "zero-shot")
        return f"image model ({self.backend.describe()}, {method})"

    def _trained(self, question: str) -> QuestionHead | None:
        if self.head is None or not self.use_head:
            return None
        return self.head.questions.get(question)

    # ---- features, cached -----------------------------------------------------------------------------------------
    def _texts(self) -> dict[str, tuple[list[str], np.ndarray]]:
        """Per question: its classes and their (C, E) prompt-ensemble embeddings (computed once)."""
        if self._text is None:
            import torch

            table = prompts.QUESTIONS
            flat = [p for classes in table.values() for ps in classes.values() for p in ps]
            emb = torch.nn.functional.normalize(self.backend.encode_text(flat).float(), dim=-1).cpu().numpy()
            out, n = {}, 0
            for question, classes in table.items():
                rows = []
                for ps in classes.values():
                    e = emb[n:n + len(ps)].mean(0)
                    rows.append(e / np.linalg.norm(e))
                    n += len(ps)
                out[question] = (list(classes), np.stack(rows).astype(np.float64))
            self._text = out
            self._scale = float(self.backend.logit_scale.detach().exp())
        return self._text

    def _bind(self, image: sitk.Image) -> None:
        if image is not self._image:  # another image: the per-slice cache is for one image at a time
            self._image, self._features = image, {}
            self._volume = sitk.GetArrayFromImage(image).astype(np.float32)
            self._geometry = Geometry.from_image(image)

    def features(self, image: sitk.Image, ref: SliceRef) -> _SliceFeatures:
        """The slice's CLIP embeddings (and its mirror image's), from the cache or one backbone pass."""
        import torch

        self._bind(image)
        key = str(ref)
        if key not in self._features:
            x, cols, plane = slice_input(self._volume, self._geometry, ref, self.size, self.window)
            batch = np.stack([x, mirror(x, cols)]) if plane != "sagittal" else x[None]
            self.encode_calls += 1
            f = self.backend.encode(batch, (1.0, 1.0), roles=("clip",))  # square pixels: letterboxed already
            emb = torch.nn.functional.normalize(f.clip_embedding.float(), dim=-1).cpu().numpy().astype(np.float64)
            self._features[key] = _SliceFeatures(plane, emb[0], emb[1] if len(emb) > 1 else None)
        return self._features[key]

    # ---- probabilities --------------------------------------------------------------------------------------------
    def zero_shot_logits(self, question: str, feats: _SliceFeatures) -> np.ndarray:
        classes, text = self._texts()[question]
        z = self._scale * (text @ feats.emb)
        if question == "target_side":  # mirror-consistent: the mirrored slice's left is this slice's right
            zm = self._scale * (text @ feats.emb_mirror)
            z = (z + zm[_mirror_perm(classes)]) / 2
        return z

    def logits(self, question: str, feats: _SliceFeatures) -> tuple[np.ndarray, float]:
        """Uncalibrated logits and the temperature that calibrates them."""
        head = self._trained(question)
        if head is None:
            t = self.head.zero_shot_temperature.get(question, 1.0) if self.head is not None else 1.0
            return self.zero_shot_logits(question, feats), t
        z = head.logits(feats.emb, feats.emb_mirror)
        if head.features == "embedding+mirror":
            zm = head.logits(feats.emb_mirror, feats.emb)
            z = (z + zm[_mirror_perm(head.classes)]) / 2
        return z, head.temperature

    def probabilities(self, question: str, image: sitk.Image, ref: SliceRef) -> dict[str, float]:
        """Calibrated class probabilities of a question (:data:`..prompts.QUESTIONS`) on a slice."""
        feats = self.features(image, ref)
        z, t = self.logits(question, feats)
        classes = self.classes(question)
        return dict(zip(classes, softmax(z / t).tolist()))

    def classes(self, question: str) -> list[str]:
        head = self._trained(question)
        return list(head.classes) if head is not None else list(prompts.QUESTIONS[question])

    # ---- answers --------------------------------------------------------------------------------------------------
    def answer(self, intent: Intent, ctx: ChatContext) -> Answer | None:
        """An answer from the pixels of ``ctx.slice``, or None for a kind this engine does not answer."""
        if intent.kind not in KINDS:
            return None
        ref = ctx.slice
        where = str(ref) if ref is not None else None
        if ref is None:
            return self._cannot("the image model reads one slice at a time and no slice was given: choose a slice "
                                "(--slice AXIS:INDEX, or the slice on screen in Slicer)", intent, None)
        if intent.scope == "volume" and intent.kind != "plane":
            return self._cannot("the image model judges one slice at a time, not the whole scan: load the structures "
                                "(--segmentation) to ask about the scan", intent, where)
        return getattr(self, f"_{intent.kind}")(intent, ctx.image, ref)

    def _cannot(self, because: str, intent: Intent, where: str | None, confidence: float = 1.0,
                question: str | None = None) -> Answer:
        return Answer.cannot_tell(because, source=self.source(question), kind=intent.kind, confidence=confidence,
                                  slice=where)

    def _known(self) -> str:
        organs = [display_name(c) for c in prompts.VISIBLE if c not in ("parotid",)]
        return ("it knows " + ", ".join(organs) + ", a parotid of either side, and whether a target "
                "(any PTV) is on the slice")

    def _presence(self, intent: Intent, image, ref: SliceRef) -> Answer:
        where = str(ref)
        ids = list(intent.structures)
        if not ids:
            return self._cannot(f"the question names no structure for the image model to look for; {self._known()}",
                                intent, where)
        unknown = [s for s in ids if s not in prompts.VISIBLE and s not in prompts.TARGETS]
        if unknown:
            what = ", ".join(display_name(s) for s in unknown)
            if all(s in _TARGET_LIKE for s in unknown):
                why = (f"the image model tells whether some target (any PTV) is on a slice, not which one: load the "
                       f"structures (--segmentation) to ask about {what}")
            else:
                why = f"the image model was not trained on {what}; {self._known()}"
            return self._cannot(why, intent, where)
        feats = self.features(image, ref)
        probs, questions, notes = {}, [], []
        for s in ids:
            question = "target" if s in prompts.TARGETS else f"visible:{s}"
            if feats.plane == "sagittal" and s in prompts.SIDED:
                # a sagittal slice looks the same from either side: only "no parotid at all" can be told
                p_any = self.probabilities(f"visible:{prompts.SIDED[s]}", image, ref)["yes"]
                if p_any >= 0.5:
                    return self._cannot(f"a sagittal slice does not show which side it is on: the image model sees a "
                                        f"parotid here (p = {p_any:.2f}) but cannot tell whether it is the "
                                        f"{display_name(s)}; ask about 'the parotid'", intent, where,
                                        question=f"visible:{prompts.SIDED[s]}")
                probs[s] = p_any
                questions.append(f"visible:{prompts.SIDED[s]}")
                notes.append(f"no parotid is visible, so not the {display_name(s)}")
                continue
            probs[s] = self.probabilities(question, image, ref)["yes"]
            questions.append(question)
        p_all = float(np.prod(list(probs.values())))  # the structures taken as independent
        yes = p_all >= 0.5 if len(ids) > 1 else probs[ids[0]] >= 0.5
        conf = p_all if yes else 1.0 - p_all
        place = _slice_words(ref, feats.plane)
        seen = [display_name(s) for s in ids if probs[s] >= 0.5]
        unseen = [display_name(s) for s in ids if probs[s] < 0.5]
        if len(ids) == 1:
            name = display_name(ids[0])
            text = (f"Yes, the {name} is visible on {place}." if yes else f"No, the {name} is not visible on {place}.")
        elif yes:
            text = f"Yes, all of them are visible on {place}: {_join(seen)}."
        else:
            text = f"No, not all of them are visible on {place}: " + (f"I see {_join(seen)} but not " if seen
                                                                       else "I see none of ") + f"{_join(unseen)}."
        if notes:
            text += " (" + "; ".join(notes) + ".)"
        method = {self.method(q) for q in questions}
        return Answer(text, conf, self._source_of(method), bool(yes), None, kind="presence", slice=str(ref),
                      details={"probabilities": {s: round(p, 4) for s, p in probs.items()}, "plane": feats.plane,
                               "method": "/".join(sorted(method))})

    def _list(self, intent: Intent, image, ref: SliceRef) -> Answer:
        feats = self.features(image, ref)
        sagittal = feats.plane == "sagittal"
        wanted = list(intent.structures) or list(prompts.LIST_ORGANS)
        candidates = []
        for s in wanted:
            parts = [c for c in prompts.LIST_ORGANS if prompts.SIDED.get(c) == s] or [s]  # "parotid": both sides
            for c in parts:
                c = prompts.SIDED.get(c, c) if sagittal else c  # one "parotid" on sagittal slices
                if c in prompts.VISIBLE and c not in candidates:
                    candidates.append(c)
        if not candidates:
            names = ", ".join(display_name(s) for s in wanted)
            return self._cannot(f"the image model cannot list {names}; {self._known()}", intent, str(ref))
        probs = {c: self.probabilities(f"visible:{c}", image, ref)["yes"] for c in candidates}
        seen = sorted(c for c, p in probs.items() if p >= 0.5)
        conf = float(np.prod([max(p, 1 - p) for p in probs.values()]))  # every organ's call right (independent)
        place = _slice_words(ref, feats.plane)
        text = (f"On {place} the image model sees: {_join([display_name(c) for c in seen])}." if seen
                else f"The image model sees none of the organs it knows on {place}.")
        if sagittal and "parotid" in candidates:
            text += " (A sagittal slice cannot show which parotid it is.)"
        method = {self.method(f"visible:{c}") for c in candidates}
        return Answer(text, conf, self._source_of(method), seen, None, kind="list", slice=str(ref),
                      details={"probabilities": {c: round(p, 4) for c, p in probs.items()}, "plane": feats.plane,
                               "method": "/".join(sorted(method))})

    def _laterality(self, intent: Intent, image, ref: SliceRef) -> Answer:
        where = str(ref)
        ids = list(intent.structures) or ["target"]
        if any(s not in prompts.TARGETS for s in ids):
            what = ", ".join(display_name(s) for s in ids)
            return self._cannot(f"from the pixels alone the image model tells only which side a target (any PTV) is "
                                f"on, not the side of {what}: load the structures (--segmentation) for that", intent,
                                where)
        feats = self.features(image, ref)
        if feats.plane == "sagittal":
            return self._cannot("a sagittal slice does not show left and right: ask on an axial or coronal slice",
                                intent, where)
        p_target = self.probabilities("target", image, ref)["yes"]
        if p_target < 0.5:
            return self._cannot(f"the image model sees no target on {_slice_words(ref, feats.plane)} (p = "
                                f"{1 - p_target:.2f} that there is none), so it has no side to give", intent, where,
                                confidence=1.0 - p_target, question="target")
        probs = self.probabilities("target_side", image, ref)
        side = max(probs, key=probs.get)
        screen = {"left": "right", "right": "left"}.get(side, "both")  # radiological display: patient left on the right
        place = _slice_words(ref, feats.plane)
        if side == "bilateral":
            text = f"On {place} the target is on both sides of the midline (the patient's left and right)."
        elif intent.frame == "screen":
            text = f"On {place} the target is on the screen's {screen}, the patient's {side}."
        else:
            text = f"On {place} the target is on the patient's {side}, on the screen's {screen}."
        return Answer(text, float(probs[side]), self.source("target_side"), side, None, kind="laterality",
                      slice=where, details={"screen": screen, "probabilities": {k: round(v, 4) for k, v in
                                                                                 probs.items()},
                                            "p_target": round(p_target, 4), "plane": feats.plane,
                                            "method": self.method("target_side")})

    def _plane(self, intent: Intent, image, ref: SliceRef) -> Answer:
        probs = self.probabilities("plane", image, ref)
        best = max(probs, key=probs.get)
        details = {"probabilities": {k: round(v, 4) for k, v in probs.items()}, "method": self.method("plane")}
        asked = (intent.plane or "").lower() or None
        if asked in probs:
            yes = best == asked
            text = (f"Yes, this looks like {_article(asked)} slice." if yes
                    else f"No, this looks like {_article(best)} slice, not {_article(asked)} one.")
            conf = probs[asked] if yes else 1.0 - probs[asked]
            return Answer(text, float(conf), self.source("plane"), bool(yes), None, kind="plane", slice=str(ref),
                          details=details)
        return Answer(f"This looks like {_article(best)} slice.", float(probs[best]), self.source("plane"), best,
                      None, kind="plane", slice=str(ref), details=details)

    def _source_of(self, methods: set) -> str:
        return f"image model ({self.backend.describe()}, {'/'.join(sorted(methods))})"


_TARGET_LIKE = ("gtv", "ctv", "ptv70", "ptv63", "ptv56")


def _mirror_perm(classes: list[str]) -> list[int]:
    """Index permutation taking a mirrored slice's class scores to this slice's (left <-> right)."""
    return [classes.index(prompts.MIRROR_CLASSES.get(c, c)) for c in classes]


def _slice_words(ref: SliceRef, plane: str) -> str:
    return f"{ref.axis} slice {ref.index}" if plane == ref.axis else f"slice {ref} (which shows a {plane} view)"


def _article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _join(items: list[str]) -> str:
    items = list(items)
    if len(items) < 2:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
