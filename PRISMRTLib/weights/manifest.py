"""The weights manifest: which models exist, their files, mirror URLs, sizes, SHA-256 and licence.

The package ships ``manifest.json``. Further manifests (a user's own mirror, tests) are read from paths given to
:func:`default_manifest` or listed in the ``PRISMRT_MANIFEST`` environment variable (several paths separated by
``os.pathsep``). A model in a later manifest replaces the model of the same name from an earlier one, so a mirror
manifest can redirect a shipped model to other URLs.

Every field is validated on load; an error names the manifest file and the entry (``models[1] 'x': files[0] ...``).
Names and file paths become folders in the cache, so they are restricted to safe characters.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from .errors import ManifestError, UnknownModelError

SCHEMA_VERSION = 1
SHIPPED_MANIFEST = Path(__file__).resolve().with_name("manifest.json")
MANIFEST_ENV = "PRISMRT_MANIFEST"

PART_SUFFIX = ".part"  # partial downloads and imports: "<file>.part" next to the final file

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODEL_KEYS = {"name", "version", "description", "licence", "homepage", "files"}
_MODEL_OPTIONAL = {"convert"}
_FILE_KEYS = {"name", "url", "size", "sha256"}
_FILE_OPTIONAL = {"package"}
_PACKAGE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z0-9._/+-]+$")


@dataclass(frozen=True)
class FileEntry:
    """One file of a model: ``name`` is a relative POSIX path in the model folder; ``urls`` are mirrors, in order;
    ``package`` (``module:path``) a copy inside an installed Python package, used in place once verified."""

    name: str
    urls: tuple[str, ...]
    size: int
    sha256: str
    package: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    description: str
    licence: str
    homepage: str
    files: tuple[FileEntry, ...]
    convert: str = ""  # a converter name: the files are sources, the model is the bundle converted from them

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Manifest:
    """Models by name, with the files they were read from (for messages)."""

    schema_version: int
    models: dict[str, ModelEntry]
    sources: tuple[str, ...] = ()

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none: the manifest lists no models yet"
            raise UnknownModelError(
                f"no model named '{name}' in the weights manifest (known models: {known})"
            ) from None

    def merged(self, other: Manifest) -> Manifest:
        """This manifest with ``other``'s models added; ``other`` wins for a name in both."""
        return Manifest(
            max(self.schema_version, other.schema_version),
            {**self.models, **other.models},
            self.sources + other.sources,
        )


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate one manifest file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"weights manifest {path} does not exist") from None
    except OSError as exc:
        raise ManifestError(f"cannot read weights manifest {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"weights manifest {path} is not valid JSON: {exc}") from None
    return parse_manifest(data, source=str(path))


def default_manifest(extra: Iterable[str | os.PathLike[str]] = ()) -> Manifest:
    """The shipped manifest, then those in ``$PRISMRT_MANIFEST``, then ``extra``; later ones override models by name."""
    manifest = load_manifest(SHIPPED_MANIFEST)
    env = os.environ.get(MANIFEST_ENV, "")
    paths = [p for p in env.split(os.pathsep) if p.strip()] + [os.fspath(p) for p in extra]
    for path in paths:
        manifest = manifest.merged(load_manifest(Path(path).expanduser()))
    return manifest


def parse_manifest(data: Any, source: str = "<manifest>") -> Manifest:
    """Validate a manifest already parsed from JSON."""
    where = f"weights manifest {source}"
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: the top level must be a JSON object with 'schema_version' and 'models'")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{where}: 'schema_version' must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{where} has schema_version {version}, this PRISM-RT reads up to {SCHEMA_VERSION}: upgrade PRISM-RT"
        )
    unknown = set(data) - {"schema_version", "models"}
    if unknown:
        raise ManifestError(f"{where}: unknown top-level keys {sorted(unknown)}")
    models_data = data.get("models")
    if not isinstance(models_data, list):
        raise ManifestError(f"{where}: 'models' must be a list")
    models: dict[str, ModelEntry] = {}
    for index, item in enumerate(models_data):
        model = _parse_model(item, f"{where}: models[{index}]")
        if model.name in models:
            raise ManifestError(f"{where}: models[{index}]: model '{model.name}' is listed twice")
        models[model.name] = model
    return Manifest(version, models, (source,))


