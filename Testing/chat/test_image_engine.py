"""The chat's image-model engine: answers from a real OpenKBP slice, honest refusals, the per-slice cache, the head
file, the calibration math, and that its input is the slice exactly as the CLIP stand-in was trained on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from prismrt_testing import SAMPLE_DIR

from PRISMRTLib.chat import prompts
from PRISMRTLib.chat.engines import image as image_engine
from PRISMRTLib.chat.engines.image import (
    ChatHead, ImageModelEngine, QuestionHead, _SliceFeatures, clip_fingerprint, clip_model_name,
    expected_calibration_error, fit_temperature, mirror, slice_input,
)
from PRISMRTLib.chat.types import CANNOT_TELL, ChatContext, Intent, SliceRef
from PRISMRTLib.errors import PrismRTError
from PRISMRTLib.imaging.geometry import Geometry


@pytest.fixture(scope="module")
def engine():
    try:
        return ImageModelEngine.default(device="cpu")
    except PrismRTError as exc:
        pytest.skip(f"no CLIP model: {exc}")


@pytest.fixture(scope="module")
def ct():
    return sitk.ReadImage(str(SAMPLE_DIR / "ct.nii.gz"))


def _central_axial(name: str) -> int:
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_DIR / f"{name}.nii.gz")))
    return int(round(np.nonzero(mask)[0].mean()))  # k of the centre of mass (k runs S->I in this CT)


def _counting(engine, monkeypatch):
    calls = {"image": 0, "text": 0}
    encode, encode_text = engine.backend.encode, engine.backend.encode_text

    def counted(*a, **k):
        calls["image"] += 1
        return encode(*a, **k)

    def counted_text(*a, **k):
        calls["text"] += 1
        return encode_text(*a, **k)

    monkeypatch.setattr(engine.backend, "encode", counted)
    monkeypatch.setattr(engine.backend, "encode_text", counted_text)
    return calls


# ---- answers on a real slice ---------------------------------------------------------------------------------------
def test_mandible_present_on_its_central_axial_slice_and_absent_far_below(engine, ct):
    k = _central_axial("Mandible")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_DIR / "Mandible.nii.gz")))
    far = 118  # the lower neck / thoracic inlet: no mandible voxel within 40 slices
    assert not mask[far - 40:far + 1].any()
    here = engine.answer(Intent("presence", ("mandible",), polar=True), ChatContext(ct, SliceRef("axial", k)))
    there = engine.answer(Intent("presence", ("mandible",), polar=True), ChatContext(ct, SliceRef("axial", far)))
    assert here.status == "answered" and here.value is True, here.answer
    assert there.status == "answered" and there.value is False, there.answer
    assert here.answer.startswith("Yes") and there.answer.startswith("No")
    for a in (here, there):
        assert 0.5 <= a.confidence <= 1.0
        assert a.source.startswith("image model (teachers: clip=") and a.source.endswith(("zero-shot)", "head)"))
        assert a.slice in (f"axial:{k}", f"axial:{far}")


def test_without_a_slice_it_says_a_slice_is_needed(engine, ct):
    for intent in (Intent("presence", ("mandible",)), Intent("list"), Intent("laterality", ("target",)),
                   Intent("plane")):
        a = engine.answer(intent, ChatContext(ct, None))
        assert a.status == CANNOT_TELL and a.answer.startswith("I cannot tell from this CT because")
        assert "slice" in a.answer and a.source.startswith("image model")


def test_unknown_structures_and_kinds(engine, ct):
    a = engine.answer(Intent("presence", ("heart",)), ChatContext(ct, SliceRef("axial", 60)))
    assert a.status == CANNOT_TELL and "heart" in a.answer and "knows" in a.answer and "mandible" in a.answer
    a = engine.answer(Intent("presence", ("ptv70",)), ChatContext(ct, SliceRef("axial", 60)))
    assert a.status == CANNOT_TELL and "PTV70" in a.answer
    a = engine.answer(Intent("laterality", ("mandible",)), ChatContext(ct, SliceRef("axial", 60)))
    assert a.status == CANNOT_TELL
    a = engine.answer(Intent("laterality", ("target",)), ChatContext(ct, SliceRef("sagittal", 64)))
    assert a.status == CANNOT_TELL and "sagittal" in a.answer
    assert engine.answer(Intent("volume", ("ptv70",)), ChatContext(ct, SliceRef("axial", 60))) is None


def test_list_plane_and_laterality_answer_in_the_contract(engine, ct):
    ref = SliceRef("axial", _central_axial("Mandible"))
    a = engine.answer(Intent("list"), ChatContext(ct, ref))
    assert isinstance(a.value, list) and a.value == sorted(a.value)
    assert set(a.value) <= set(prompts.LIST_ORGANS) and 0 < a.confidence <= 1
    a = engine.answer(Intent("plane"), ChatContext(ct, SliceRef("sagittal", 64)))
    assert a.value in ("axial", "coronal", "sagittal") and a.kind == "plane"
    a = engine.answer(Intent("plane", plane="sagittal", polar=True), ChatContext(ct, SliceRef("sagittal", 64)))
    assert isinstance(a.value, bool)
    a = engine.answer(Intent("laterality", ("target",)), ChatContext(ct, SliceRef("axial", _central_axial("PTV70"))))
    if a.status == "answered":
        assert a.value in ("left", "right", "bilateral")
        assert a.details["screen"] == {"left": "right", "right": "left", "bilateral": "both"}[a.value]
        if a.value != "bilateral":  # both frames, the patient's and the screen's (radiological display)
            assert f"patient's {a.value}" in a.answer and f"screen's {a.details['screen']}" in a.answer


# ---- the cache -----------------------------------------------------------------------------------------------------
def test_second_question_on_a_slice_encodes_nothing_new(engine, ct, monkeypatch):
    fresh = ImageModelEngine(engine.backend, engine.head, use_head=False)  # zero-shot: needs the text embeddings
    calls = _counting(fresh, monkeypatch)
    ref = SliceRef("axial", 50)
    fresh.answer(Intent("presence", ("mandible",)), ChatContext(ct, ref))
    assert calls == {"image": 1, "text": 1}
    fresh.answer(Intent("list"), ChatContext(ct, ref))
    fresh.answer(Intent("presence", ("target",)), ChatContext(ct, SliceRef("axial", 50)))
    fresh.answer(Intent("laterality", ("target",)), ChatContext(ct, ref))
    assert calls == {"image": 1, "text": 1} and fresh.encode_calls == 1
    fresh.answer(Intent("plane"), ChatContext(ct, SliceRef("coronal", 50)))
    assert calls == {"image": 2, "text": 1}
    other = sitk.Image(ct)  # another image: its slices are other slices
    fresh.answer(Intent("plane"), ChatContext(other, ref))
    assert calls["image"] == 3


# ---- the input is the slice as the stand-in was trained on it ------------------------------------------------------
def test_slice_input_is_the_training_slice(ct):
    from training.data import cut_slice, load_case

    case = load_case(SAMPLE_DIR)
    for axis, index in (("axial", 40), ("coronal", 70), ("sagittal", 50)):
        x, cols, shown = slice_input(case.hu, case.geometry, SliceRef(axis, index), 128)
        sample = cut_slice(case, axis, index, 128)
        assert shown == axis and cols == sample.letterbox.content_box[3]
        np.testing.assert_array_equal(x, image_engine.WINDOW.apply(sample.hu))
        if axis != "sagittal":
            np.testing.assert_array_equal(mirror(x, cols),
                                          image_engine.WINDOW.apply(cut_slice(case, axis, index, 128, True).hu))
    # the index counts along k for axial slices, not display rows: this CT's axial slice k is its array plane k
    volume = sitk.GetArrayFromImage(ct).astype(np.float32)
    x, _, _ = slice_input(volume, Geometry.from_image(ct), SliceRef("axial", 40), 128)
    np.testing.assert_allclose(x, image_engine.WINDOW.apply(volume[40]), atol=1e-6)


# ---- mirror consistency of the side ---------------------------------------------------------------------------------
@pytest.mark.parametrize("trained", [False, True])
def test_side_of_the_mirrored_slice_is_the_other_side(engine, trained):
    """Swapping a slice's embedding with its mirror image's swaps left and right, zero-shot and trained alike."""
    rng = np.random.default_rng(0)
    probe = ImageModelEngine(engine.backend, engine.head, use_head=trained)
    dim = probe._texts()["plane"][1].shape[1]
    if trained and probe._trained("target_side") is None:
        probe.head = ChatHead("x", "y", {"target_side": QuestionHead(
            list(prompts.QUESTIONS["target_side"]), rng.normal(size=(3, 2 * dim)), rng.normal(size=3), 0.7,
            "embedding+mirror")})
    e, em = (v / np.linalg.norm(v) for v in rng.normal(size=(2, dim)))
    z, _ = probe.logits("target_side", _SliceFeatures("axial", e, em))
    zm, _ = probe.logits("target_side", _SliceFeatures("axial", em, e))
    classes = probe.classes("target_side")
    swap = [classes.index({"left": "right", "right": "left"}.get(c, c)) for c in classes]
    np.testing.assert_allclose(z, zm[swap], atol=1e-12)
    assert classes.index("left") != classes.index("right")


# ---- the head file -------------------------------------------------------------------------------------------------
def test_head_file_round_trip_and_model_match(engine, tmp_path):
    rng = np.random.default_rng(1)
    name = clip_model_name(engine.backend)
    head = ChatHead(name, clip_fingerprint(engine.backend),
                    {"visible:mandible": QuestionHead(["yes", "no"], rng.normal(size=(2, 128)), rng.normal(size=2),
                                                      0.8),
                     "target_side": QuestionHead(["left", "right", "bilateral"], rng.normal(size=(3, 256)),
                                                 rng.normal(size=3), 1.3, "embedding+mirror")},
                    {"plane": 0.5}, {"note": "test"})
    path = head.save(ChatHead.path_for(name, tmp_path))
    assert path.exists() and path.with_suffix(".json").exists() and path.stat().st_size < 10_000
    back = ChatHead.load(path)
    assert (back.model, back.fingerprint, back.zero_shot_temperature, back.meta) == \
        (head.model, head.fingerprint, head.zero_shot_temperature, head.meta)
    for q, h in head.questions.items():
        b = back.questions[q]
        assert (b.classes, b.features) == (h.classes, h.features) and b.temperature == pytest.approx(h.temperature)
        np.testing.assert_allclose(b.weight, h.weight, rtol=1e-6)  # stored as float32
        np.testing.assert_allclose(b.bias, h.bias, rtol=1e-6)
    found = ChatHead.for_backend(engine.backend, tmp_path)
    assert found is not None and set(found.questions) == set(head.questions)
    with_mandible = ImageModelEngine(engine.backend, found)
    assert with_mandible.method("visible:mandible") == "trained head" and with_mandible.method("plane") == "zero-shot"
    assert "trained head" in with_mandible.source("visible:mandible")
    # a head trained for another model (name or weights) is not used
    ChatHead(name, "0" * 64, head.questions).save(ChatHead.path_for(name, tmp_path))
    assert ChatHead.for_backend(engine.backend, tmp_path) is None


def test_shipped_head_matches_the_default_model(engine):
    path = ChatHead.path_for(clip_model_name(engine.backend))
    if not path.exists():
        pytest.skip("no head trained for the default CLIP model")
    assert engine.head is not None and engine.head.model == clip_model_name(engine.backend)
    assert set(engine.head.questions) <= set(prompts.QUESTIONS)
    assert path.stat().st_size < 100_000


# ---- calibration math ----------------------------------------------------------------------------------------------
def test_temperature_on_a_hand_case():
    # every sample has logits (2, 0) and 3 of 4 are class 0: the best T makes sigmoid(2 / T) = 3/4, T = 2 / ln 3
    logits, labels = np.array([[2.0, 0.0]] * 4), np.array([0, 0, 0, 1])
    assert fit_temperature(logits, labels) == pytest.approx(2 / math.log(3), rel=1e-5)
    # always right with a margin: sharper is better, to where the NLL is flat at float precision
    assert fit_temperature(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1])) < 0.05
    # nothing to fit on is an error, not a NaN temperature that would silently reach a shipped head
    with pytest.raises(ValueError, match="no labelled rows"):
        fit_temperature(np.zeros((0, 2)), np.zeros(0, int))


def test_expected_calibration_error_on_a_hand_case():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    # bin 0.9: accuracy 1/2, confidence 0.9 -> 0.4 x 2/4; bin 0.6: accuracy 1, confidence 0.6 -> 0.4 x 2/4
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)  # bin 10 closed


# ---- the stand-in scores the same prompts --------------------------------------------------------------------------
def test_stand_in_imports_the_chat_prompt_tables():
    from training.standins import biomedclip as C

    assert C.ORIENTATION_PROMPTS is prompts.ORIENTATION_PROMPTS and C.TARGET_PROMPTS is prompts.TARGET_PROMPTS
    assert C.TARGET_SIDE_PROMPTS is prompts.TARGET_SIDE_PROMPTS and C.visible_prompts is prompts.visible_prompts
    assert all(prompts.PROMPT_NAMES[s] == C.NAMES[s][0] for s in prompts.PROMPT_NAMES)
    assert prompts.visible_prompts("Mandible")[0][0] == "a CT slice showing the mandible"
    for concept in prompts.VISIBLE:  # keyed by lexicon concept ids
        from PRISMRTLib.chat.lexicon import CONCEPTS

        assert concept in CONCEPTS


def test_default_names_what_to_install(monkeypatch):
    from PRISMRTLib.features import resolve
    from PRISMRTLib.weights import UnknownModelError

    def no_model(*a, **k):
        raise UnknownModelError("no model for the teachers' clip role")

    monkeypatch.setattr(resolve, "open_backend", no_model)
    with pytest.raises(PrismRTError, match="teachers-standin-openkbp"):
        ImageModelEngine.default(device="cpu")


def test_a_default_model_without_a_chat_head_gives_way_to_the_teachers_that_have_one(monkeypatch):
    """The student (auto's default once shipped) has no chat head trained for its CLIP features: the chat keeps the
    teachers' CLIP model, whose calibrated head ships; asked for the student by name, it gets the student."""
    from PRISMRTLib.features import resolve
    from PRISMRTLib.features.backends import TeacherBackend

    real_open, real_for = resolve.open_backend, ChatHead.for_backend

    class Student:
        tokenizer = clip_text = clip_visual_proj = object()
        input_size = 256

        def describe(self):
            return "prismrt: a student 1"

    student = Student()
    monkeypatch.setattr(resolve, "open_backend",
                        lambda backend="auto", model=None, device="cpu", **k: student if backend in ("auto", "prismrt")
                        else real_open(backend, model, device, **k))
    monkeypatch.setattr(ChatHead, "for_backend", classmethod(
        lambda cls, b, *a: None if b is student else real_for.__func__(cls, b, *a)))
    chosen = ImageModelEngine.default(device="cpu")
    if chosen.head is None:
        pytest.skip("no chat head ships for the teachers' CLIP model")
    assert isinstance(chosen.backend, TeacherBackend) and "trained head" in chosen.source("visible:mandible")
    named = ImageModelEngine.default(device="cpu", backend="prismrt")
    assert named.backend is student and named.head is None


def test_head_training_keeps_an_uncalibrated_zero_shot_where_calibration_has_no_labels():
    # a tiny run (few patients, a coarse stride) can leave a question without one labelled calibration slice: the
    # trainer must say so and keep T = 1, not write a NaN temperature into the head file
    from types import SimpleNamespace

    from training.chat_head.train import QUESTIONS, Pool, train_heads

    rng = np.random.default_rng(0)
    dim, rows = 8, 6
    texts = {q: (list(prompts.QUESTIONS[q]), rng.normal(size=(len(prompts.QUESTIONS[q]), dim))) for q in QUESTIONS}
    engine = SimpleNamespace(_texts=lambda: texts, _scale=10.0)

    def pool(labelled: bool) -> Pool:
        labels = {q: (rng.integers(0, len(prompts.QUESTIONS[q]), rows) if labelled else np.full(rows, -1))
                  for q in QUESTIONS}
        return Pool(rng.normal(size=(rows, dim)), rng.normal(size=(rows, dim)), np.array(["axial"] * rows),
                    np.zeros(rows, bool), np.arange(rows), labels)

    heads, zs_t, _ = train_heads(engine, pool(True), pool(False), verbose=False)
    assert heads == {}
    assert zs_t == {q: 1.0 for q in QUESTIONS}
