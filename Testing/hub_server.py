"""A tiny local stand-in for the Hugging Face Hub, for tests: tests cannot reach the internet.

It answers the requests ``huggingface_hub`` 2.4 sends, with the headers it reads:

* ``HEAD``/``GET /{owner}/{name}/resolve/{revision}/{path}``: ``X-Repo-Commit`` (40 hex) on every
  answer. Small files (under ``lfs_threshold`` bytes, like config.json kept in git) are served
  directly with ``ETag: "<git blob sha1>"`` and ``Content-Length``. Large files are "LFS": the Hub
  answers with a redirect to its CDN carrying ``X-Linked-Etag: "<sha256>"`` and ``X-Linked-Size``;
  here the CDN is a second server on another port (another origin, like the real CDN), serving
  ``/cdn/<sha256>``. Both serve ``Range: bytes=N-`` with ``206`` and ``Content-Range``.
* Errors like the Hub's: ``404`` with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound`` (the last with ``X-Repo-Commit``).
* ``GET /api/models/{owner}/{name}/revision/{revision}`` (``repo_info``: id, sha, siblings) and
  ``GET /api/models/{owner}/{name}/tree/{revision}`` (``list_repo_tree``: files with size, oid and
  lfs {oid, size, pointerSize}, plus folders), which a snapshot download asks for.

Files live in memory: ``server.add_file(repo_id, path, data)``. Knobs for tests:
``drop_after[path] = n`` (send n bytes of the next GET of that file, then cut the connection),
``corrupt.add(path)`` (serve different bytes of the same length under the same headers),
``delay`` (seconds to sleep after each ``chunk_size`` bytes), and ``requests`` (every request:
method, path, headers, status, bytes sent).

Every answer closes its connection, so after :meth:`HubServer.stop` nothing is served any more.

The ``hub_server`` fixture starts one and points ``huggingface_hub`` at it: ``HF_ENDPOINT``, a
fresh ``HF_HOME``/``HF_HUB_CACHE`` under ``tmp_path``, telemetry off, offline mode off.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import quote, unquote, urlsplit

import pytest


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict
    status: int = 0
    bytes_sent: int = 0


@dataclass
class _File:
    repo_id: str
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_sha1(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # clients that hang up are expected
        pass


class HubServer:
    """See the module docstring."""

    def __init__(self, *, lfs_threshold: int = 1024, chunk_size: int = 64 * 1024) -> None:
        self.lfs_threshold = lfs_threshold
        self.chunk_size = chunk_size
        self.delay = 0.0
        self.drop_after: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.requests: list[Request] = []
        self._repos: dict[str, dict[str, _File]] = {}
        self._lock = threading.Lock()
        self._servers: list[_Quiet] = []
        self._threads: list[threading.Thread] = []

    # ----- content -----

    def add_file(self, repo_id: str, path: str, data: bytes, *, lfs: Optional[bool] = None) -> None:
        with self._lock:
            self._repos.setdefault(repo_id, {})[path] = _File(
                repo_id, path, bytes(data), len(data) >= self.lfs_threshold if lfs is None else lfs
            )

    def add_repo(self, repo_id: str) -> None:
        with self._lock:
            self._repos.setdefault(repo_id, {})

    def commit(self, repo_id: str) -> str:
        """The repo's current commit: changes whenever its files change."""
        files = self._repos[repo_id]
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].sha256}\0".encode())
        return digest.hexdigest()

    def sha256(self, repo_id: str, path: str) -> str:
        return self._repos[repo_id][path].sha256

    # ----- lifecycle -----

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def start(self) -> "HubServer":
        for role in ("hub", "cdn"):
            httpd = _Quiet(("127.0.0.1", 0), _make_handler(self, role))
            thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"hub-server-{role}", daemon=True)
            thread.start()
            self._servers.append(httpd)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for httpd in self._servers:
            httpd.shutdown()
            httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    # ----- inspection -----

    def gets(self, path: str) -> list[Request]:
        """The GET requests that carried bytes of repo file ``path`` (from the Hub or the CDN)."""
        with self._lock:
            files = [f for repo in self._repos.values() for f in repo.values() if f.path == path]
            shas = {f.sha256 for f in files}
            return [
                r for r in self.requests
                if r.method == "GET" and r.status in (200, 206) and (
                    r.path.endswith("/" + quote(path))
                    or (r.path.startswith("/cdn/") and r.path.split("?")[0].rsplit("/", 1)[-1] in shas)
                )
            ]

    # ----- internals used by the handler -----

    def _find(self, repo_id: str) -> Optional[dict[str, _File]]:
        with self._lock:
            return self._repos.get(repo_id)

    def _by_sha(self, sha: str) -> Optional[_File]:
        with self._lock:
            for repo in self._repos.values():
                for f in repo.values():
                    if f.lfs and f.sha256 == sha:
                        return f
        return None

    def _take_drop(self, path: str) -> Optional[int]:
        with self._lock:
            return self.drop_after.pop(path, None)

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