def _parse_model(item: Any, where: str) -> ModelEntry:
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: a model must be a JSON object")
    name = item.get("name")
    if isinstance(name, str):
        where = f"{where} '{name}'"
    _check_keys(item, _MODEL_KEYS, where, _MODEL_OPTIONAL)
    name = _safe_name(item, "name", where)
    version = _safe_name(item, "version", where)
    text = {key: _string(item, key, where) for key in ("description", "licence", "homepage")}
    files_data = item["files"]
    if not isinstance(files_data, list) or not files_data:
        raise ManifestError(f"{where}: 'files' must be a non-empty list")
    files: list[FileEntry] = []
    seen: set[str] = set()
    for index, file_item in enumerate(files_data):
        entry = _parse_file(file_item, f"{where}: files[{index}]")
        # Case-insensitive: two names differing only in case collide on Windows and macOS.
        if entry.name.lower() in seen:
            raise ManifestError(f"{where}: files[{index}]: '{entry.name}' is listed twice")
        seen.add(entry.name.lower())
        files.append(entry)
    convert = item.get("convert", "")
    if not isinstance(convert, str) or (convert and not _SAFE_NAME.match(convert)):
        raise ManifestError(f"{where}: 'convert' must name a converter (letters, digits, . _ + -), got {convert!r}")
    return ModelEntry(name, version, text["description"], text["licence"], text["homepage"], tuple(files), convert)


def _parse_file(item: Any, where: str) -> FileEntry:
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: a file must be a JSON object")
    if isinstance(item.get("name"), str):
        where = f"{where} '{item['name']}'"
    _check_keys(item, _FILE_KEYS, where, _FILE_OPTIONAL)
    name = _file_path(item["name"], where)
    package = item.get("package", "")
    if not isinstance(package, str) or (package and not _PACKAGE.match(package)):
        raise ManifestError(f"{where}: 'package' must be 'module:path/in/package', got {package!r}")
    urls = item["url"]
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or (not urls and not package):
        raise ManifestError(f"{where}: 'url' must be a non-empty list of http(s) URLs (it may be empty only when "
                            "'package' names where the file is installed)")
    for url in urls:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ManifestError(f"{where}: 'url' entry {url!r} is not an http(s) URL")
    size = item["size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where}: 'size' must be a number of bytes (integer >= 0), got {size!r}")
    sha = item["sha256"]
    if not isinstance(sha, str) or not _SHA256.match(sha.lower()):
        raise ManifestError(f"{where}: 'sha256' must be 64 hexadecimal digits, got {sha!r}")
    return FileEntry(name, tuple(urls), size, sha.lower(), package)


def _check_keys(item: dict, expected: set[str], where: str, optional: set[str] = frozenset()) -> None:
    missing = expected - set(item)
    unknown = set(item) - expected - optional
    hints = {"license": "licence", "urls": "url", "sha-256": "sha256", "hash": "sha256"}
    if unknown:
        hint = "".join(f" (did you mean '{hints[k]}'?)" for k in sorted(unknown) if k in hints)
        raise ManifestError(f"{where}: unknown keys {sorted(unknown)}{hint}")
    if missing:
        raise ManifestError(f"{where}: missing keys {sorted(missing)}")


def _string(item: dict, key: str, where: str) -> str:
    value = item[key]
    if not isinstance(value, str):
        raise ManifestError(f"{where}: '{key}' must be a string, got {value!r}")
    return value


def _safe_name(item: dict, key: str, where: str) -> str:
    value = _string(item, key, where)
    if not _SAFE_NAME.match(value):
        raise ManifestError(
            f"{where}: '{key}' {value!r} may only hold letters, digits and . _ + - (and not start with . _ + -)"
        )
    return value


def _file_path(value: Any, where: str) -> str:
    """A relative POSIX path whose parts are safe names: it cannot escape the model folder on any platform."""
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: 'name' must be a non-empty relative path")
    parts = PurePosixPath(value).parts
    if value.startswith("/") or any(not _SAFE_NAME.match(part) for part in parts):
        raise ManifestError(
            f"{where}: 'name' {value!r} must be a relative path of letters, digits and . _ + - "
            "(no '..', no absolute path, no backslash)"
        )
    # Parts cannot start with '.', so the store's own '.prismrt-*' files cannot collide; '*.part' could.
    if value.endswith(PART_SUFFIX):
        raise ManifestError(f"{where}: 'name' {value!r} must not end with '{PART_SUFFIX}' (used for partial downloads)")
    return "/".join(parts)


def model_entry_for_folder(
    folder: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    base_urls: Iterable[str],
    licence: str,
    description: str = "",
    homepage: str = "",
) -> dict:
    """A manifest entry (JSON-ready dict) for the files of a model folder, e.g. a bundle about to be published.

    Each file is listed with its size and SHA-256, and one URL per base URL (``BASE/NAME/VERSION/FILE``).
    """
    import hashlib

    root = Path(folder)
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(root).as_posix()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        urls = [f"{base.rstrip('/')}/{name}/{version}/{rel}" for base in base_urls]
        files.append({"name": rel, "url": urls, "size": path.stat().st_size, "sha256": digest.hexdigest()})
    if not files:
        raise ManifestError(f"'{root}' holds no files to publish")
    entry = {"name": name, "version": version, "description": description, "licence": licence,
             "homepage": homepage, "files": files}
    _parse_model(entry, f"model '{name}'")  # the same validation a reader applies
    return entry
