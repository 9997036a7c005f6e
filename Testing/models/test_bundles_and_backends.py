"""Bundles round-trip and refuse mismatches; both feature backends give the same typed features."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PRISMRTLib.features import SliceFeatures, StudentBackend, TeacherBackend, create_backend
from PRISMRTLib.imaging import Geometry, SlicePlane, get_window
from PRISMRTLib.models import BundleError, load_bundle, preset_configs, save_bundle
from PRISMRTLib.models.biomedclip import write_vocab
from prismrt_testing import make_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
WORDS = "an axial ct slice of the left right parotid gland is visible in this image spinal cord target".split()


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_vocab(WORDS, tmp_path_factory.mktemp("vocab") / "vocab.txt")


def _make(kind, folder, vocab, seed=0):
    return make_tiny_bundle(kind, folder, seed, WORDS)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, vocab):
    root = tmp_path_factory.mktemp("bundles")
    made = {kind: _make(kind, root / kind, vocab) for kind in ("teachers", "prismrt")}
    return root, made


@pytest.fixture(scope="module")
def ct_slices():
    """Three neighbouring axial slices of the shipped OpenKBP CT, head-and-neck window, and their spacing."""
    ct = sitk.ReadImage(str(REPO / "Testing" / "Data" / "openkbp_pt_226" / "ct.nii.gz"))
    plane = SlicePlane.create(Geometry.from_image(ct), "axial")
    arr = sitk.GetArrayViewFromImage(ct)
    window = get_window("head-and-neck")
    return np.stack([window.apply(plane.extract(arr, k)) for k in (60, 61, 62)]), plane.pixel_spacing


@pytest.mark.parametrize("kind", ["teachers", "prismrt"])
def test_bundle_round_trip_reproduces_outputs(bundles, kind, ct_slices):
    root, made = bundles
    bundle = load_bundle(root / kind)
    assert bundle.kind == kind and bundle.version == "0.0.1"
    for name, module in made[kind].items():
        saved = module.state_dict()
        loaded = bundle.modules[name].state_dict()
        assert saved.keys() == loaded.keys()
        for key in saved:
            torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)
    # and the same features come out of a backend built twice from the files
    slices, spacing = ct_slices
    a = create_backend(bundle).encode(slices, spacing)
    b = create_backend(load_bundle(root / kind)).encode(slices, spacing)
    for name in SliceFeatures.TENSORS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name))


def test_both_backends_return_identical_shapes_and_types(bundles, ct_slices):
    root, _ = bundles
    slices, spacing = ct_slices
    teachers = TeacherBackend.from_bundle(load_bundle(root / "teachers"))
    student = StudentBackend(load_bundle(root / "prismrt"))
    ft, fs = teachers.encode(slices, spacing), student.encode(slices, spacing)
    assert ft.shapes() == fs.shapes()
    for name in SliceFeatures.TENSORS:
        t, s = getattr(ft, name), getattr(fs, name)
        assert t.dtype == s.dtype == torch.float32 and t.device == s.device
        assert torch.isfinite(t).all() and torch.isfinite(s).all()
    assert ft.letterbox == fs.letterbox
    assert ft.shapes()["sam_embedding"] == (3, 32, 8, 8)  # the tiny MedSAM: 32 channels at 128 / 16
    # the task heads exist in both and agree in size
    assert teachers.encode_text(["left parotid"]).shape == student.encode_text(["left parotid"]).shape == (1, 32)


def test_student_runs_at_several_input_sizes(bundles, ct_slices):
    root, _ = bundles
    slices, spacing = ct_slices
    bundle = load_bundle(root / "prismrt")
    shapes = {size: StudentBackend(bundle, input_size=size).encode(slices, spacing).shapes() for size in (64, 128, 256)}
    assert shapes[64] == shapes[128] == shapes[256]
    with pytest.raises(ValueError, match="multiple of 16"):
        StudentBackend(bundle, input_size=100)


def test_batching_does_not_change_features(bundles, ct_slices):
    root, _ = bundles
    slices, spacing = ct_slices
    bundle = load_bundle(root / "teachers")
    whole = TeacherBackend.from_bundle(bundle, batch_size=8).encode(slices, spacing)
    pieces = TeacherBackend.from_bundle(bundle, batch_size=1).encode(slices, spacing)
    torch.testing.assert_close(whole.sam_embedding, pieces.sam_embedding, rtol=1e-4, atol=1e-5)
    one = TeacherBackend.from_bundle(bundle).encode(slices[1], spacing)
    torch.testing.assert_close(one.dino_patches[0], whole.dino_patches[1], rtol=1e-4, atol=1e-5)


def test_slices_must_be_windowed(bundles):
    root, _ = bundles
    backend = TeacherBackend.from_bundle(load_bundle(root / "teachers"))
    with pytest.raises(ValueError, match=r"windowed to \[0, 1\]"):
        backend.encode(np.full((1, 16, 16), 40.0, np.float32))


def test_gpu_out_of_memory_falls_back_to_cpu(bundles, ct_slices, monkeypatch, caplog):
    root, _ = bundles
    slices, spacing = ct_slices
    backend = StudentBackend(load_bundle(root / "prismrt"))
    backend.device = "cuda:0"  # pretend the backend sits on a GPU that is full
    calls = {"n": 0}
    original = StudentBackend._encode_chunk

    def flaky(self, chunk, box, sam_only):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return original(self, chunk, box, sam_only)

    monkeypatch.setattr(StudentBackend, "_encode_chunk", flaky)
    features = backend.encode(slices, spacing)
    assert len(features) == 3 and backend.device == "cpu"
    assert "ran out of memory" in backend.fallback_message and "ran out of memory" in caplog.text


def test_mismatched_bundle_is_refused(bundles, tmp_path, vocab):
    root, _ = bundles
    # a bundle whose config says one size and whose tensors are of another
    folder = tmp_path / "broken"
    _make("teachers", folder, vocab)
    config = json.loads((folder / "config.json").read_text())
    config["teachers"]["dino"]["config"]["overrides"]["embed_dim"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="does not match its config.json.*another shape"):
        load_bundle(folder)
    # tensors missing
    config["teachers"]["dino"]["config"]["overrides"]["embed_dim"] = 48
    config["teachers"]["dino"]["config"]["overrides"]["depth"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="tensors missing"):
        load_bundle(folder)


def test_corrupt_or_foreign_bundles_are_refused(bundles, tmp_path):
    root, _ = bundles
    with pytest.raises(BundleError, match="config.json is missing"):
        load_bundle(tmp_path)
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(root / "prismrt", folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="not a valid safetensors file"):
        load_bundle(folder)
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="update PRISM-RT"):
        load_bundle(folder)


def test_save_refuses_to_overwrite_and_checks_components(bundles, tmp_path, vocab):
    root, made = bundles
    configs = preset_configs("tiny", None)
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(root / "teachers", "teachers", configs, made["teachers"], vocab, name="x", version="0")
    with pytest.raises(BundleError, match="needs the components"):
        save_bundle(tmp_path / "t", "teachers", configs, {"sam": made["teachers"]["sam"]}, vocab, name="x",
                    version="0")


def test_no_pickle_on_any_load_path():
    """PRISMRTLib never unpickles, but for the one verified file: LiteMedSAM's released checkpoint, read once with
    torch.load(weights_only=True) after its size and SHA-256 matched, to convert it into safetensors."""
    offenders = []
    for path in (REPO / "PRISMRTLib").rglob("*.py"):
        text = path.read_text()
        for needle in ("torch.load(", "import pickle", "pickle.load", "allow_pickle=True", "torch.jit.load"):
            if needle in text:
                offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == ["PRISMRTLib/models/litemedsam.py: torch.load("]
    text = (REPO / "PRISMRTLib" / "models" / "litemedsam.py").read_text()
    calls = [line for line in text.splitlines() if "= torch.load(" in line]
    assert len(calls) == 1 and "weights_only=True" in calls[0]


def test_the_released_checkpoint_is_verified_before_it_is_unpickled(tmp_path, monkeypatch):
    from PRISMRTLib.errors import PrismRTError
    from PRISMRTLib.models import litemedsam

    called = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: called.append(a))
    fake = tmp_path / "lite_medsam.pth"
    fake.write_bytes(b"\0" * litemedsam.RELEASED_SIZE)  # the right size, not the right bytes
    with pytest.raises(PrismRTError, match="not the released LiteMedSAM checkpoint"):
        litemedsam.read_released_checkpoint(fake)
    assert called == []


def test_half_precision_storage_loads_into_float32(tmp_path, vocab):
    configs = preset_configs("tiny", None)
    torch.manual_seed(1)
    from PRISMRTLib.models import build_components

    modules = build_components("teachers", configs)
    save_bundle(tmp_path / "half", "teachers", configs, modules, vocab, name="h", version="0", float_dtype=torch.float16)
    loaded = load_bundle(tmp_path / "half")
    p = dict(loaded.modules["dino"].named_parameters())["patch_embed.proj.weight"]
    ref = dict(modules["dino"].named_parameters())["patch_embed.proj.weight"]
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, ref.half().float())


def test_sam_only_features_for_delineation(bundles, ct_slices):
    root, _ = bundles
    slices, spacing = ct_slices
    backend = TeacherBackend.from_bundle(load_bundle(root / "teachers"))
    full, sam = backend.encode(slices, spacing), backend.encode(slices, spacing, sam_only=True)
    torch.testing.assert_close(sam.sam_embedding, full.sam_embedding)
    assert sam.dino_patches is None and sam.clip_embedding is None
    assert sam.shapes()["dino_cls"] is None and len(sam.select(1)) == 1


def test_version_1_bundles_still_load(tmp_path, bundles):
    """A student bundle as format 1 wrote it (configs named medsam/dinov3/biomedclip, the SAM translator named
    'medsam') loads into the same modules; the shipped stand-in teachers are format 1 too."""
    from safetensors.torch import load_file, save_file

    from PRISMRTLib.weights import default_manifest, model_path

    root, made = bundles
    v2 = json.loads((root / "prismrt" / "config.json").read_text())
    teachers = v2.pop("teachers")
    v1 = {**v2, "format_version": 1, "configs": {
        "medsam": teachers["sam"]["config"], "dinov3": teachers["dino"]["config"],
        "biomedclip": teachers["clip"]["config"],
        "student": {**v2["student"], "targets": {("medsam" if k == "sam_embedding" else k): t
                                                  for k, t in v2["student"]["targets"].items()}}}}
    del v1["student"]
    folder = tmp_path / "v1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(v1))
    tensors = {k.replace("student.translators.sam_embedding.", "student.translators.medsam."): v
               for k, v in load_file(str(root / "prismrt" / "model.safetensors")).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "vocab.txt").write_text((root / "prismrt" / "vocab.txt").read_text())
    loaded = load_bundle(folder)
    assert [s.name for s in loaded.teachers.values()] == ["medsam-tiny", "dinov3-tiny", "biomedclip-tiny"]
    original = load_bundle(root / "prismrt")
    for name in original.modules:
        a, b = loaded.modules[name].state_dict(), original.modules[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shipped = load_bundle(model_path("teachers-standin-openkbp", default_manifest()))
    assert json.loads((shipped.path / "config.json").read_text())["format_version"] == 1
    assert shipped.roles == ("sam", "dino", "clip")


def test_a_role_loaded_during_encoding_is_not_made_of_inference_tensors(bundles, ct_slices):
    """Roles load when first used, which may be inside encode()'s inference mode; their weights must still be
    ordinary tensors, or moving the backend to the CPU after a GPU out-of-memory would break it."""
    from PRISMRTLib.features.backends import teachers_of

    root, _ = bundles
    slices, spacing = ct_slices
    teachers = teachers_of(load_bundle(root / "teachers"))
    backend = TeacherBackend({role: (lambda t=t: t) for role, t in teachers.items()})
    backend.encode(slices, spacing)
    assert not any(p.is_inference() for role in backend.roles for p in backend.teacher(role).module.parameters())
    backend.to("cpu")
    assert backend.encode(slices, spacing).dino_patches is not None
