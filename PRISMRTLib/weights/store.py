"""What the rest of PRISM-RT calls: ensure a model is present, list, import and remove models.

Every function takes an optional ``manifest`` (default: :func:`default_manifest`, i.e. the shipped manifest plus
``$PRISMRT_MANIFEST``); files live under :func:`cache_root` (``$PRISMRT_HOME`` or the user cache folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .cache import (
    cache_root,
    check_files,
    check_free_space,
    disk_full_error,
    model_dir,
    model_lock,
    part_path,
    record_verified,
    remove_dir,
    shipped_dir,
)
from .download import Cancel, DownloadConfig, Progress, cancel_check, download_file, new_session
from .errors import ModelImportError, WeightsError
from .manifest import PART_SUFFIX, FileEntry, Manifest, ModelEntry, default_manifest

_COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class ModelStatus:
    name: str
    version: str
    description: str
    licence: str
    homepage: str
    size: int
    """Total bytes of the model's files."""
    installed: bool
    """All files present and verified (size and SHA-256)."""
    path: Path
    """The model's folder in the cache (it exists only when something was downloaded or imported)."""
    converted: bool = False
    """Made on first use from verified source files (see :mod:`PRISMRTLib.weights.convert`)."""


def ensure_model(
    name: str,
    progress: Progress | None = None,
    cancel: Cancel = None,
    *,
    manifest: Manifest | None = None,
    config: DownloadConfig | None = None,
) -> Path:
    """The verified folder of model ``name``, downloading the files that are missing first.

    ``progress(done_bytes, total_bytes)`` covers the whole model (files already present count as done).
    ``cancel``: a ``threading.Event`` or a callable returning True; raises :class:`DownloadCancelled` and keeps the
    partial file for the next call. Download failures raise :class:`DownloadError` subclasses.
    """
    model = (manifest or default_manifest()).get(name)
    shipped = shipped_dir(model)
    if shipped is not None:
        return shipped
    if model.convert:
        from .convert import ensure_converted

        return ensure_converted(model, download=lambda: _download(model, progress, cancel, config))
    return _download(model, progress, cancel, config)


def _download(model: ModelEntry, progress: Progress | None, cancel: Cancel, config: DownloadConfig | None) -> Path:
    """Download the files of ``model`` that are not in the cache yet (verified); returns its cache folder."""
    name = model.name
    folder = model_dir(model)
    if all(s.ok for s in check_files(model)):
        return folder
    is_cancelled = cancel_check(cancel)
    config = config or DownloadConfig()
    # a converted model's sources are fetched under the lock its conversion already holds
    with model_lock(model) if not model.convert else contextlib.nullcontext(), _cache_write_errors(folder):
        states = check_files(model)  # again: another process may have finished meanwhile
        todo = [s for s in states if not s.ok]
        for state in todo:
            if state.problem != "missing":  # wrong size or hash under the final name: never trust it
                state.path.unlink(missing_ok=True)
        remaining = sum(s.entry.size - _part_size(s.path) for s in todo)
        check_free_space(folder, remaining, f"model '{name}'")

        total = model.size
        done = sum(s.entry.size for s in states if s.ok)
        if progress:
            progress(done, total)
        session = config.session or new_session()
        file_config = dataclasses.replace(config, session=session)  # one connection pool for all files
        try:
            for state in todo:
                base = done
                report = (lambda d, _t, base=base: progress(base + d, total)) if progress else None
                download_file(state.entry, state.path, progress=report, cancel=is_cancelled, config=file_config,
                              model_name=name)
                record_verified(model, state.entry)
                done += state.entry.size
        finally:
            if config.session is None:
                session.close()
    return folder


