"""Download one manifest file over HTTP(S): resumable, retried, cancellable, verified before it gets its name.

Bytes go to ``<file>.part`` next to the target. An existing ``.part`` is resumed with a ``Range`` request; a server
that ignores Range (200) or rejects it (416) makes us start again from zero. Connection errors, stalls (no bytes for
``read_timeout`` seconds, through requests' read timeout), early closes and 5xx/429 answers are retried with
exponential backoff; an attempt that added bytes does not use up the retry budget. Mirrors are tried in order.
Only when the ``.part`` has the manifest's size and SHA-256 is it renamed (``os.replace``, atomic) to the final name,
so a file under its final name has always been verified. Proxies and CA bundles come from the environment
(``HTTPS_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``), as requests reads them.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

from .. import __version__
from .cache import check_free_space, disk_full_error, part_path, sha256_file
from .errors import (
    ChecksumMismatchError,
    DownloadCancelled,
    DownloadError,
    DownloadTimeoutError,
    HTTPStatusError,
    NetworkError,
    ProxyConnectionError,
    RemoteFileNotFoundError,
    SSLConnectionError,
    WeightsError,
)
from .manifest import FileEntry

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``, called as bytes arrive (and once at the start with the resumed size)."""

Cancel = threading.Event | Callable[[], bool] | None
"""A ``threading.Event`` (cancel when set) or a callable returning True to cancel; checked between chunks."""


@dataclass
class DownloadConfig:
    retries: int = 3
    """Extra attempts per mirror after the first, for failures that may pass (network, stall, 5xx)."""
    backoff: float = 1.0
    """Delay before the first retry in seconds; doubled for each further retry, up to ``max_backoff``."""
    max_backoff: float = 30.0
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    """Stall timeout: an attempt that receives no bytes for this long is abandoned and retried."""
    chunk_size: int = 1 << 20
    sleep: Callable[[float], None] | None = None
    """Replaces the (cancellable) wait between retries; tests inject a recorder."""
    session: requests.Session | None = None


class _Retry(Exception):
    """A failure worth another attempt; ``final`` is the error to raise once the attempts are used up."""

    def __init__(self, final: DownloadError, retry_after: float | None = None, immediate: bool = False):
        super().__init__(str(final))
        self.final = final
        self.retry_after = retry_after
        self.immediate = immediate  # the state was reset (416, bad Content-Range): try again at once


