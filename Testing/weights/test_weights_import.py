"""Offline import: good files from a folder or zip are installed; anything else is refused and nothing is left."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from PRISMRTLib.weights import ModelImportError, WeightsNotInstalledError, import_model, model_path
from PRISMRTLib.weights import cache as cache_module


def carry(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def assert_nothing_installed(cache: Path, manifest) -> None:
    folder = cache / "tiny" / "1.0"
    leftovers = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    assert leftovers == []
    with pytest.raises(WeightsNotInstalledError):
        model_path("tiny", manifest=manifest)


@pytest.mark.parametrize("layout", ["flat", "cache copy"])
def test_import_from_a_folder_installs_verified_files(served_manifest, model_files, tmp_path, monkeypatch, layout):
    source = tmp_path / "usb"
    carry(source if layout == "flat" else source / "tiny" / "1.0", model_files)

    folder = import_model("tiny", source, manifest=served_manifest)

    for name, data in model_files.items():
        assert (folder / name).read_bytes() == data
    monkeypatch.setattr(cache_module, "sha256_file", lambda path: pytest.fail("hashed again"))
    assert model_path("tiny", manifest=served_manifest) == folder  # verified at import, remembered


def test_import_from_a_zip_with_a_top_folder(served_manifest, model_files, tmp_path):
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in model_files.items():
            zf.writestr(f"tiny-weights/{name}", data)
        zf.writestr("tiny-weights/README.txt", "not in the manifest: ignored")

    folder = import_model("tiny", archive, manifest=served_manifest)

    assert model_path("tiny", manifest=served_manifest) == folder
    assert (folder / "tokenizer" / "vocab.txt").read_bytes() == model_files["tokenizer/vocab.txt"]
    assert not (folder / "README.txt").exists()


def test_tampered_file_is_refused_and_nothing_is_installed(served_manifest, model_files, tmp_path, isolated_env):
    tampered = bytearray(model_files["model.safetensors"])
    tampered[-1] ^= 0xFF  # same size, different bytes
    source = carry(tmp_path / "usb", {**model_files, "model.safetensors": bytes(tampered)})

    with pytest.raises(ModelImportError) as info:
        import_model("tiny", source, manifest=served_manifest)

    message = str(info.value)
    assert "refused to import model 'tiny'" in message and "nothing was installed" in message
    assert "model.safetensors: SHA-256 is" in message and "config.json" not in message
    assert_nothing_installed(isolated_env, served_manifest)


def test_missing_and_mismatching_files_are_all_listed(served_manifest, model_files, tmp_path, isolated_env):
    files = dict(model_files)
    del files["config.json"]
    files["tokenizer/vocab.txt"] = b"short"
    tampered = bytearray(files["model.safetensors"])
    tampered[100] ^= 1
    files["model.safetensors"] = bytes(tampered)
    source = carry(tmp_path / "usb", files)

    with pytest.raises(ModelImportError) as info:
        import_model("tiny", source, manifest=served_manifest)

    message = str(info.value)
    assert "config.json: missing" in message
    assert f"tokenizer/vocab.txt: 5 bytes, expected {len(model_files['tokenizer/vocab.txt'])}" in message
    assert "model.safetensors: SHA-256 is" in message
    assert_nothing_installed(isolated_env, served_manifest)


def test_refused_import_keeps_a_partial_download(served_manifest, model_files, tmp_path, isolated_env):
    part = isolated_env / "tiny" / "1.0" / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(model_files["model.safetensors"][:1234])
    tampered = bytearray(model_files["config.json"])
    tampered[0] ^= 1
    source = carry(tmp_path / "usb", {**model_files, "config.json": bytes(tampered)})

    with pytest.raises(ModelImportError, match="config.json: SHA-256"):
        import_model("tiny", source, manifest=served_manifest)
    assert part.read_bytes() == model_files["model.safetensors"][:1234]  # the download can still resume
    assert not (isolated_env / "tiny" / "1.0" / "model.safetensors").exists()


def test_source_that_is_neither_folder_nor_zip(served_manifest, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelImportError, match="neither a folder nor a zip"):
        import_model("tiny", tmp_path / "weights.bin", manifest=served_manifest)
    with pytest.raises(ModelImportError, match="does not exist"):
        import_model("tiny", tmp_path / "nowhere", manifest=served_manifest)