def import_model(name: str, source: str | os.PathLike[str], *, manifest: Manifest | None = None) -> Path:
    """Install model ``name`` from files carried in: a folder or a .zip holding the model's files.

    The files may sit at the top of ``source`` or under ``<name>/`` or ``<name>/<version>/`` (a copied cache folder),
    and in a zip under one top-level folder. Each file is copied next to its final place under a temporary name while
    its SHA-256 is computed; only when every file matches the manifest are they renamed into place. Otherwise nothing is installed and
    :class:`ModelImportError` lists the missing and mismatching files.
    """
    model = (manifest or default_manifest()).get(name)
    source = Path(source).expanduser()
    if not source.exists():
        raise ModelImportError(f"cannot import model '{name}': {source} does not exist")
    with _open_source(source, model) as (opener, problems):
        if problems:  # refuse before copying anything, but list every bad file, hash mismatches included
            for entry in model.files:
                if entry.name not in problems and (actual := _sha256(opener(entry))) != entry.sha256:
                    problems[entry.name] = f"SHA-256 is {actual}, expected {entry.sha256}"
            raise ModelImportError(_import_message(model, source, problems))
        folder = model_dir(model)
        with model_lock(model), _cache_write_errors(folder):
            check_free_space(folder, model.size, f"model '{name}'")
            parts: list[tuple[FileEntry, Path]] = []
            try:
                for entry in model.files:
                    # Not "<file>.part": a refused import must not destroy a partial download kept for resuming.
                    target = folder / entry.name
                    part = target.with_name(f".{target.name}.import{PART_SUFFIX}")
                    parts.append((entry, part))
                    problem = _copy_verified(opener(entry), part, entry)
                    if problem:
                        problems[entry.name] = problem
                if problems:
                    raise ModelImportError(_import_message(model, source, problems))
                for entry, part in parts:  # all verified: now they may take their names
                    os.replace(part, folder / entry.name)
                    record_verified(model, entry)
            finally:
                for _, part in parts:
                    part.unlink(missing_ok=True)
    return folder


def list_models(manifest: Manifest | None = None) -> list[ModelStatus]:
    """Every model of the manifest, with whether it is installed (verified) in the cache."""
    statuses = []
    for model in (manifest or default_manifest()).models.values():
        shipped = shipped_dir(model)
        if model.convert:
            from .convert import converted_dir, converted_ok

            installed, path = converted_ok(model), converted_dir(model)
        else:
            installed = shipped is not None or all(s.ok for s in check_files(model))
            path = shipped or model_dir(model)
        statuses.append(ModelStatus(model.name, model.version, model.description, model.licence, model.homepage,
                                    model.size, installed, path, bool(model.convert)))
    return statuses


def is_available(name: str, manifest: Manifest | None = None) -> bool:
    """Whether model ``name`` can be used without the network: shipped, installed, or convertible from files on this
    machine; for a bundle on a ``base`` model, that model too."""
    manifest = manifest or default_manifest()
    if name not in manifest.models:
        return False
    model = manifest.get(name)
    if model.convert:
        from .convert import converted_ok, local_sources

        return converted_ok(model) or local_sources(model, verify=False) is not None
    folder = shipped_dir(model)
    if folder is None:
        if not all(s.ok for s in check_files(model)):
            return False
        folder = model_dir(model)
    try:
        base = json.loads((folder / "config.json").read_text()).get("base")
    except (OSError, ValueError):
        base = None
    return base is None or (base.get("model") != name and is_available(base["model"], manifest))


def remove_model(name: str, *, all_versions: bool = False, manifest: Manifest | None = None) -> list[Path]:
    """Delete the cached files (partial downloads included) of model ``name``; returns the folders removed.

    Only the manifest's version is removed, unless ``all_versions`` (older versions left by upgrades too).
    """
    model = (manifest or default_manifest()).get(name)  # a known, validated name: safe to build paths from
    root = cache_root()
    versions = [model.version]
    if all_versions and (root / model.name).is_dir():
        versions = sorted({model.version, *(p.name for p in (root / model.name).iterdir() if p.is_dir())})
    removed = []
    for version in versions:
        entry = ModelEntry(model.name, version, "", "", "", ())
        folder = model_dir(entry)
        with model_lock(entry):
            if folder.exists():
                remove_dir(folder)
                removed.append(folder)
    with contextlib.suppress(OSError):
        (root / model.name).rmdir()  # only if empty
    return removed


@contextlib.contextmanager
def _cache_write_errors(folder: Path) -> Iterator[None]:
    """Turn a raw OSError from the cache folder (permissions, full disk) into a message the user can act on."""
    try:
        yield
    except WeightsError:
        raise
    except OSError as exc:
        raise disk_full_error(exc, folder) or WeightsError(
            f"cannot write to the weights cache {folder}: {exc.strerror or exc}. Check its permissions, or set "
            "PRISMRT_HOME to a writable folder"
        ) from None


