"""Errors of the weights store: each message says what went wrong and what the user can do."""

from __future__ import annotations

from ..errors import PrismRTError


class WeightsError(PrismRTError):
    """Base class for everything about model weights."""


class ManifestError(WeightsError):
    """A manifest file is missing, not JSON, or has an invalid entry (the message names the entry)."""


class UnknownModelError(WeightsError):
    """No model of that name is listed in the manifest."""


class WeightsNotInstalledError(WeightsError):
    """The model's files are not (all) in the cache, or one of them failed verification."""


class ModelBusyError(WeightsError):
    """Another thread or process is downloading, importing or removing the same model."""


class ModelImportError(WeightsError):
    """Files offered for import are missing or are not the ones the manifest describes; nothing was installed."""


class DiskFullError(WeightsError):
    """Not enough free space for the model files (checked before starting, or ENOSPC while writing)."""


class DownloadCancelled(WeightsError):
    """The user cancelled; the partial file is kept and the next download resumes from it."""


class DownloadError(WeightsError):
    """A file could not be downloaded. ``url`` is the last URL tried; ``errors`` holds one error per failed mirror."""

    def __init__(self, message: str, *, url: str | None = None, errors: list[DownloadError] | None = None):
        super().__init__(message)
        self.url = url
        self.errors: list[DownloadError] = errors if errors is not None else [self]


class NetworkError(DownloadError):
    """The host could not be reached (no network, DNS failure, connection refused or reset)."""


class ProxyConnectionError(DownloadError):
    """The HTTP(S) proxy refused or failed the connection."""


class SSLConnectionError(DownloadError):
    """The TLS handshake or certificate check failed."""


class DownloadTimeoutError(DownloadError):
    """The server stopped sending data for longer than the read timeout, on every attempt."""


class RemoteFileNotFoundError(DownloadError):
    """The server answered 404/403/410: the file is not (or no longer) at that URL."""


class HTTPStatusError(DownloadError):
    """The server kept answering with an error status (5xx, 429, other 4xx)."""


class ChecksumMismatchError(DownloadError):
    """The downloaded bytes are not the file of the manifest (wrong SHA-256 or wrong size); they were deleted."""

    def __init__(self, message: str, *, filename: str, expected: str, actual: str | None, url: str | None = None):
        super().__init__(message, url=url)
        self.filename = filename
        self.expected = expected
        self.actual = actual
