"""A local HTTP file server with switchable faults, and helpers to describe test models in a manifest."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from PRISMRTLib.weights import load_manifest


@dataclass
class Fault:
    """One planned misbehaviour, used for one request.

    kinds: ``status`` (answer ``value`` as HTTP status), ``truncate`` (send ``value`` body bytes, then close),
    ``stall`` (send half the body, then go silent for ``value`` s), ``stall_headers`` (silent for ``value`` s before
    answering), ``corrupt`` (flip one byte, same length), ``lie_length`` (Content-Length off by ``value`` bytes,
    then close), ``ignore_range`` (answer 200 with the full body).
    """

    kind: str
    value: float = 0


@dataclass
class Hit:
    path: str
    range: str | None
    status: int


class FileServer:
    """Serves ``files`` over HTTP/1.1 with Range support; ``plan()`` queues faults per path; ``hits`` logs requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[Fault]] = defaultdict(list)
        self.always: dict[str, set[str]] = defaultdict(set)  # persistent modes: "corrupt", "ignore_range"
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + "/" + path.lstrip("/")

    def add(self, path: str, data: bytes) -> str:
        self.files["/" + path.lstrip("/")] = data
        return self.url(path)

    def plan(self, path: str, *faults: Fault) -> None:
        with self.lock:
            self.faults["/" + path.lstrip("/")].extend(faults)

    def hits_for(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == "/" + path.lstrip("/")]

    def next_fault(self, path: str) -> Fault | None:
        with self.lock:
            queue = self.faults[path]
            return queue.pop(0) if queue else None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # clients that hang up (stall, TLS test) are expected
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        server: FileServer = self.server.owner
        path = urlsplit(self.path).path
        range_header = self.headers.get("Range")
        data = server.files.get(path)
        fault = server.next_fault(path)
        kind = fault.kind if fault else None
        hit = Hit(path, range_header, 0)  # logged on arrival (a stalled request too); status set when answered
        server.hits.append(hit)
        if data is None:
            return self._status(hit, 404)
        if kind == "status":
            return self._status(hit, int(fault.value))
        if kind == "stall_headers":
            time.sleep(fault.value)
        if kind == "corrupt" or "corrupt" in server.always[path]:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]

        start, status = 0, 200
        if range_header and kind != "ignore_range" and "ignore_range" not in server.always[path]:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            start = int(match.group(1))
            if start >= len(data):
                hit.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        length = len(body) + (int(fault.value) if kind == "lie_length" else 0)

        hit.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if kind in ("truncate", "lie_length", "stall"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            if kind == "truncate":
                self.wfile.write(body[: int(fault.value)])
            elif kind == "stall":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(fault.value)
                self.wfile.write(body[len(body) // 2:])
            else:
                self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            pass  # the client gave up (stall): expected

    def _status(self, hit: Hit, code: int) -> None:
        hit.status = code  # before answering: the client may check at once
        body = f"HTTP {code}\n".encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_json(files: dict[str, bytes], urls: dict[str, list[str]], name="tiny", version="1.0") -> dict:
    return {
        "name": name,
        "version": version,
        "description": "a tiny model for tests",
        "licence": "CC0-1.0",
        "homepage": "https://example.org/tiny",
        "files": [{"name": n, "url": urls[n], "size": len(d), "sha256": sha256(d)} for n, d in files.items()],
    }


def write_manifest(path: Path, *models: dict):
    path.write_text(json.dumps({"schema_version": 1, "models": list(models)}, indent=1))
    return load_manifest(path)


