"""Downloading against a real local HTTP server: resume, retries, stalls, mirrors, cancel, verification, messages."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from safetensors.numpy import load_file
from weights_server import Fault, model_json, sha256, write_manifest

from PRISMRTLib.errors import PrismRTError
from PRISMRTLib.weights import (
    ChecksumMismatchError,
    DiskFullError,
    DownloadCancelled,
    DownloadConfig,
    DownloadError,
    DownloadTimeoutError,
    HTTPStatusError,
    NetworkError,
    ProxyConnectionError,
    RemoteFileNotFoundError,
    SSLConnectionError,
    WeightsNotInstalledError,
    ensure_model,
    model_path,
)

WEIGHTS = "model.safetensors"
SERVED = f"/m/{WEIGHTS}"


def installed(cache: Path, name: str = WEIGHTS) -> Path:
    return cache / "tiny" / "1.0" / name


def part_of(cache: Path, name: str = WEIGHTS) -> Path:
    return cache / "tiny" / "1.0" / f"{name}.part"


def assert_not_installed(cache: Path, manifest) -> None:
    """Neither the final file exists nor does any public entry point hand out the model."""
    assert not installed(cache).exists()
    with pytest.raises(WeightsNotInstalledError):
        model_path("tiny", manifest=manifest)


def test_ensure_model_downloads_verified_loadable_files(served_manifest, server, config, model_files, isolated_env):
    reports = []
    folder = ensure_model("tiny", progress=lambda done, total: reports.append((done, total)),
                          manifest=served_manifest, config=config)

    assert folder == isolated_env / "tiny" / "1.0"
    for name, data in model_files.items():
        assert (folder / name).read_bytes() == data
    assert not list(folder.rglob("*.part"))
    assert load_file(str(folder / WEIGHTS))["patch_embed.weight"].shape == (48, 500)
    assert json.loads((folder / "config.json").read_text())["embed_dim"] == 48
    total = sum(map(len, model_files.values()))
    assert all(t == total for _, t in reports)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports)  # monotonic over all files
    assert reports[0][0] == 0 and reports[-1][0] == total
    assert model_path("tiny", manifest=served_manifest) == folder

    hits = len(server.hits)
    assert ensure_model("tiny", manifest=served_manifest, config=config) == folder
    assert len(server.hits) == hits  # already installed: no request at all


def test_interrupted_download_resumes_from_the_part_with_a_range_request(
    served_manifest, server, config, model_files, isolated_env, sleeps
):
    cut = 10_001  # not a multiple of the chunk size
    server.plan(SERVED, Fault("truncate", cut))

    ensure_model("tiny", manifest=served_manifest, config=config)

    hits = server.hits_for(SERVED)
    assert [(h.range, h.status) for h in hits] == [(None, 200), (f"bytes={cut}-", 206)]
    assert installed(isolated_env).read_bytes() == model_files[WEIGHTS]
    assert sleeps == []  # the broken attempt made progress: reconnect at once, no backoff


def test_part_left_by_an_earlier_session_is_resumed(served_manifest, server, config, model_files, isolated_env):
    part = part_of(isolated_env)
    part.parent.mkdir(parents=True)
    part.write_bytes(model_files[WEIGHTS][:30_000])

    ensure_model("tiny", manifest=served_manifest, config=config)

    assert [h.range for h in server.hits_for(SERVED)] == ["bytes=30000-"]
    assert installed(isolated_env).read_bytes() == model_files[WEIGHTS]
    assert not part.exists()


def test_stale_part_from_another_file_gets_one_clean_retry(served_manifest, server, config, model_files, isolated_env):
    """A kept prefix that does not belong to the file: the mismatch is blamed on it, not on the mirror."""
    part = part_of(isolated_env)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 30_000)

    ensure_model("tiny", manifest=served_manifest, config=config)

    assert [h.range for h in server.hits_for(SERVED)] == ["bytes=30000-", None]
    assert installed(isolated_env).read_bytes() == model_files[WEIGHTS]


def test_corrupted_download_is_deleted_and_never_installed(served_manifest, server, config, model_files, isolated_env):
    server.always[SERVED].add("corrupt")  # same length, one byte flipped

    with pytest.raises(ChecksumMismatchError) as info:
        ensure_model("tiny", manifest=served_manifest, config=config)

    message = str(info.value)
    assert WEIGHTS in message and sha256(model_files[WEIGHTS]) in message
    assert info.value.actual in message and info.value.actual != info.value.expected
    assert "try again" in message and "broken mirror" in message
    assert not part_of(isolated_env).exists()
    assert_not_installed(isolated_env, served_manifest)
    with pytest.raises(ChecksumMismatchError):  # and a second call does not hand it out either
        ensure_model("tiny", manifest=served_manifest, config=config)


def test_truncated_download_is_never_installed(served_manifest, server, config, model_files, isolated_env, sleeps):
    server.always[SERVED].add("ignore_range")  # every attempt restarts and breaks off at the same byte
    server.plan(SERVED, *[Fault("truncate", 5000)] * 5)

    with pytest.raises(NetworkError, match=r"connection to 127\.0\.0\.1:\d+ kept breaking off"):
        ensure_model("tiny", manifest=served_manifest, config=config)

    # the first attempt made progress (free); then 1 + retries attempts that got no further
    assert len(server.hits_for(SERVED)) == 2 + config.retries
    assert sleeps == [0.5, 1.0]  # exponential backoff between attempts that made no progress
    assert part_of(isolated_env).stat().st_size == 5000  # kept for a later resume
    assert_not_installed(isolated_env, served_manifest)


def test_file_larger_than_the_manifest_says_is_refused(server, config, model_files, isolated_env, tmp_path):
    short = model_files[WEIGHTS][:50_000]  # the manifest describes a shorter file than the mirror serves
    url = server.add("m/big.bin", model_files[WEIGHTS])
    manifest = write_manifest(tmp_path / "m.json", model_json({WEIGHTS: short}, {WEIGHTS: [url]}))

    with pytest.raises(ChecksumMismatchError, match="larger than the 50000 bytes"):
        ensure_model("tiny", manifest=manifest, config=config)
    assert not part_of(isolated_env).exists()
    assert_not_installed(isolated_env, manifest)


@pytest.mark.parametrize("kind", ["stall", "stall_headers"])
def test_stalled_server_is_retried_and_resumed(
    served_manifest, server, config, model_files, isolated_env, kind, sleeps
):
    server.plan(SERVED, Fault(kind, 2.0))  # silent for much longer than the 0.3 s read timeout

    started = time.monotonic()
    ensure_model("tiny", manifest=served_manifest, config=config)

    assert time.monotonic() - started < 1.5  # gave up on the stall after the read timeout, did not wait it out
    assert installed(isolated_env).read_bytes() == model_files[WEIGHTS]
    ranges = [h.range for h in server.hits_for(SERVED)]
    if kind == "stall":  # half the body had arrived: resumed from there, no backoff
        assert ranges == [None, f"bytes={len(model_files[WEIGHTS]) // 2}-"] and sleeps == []
    else:
        assert ranges == [None, None] and sleeps == [0.5]


def test_server_that_always_stalls_gives_a_timeout_error(served_manifest, server, config, isolated_env):
    server.plan(SERVED, *[Fault("stall_headers", 0.6)] * 3)
    config.retries = 1

    with pytest.raises(DownloadTimeoutError, match=r"127\.0\.0\.1:\d+ sent no data for 0\.3 s on 2 attempts"):
        ensure_model("tiny", manifest=served_manifest, config=config)
    assert_not_installed(isolated_env, served_manifest)


def test_transient_server_errors_are_retried_with_exponential_backoff(
    served_manifest, server, config, model_files, isolated_env, sleeps
):
    server.plan(SERVED, Fault("status", 500), Fault("status", 503))

    ensure_model("tiny", manifest=served_manifest, config=config)

    assert [h.status for h in server.hits_for(SERVED)] == [500, 503, 200]
    assert sleeps == [0.5, 1.0]
    assert installed(isolated_env).read_bytes() == model_files[WEIGHTS]


def test_server_errors_that_persist_give_up_after_the_retries(served_manifest, server, config, sleeps):
    server.plan(SERVED, *[Fault("status", 500)] * 5)

    with pytest.raises(HTTPStatusError, match="HTTP 500.*try again later"):
        ensure_model("tiny", manifest=served_manifest, config=config)
    assert len(server.hits_for(SERVED)) == 3 and sleeps == [0.5, 1.0]


@pytest.mark.parametrize("status", [404, 403])
def test_missing_file_names_the_url_and_is_not_retried(served_manifest, server, config, sleeps, status):
    server.plan(SERVED, Fault("status", status))

    with pytest.raises(RemoteFileNotFoundError) as info:
        ensure_model("tiny", manifest=served_manifest, config=config)

    assert f"the file is not at {server.url(SERVED)} (HTTP {status}" in str(info.value)
    assert "prismrt models import tiny" in str(info.value)
    assert len(server.hits_for(SERVED)) == 1 and sleeps == []


def test_connection_refused_says_the_host_is_unreachable(config, model_files, closed_port, tmp_path, sleeps):
    url = f"http://127.0.0.1:{closed_port}/m/config.json"
    manifest = write_manifest(tmp_path / "m.json",
                              model_json({"config.json": model_files["config.json"]}, {"config.json": [url]}))

    with pytest.raises(NetworkError) as info:
        ensure_model("tiny", manifest=manifest, config=config)

    message = str(info.value)
    assert f"cannot reach 127.0.0.1:{closed_port} (connection refused): check the network or proxy" in message
    assert "offline users can import files: prismrt models import tiny FOLDER" in message
    assert isinstance(info.value, PrismRTError) and info.value.url == url
    assert sleeps == [0.5, 1.0]


def test_mirrors_are_tried_in_order(server, config, model_files, closed_port, tmp_path, isolated_env):
    data = model_files["config.json"]
    good = server.add("mirror2/config.json", data)
    urls = [f"http://127.0.0.1:{closed_port}/config.json", server.url("gone/config.json"), good]
    manifest = write_manifest(tmp_path / "m.json", model_json({"config.json": data}, {"config.json": urls}))

    ensure_model("tiny", manifest=manifest, config=config)

    assert [(h.path, h.status) for h in server.hits] == [("/gone/config.json", 404), ("/mirror2/config.json", 200)]
    assert installed(isolated_env, "config.json").read_bytes() == data


def test_when_every_mirror_fails_each_failure_is_listed(server, config, model_files, closed_port, tmp_path):
    data = model_files["config.json"]
    urls = [f"http://127.0.0.1:{closed_port}/config.json", server.url("gone/config.json")]
    manifest = write_manifest(tmp_path / "m.json", model_json({"config.json": data}, {"config.json": urls}))

    with pytest.raises(DownloadError) as info:
        ensure_model("tiny", manifest=manifest, config=config)

    assert "from any of its 2 mirrors" in str(info.value) and urls[1] in str(info.value)
    assert [type(e) for e in info.value.errors] == [NetworkError, RemoteFileNotFoundError]


def test_server_ignoring_range_makes_the_download_restart_from_zero(
    served_manifest, server, config, model_files, isolated_env
):
    server.always[SERVED].add("ignore_range")
    server.plan(SERVED, Fault("truncate", 7000))

    ensure_model("tiny", manifest=served_manifest, config=config)

    assert [(h.range, h.status) for h in server.hits_for(SERVED)] == [(None, 200), ("bytes=7000-", 200)]
    assert installed(isolated_env).read_bytes() == model_files[WEIGHTS]


def test_range_not_satisfiable_restarts_from_zero(served_manifest, server, config, model_files, isolated_env):
    part = part_of(isolated_env)
    part.parent.mkdir(parents=True)
    part.write_bytes(model_files[WEIGHTS][:1000])
    server.plan(SERVED, Fault("status", 416))

    ensure_model("tiny", manifest=served_manifest, config=config)

    assert [(h.range, h.status) for h in server.hits_for(SERVED)] == [("bytes=1000-", 416), (None, 200)]
    assert installed(isolated_env).read_bytes() == model_files[WEIGHTS]


@pytest.mark.parametrize("lie", [+5000, -5000])
def test_lying_content_length_still_gives_the_right_file(
    served_manifest, server, config, model_files, isolated_env, lie
):
    server.plan(SERVED, Fault("lie_length", lie))

    ensure_model("tiny", manifest=served_manifest, config=config)

    assert installed(isolated_env).read_bytes() == model_files[WEIGHTS]
    if lie < 0:  # the client believed the short length, then fetched the rest
        size = len(model_files[WEIGHTS])
        assert [h.range for h in server.hits_for(SERVED)] == [None, f"bytes={size - 5000}-"]


@pytest.mark.parametrize("style", ["event", "callable"])
def test_cancel_keeps_the_part_and_the_next_call_resumes(
    served_manifest, server, config, model_files, isolated_env, style
):
    event = threading.Event()
    cancel = event if style == "event" else event.is_set

    def progress(done, total):
        if done >= 20_000:
            event.set()

    with pytest.raises(DownloadCancelled, match="the next download resumes"):
        ensure_model("tiny", progress=progress, cancel=cancel, manifest=served_manifest, config=config)

    kept = part_of(isolated_env).stat().st_size
    assert 20_000 <= kept < len(model_files[WEIGHTS])
    assert_not_installed(isolated_env, served_manifest)

    ensure_model("tiny", manifest=served_manifest, config=config)

    assert server.hits_for(SERVED)[-1].range == f"bytes={kept}-"
    assert installed(isolated_env).read_bytes() == model_files[WEIGHTS]


def test_cancel_interrupts_the_wait_between_retries(config, model_files, closed_port, tmp_path):
    url = f"http://127.0.0.1:{closed_port}/config.json"
    manifest = write_manifest(tmp_path / "m.json",
                              model_json({"config.json": model_files["config.json"]}, {"config.json": [url]}))
    slow = DownloadConfig(retries=5, backoff=20.0, max_backoff=20.0, connect_timeout=1.0)  # real, cancellable wait
    event = threading.Event()
    threading.Timer(0.2, event.set).start()

    started = time.monotonic()
    with pytest.raises(DownloadCancelled):
        ensure_model("tiny", cancel=event, manifest=manifest, config=slow)
    assert time.monotonic() - started < 2.0


def test_free_space_is_checked_before_downloading(served_manifest, server, config, monkeypatch, model_files):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))

    with pytest.raises(DiskFullError, match="not enough disk space.*PRISMRT_HOME"):
        ensure_model("tiny", manifest=served_manifest, config=config)
    assert server.hits == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) to make the OS report ENOSPC")
def test_disk_full_while_writing_is_a_clear_error(served_manifest, server, config, isolated_env):
    part = part_of(isolated_env)
    part.parent.mkdir(parents=True)
    part.symlink_to("/dev/full")  # every write there fails with ENOSPC

    with pytest.raises(DiskFullError, match="the disk is full while writing"):
        ensure_model("tiny", manifest=served_manifest, config=config)
    assert not installed(isolated_env).exists()


def test_proxy_failure_names_the_proxy_settings(served_manifest, config, monkeypatch, closed_port):
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{closed_port}")
    monkeypatch.delenv("NO_PROXY")

    expected = r"proxy failed .*Connection refused.*HTTPS_PROXY / HTTP_PROXY / NO_PROXY"
    with pytest.raises(ProxyConnectionError, match=expected):
        ensure_model("tiny", manifest=served_manifest, config=config)


def test_tls_failure_mentions_the_ca_bundle(server, config, model_files, tmp_path):
    # https:// to a plain-HTTP port: a real TLS handshake failure
    url = server.url("m/config.json").replace("http://", "https://")
    manifest = write_manifest(tmp_path / "m.json",
                              model_json({"config.json": model_files["config.json"]}, {"config.json": [url]}))

    expected = r"secure connection to 127\.0\.0\.1:\d+ failed \(\[SSL: .*REQUESTS_CA_BUNDLE"
    with pytest.raises(SSLConnectionError, match=expected):
        ensure_model("tiny", manifest=manifest, config=config)


def test_prismrt_manifest_variable_is_used_by_default(server, config, model_files, tmp_path, monkeypatch):
    urls = {name: [server.add(f"env/{name}", data)] for name, data in model_files.items()}
    write_manifest(tmp_path / "mirror.json", model_json(model_files, urls, name="mirrored"))
    monkeypatch.setenv("PRISMRT_MANIFEST", str(tmp_path / "mirror.json"))

    folder = ensure_model("mirrored", config=config)

    assert folder == model_path("mirrored")
    assert (folder / "tokenizer" / "vocab.txt").read_bytes() == model_files["tokenizer/vocab.txt"]