def cancel_check(cancel: Cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if callable(cancel):
        return lambda: bool(cancel())
    raise TypeError("cancel must be a threading.Event, a callable returning bool, or None")


def new_session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = f"prismrt/{__version__} {session.headers.get('User-Agent', '')}".strip()
    return session


def download_file(
    entry: FileEntry,
    dest: Path,
    *,
    progress: Progress | None = None,
    cancel: Cancel = None,
    config: DownloadConfig | None = None,
    model_name: str = "MODEL",
) -> None:
    """Download ``entry`` to ``dest``, trying its mirrors in order; ``dest`` appears only once verified.

    ``model_name`` is used in messages (the ``prismrt models import`` hint). Raises a :class:`DownloadError` subclass
    (one mirror) or :class:`DownloadError` listing every mirror's failure, :class:`DownloadCancelled` (the ``.part``
    is kept) or :class:`DiskFullError`.
    """
    config = config or DownloadConfig()
    is_cancelled = cancel_check(cancel)
    part = part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = _size(part)
    if have > entry.size:  # cannot be a prefix of the right file
        part.unlink()
        have = 0
    check_free_space(dest.parent, entry.size - have, f"'{entry.name}'")

    session = config.session or new_session()
    errors: list[DownloadError] = []
    try:
        for url in entry.urls:
            try:
                _from_mirror(url, entry, dest, part, session, config, progress, is_cancelled, model_name)
                return
            except DownloadError as exc:
                errors.append(exc)
    finally:
        if config.session is None:
            session.close()
    if len(errors) == 1:
        raise errors[0]
    listing = "; ".join(f"[{i + 1}] {e}" for i, e in enumerate(errors))
    raise DownloadError(
        f"could not download '{entry.name}' from any of its {len(errors)} mirrors: {listing}",
        url=errors[-1].url,
        errors=errors,
    )


def _from_mirror(url, entry, dest, part, session, config, progress, is_cancelled, model_name) -> None:
    failures = 0  # consecutive attempts that added no bytes
    high_water = _size(part)
    # Bytes kept from an earlier attempt or mirror may not belong to this mirror's file: on a hash mismatch of such
    # a mixed file, this mirror gets one clean try from zero before it is blamed.
    state = _PartState(mixed=high_water > 0)
    while True:
        if is_cancelled():
            raise _cancelled(entry, part, model_name)
        if part.exists() and _size(part) == entry.size:
            try:
                _verify_and_rename(part, dest, entry, url)
                return
            except ChecksumMismatchError:
                if not state.mixed:
                    raise
                state.mixed, high_water = False, 0
                continue
        try:
            _attempt(url, entry, part, session, config, progress, is_cancelled, model_name, state)
            if _size(part) == entry.size:
                continue  # verified at the top of the loop
            host = _host(url)
            retry = _Retry(NetworkError(f"{host} closed the connection before sending all of '{entry.name}' "
                                        f"({_size(part)} of {entry.size} bytes)", url=url))
        except _Retry as exc:
            retry = exc
        size = _size(part)
        if size > high_water:  # progress: the retry budget is for attempts that get nowhere
            high_water, failures = size, 0
            continue
        high_water = size
        failures += 1
        if failures > config.retries:
            raise retry.final
        if retry.immediate:  # the partial file was reset (416, odd range): no reason to wait
            continue
        delay = min(config.max_backoff, config.backoff * 2 ** (failures - 1))
        if retry.retry_after is not None:
            delay = min(config.max_backoff, max(delay, retry.retry_after))
        _wait(delay, is_cancelled, config.sleep)


@dataclass
class _PartState:
    mixed: bool


def _attempt(url, entry: FileEntry, part: Path, session, config: DownloadConfig, progress, is_cancelled, model_name,
             state: _PartState):
    """One HTTP request; appends to (or restarts) ``part``. Raises _Retry for failures worth another attempt."""
    offset = _size(part)
    headers = {"Accept-Encoding": "identity"}  # byte ranges and sizes refer to the file itself, never a gzip of it
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = session.get(
            url, headers=headers, stream=True, timeout=(config.connect_timeout, config.read_timeout)
        )
    except requests.RequestException as exc:
        raise _classify(exc, url, config, model_name) from None

    with response:
        status = response.status_code
        if status == 206:
            if _content_range_start(response.headers.get("Content-Range")) != offset:
                part.unlink(missing_ok=True)  # the server sent some other range: start clean
                raise _Retry(HTTPStatusError(f"{url} answered with an unexpected byte range", url=url), immediate=True)
            mode = "ab"
        elif 200 <= status < 300:
            mode, offset = "wb", 0  # full body: the server ignored Range, so start again from zero
        elif status == 416:
            part.unlink(missing_ok=True)  # our partial file does not fit the server's file
            raise _Retry(HTTPStatusError(f"{url} rejected resuming (HTTP 416)", url=url), immediate=True)
        else:
            _raise_for_status(response, url, model_name)

        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # we asked for identity: these bytes are not the file's bytes
            raise DownloadError(f"{url} sent the file compressed ({encoding}) although asked not to; it cannot be "
                                "verified or resumed: use another mirror", url=url)
        if offset == 0:
            state.mixed = False  # every byte of the part now comes from this mirror
        written = offset
        if progress:
            progress(written, entry.size)
        try:
            with open(part, mode) as f:
                try:
                    for chunk in _body_chunks(response, config.chunk_size):
                        if not chunk:
                            continue
                        if written + len(chunk) > entry.size:
                            f.close()
                            part.unlink(missing_ok=True)
                            raise ChecksumMismatchError(
                                f"'{entry.name}' at {url} is larger than the {entry.size} bytes the manifest "
                                "declares: it is not the expected file. Report the broken mirror, or import "
                                f"the right files: prismrt models import {model_name} FOLDER",
                                filename=entry.name, expected=entry.sha256, actual=None, url=url,
                            )
                        f.write(chunk)
                        written += len(chunk)
                        if progress:
                            progress(written, entry.size)
                        if is_cancelled():
                            raise _cancelled(entry, part, model_name, written)
                except requests.RequestException as exc:
                    raise _classify(exc, url, config, model_name) from None
                if written == entry.size:
                    f.flush()
                    os.fsync(f.fileno())  # the bytes are on disk before the file gets its final name
        except OSError as exc:  # from open/write/fsync: requests' own errors were converted above
            raise disk_full_error(exc, part) or WeightsError(f"cannot write {part}: {exc.strerror or exc}") from None


def _body_chunks(response: requests.Response, size: int) -> Iterator[bytes]:
    """The body's bytes as they arrive, undecoded, as requests exceptions.

    Unlike ``iter_content``, which collects full chunks and drops a partial one when the connection breaks, ``read1``
    returns whatever one socket read gave: every byte received reaches the ``.part``, and the resume loses nothing.
    """
    raw = response.raw
    try:
        if not hasattr(raw, "read1"):  # urllib3 < 2.3
            yield from raw.stream(size, decode_content=False)
            return
        while data := raw.read1(size, decode_content=False):
            yield data
    except urllib3.exceptions.SSLError as exc:  # before ProtocolError: on some versions it is one
        raise requests.exceptions.SSLError(exc) from exc
    except urllib3.exceptions.ProtocolError as exc:  # closed early, reset, IncompleteRead
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except urllib3.exceptions.ReadTimeoutError as exc:  # the stall timeout
        raise requests.exceptions.ConnectionError(exc) from exc
    except OSError as exc:  # a socket error urllib3 did not wrap
        raise requests.exceptions.ConnectionError(exc) from exc


def _verify_and_rename(part: Path, dest: Path, entry: FileEntry, url: str) -> None:
    actual = sha256_file(part)
    if actual != entry.sha256:
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(
            f"'{entry.name}' downloaded from {url} is damaged or not the expected file: its SHA-256 is {actual}, "
            f"the manifest expects {entry.sha256}. The download was deleted; try again, and if it fails again "
            "report the broken mirror",
            filename=entry.name, expected=entry.sha256, actual=actual, url=url,
        )
    os.replace(part, dest)


def _raise_for_status(response: requests.Response, url: str, model_name: str):
    status, reason = response.status_code, response.reason or ""
    offline = f"prismrt models import {model_name} FOLDER"
    if status in (403, 404, 410):
        raise RemoteFileNotFoundError(
            f"the file is not at {url} (HTTP {status} {reason}): the mirror may have moved or restricted it; "
            f"use another mirror (PRISMRT_MANIFEST) or import the files: {offline}",
            url=url,
        )
    if status == 407:
        raise ProxyConnectionError(
            f"the proxy asks for authentication (HTTP 407) for {url}: put the user and password in HTTPS_PROXY "
            "(https://user:password@proxy:port) or ask your IT department",
            url=url,
        )
    error = HTTPStatusError(f"{_host(url)} answered HTTP {status} {reason} for {url}", url=url)
    if status in (408, 429) or status >= 500:
        raise _Retry(
            HTTPStatusError(f"{error} on every attempt: the server has a problem; try again later", url=url),
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )
    raise error


def _classify(exc: requests.RequestException, url: str, config: DownloadConfig, model_name: str) -> Exception:
    """Map a requests exception to a final error (returned) or a _Retry; order matters: SSL and proxy errors are
    ConnectionErrors too."""
    host = _host(url)
    offline = f"offline users can import files: prismrt models import {model_name} FOLDER"
    if isinstance(exc, requests.exceptions.SSLError):
        return SSLConnectionError(
            f"secure connection to {host} failed ({_short(exc)}): behind a corporate proxy that inspects HTTPS, "
            "set REQUESTS_CA_BUNDLE to your organisation's CA certificate file; otherwise check the system clock; "
            f"{offline}",
            url=url,
        )
    if isinstance(exc, requests.exceptions.ProxyError):
        return ProxyConnectionError(
            f"the proxy failed to connect to {host} ({_short(exc)}): check HTTPS_PROXY / HTTP_PROXY / NO_PROXY; "
            f"{offline}",
            url=url,
        )
    text = repr(exc)
    if isinstance(exc, requests.exceptions.ReadTimeout) or "ReadTimeoutError" in text:
        return _Retry(DownloadTimeoutError(
            f"{host} sent no data for {config.read_timeout:g} s on {config.retries + 1} attempts: the connection is "
            f"stalled or very slow; try again later (the download resumes), or {offline}",
            url=url,
        ))
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return _Retry(NetworkError(f"the connection to {host} kept breaking off: check the network or proxy; "
                                   f"{offline}", url=url))
    if isinstance(exc, requests.exceptions.ConnectionError):  # includes ConnectTimeout
        return _Retry(NetworkError(f"cannot reach {host}{_reason(text)}: check the network or proxy; {offline}",
                                   url=url))
    return DownloadError(f"cannot download {url}: {_short(exc)}", url=url)


def _reason(text: str) -> str:
    low = text.lower()
    if any(s in low for s in ("nameresolution", "name or service not known", "getaddrinfo", "nodename nor servname",
                              "temporary failure in name resolution", "no address associated")):
        return " (the name does not resolve: no network or DNS failure)"
    if "refused" in low or "10061" in low:
        return " (connection refused)"
    if "timed out" in low or "connecttimeout" in low:
        return " (connection timed out)"
    if "reset" in low or "aborted" in low:
        return " (connection reset)"
    return ""


def _short(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error (``[Errno 111] Connection refused``), without the nesting."""
    text = str(exc)
    for pattern in (r"\[SSL: [A-Z_]+\] [^'\"(]+", r"\[Errno -?\d+\] [^'\"]+", r"[Cc]ertificate [^'\"(]+"):
        if match := re.search(pattern, text):
            return match.group(0).strip()
    return text[:200]


def _host(url: str) -> str:
    """``host`` or ``host:port`` as the URL names it (no user or password)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname or url)


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", value or "")
    return int(match.group(1)) if match else None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: ignored, the backoff applies


def _wait(delay: float, is_cancelled: Callable[[], bool], sleep: Callable[[float], None] | None) -> None:
    if sleep is not None:
        sleep(delay)
        return
    end = time.monotonic() + delay
    while (left := end - time.monotonic()) > 0 and not is_cancelled():  # Cancel works during the wait too
        time.sleep(min(0.1, left))


def _cancelled(entry: FileEntry, part: Path, model_name: str, written: int | None = None) -> DownloadCancelled:
    have = _size(part) if written is None else written
    return DownloadCancelled(
        f"download of '{model_name}' cancelled during '{entry.name}': {have} of {entry.size} bytes kept in {part}; "
        "the next download resumes from there"
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
