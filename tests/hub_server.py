"""A tiny local stand-in for the Hugging Face Hub's file-resolve API (test helper).

Serves ``HEAD``/``GET /{repo_type}s/{owner}/{name}/resolve/{revision}/{path}`` the way the Hub
does for what ``huggingface_hub.hf_hub_download`` needs: ``X-Repo-Commit``, ``ETag`` (plus
``X-Linked-Etag``/``X-Linked-Size``, as the Hub sends for LFS files), ``Content-Length``,
``Accept-Ranges`` with ``Range: bytes=N-`` answered by 206, and 404s carrying
``X-Error-Code: RepoNotFound`` / ``EntryNotFound`` / ``RevisionNotFound``.
Every request is recorded so tests can count what was fetched.
"""
from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class FakeRepo:
    repo_type: str = "dataset"
    revisions: tuple[str, ...] = ("main", COMMIT)
    files: dict[str, bytes] = field(default_factory=dict)


class FakeHub:
    """Thread-safe state of the fake Hub: repos, and the log of (method, repo-relative path) requests."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # ---- test API
    def add_repo(self, repo_id: str, repo_type: str = "dataset") -> FakeRepo:
        self.repos[repo_id] = FakeRepo(repo_type=repo_type)
        return self.repos[repo_id]

    def gets(self, suffix: str = "") -> list[str]:
        """Paths of GET requests so far (optionally only those ending with suffix)."""
        with self.lock:
            return [p for m, p in self.requests if m == "GET" and p.endswith(suffix)]

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            state = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeHub

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._resolve(send_body=False)

    def do_GET(self) -> None:
        self._resolve(send_body=True)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        body = f'{{"error": "{message}"}}'.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _resolve(self, send_body: bool) -> None:
        match = _RESOLVE.match(urlsplit(self.path).path)
        if match is None:
            return self._error(404, "NotFound", "unknown route")
        repo_id, rev, path = match["repo"], unquote(match["rev"]), unquote(match["path"])
        with self.state.lock:
            self.state.requests.append((self.command, path))
            repo = self.state.repos.get(repo_id)
            data = repo.files.get(path) if repo is not None else None
        if repo is None or f"{repo.repo_type}s" != match["type"]:
            return self._error(401, "RepoNotFound", "Repository not found")
        if rev not in repo.revisions:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found", commit=COMMIT)

        etag = hashlib.sha256(data).hexdigest()
        start, status = 0, 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if rng and send_body:
            start = int(rng[1])
            end = int(rng[2]) + 1 if rng[2] else len(data)
            if start >= len(data):
                return self._error(416, "RangeNotSatisfiable", "Range not satisfiable", commit=COMMIT)
            status, body = 206, data[start:end]
        else:
            body = data
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Linked-Etag", f'"{etag}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)
