"""Model weights on first use: a manifest of models, a verified user cache, resumable downloads, offline import.

Typical use::

    from PRISMRTLib.weights import ensure_model
    folder = ensure_model("prismrt-vitb", progress=lambda done, total: ..., cancel=stop_event)

Weights are safetensors + JSON config (+ tokenizer vocabulary) files, never pickles. A file appears under its final
name in the cache only after its size and SHA-256 matched the manifest. Environment variables: ``PRISMRT_HOME``
(cache folder), ``PRISMRT_MANIFEST`` (extra manifests, e.g. your own mirror; ``os.pathsep``-separated), and the usual
``HTTPS_PROXY`` / ``NO_PROXY`` / ``REQUESTS_CA_BUNDLE``.
"""

from .cache import cache_root, model_path
from .download import DownloadConfig, download_file
from .errors import (
    ChecksumMismatchError,
    DiskFullError,
    DownloadCancelled,
    DownloadError,
    DownloadTimeoutError,
    HTTPStatusError,
    ManifestError,
    ModelBusyError,
    ModelImportError,
    NetworkError,
    ProxyConnectionError,
    RemoteFileNotFoundError,
    SSLConnectionError,
    UnknownModelError,
    WeightsError,
    WeightsNotInstalledError,
)
from .manifest import (
    FileEntry, Manifest, ModelEntry, default_manifest, load_manifest, model_entry_for_folder, parse_manifest,
)
from .store import ModelStatus, ensure_model, import_model, is_available, list_models, remove_model

__all__ = [
    "ChecksumMismatchError",
    "DiskFullError",
    "DownloadCancelled",
    "DownloadConfig",
    "DownloadError",
    "DownloadTimeoutError",
    "FileEntry",
    "HTTPStatusError",
    "Manifest",
    "ManifestError",
    "ModelBusyError",
    "ModelEntry",
    "ModelImportError",
    "ModelStatus",
    "NetworkError",
    "ProxyConnectionError",
    "RemoteFileNotFoundError",
    "SSLConnectionError",
    "UnknownModelError",
    "WeightsError",
    "WeightsNotInstalledError",
    "cache_root",
    "default_manifest",
    "download_file",
    "ensure_model",
    "import_model",
    "is_available",
    "list_models",
    "load_manifest",
    "model_entry_for_folder",
    "model_path",
    "parse_manifest",
    "remove_model",
]
