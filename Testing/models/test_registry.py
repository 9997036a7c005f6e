"""The teacher registry: every teacher builds and produces the features its role promises; sets, bundles, the
student's translators and the backends all read it."""

import numpy as np
import pytest
import torch

from PRISMRTLib.features import TeacherBackend
from PRISMRTLib.models import bundle as bundle_module
from PRISMRTLib.models.registry import (ROLE_HEADS, ROLE_OUTPUTS, ROLES, TEACHER_SETS, TEACHERS, RegistryError,
                                        get_teacher, spec_from_record, spec_record, student_targets, teacher_set)
from PRISMRTLib.models.student import make_student_config


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_every_teacher_builds_and_gives_its_roles_features(name):
    spec = TEACHERS[name]
    outputs = spec.outputs()  # on the meta device: full-size teachers cost nothing here
    assert set(outputs) == set(ROLE_OUTPUTS[spec.role]) - {"clip_embedding"}
    assert all(t.channels > 0 for t in outputs.values())
    assert spec.normalisation in ("none", "minmax", "mean-std")
    if spec.normalisation == "mean-std":
        assert len(spec.mean) == len(spec.std) == 3
    with torch.device("cpu" if spec.family == "sam-tinyvit" else "meta"):  # TinyViT's init cannot run on meta
        heads = spec.heads(spec.build())
    assert set(heads) == set(ROLE_HEADS[spec.role])


def test_the_published_feature_grids():
    """What the paper's teachers and the VFSS set give (and what the student's translators must produce)."""
    grid = {n: {k: (t.channels, t.grid) for k, t in TEACHERS[n].outputs().items()} for n in
            ("litemedsam", "medsam", "dinov3", "biomedclip", "rad-dino", "medclip")}
    assert grid["litemedsam"] == grid["medsam"] == {"sam_embedding": (256, 64)}
    assert grid["dinov3"] == {"dino_cls": (768, 0), "dino_patches": (768, 32)}  # 512 px / 16
    assert grid["rad-dino"] == {"dino_cls": (768, 0), "dino_patches": (768, 37)}  # 518 px / 14
    assert grid["biomedclip"] == {"clip_cls": (768, 0), "clip_patches": (768, 14)}
    assert grid["medclip"] == {"clip_cls": (768, 0), "clip_patches": (768, 7)}  # Swin-T's last stage
    assert TEACHERS["litemedsam"].input_size == 256 and TEACHERS["medsam"].input_size == 1024


@pytest.mark.parametrize("set_name", sorted(TEACHER_SETS))
def test_teacher_sets_name_one_teacher_per_role(set_name):
    specs = teacher_set(set_name)
    assert set(specs) == set(ROLES)
    assert all(spec.role == role for role, spec in specs.items())


def test_the_students_translators_follow_the_teacher_set():
    lite = make_student_config("tiny", "lite")
    vfss = make_student_config("tiny", "vfss")
    assert lite.targets["sam_embedding"] == {"channels": 256, "grid": 64}
    assert lite.targets["dino_patches"] == {"channels": 128, "grid": 32}  # the DINOv3-like stand-in
    assert vfss.targets["dino_patches"] == {"channels": 768, "grid": 37}  # RAD-DINO
    assert set(student_targets(teacher_set("official"))) == {"sam_embedding", "dino_cls", "dino_patches",
                                                               "clip_cls", "clip_patches"}


def test_records_round_trip_and_unknown_teachers_are_named():
    spec = TEACHERS["dinov3-standin"]
    assert spec_from_record(spec_record(spec)) == spec
    with pytest.raises(RegistryError, match="unknown teacher 'sam-3'.*update it"):
        get_teacher("sam-3")
    with pytest.raises(RegistryError, match="unknown teacher set"):
        teacher_set("nope")