def _make_handler(server: HubServer, role: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_HEAD(self):
            self._dispatch(head=True)

        def do_GET(self):
            self._dispatch(head=False)

        # ----- routing -----

        def _dispatch(self, head: bool) -> None:
            record = Request(role, self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            server._record(record)
            self.close_connection = True
            self._record_ = record
            path = urlsplit(self.path).path
            try:
                if role == "cdn":
                    self._cdn(path, head)
                elif path.startswith("/api/models/"):
                    self._api(path[len("/api/models/"):])
                else:
                    self._resolve(path, head)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _answer(self, status: int, headers: dict, body: bytes = b"", head: bool = False) -> None:
            self._record_.status = status
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Connection", "close")
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and not head:
                self.wfile.write(body)
                self._record_.bytes_sent = len(body)

        def _error(self, code: str, message: str, extra: Optional[dict] = None, head: bool = False) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            self._answer(404, {**headers, **(extra or {})}, body, head)

        def _repo(self, parts: list[str], head: bool):
            """(repo_id, files, commit, rest) or None after answering an error."""
            if len(parts) < 2:
                self._answer(404, {}, b"not found", head)
                return None
            repo_id = f"{parts[0]}/{parts[1]}"
            files = server._find(repo_id)
            if files is None:
                self._error("RepoNotFound", "Repository not found", head=head)
                return None
            return repo_id, files, server.commit(repo_id)

        def _revision_ok(self, revision: str, commit: str, head: bool) -> bool:
            if revision in ("main", commit):
                return True
            self._error("RevisionNotFound", "Invalid rev id: " + revision, head=head)
            return False

        # ----- Hub endpoints -----

        def _resolve(self, path: str, head: bool) -> None:
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if len(parts) < 5 or parts[2] != "resolve":
                self._answer(404, {}, b"not found", head)
                return
            found = self._repo(parts, head)
            if found is None:
                return
            repo_id, files, commit = found
            revision, filename = parts[3], "/".join(parts[4:])
            if not self._revision_ok(revision, commit, head):
                return
            f = files.get(filename)
            if f is None:
                self._error("EntryNotFound", "Entry not found", {"X-Repo-Commit": commit}, head)
                return
            if f.lfs:
                self._answer(302, {
                    "Location": f"{server.cdn}/cdn/{f.sha256}",
                    "X-Repo-Commit": commit,
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(len(f.data)),
                    "ETag": f'"{f.git_sha1}"',
                    "Content-Length": "0",
                }, head=True)
                return
            self._content(f, {"X-Repo-Commit": commit}, head)

        def _cdn(self, path: str, head: bool) -> None:
            sha = path.rsplit("/", 1)[-1]
            f = server._by_sha(sha) if path.startswith("/cdn/") else None
            if f is None:
                self._answer(404, {}, b"no such object", head)
                return
            self._content(f, {}, head)

        def _content(self, f: _File, headers: dict, head: bool) -> None:
            data = f.data
            if f.path in server.corrupt:
                flipped = bytearray(data)
                flipped[len(flipped) // 2] ^= 0xFF
                data = bytes(flipped)
            start = 0
            status = 200
            headers = {**headers, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes=") and wanted.endswith("-") and not head:
                start = int(wanted[len("bytes="):-1])
                if start >= len(data):
                    self._answer(416, {"Content-Range": f"bytes */{len(data)}"})
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            headers["Content-Length"] = str(len(data) - start)
            self._record_.status = status
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            if head:
                return
            drop = server._take_drop(f.path)
            sent = 0
            position = start
            while position < len(data):
                size = server.chunk_size
                if drop is not None:
                    size = min(size, drop - sent)
                    if size <= 0:
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                piece = data[position:position + size]
                self.wfile.write(piece)
                sent += len(piece)
                position += len(piece)
                self._record_.bytes_sent = sent
                if server.delay:
                    self.wfile.flush()
                    time.sleep(server.delay)

        def _api(self, rest: str) -> None:
            parts = [unquote(p) for p in rest.strip("/").split("/")]
            found = self._repo(parts, False)
            if found is None:
                return
            repo_id, files, commit = found
            if len(parts) == 2:  # repo_info without a revision: the default branch
                parts += ["revision", "main"]
            if len(parts) >= 4 and parts[2] in ("revision", "tree"):
                if not self._revision_ok(parts[3], commit, False):
                    return
            else:
                self._answer(404, {}, b"not found")
                return
            if parts[2] == "revision":
                body = {"id": repo_id, "sha": commit, "private": False,
                        "siblings": [{"rfilename": p} for p in sorted(files)]}
            else:
                folders = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
                body = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                        for d in folders]
                for p in sorted(files):
                    f = files[p]
                    entry = {"type": "file", "path": p, "size": len(f.data), "oid": f.git_sha1}
                    if f.lfs:
                        entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                    body.append(entry)
            self._answer(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    return Handler


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A started :class:`HubServer` with huggingface_hub pointed at it and a fresh cache."""
    import huggingface_hub.constants

    server = HubServer().start()
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads these when it is imported, before this fixture runs. Offline mode must be
    # off; telemetry must be off because with it on, building the request headers fetches an "agent
    # harnesses" list from the endpoint known at import time (huggingface.co): no internet in tests.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    try:
        yield server
    finally:
        server.stop()
