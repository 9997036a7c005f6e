"""The weights manifest: the shipped one loads, extra manifests merge, and every bad entry is named in the error."""

from __future__ import annotations

import copy
import json
import os

import pytest
from weights_server import model_json, write_manifest

from PRISMRTLib.errors import PrismRTError
from PRISMRTLib.weights import ManifestError, UnknownModelError, default_manifest, load_manifest, parse_manifest
from PRISMRTLib.weights.manifest import SHIPPED_MANIFEST

FILES = {"model.safetensors": b"weights", "config.json": b"{}"}
URLS = {name: [f"https://example.org/tiny/{name}"] for name in FILES}


def valid() -> dict:
    return {"schema_version": 1, "models": [model_json(FILES, URLS)]}


def test_shipped_manifest_is_valid():
    manifest = load_manifest(SHIPPED_MANIFEST)
    assert manifest.schema_version == 1
    for model in manifest.models.values():  # whatever models it lists
        assert model.licence and model.files
        assert all(url.startswith("https://") for f in model.files for url in f.urls)


def test_valid_manifest_parses_into_entries():
    manifest = parse_manifest(valid())
    model = manifest.get("tiny")
    assert (model.name, model.version, model.licence) == ("tiny", "1.0", "CC0-1.0")
    assert [f.name for f in model.files] == ["model.safetensors", "config.json"]
    assert model.files[0].urls == ("https://example.org/tiny/model.safetensors",)
    assert model.size == len(b"weights") + 2


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match="no model named 'other'.*known models: tiny"):
        parse_manifest(valid()).get("other")


def test_manifest_variable_and_extra_paths_add_and_override_models(tmp_path, monkeypatch):
    write_manifest(tmp_path / "a.json", model_json(FILES, URLS, name="alpha"))
    mirror_urls = {name: [f"https://mirror.example.net/{name}"] for name in FILES}
    write_manifest(tmp_path / "b.json", model_json(FILES, URLS, name="beta"))
    write_manifest(tmp_path / "c.json", model_json(FILES, mirror_urls, name="beta"))
    monkeypatch.setenv("PRISMRT_MANIFEST", f"{tmp_path / 'a.json'}{os.pathsep}{tmp_path / 'b.json'}")

    manifest = default_manifest(extra=[tmp_path / "c.json"])

    assert {"alpha", "beta"} <= set(manifest.models)
    assert manifest.get("beta").files[0].urls == ("https://mirror.example.net/model.safetensors",)  # later wins
    assert str(SHIPPED_MANIFEST) == manifest.sources[0]


def test_missing_manifest_named_by_the_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISMRT_MANIFEST", str(tmp_path / "nope.json"))
    with pytest.raises(ManifestError, match="nope.json does not exist"):
        default_manifest()


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ManifestError, match="bad.json is not valid JSON"):
        load_manifest(tmp_path / "bad.json")


def _set(path, value):
    def edit(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return data
    return edit


FILE0 = ("models", 0, "files", 0)
BAD = {
    "newer schema": (_set(("schema_version",), 2), "schema_version 2.*upgrade PRISM-RT"),
    "models not a list": (_set(("models",), {}), "'models' must be a list"),
    "model missing key": (_set(("models", 0, "licence"), KeyError), r"models\[0\] 'tiny': missing keys \['licence'\]"),
    "license spelling": (
        lambda d: _set(("models", 0, "license"), "MIT")(_set(("models", 0, "licence"), KeyError)(d)),
        r"models\[0\] 'tiny': unknown keys \['license'\] \(did you mean 'licence'\?\)",
    ),
    "unsafe model name": (_set(("models", 0, "name"), "../evil"), r"models\[0\] '\.\./evil'.*'name'"),
    "empty files": (_set(("models", 0, "files"), []), r"'tiny': 'files' must be a non-empty list"),
    "bad sha": (_set(FILE0 + ("sha256",), "abc"), r"'tiny': files\[0\] 'model.safetensors': 'sha256' must be 64"),
    "negative size": (_set(FILE0 + ("size",), -1), r"files\[0\] 'model.safetensors': 'size' must be"),
    "bool size": (_set(FILE0 + ("size",), True), r"files\[0\] 'model.safetensors': 'size' must be"),
    "ftp url": (_set(FILE0 + ("url",), ["ftp://x/y"]), r"files\[0\] 'model.safetensors': 'url' entry 'ftp://x/y'"),
    "no url": (_set(FILE0 + ("url",), []), r"files\[0\] 'model.safetensors': 'url' must be a non-empty list"),
    "path escape": (_set(FILE0 + ("name",), "../../.bashrc"), r"files\[0\] '\.\./\.\./\.bashrc': 'name'"),
    "absolute path": (_set(FILE0 + ("name",), "/etc/passwd"), r"files\[0\] '/etc/passwd': 'name'"),
    "backslash path": (_set(FILE0 + ("name",), "a\\b"), r"'name' 'a\\\\b' must be a relative path"),
    "part suffix": (_set(FILE0 + ("name",), "x.part"), r"must not end with '\.part'"),
    "duplicate file": (_set(("models", 0, "files", 1, "name"), "MODEL.safetensors"), r"files\[1\].*listed twice"),
    "typo in file key": (_set(FILE0 + ("sha265",), "0"), r"files\[0\] 'model.safetensors': unknown keys \['sha265'\]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_entries_are_refused_with_the_entry_named(case):
    edit, pattern = BAD[case]
    with pytest.raises(ManifestError, match=pattern) as info:
        parse_manifest(edit(copy.deepcopy(valid())), source="test.json")
    assert "weights manifest test.json" in str(info.value)
    assert isinstance(info.value, PrismRTError)


def test_duplicate_model_is_refused():
    data = valid()
    data["models"].append(copy.deepcopy(data["models"][0]))
    with pytest.raises(ManifestError, match=r"models\[1\]: model 'tiny' is listed twice"):
        parse_manifest(data)


def test_single_url_string_and_uppercase_sha_are_accepted():
    data = valid()
    entry = data["models"][0]["files"][0]
    entry["url"] = entry["url"][0]
    entry["sha256"] = entry["sha256"].upper()
    parsed = parse_manifest(json.loads(json.dumps(data))).get("tiny").files[0]
    assert parsed.urls == (entry["url"],) and parsed.sha256 == entry["sha256"].lower()
