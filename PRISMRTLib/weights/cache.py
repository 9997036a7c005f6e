"""The on-disk cache: ``<root>/<name>/<version>/<file>``, with a marker file that remembers verified files.

A file counts as installed only when its size and SHA-256 match the manifest. Hashing a large file at every start
would be slow, so each verification is recorded in ``<root>/<name>/<version>/.prismrt-verified.json`` with the file's
size and modification time; while those are unchanged the recorded result is reused.

Writers (download, import, remove) hold a per-model lock file under ``<root>/.locks`` so that two processes (say the
Slicer module and the command line) never write the same files at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import DiskFullError, ModelBusyError, WeightsError, WeightsNotInstalledError
from .manifest import PART_SUFFIX, FileEntry, Manifest, ModelEntry, default_manifest

HOME_ENV = "PRISMRT_HOME"
MARKER_NAME = ".prismrt-verified.json"
_HASH_BLOCK = 1 << 20


def cache_root() -> Path:
    """``$PRISMRT_HOME`` if set, else the platform's user cache folder (nothing is created here)."""
    env = os.environ.get(HOME_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA", "").strip()
        return (Path(base) if base else Path.home() / "AppData" / "Local") / "prismrt" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "prismrt"
    # XDG: only an absolute XDG_CACHE_HOME counts, as the specification says.
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "prismrt"


def model_dir(model: ModelEntry, root: Path | None = None) -> Path:
    return (root or cache_root()) / model.name / model.version


# Small models shipped inside the package (stand-in teachers), laid out like the cache.
SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"


def shipped_dir(model: ModelEntry) -> Path | None:
    """The package's own copy of a model, if it ships one and every file matches the manifest (size, SHA-256)."""
    folder = model_dir(model, SHIPPED_ROOT)
    if not folder.is_dir():
        return None
    for entry in model.files:
        path = folder / entry.name
        if not path.is_file() or path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            return None
    return folder


def part_path(path: Path) -> Path:
    return path.with_name(path.name + PART_SUFFIX)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileState:
    """What is on disk for one manifest file: ``ok`` or a short reason (``missing``, ``size ...``, ``SHA-256 ...``)."""

    entry: FileEntry
    path: Path
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_files(model: ModelEntry, root: Path | None = None) -> list[FileState]:
    """Verify every file of ``model`` in the cache, hashing only files whose size or mtime changed since last time."""
    folder = model_dir(model, root)
    marker = _read_marker(folder)
    states: list[FileState] = []
    changed = False
    for entry in model.files:
        path = folder / entry.name
        try:
            stat = path.stat()
        except FileNotFoundError:
            states.append(FileState(entry, path, "missing"))
            continue
        except OSError as exc:
            states.append(FileState(entry, path, f"unreadable ({exc.strerror or exc})"))
            continue
        if stat.st_size != entry.size:
            states.append(FileState(entry, path, f"{stat.st_size} bytes instead of {entry.size}"))
            continue
        if marker.get(entry.name) == _marker_record(stat.st_size, stat.st_mtime_ns, entry.sha256):
            states.append(FileState(entry, path, None))
            continue
        actual = sha256_file(path)
        if actual != entry.sha256:
            marker.pop(entry.name, None)
            changed = True
            states.append(FileState(entry, path, "damaged or changed (SHA-256 does not match the manifest)"))
            continue
        marker[entry.name] = _marker_record(stat.st_size, stat.st_mtime_ns, actual)
        changed = True
        states.append(FileState(entry, path, None))
    if changed:
        _write_marker(folder, marker)
    return states


def record_verified(model: ModelEntry, entry: FileEntry, root: Path | None = None) -> None:
    """Remember that ``entry``'s final file was just verified (its bytes were hashed before it got its name)."""
    folder = model_dir(model, root)
    stat = (folder / entry.name).stat()
    marker = _read_marker(folder)
    marker[entry.name] = _marker_record(stat.st_size, stat.st_mtime_ns, entry.sha256)
    _write_marker(folder, marker)


def model_path(name: str, manifest: Manifest | None = None) -> Path:
    """The folder of an installed, verified model; else :class:`WeightsNotInstalledError` saying how to get it.

    A model shipped inside the package (and intact) counts as installed.
    """
    model = (manifest or default_manifest()).get(name)
    shipped = shipped_dir(model)
    if shipped is not None:
        return shipped
    if model.convert:
        from .convert import converted_dir, converted_ok, local_sources

        if converted_ok(model):
            return converted_dir(model)
        how = ("it is made from files already on this machine the first time it is used ('prismrt models download "
               f"{name}' makes it now)" if local_sources(model, verify=False) is not None else
               f"its source files are missing: 'prismrt models import {name} FILE'")
        raise WeightsNotInstalledError(f"model '{name}' (version {model.version}) is not converted yet: {how}")
    states = check_files(model)
    bad = [s for s in states if not s.ok]
    if bad:
        raise WeightsNotInstalledError(not_installed_message(model, bad))
    return model_dir(model)


def not_installed_message(model: ModelEntry, bad: list[FileState]) -> str:
    folder = model_dir(model)
    if all(s.problem == "missing" for s in bad) and len(bad) == len(model.files):
        what = f"model '{model.name}' (version {model.version}) is not installed in {folder}"
    else:
        details = "; ".join(f"{s.entry.name}: {s.problem}" for s in bad)
        what = f"model '{model.name}' (version {model.version}) in {folder} is incomplete: {details}"
    return (
        f"{what}. Download it with 'prismrt models download {model.name}', or, without network, import files you "
        f"carried in with 'prismrt models import {model.name} FOLDER'"
    )


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Raise :class:`DiskFullError` when the disk holding ``folder`` has less than ``needed`` bytes free."""
    if needed <= 0:
        return
    probe = folder
    while not probe.exists() and probe != probe.parent:  # disk_usage needs an existing path
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskFullError(
            f"not enough disk space for {what}: {_mb(needed)} needed in {folder}, {_mb(free)} free. "
            f"Free some space, or set {HOME_ENV} to a folder on a larger disk"
        )


def disk_full_error(exc: OSError, path: Path) -> DiskFullError | None:
    """The clear error for ENOSPC/EDQUOT raised while writing ``path``, or None for other OS errors."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DiskFullError(
            f"the disk is full while writing {path}: free some space, or set {HOME_ENV} to a folder on a larger "
            "disk; the download resumes where it stopped"
        )
    return None


