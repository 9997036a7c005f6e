"""training/standins/biomedclip.py: captions from labels and geometry (sides in radiological convention, mirrored
slices, orientation), the shipped WordPiece vocabulary, the text tower, the multi-positive loss and resumable training
(on the tiny preset and synthetic cases, so it runs in seconds on a CPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from PRISMRTLib.imaging import Geometry
from PRISMRTLib.models.biomedclip import BIOMEDCLIP_PRESETS, build_biomedclip
from training.data import STRUCTURES, CTCase, cut_slice
from training.standins import biomedclip as C

N = 32  # synthetic grid (i, j, k); spacing as OpenKBP: i runs patient right -> left, k superior -> inferior


def synthetic_case(name: str = "pt_syn", target_left: bool = True, high_parotid: str = "left") -> CTCase:
    """A cylinder of soft tissue with a midline spinal cord, one parotid reaching higher up than the other (so a slice
    shows only that one), a lateralised PTV70 and a larynx further down."""
    top = {"left": 6, "right": 11} if high_parotid == "left" else {"left": 11, "right": 6}
    k, j, i = np.mgrid[:N, :N, :N]
    hu = np.full((N, N, N), -1024, np.int16)
    hu[((i - 15.5) / 12) ** 2 + ((j - 15.5) / 10) ** 2 <= 1] = 40
    masks = {
        "SpinalCord": (abs(i - 15.5) <= 1) & (abs(j - 22) <= 1) & (k >= 4),
        "LeftParotid": (abs(i - 23) <= 2) & (abs(j - 16) <= 3) & (k >= top["left"]) & (k <= 14),  # large i: left
        "RightParotid": (abs(i - 8) <= 2) & (abs(j - 16) <= 3) & (k >= top["right"]) & (k <= 14),
        "PTV70": (abs(i - (21 if target_left else 10)) <= 3) & (abs(j - 12) <= 3) & (k >= 6) & (k <= 24),
        "Larynx": (abs(i - 15.5) <= 2) & (abs(j - 8) <= 2) & (k >= 20) & (k <= 26),
    }
    labels = np.zeros((N, N, N), np.uint16)
    for s, m in masks.items():
        labels |= m.astype(np.uint16) << STRUCTURES.index(s)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((3.9, 3.9, 2.5))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    return CTCase(name, hu, labels, Geometry.from_image(image))


@pytest.fixture(scope="module")
def case():
    return synthetic_case()


@pytest.fixture(scope="module")
def tokenizer():
    return C.load_tokenizer()


LEFT = re.compile(r"\bleft\b|\bL\b|\bLt\b|\(L\)", re.I)
RIGHT = re.compile(r"\bright\b|\bR\b|\bRt\b|\(R\)", re.I)


def many_captions(truth, n=300, seed=0):
    rng = np.random.default_rng(seed)
    return C.captions(truth, rng, n)


# ---- captions --------------------------------------------------------------------------------------------------------
def test_axial_slice_sides_follow_radiological_convention_and_mirroring(case):
    info = C.case_info(case)
    plain = cut_slice(case, "axial", 8, size=64)
    mirrored = cut_slice(case, "axial", 8, size=64, mirror=True)
    t, tm = C.slice_truth(plain, info), C.slice_truth(mirrored, info)
    assert t.orientation == tm.orientation == "axial"
    # only the left parotid is cut at k = 8; it lies on the image right (radiological view)
    assert ("vis", "LeftParotid") in t.facts and ("no", "RightParotid") in t.facts
    assert np.argwhere(plain.mask("LeftParotid"))[:, 1].mean() > 32
    assert t.target_side == "left" and t.ptv70_side == "left"
    # the mirrored slice shows a right parotid (labels swapped by the sampler) and a right-sided target
    assert ("vis", "RightParotid") in tm.facts and ("no", "LeftParotid") in tm.facts
    assert tm.target_side == "right" and tm.ptv70_side == "right"
    assert t.level == tm.level == "parotid"

    for truth, side, other in ((t, LEFT, RIGHT), (tm, RIGHT, LEFT)):
        said_side = said_parotid = 0
        for cap in many_captions(truth):
            assert cap.facts <= truth.facts
            named = {f for f in cap.facts if f[1] in C.PAROTIDS}
            if any(f[0] == "side" for f in cap.facts):
                said_side += 1
                assert side.search(cap.text) and (named or not other.search(cap.text)), cap.text
            if named and not any(f[0] == "side" for f in cap.facts):
                said_parotid += 1
                present = [f for f in named if f[0] == "vis"]
                if present and len(named) == 1:  # "L parotid visible" names the visible one's side only
                    assert side.search(cap.text) and not other.search(cap.text), cap.text
        assert said_side > 10 and said_parotid > 10


def test_target_on_the_patients_right_is_captioned_right():
    case = synthetic_case(target_left=False)
    t = C.slice_truth(cut_slice(case, "axial", 16, size=64), C.case_info(case))
    assert t.target_side == "right"
    texts = [c.text for c in many_captions(t) if ("side", "Target", "right") in c.facts
             and not any(f[1] in C.PAROTIDS for f in c.facts)]
    assert texts and all(RIGHT.search(x) and not LEFT.search(x) for x in texts)


def test_orientation_words_and_sagittal_slices_never_name_a_side(case):
    info = C.case_info(case)
    words = {"axial": r"axial|transverse|transaxial|cross-sectional|\bax\b", "coronal": r"coronal|frontal|\bcor\b",
             "sagittal": r"sagittal|\bsag\b"}
    for orientation, index in (("axial", 12), ("coronal", 16), ("sagittal", 23)):
        t = C.slice_truth(cut_slice(case, orientation, index, size=64), info)
        assert t.orientation == orientation
        caps = many_captions(t, seed=1)
        with_orientation = [c for c in caps if ("orient", orientation) in c.facts]
        assert len(with_orientation) > 50
        for c in caps:
            others = "|".join(w for o, w in words.items() if o != orientation)
            if ("orient", orientation) in c.facts:
                assert re.search(words[orientation], c.text, re.I), c.text
            assert not re.search(others, c.text, re.I), c.text
            if orientation == "sagittal":
                assert not LEFT.search(c.text) and not RIGHT.search(c.text), c.text
    # the sagittal slice through the left parotid (i = 23) says "parotid" without a side, and "lateral"
    t = C.slice_truth(cut_slice(case, "sagittal", 23, size=64), info)
    assert ("vis", "Parotid") in t.facts and t.level == "lateral" and t.target_side is None


def test_target_absent_only_where_no_target_pixel(case):
    info = C.case_info(case)
    above = C.slice_truth(cut_slice(case, "axial", 2, size=64), info)
    assert ("no", "Target") in above.facts and ("vis", "Target") not in above.facts
    inside = C.slice_truth(cut_slice(case, "axial", 12, size=64), info)
    assert ("vis", "Target") in inside.facts and ("vis", "PTV70") in inside.facts
    # structures this case has no contour of are never said to be absent
    assert not any(f == ("no", "Mandible") for f in above.facts | inside.facts)


# ---- vocabulary and text tower ---------------------------------------------------------------------------------------
def test_vocab_covers_every_caption_and_prompt_word(tokenizer):
    unk = tokenizer.tokenizer.unk_token_id
    texts = C.caption_corpus(3000, seed=7) + C.all_prompts()
    ids = tokenizer(texts)
    assert not (ids == unk).any()
    assert (ids != 0).sum(1).max() < tokenizer.context_length  # nothing truncated
    # any ASCII text tokenizes without [UNK] (single characters are in the vocabulary)
    assert not (tokenizer(["Is the oesophagus (Zz-9 #@!) visible? Bilateral PTV~70 & 'cord'."]) == unk).any()
    # the caption words are whole tokens
    for word in ("parotid", "larynx", "axial", "coronal", "sagittal", "ptv70", "mandible", "brainstem"):
        assert tokenizer.tokenizer.tokenize(word) == [word]


def test_shipped_vocab_matches_the_standin_preset_and_its_build(tmp_path):
    assert BIOMEDCLIP_PRESETS["standin"].text_bert["vocab_size"] == C.vocab_size(C.VOCAB_PATH)
    lines = C.VOCAB_PATH.read_text().splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(set(lines)) == len(lines)
    assert C.build_vocab(tmp_path / "vocab.txt").read_text() == C.VOCAB_PATH.read_text()  # rebuilt identically


def test_text_tower_runs_and_trimming_padding_changes_nothing(tokenizer):
    torch.manual_seed(0)
    model = build_biomedclip(C.standin_config())
    texts = ["an axial CT slice at the level of the parotid glands", "no target in this slice", "L parotid, cord"]
    ids = tokenizer(texts)
    with torch.inference_mode():
        full = model.encode_text(ids, normalize=True)
        trimmed = model.encode_text(C._trim(ids), normalize=True)
    assert full.shape == (3, BIOMEDCLIP_PRESETS["standin"].embed_dim) and torch.isfinite(full).all()
    torch.testing.assert_close(full, trimmed, atol=1e-5, rtol=1e-5)
    assert C.count_parameters(model) < 2.0e6


def test_multi_positive_loss():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * img @ txt.t()
    target = torch.arange(6)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(C.multi_positive_clip_loss(img, txt, scale, torch.eye(6, dtype=torch.bool)), clip)
    # two identical captions of two images: each image's target is split between them; swapping them changes nothing
    txt2 = txt.clone()
    txt2[1] = txt2[0]
    pos = torch.eye(6, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    a = C.multi_positive_clip_loss(img, txt2, scale, pos)
    b = C.multi_positive_clip_loss(img[[1, 0, 2, 3, 4, 5]], txt2, scale, pos)
    torch.testing.assert_close(a, b)


# ---- training --------------------------------------------------------------------------------------------------------
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cases = [synthetic_case("pt_1"), synthetic_case("pt_2", target_left=False)]
    kw = dict(seed=3, batch_size=6, cases=cases, config="tiny", warmup=2, checkpoint_every=1, log_every=1,
              verbose=False)
    C.train(tmp_path / "a", 4, **kw)
    C.train(tmp_path / "b", 4, stop_after=2, **kw)
    assert not (tmp_path / "b" / C.WEIGHTS_NAME).exists()
    C.train(tmp_path / "b", 4, **kw)
    a, b = load_file(str(tmp_path / "a" / C.WEIGHTS_NAME)), load_file(str(tmp_path / "b" / C.WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    start = build_biomedclip(C.standin_config("tiny")).state_dict()  # and training changed the weights
    assert not torch.equal(start["text.proj.0.weight"], a["text.proj.0.weight"])
    model = C.load_trained(tmp_path / "b")
    assert model.config.image_size == BIOMEDCLIP_PRESETS["tiny"].image_size
    log = (tmp_path / "b" / C.LOG_NAME).read_text()
    assert '"step": 4' in log
    with pytest.raises(ValueError, match="other settings"):
        C.train(tmp_path / "b", 4, **dict(kw, seed=4))


def test_evaluate_reports_every_question_type(case, tokenizer):
    torch.manual_seed(0)
    model = build_biomedclip(C.standin_config("tiny"))
    cases = [case, synthetic_case("pt_r", target_left=False, high_parotid="right")]
    result = C.evaluate(model, tokenizer, cases, stride=2)
    q = result["questions"]
    assert q["orientation (axial/coronal/sagittal)"]["chance"] == pytest.approx(1 / 3)
    assert q["side of a lateralised target (L/R)"]["n"] > 0 and q["side of a lone parotid (L/R)"]["n"] > 0
    for r in q.values():
        assert r["n"] == 0 or 0 <= r["accuracy"] <= 1
    assert result["table"].startswith("| question |")


def test_recenter_folds_the_pooled_feature_means_into_the_layernorm_biases(case, tokenizer):
    torch.manual_seed(0)
    model = build_biomedclip(C.standin_config("tiny"))
    info = {case.name: C.case_info(case)}
    settings = C.TrainSettings(steps=1, batch_size=8, augment=0.0)
    sampler = C.SliceSampler([case], seed=0, size=model.config.image_size)
    images, ids, _, _ = C.make_batch(sampler, info, tokenizer, 0, settings)
    with torch.no_grad():
        before = C.pooled_features(model, images, ids)
        cosine_before = (lambda e: (e @ e.t()).mean())(model.encode_image(images, normalize=True))
        C.recenter(model, sampler, info, tokenizer, settings, batches=1)
        after = C.pooled_features(model, images, ids)
        cosine_after = (lambda e: (e @ e.t()).mean())(model.encode_image(images, normalize=True))
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b - b.mean(0), atol=1e-4, rtol=1e-4)  # shifted by the mean, nothing else
        assert a.mean(0).abs().max() < 1e-4
    assert cosine_before > 0.95 and cosine_after < 0.5  # the collapse the centring removes
