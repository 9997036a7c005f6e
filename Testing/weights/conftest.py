"""Fixtures for the weights tests: an isolated cache, a tiny model, and a local HTTP server with switchable faults.

Nothing here touches the network or the real user cache: PRISMRT_HOME and HOME point into tmp_path, proxies are
cleared, and files are served by :class:`weights_server.FileServer` on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from weights_server import FileServer, model_json, write_manifest

from PRISMRTLib.weights import DownloadConfig

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch) -> Path:
    """Cache, home and manifest overrides inside tmp_path; no proxy for 127.0.0.1."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRISMRT_HOME", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PRISMRT_MANIFEST", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return cache


@pytest.fixture
def server():
    srv = FileServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny model as PRISM-RT ships them: safetensors weights, a JSON config, a tokenizer vocabulary."""
    from safetensors.numpy import save_file

    folder = tmp_path_factory.mktemp("model")
    rng = np.random.default_rng(0)
    save_file({"patch_embed.weight": rng.standard_normal((48, 500)).astype(np.float32),
               "head.bias": rng.standard_normal(17).astype(np.float32)},
              str(folder / "model.safetensors"))
    files = {
        "model.safetensors": (folder / "model.safetensors").read_bytes(),
        "config.json": json.dumps({"embed_dim": 48, "patch_size": 16, "note": "tiny test model"}).encode(),
        "tokenizer/vocab.txt": "\n".join(["[PAD]", "[UNK]", "ct", "tumour", "left", "right"] * 50).encode(),
    }
    assert len(files["model.safetensors"]) > 90_000  # several chunks of the 4 KiB test chunk size
    return files


@pytest.fixture
def served_manifest(server, model_files, tmp_path):
    """The tiny model served by ``server`` at /m/<file>, and its manifest."""
    urls = {name: [server.add(f"m/{name}", data)] for name, data in model_files.items()}
    return write_manifest(tmp_path / "manifest.json", model_json(model_files, urls))


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def config(sleeps) -> DownloadConfig:
    """Small chunks, short timeouts, recorded (not real) backoff sleeps."""
    return DownloadConfig(retries=2, backoff=0.5, max_backoff=4.0, connect_timeout=2.0, read_timeout=0.3,
                          chunk_size=4096, sleep=sleeps.append)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
