"""Weights on first use, end to end: bundles published with a manifest, served from 127.0.0.1, downloaded,
verified, loaded into a backend; a tampered file is never loaded."""

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from PRISMRTLib.cli import main
from PRISMRTLib.features import open_backend
from PRISMRTLib.models import build_components, preset_configs, save_bundle
from PRISMRTLib.models.biomedclip import write_vocab
from PRISMRTLib.weights import ChecksumMismatchError, WeightsNotInstalledError, model_entry_for_folder, model_path


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Two tiny bundles laid out as a mirror (NAME/VERSION/FILE) and served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mirror")
    vocab = write_vocab("left right parotid axial slice".split(), tmp_path_factory.mktemp("v") / "vocab.txt")
    torch.manual_seed(0)
    for kind, name in (("teachers", "tiny-teachers"), ("prismrt", "tiny-prismrt")):
        configs = preset_configs("tiny", "tiny" if kind == "prismrt" else None)
        save_bundle(root / name / "1.0", kind, configs, build_components(kind, configs), vocab, name=name, version="1.0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    entries = [
        model_entry_for_folder(root / name / "1.0", name=name, version="1.0", base_urls=[base], licence="test only")
        for name in ("tiny-teachers", "tiny-prismrt")
    ]
    yield root, entries
    server.shutdown()


@pytest.fixture
def env(tmp_path, monkeypatch, published):
    _, entries = published
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"schema_version": 1, "models": entries}))
    monkeypatch.setenv("PRISMRT_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PRISMRT_MANIFEST", str(manifest))
    return tmp_path, manifest


@pytest.mark.parametrize("backend, name", [("teachers", "tiny-teachers"), ("prismrt", "tiny-prismrt")])
def test_first_use_downloads_verifies_and_runs(env, backend, name):
    tmp_path, _ = env
    with pytest.raises(WeightsNotInstalledError):
        model_path(name)
    seen = []
    be = open_backend(backend, model=name, device="cpu", progress=lambda done, total: seen.append((done, total)))
    assert be.name == backend
    assert seen and seen[-1][0] == seen[-1][1]  # progress reached the total
    folder = model_path(name)
    assert folder.is_relative_to(tmp_path / "cache")
    features = be.encode(np.random.default_rng(0).random((2, 32, 24), dtype=np.float32), (2.5, 3.9))
    assert features.shapes()["sam_embedding"] == (2, 32, 8, 8)


def test_models_cli_lists_downloads_and_locates(env, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-teachers 1.0" in out and "not installed" in out
    assert main(["models", "download", "tiny-teachers"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["models", "path", "tiny-teachers"]) == 0
    assert capsys.readouterr().out.strip() == path
    assert main(["models", "path", "tiny-prismrt"]) == 2
    assert "prismrt models download tiny-prismrt" in capsys.readouterr().err
    assert main(["models", "remove", "tiny-teachers"]) == 0
    assert main(["models", "path", "tiny-teachers"]) == 2


def test_a_tampered_download_is_never_loaded(env, published):
    root, entries = published
    tmp_path, manifest = env
    bad = json.loads(json.dumps(entries[0]))
    weights = next(f for f in bad["files"] if f["name"] == "model.safetensors")
    weights["sha256"] = "0" * 64  # the mirror serves something else than the manifest promises
    manifest.write_text(json.dumps({"schema_version": 1, "models": [bad]}))
    with pytest.raises(ChecksumMismatchError):
        open_backend("teachers", model="tiny-teachers", device="cpu")
    with pytest.raises(WeightsNotInstalledError):
        model_path("tiny-teachers")
    cached = tmp_path / "cache" / "tiny-teachers" / "1.0"
    assert not (cached / "model.safetensors").exists()


def test_wrong_kind_of_bundle_for_the_backend(env):
    from PRISMRTLib.models import BundleError

    with pytest.raises(BundleError, match="not one for the 'prismrt' backend"):
        open_backend("prismrt", model="tiny-teachers", device="cpu")


def test_a_model_shipped_in_the_package_needs_no_download(env, published, monkeypatch, tmp_path):
    import shutil

    import PRISMRTLib.weights.cache as cache
    from PRISMRTLib.weights import ensure_model, list_models

    root, entries = published
    shipped = tmp_path / "shipped"
    shutil.copytree(root / "tiny-teachers" / "1.0", shipped / "tiny-teachers" / "1.0")
    monkeypatch.setattr(cache, "SHIPPED_ROOT", shipped)
    # no server needed: point the manifest at a closed port
    dead = json.loads(json.dumps(entries[0]))
    for f in dead["files"]:
        f["url"] = ["http://127.0.0.1:9/" + f["name"]]
    _, manifest = env
    manifest.write_text(json.dumps({"schema_version": 1, "models": [dead]}))
    assert model_path("tiny-teachers") == shipped / "tiny-teachers" / "1.0"
    assert ensure_model("tiny-teachers") == shipped / "tiny-teachers" / "1.0"
    assert {s.name: s.installed for s in list_models()}["tiny-teachers"] is True
    # a damaged shipped copy is not used
    (shipped / "tiny-teachers" / "1.0" / "vocab.txt").write_text("tampered\n")
    with pytest.raises(WeightsNotInstalledError):
        model_path("tiny-teachers")


def test_default_model_is_the_first_installed_then_the_first_known(env, monkeypatch):
    import PRISMRTLib.features as features

    monkeypatch.setitem(features.DEFAULT_MODELS, "sam", ("not-in-manifest", "tiny-teachers"))
    backend = open_backend("teachers", device="cpu")
    assert backend.describe() == "teachers: none loaded yet"  # roles load when first used
    assert backend.teacher("sam").model == "tiny-teachers 1.0"  # downloaded on first use
    monkeypatch.setitem(features.DEFAULT_MODELS, "prismrt", ("not-in-manifest",))
    with pytest.raises(Exception, match="no model for the 'prismrt' backend is published yet"):
        open_backend("prismrt", device="cpu")
    assert open_backend("auto", device="cpu").name == "teachers"  # no student anywhere: the teachers


def test_auto_is_the_student_once_one_is_installed(env, monkeypatch):
    import PRISMRTLib.features as features

    monkeypatch.setitem(features.DEFAULT_MODELS, "prismrt", ("tiny-prismrt",))
    assert open_backend("auto", device="cpu").name == "teachers"  # published but not installed: not yet
    open_backend("prismrt", device="cpu")  # downloads it
    assert open_backend("auto", device="cpu").name == "prismrt"
    assert open_backend("auto", model="tiny-teachers", device="cpu").name == "teachers"  # a named model's kind