# --- import helpers -------------------------------------------------------------------------------------------------

_Opener = Callable[[FileEntry], IO[bytes]]


@contextlib.contextmanager
def _open_source(source: Path, model: ModelEntry) -> Iterator[tuple[_Opener, dict[str, str]]]:
    """Find the model's files in a folder or zip: yields (opener, problems found from names and sizes alone)."""
    if source.is_file() and source.suffix.lower() != ".zip" and len(model.files) == 1:
        entry = model.files[0]  # a model of one file: the file itself, under any name
        yield (lambda e: open(source, "rb")), _size_problems(model, {entry.name: _file_size(source)})
        return
    if source.is_dir():
        roots = [source, source / model.name, source / model.name / model.version]
        sizes = [{e.name: _file_size(r / e.name) for e in model.files} for r in roots]
        best = max(range(len(roots)), key=lambda i: sum(s is not None for s in sizes[i].values()))
        root = roots[best]
        yield (lambda entry: open(root / entry.name, "rb")), _size_problems(model, sizes[best])
        return
    if not zipfile.is_zipfile(source):
        raise ModelImportError(f"cannot import model '{model.name}': {source} is neither a folder nor a zip file")
    try:
        archive = zipfile.ZipFile(source)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelImportError(f"cannot read {source} as a zip file: {exc}") from None
    with archive:
        members = {info.filename: info for info in archive.infolist() if not info.is_dir()}
        # Any prefix under which the first file appears is a candidate model folder inside the zip.
        first = model.files[0].name
        prefixes = {""} | {m[: -len(first)] for m in members if m.endswith("/" + first)}
        scored = []
        for prefix in sorted(prefixes):
            sizes = {e.name: (members[prefix + e.name].file_size if prefix + e.name in members else None)
                     for e in model.files}
            scored.append((sum(s is not None for s in sizes.values()), prefix, sizes))
        _, prefix, sizes = max(scored, key=lambda t: t[0])
        yield (lambda entry: archive.open(members[prefix + entry.name])), _size_problems(model, sizes)


def _size_problems(model: ModelEntry, sizes: dict[str, int | None]) -> dict[str, str]:
    """File name -> problem, for files that are missing or have the wrong size."""
    problems = {}
    for entry in model.files:
        size = sizes[entry.name]
        if size is None:
            problems[entry.name] = "missing"
        elif size != entry.size:
            problems[entry.name] = f"{size} bytes, expected {entry.size}"
    return problems


def _copy_verified(reader: IO[bytes], part: Path, entry: FileEntry) -> str | None:
    """Copy to ``part`` while hashing; returns a problem (and deletes the part) or None."""
    digest = hashlib.sha256()
    size = 0
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        with reader, open(part, "wb") as out:
            while block := reader.read(_COPY_BLOCK):
                size += len(block)
                if size > entry.size:
                    break
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise disk_full_error(exc, part) or WeightsError(f"cannot import '{entry.name}': {exc.strerror or exc}") \
            from None
    if size != entry.size:
        part.unlink(missing_ok=True)
        return f"{size if size <= entry.size else 'more than ' + str(entry.size)} bytes, expected {entry.size}"
    actual = digest.hexdigest()
    if actual != entry.sha256:
        part.unlink(missing_ok=True)
        return f"SHA-256 is {actual}, expected {entry.sha256}"
    return None


def _import_message(model: ModelEntry, source: Path, problems: dict[str, str]) -> str:
    listing = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
    return (
        f"refused to import model '{model.name}' (version {model.version}) from {source}; nothing was installed. "
        f"These files are missing or are not the ones this PRISM-RT expects: {listing}. "
        f"Copy the files of '{model.name}' version {model.version} again (from {model.homepage or 'the model page'}, "
        f"or from a machine where 'prismrt models download {model.name}' worked)"
    )


def _sha256(reader: IO[bytes]) -> str:
    digest = hashlib.sha256()
    with reader:
        while block := reader.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _part_size(path: Path) -> int:
    try:
        return part_path(path).stat().st_size
    except OSError:
        return 0


