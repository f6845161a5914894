"""The demo and benchmark corpus, and a local HTTP server that serves it like a slow API.

The corpus is the Django documentation: the 656 ``.txt`` files under ``docs/`` of the
``django==5.2.19`` sdist from PyPI, fetched once with pip into the cache. The server adds a
per-request latency (so fetching behaves like a remote API), and answers conditional
requests (ETag / Last-Modified) the way a real server does.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import mimetypes
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from streams.errors import RagstreamError

log = logging.getLogger(__name__)

DJANGO_VERSION = "5.2.19"


def ensure_django_docs(cache_dir: Path, version: str = DJANGO_VERSION) -> Path:
    """The ``docs/`` folder of the Django sdist, downloaded (pip) and unpacked once."""
    root = cache_dir / f"django-{version}-docs"
    marker = root / ".complete"
    if marker.exists():
        return root / "docs"
    dl = cache_dir / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = dl / f"django-{version}.tar.gz"
    if not sdist.exists():
        print(f"downloading the django=={version} sdist from PyPI (once) ...", file=sys.stderr)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                str(dl),
                f"django=={version}",
            ],
            capture_output=True,
            text=True,
        )
        found = sorted(dl.glob(f"[dD]jango-{version}.tar.gz"))
        if proc.returncode != 0 or not found:
            raise RagstreamError(f"could not download django=={version}: {proc.stderr[-800:]}")
        found[0].rename(sdist) if found[0] != sdist else None
    tmp = root.with_suffix(".tmp")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/docs/" in m.name and m.isfile()]
        for m in members:
            m.name = m.name.split("/", 1)[1]  # strip "django-5.2.19/"
        tar.extractall(tmp, members=members, filter="data")
    root.mkdir(parents=True, exist_ok=True)
    (tmp / "docs").replace(root / "docs")
    marker.write_text(version)
    return root / "docs"


def corpus_files(docs: Path) -> list[Path]:
    """The corpus documents, in a stable order."""
    return sorted(p for p in docs.rglob("*.txt") if p.is_file())


def subset(files: list[Path], n: int) -> list[Path]:
    """A deterministic, spread-out sample of ``n`` files (every k-th), for quick runs."""
    if n <= 0 or n >= len(files):
        return files
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def _content_type(path: Path) -> str:
    if path.suffix in (".txt", ".rst", ""):
        return "text/plain; charset=utf-8"
    guessed = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


def _fresh(
    if_none_match: str | None, if_modified_since: str | None, etag: str, mtime: float
) -> bool:
    """RFC 9110: If-None-Match decides when present; else If-Modified-Since."""
    if if_none_match is not None:
        return etag in [t.strip() for t in if_none_match.split(",")] or if_none_match == "*"
    if if_modified_since:
        try:
            since = email.utils.parsedate_to_datetime(if_modified_since).timestamp()
        except (TypeError, ValueError):
            return False
        return int(mtime) <= since
    return False


class CorpusHandler(BaseHTTPRequestHandler):
    """The request a ``CorpusServer`` hook receives; ``reply`` answers it in one call."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(
        self, status: int, body: bytes, ctype: str | None, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)


class CorpusServer:
    """Serves ``root`` over HTTP on 127.0.0.1 with ``latency_s`` per request, in a thread.

    ``hook`` sees every request first and returns True when it has answered it (tests make
    pages fail, stall or change with it)."""

    def __init__(
        self,
        root: Path,
        latency_s: float = 0.0,
        port: int = 0,
        hook: Callable[[CorpusHandler], bool] | None = None,
    ) -> None:
        self.root = root.resolve()
        self.latency_s = latency_s
        self.hook = hook
        self.requests = 0
        self.not_modified = 0
        server = self

        class Handler(CorpusHandler):
            def do_GET(self) -> None:
                server.requests += 1
                if server.latency_s:
                    time.sleep(server.latency_s)
                if server.hook is not None and server.hook(self):
                    return
                path = (server.root / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
                if server.root not in path.parents or not path.is_file():
                    self.reply(404, b"not found", "text/plain")
                    return
                body = path.read_bytes()
                etag = '"' + hashlib.blake2b(body, digest_size=8).hexdigest() + '"'
                mtime = email.utils.formatdate(path.stat().st_mtime, usegmt=True)
                if _fresh(
                    self.headers.get("If-None-Match"),
                    self.headers.get("If-Modified-Since"),
                    etag,
                    path.stat().st_mtime,
                ):
                    server.not_modified += 1
                    self.reply(304, b"", None, {"ETag": etag, "Last-Modified": mtime})
                    return
                ctype = _content_type(path)
                self.reply(200, body, ctype, {"ETag": etag, "Last-Modified": mtime})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def url_of(self, path: Path) -> str:
        return self.base_url + quote(str(path.resolve().relative_to(self.root)))

    def __enter__(self) -> CorpusServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