@contextlib.contextmanager
def model_lock(model: ModelEntry, root: Path | None = None) -> Iterator[None]:
    """Exclusive, non-blocking lock for writing a model; lock files stay in place (deleting them would race)."""
    root = root or cache_root()
    lock_path = root / ".locks" / f"{model.name}@{model.version}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+b")
    except OSError as exc:
        raise WeightsError(f"cannot write to the weights cache {root}: {exc.strerror or exc}. Set {HOME_ENV} to a "
                           "writable folder") from None
    try:
        if not _try_lock(handle):
            raise ModelBusyError(
                f"model '{model.name}' is being downloaded, imported or removed by another PRISM-RT process or "
                "window; wait for it to finish, or close it and try again"
            )
        try:
            yield
        finally:
            _unlock(handle)
    finally:
        handle.close()


def remove_dir(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise WeightsError(
            f"cannot remove {path}: {exc.strerror or exc}. Close programs that use the model (Slicer, prismrt) "
            "and try again"
        ) from None


def _marker_record(size: int, mtime_ns: int, sha256: str) -> dict:
    return {"size": size, "mtime_ns": mtime_ns, "sha256": sha256}


def _read_marker(folder: Path) -> dict:
    try:
        data = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no marker or a damaged one: files are simply hashed again
    files = data.get("files") if isinstance(data, dict) else None
    return dict(files) if isinstance(files, dict) else {}


def _write_marker(folder: Path, files: dict) -> None:
    """Atomic replace, so a reader never sees half a marker; failure only costs a re-hash later."""
    tmp = folder / f"{MARKER_NAME}.{os.getpid()}.{threading.get_ident()}.tmp"  # unique per writer
    try:
        tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, folder / MARKER_NAME)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _try_lock(handle: IO[bytes]) -> bool:
    if sys.platform == "win32":
        import msvcrt

        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError when held elsewhere
        return False
    return True


def _unlock(handle: IO[bytes]) -> None:
    with contextlib.suppress(OSError):
        if sys.platform == "win32":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
