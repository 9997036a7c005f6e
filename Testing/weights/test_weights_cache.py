"""The cache: where it lives, what model_path accepts, the verification marker, listing, removal and the lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from PRISMRTLib.weights import (
    ModelBusyError,
    UnknownModelError,
    WeightsNotInstalledError,
    cache_root,
    ensure_model,
    list_models,
    model_path,
    remove_model,
)
from PRISMRTLib.weights import cache as cache_module
from PRISMRTLib.weights.cache import model_lock


def test_cache_root_honours_prismrt_home(isolated_env, monkeypatch, tmp_path):
    assert cache_root() == isolated_env
    monkeypatch.setenv("PRISMRT_HOME", "~/models")
    assert cache_root() == tmp_path / "home" / "models"


@pytest.mark.parametrize(
    "platform, env, expected",
    [
        ("linux", {}, "home/.cache/prismrt"),
        ("linux", {"XDG_CACHE_HOME": "{tmp}/xdg"}, "xdg/prismrt"),
        ("linux", {"XDG_CACHE_HOME": "relative/ignored"}, "home/.cache/prismrt"),
        ("darwin", {}, "home/Library/Caches/prismrt"),
        ("win32", {"LOCALAPPDATA": "{tmp}/AppData/Local"}, "AppData/Local/prismrt/Cache"),
        ("win32", {}, "home/AppData/Local/prismrt/Cache"),
    ],
)
def test_cache_root_defaults_per_platform(monkeypatch, tmp_path, platform, env, expected):
    monkeypatch.delenv("PRISMRT_HOME")
    monkeypatch.delenv("LOCALAPPDATA", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "home"))
    monkeypatch.setattr(cache_module.sys, "platform", platform)
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(tmp=tmp_path))
    assert cache_root() == tmp_path / expected


def test_model_path_says_how_to_get_a_missing_model(served_manifest):
    with pytest.raises(WeightsNotInstalledError) as info:
        model_path("tiny", manifest=served_manifest)
    message = str(info.value)
    assert "model 'tiny' (version 1.0) is not installed" in message
    assert "prismrt models download tiny" in message and "prismrt models import tiny FOLDER" in message


def test_unknown_model_is_named(served_manifest):
    with pytest.raises(UnknownModelError, match="no model named 'nope'.*known models: tiny"):
        model_path("nope", manifest=served_manifest)


def test_partial_download_is_not_a_model(served_manifest, model_files, isolated_env):
    folder = isolated_env / "tiny" / "1.0"
    (folder / "tokenizer").mkdir(parents=True)
    for name, data in model_files.items():
        (folder / name).write_bytes(data)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.part").write_bytes(model_files["model.safetensors"])  # not under its final name

    with pytest.raises(WeightsNotInstalledError, match="incomplete: model.safetensors: missing"):
        model_path("tiny", manifest=served_manifest)


def test_verification_is_remembered_until_the_file_changes(served_manifest, config, monkeypatch):
    folder = ensure_model("tiny", manifest=served_manifest, config=config)
    hashed = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda path: hashed.append(path.name) or real(path))

    assert model_path("tiny", manifest=served_manifest) == folder
    assert hashed == []  # the marker written at download time is trusted while size and mtime are unchanged

    config_file = folder / "config.json"
    stat = config_file.stat()
    os.utime(config_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_path("tiny", manifest=served_manifest) == folder
    assert hashed == ["config.json"]  # changed mtime: hashed again, found good, remembered
    assert model_path("tiny", manifest=served_manifest) == folder
    assert hashed == ["config.json"]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_installed_file_is_refused_and_ensure_model_replaces_it(
    served_manifest, server, config, model_files, damage
):
    folder = ensure_model("tiny", manifest=served_manifest, config=config)
    weights = folder / "model.safetensors"
    data = bytearray(model_files["model.safetensors"])
    if damage == "flip":
        data[5000] ^= 0x01
    else:
        del data[-10:]
    weights.write_bytes(bytes(data))

    with pytest.raises(WeightsNotInstalledError, match="model.safetensors: (damaged|.*bytes instead of)"):
        model_path("tiny", manifest=served_manifest)

    before = len(server.hits)
    assert ensure_model("tiny", manifest=served_manifest, config=config) == folder
    assert [h.path for h in server.hits[before:]] == ["/m/model.safetensors"]  # only the bad file again
    assert weights.read_bytes() == model_files["model.safetensors"]


def test_list_models_reports_installation(served_manifest, config, model_files, isolated_env):
    (status,) = list_models(manifest=served_manifest)
    assert (status.name, status.version, status.licence, status.installed) == ("tiny", "1.0", "CC0-1.0", False)
    assert status.size == sum(map(len, model_files.values()))
    assert status.path == isolated_env / "tiny" / "1.0"

    ensure_model("tiny", manifest=served_manifest, config=config)
    (status,) = list_models(manifest=served_manifest)
    assert status.installed


def test_remove_model_deletes_files_and_partial_downloads(served_manifest, config, isolated_env):
    folder = ensure_model("tiny", manifest=served_manifest, config=config)
    (folder / "extra.safetensors.part").write_bytes(b"partial")
    old = isolated_env / "tiny" / "0.9"
    old.mkdir()

    assert remove_model("tiny", manifest=served_manifest) == [folder]
    assert not folder.exists() and old.exists()
    with pytest.raises(WeightsNotInstalledError):
        model_path("tiny", manifest=served_manifest)

    assert remove_model("tiny", all_versions=True, manifest=served_manifest) == [old]
    assert not (isolated_env / "tiny").exists()
    assert remove_model("tiny", manifest=served_manifest) == []


def test_a_model_being_written_elsewhere_is_busy(served_manifest, server):
    model = served_manifest.get("tiny")
    with model_lock(model):  # as another process downloading it would
        with pytest.raises(ModelBusyError, match="being downloaded, imported or removed"):
            ensure_model("tiny", manifest=served_manifest)
        with pytest.raises(ModelBusyError):
            remove_model("tiny", manifest=served_manifest)
    assert server.hits == []


def test_unwritable_marker_does_not_stop_an_installed_model(served_manifest, config, monkeypatch):
    """A cache on a read-only share: verification cannot be remembered, but the model is still served."""
    folder = ensure_model("tiny", manifest=served_manifest, config=config)
    (folder / ".prismrt-verified.json").unlink()

    def read_only(src, dst):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(cache_module.os, "replace", read_only)
    assert model_path("tiny", manifest=served_manifest) == folder
    assert not (folder / ".prismrt-verified.json").exists()
    assert not list(folder.glob("*.tmp"))