def test_a_teacher_swapped_in_the_registry_reaches_the_backend(tmp_path):
    """A bundle of LiteMedSAM's architecture as the SAM teacher: the backend feeds it 256 px min-max inputs and
    reads a 256 x 64 x 64 embedding, from the registry alone."""
    specs = teacher_set("tiny-lite")
    configs = bundle_module.preset_configs({"sam": specs["sam"]})
    torch.manual_seed(0)
    modules = bundle_module.build_components("teachers", configs)
    bundle_module.save_bundle(tmp_path / "b", "teachers", configs, modules, None, name="b", version="0")
    loaded = bundle_module.load_bundle(tmp_path / "b")
    assert loaded.roles == ("sam",) and loaded.tokenizer is None
    backend = TeacherBackend.from_bundle(loaded)
    slices = np.random.default_rng(0).random((1, 96, 64), dtype=np.float32)
    features = backend.encode(slices, (1.0, 1.5), sam_only=True)
    assert features.shapes()["sam_embedding"] == (1, 256, 64, 64)
    assert features.letterbox.out_size == 256 and features.letterbox.in_shape == (96, 64)
    assert backend.encode(slices, (1.0, 1.5)).dino_patches is None  # what it has, nothing more
    with pytest.raises(Exception, match="no dino teacher is configured"):
        backend.teacher("dino")


def test_minmax_normalisation_is_over_the_slice_not_the_padding():
    spec = TEACHERS["litemedsam-tiny"]
    images = torch.full((1, 8, 8), 0.0)
    images[0, :8, :4] = torch.linspace(0.2, 0.6, 32).reshape(8, 4)  # the slice: 8 x 4 at the top-left
    x = spec.prepare(images, (0, 0, 8, 4))
    assert x.shape == (1, 3, 8, 8)
    assert float(x[0, 0, :, :4].min()) == 0.0 and float(x[0, 0, :, :4].max()) == pytest.approx(1.0)
    assert float(x[0, :, :, 4:].abs().max()) == 0.0  # padding stays zero, as LiteMedSAM pads after normalising


def test_a_lone_click_keeps_the_mask_with_the_highest_predicted_iou(tmp_path):
    """SAM answers one click with three masks; the predictor keeps the one the model rates best (the rule that
    training/litemedsam_clicks/first_click.py found best on the validation views). Corrective clicks give one mask."""
    from PRISMRTLib.segmentation.predictor import MaskPredictor, SlicePrompts

    configs = bundle_module.preset_configs({"sam": teacher_set("tiny-lite")["sam"]})
    torch.manual_seed(0)
    modules = bundle_module.build_components("teachers", configs)
    bundle_module.save_bundle(tmp_path / "b", "teachers", configs, modules, None, name="b", version="0")
    backend = TeacherBackend.from_bundle(bundle_module.load_bundle(tmp_path / "b"))
    features = backend.encode(np.random.default_rng(0).random((1, 64, 64), dtype=np.float32), (1.0, 1.0),
                              sam_only=True)
    predictor = MaskPredictor(backend)
    one = predictor.predict(features, SlicePrompts([(30.0, 30.0)], [1]))
    pe = backend.prompt_encoder
    with torch.inference_mode():
        rc = features.letterbox.to_model(np.array([[30.0, 30.0]]))
        sparse, dense = pe(points=(torch.tensor(rc[:, ::-1].copy(), dtype=torch.float32)[None],
                                   torch.tensor([[1]])), boxes=None, masks=None)
        low, iou = backend.mask_decoder(image_embeddings=features.sam_embedding, image_pe=pe.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=True)
    best = int(iou[0].argmax())
    np.testing.assert_allclose(one.logits, low[0, best].numpy(), rtol=1e-5, atol=1e-5)
    assert one.score == pytest.approx(float(iou[0, best]), abs=1e-5)
    two = predictor.predict(features, SlicePrompts([(30.0, 30.0), (10.0, 10.0)], [1, 0]))
    assert two.logits.shape == one.logits.shape  # one mask only: nothing to choose
