"""A local fake of the GitHub REST API and raw-content host, with GitHub's rate limits.

It serves one repository (paths -> bytes) at one commit, under ``/api`` (the REST API:
``/repos/{o}/{r}``, ``/commits/{ref}``, ``/git/trees/{sha}``) and ``/raw`` (raw files), on
127.0.0.1 from a thread, so both an in-process client and a worker process can reach it.

What it enforces, on API requests only:

- a **primary** limit: ``limit`` requests per ``window_s``; every answer carries
  ``X-RateLimit-Limit/Remaining/Reset``, and a request over the limit gets ``403`` with
  ``Remaining: 0`` and the reset time, as GitHub answers.
- a **secondary** limit: every ``secondary_every``-th request is answered ``429`` with
  ``Retry-After: <secondary_after>`` (or, with ``secondary_headers=False``, a ``403``
  "secondary rate limit" without headers, for the backoff path), and the
  ``secondary_times - 1`` requests after it too.
- **truncation**: with ``truncate_above=N``, a recursive trees answer of more than ``N``
  entries lists only the first ``N`` and says ``truncated: true`` (GitHub's cut is 100,000
  entries or 7 MB).
- a **token**: with ``token``, API requests need ``Authorization: Bearer <token>`` (else
  401) and raw files ``Authorization: token <token>`` (else 404, as for a private repo).

``stats`` counts what happened, ``early`` the requests sent while the server had said the
limit was spent (a client that does that gets banned by GitHub).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = hashlib.sha1(b"the one commit").hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class FakeGitHub:
    def __init__(
        self,
        files: dict[str, bytes],
        repo: str = "owner/repo",
        *,
        default_branch: str = "main",
        limit: int = 1000,
        window_s: float = 2.0,
        secondary_every: int = 0,
        secondary_after: int = 1,
        secondary_headers: bool = True,
        secondary_times: int = 1,
        truncate_above: int = 0,
        token: str = "",
    ) -> None:
        self.files = files
        self.repo = repo
        self.default_branch = default_branch
        self.limit = limit
        self.window_s = window_s
        self.secondary_every = secondary_every
        self.secondary_after = secondary_after
        self.secondary_headers = secondary_headers
        self.secondary_times = secondary_times
        self._secondary_left = 0
        self.truncate_above = truncate_above
        self.token = token
        self.stats: Counter[str] = Counter()
        self.api_auth: list[str | None] = []
        self.raw_auth: list[str | None] = []
        self._lock = threading.Lock()
        self._window_end = 0.0
        self._used = 0
        self._blocked_until = 0.0
        self._trees: dict[str, list[dict[str, Any]]] = {}
        self.root = self._build("")
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- the repository ---------------------------------------------------------------------

    def _build(self, prefix: str) -> str:
        """The tree of directory ``prefix`` (``""`` or ``"a/b/"``); returns its sha."""
        entries: dict[str, dict[str, Any]] = {}
        for path in sorted(self.files):
            if not path.startswith(prefix):
                continue
            head, _, rest = path[len(prefix) :].partition("/")
            if rest:
                if head not in entries:
                    entries[head] = {"path": head, "mode": "040000", "type": "tree",
                                     "sha": self._build(f"{prefix}{head}/")}  # fmt: skip
            else:
                data = self.files[path]
                entries[head] = {"path": head, "mode": "100644", "type": "blob",
                                 "sha": _sha(data), "size": len(data)}  # fmt: skip
        listing = list(entries.values())
        sha = _sha(json.dumps([prefix, listing]).encode())
        self._trees[sha] = listing
        return sha

    def _recursive(self, sha: str, prefix: str = "") -> list[dict[str, Any]]:
        out = []
        for entry in self._trees[sha]:
            out.append({**entry, "path": prefix + entry["path"]})
            if entry["type"] == "tree":
                out.extend(self._recursive(entry["sha"], f"{prefix}{entry['path']}/"))
        return out

    # --- serving ----------------------------------------------------------------------------

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api(self) -> str:
        return f"{self.base}/api"

    @property
    def raw(self) -> str:
        return f"{self.base}/raw"

    def __enter__(self) -> FakeGitHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _rate(self, now: float) -> tuple[int, int, int] | None:
        """``(status, remaining, reset)`` for a refusal, else None after counting the
        request; call with the lock held."""
        if now >= self._window_end:
            self._window_end = math.ceil(now + self.window_s)  # GitHub's reset: unix seconds
            self._used = 0
        self.stats["api"] += 1
        if now < self._blocked_until:
            self.stats["early"] += 1
        hit = self.secondary_every and self.stats["api"] % self.secondary_every == 0
        if hit and self._secondary_left == 0:
            self._secondary_left = self.secondary_times
        if self._secondary_left > 0:
            self._secondary_left -= 1
            self.stats["secondary"] += 1
            self._blocked_until = max(self._blocked_until, now + self.secondary_after)
            return 429 if self.secondary_headers else 403, self.limit - self._used, 0
        if self._used >= self.limit:
            self.stats["primary"] += 1
            self._blocked_until = max(self._blocked_until, self._window_end)
            return 403, 0, int(self._window_end)
        self._used += 1
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def send(self, status: int, body: Any, headers: dict[str, str] | None = None,
                     ctype: str = "application/json") -> None:  # fmt: skip
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path = unquote(parts.path)
                if path.startswith("/raw/"):
                    self.raw(path.removeprefix("/raw/"))
                elif path.startswith("/api/"):
                    self.api(path.removeprefix("/api"), parse_qs(parts.query))
                else:
                    self.send(404, b"not found", ctype="text/plain")

            def raw(self, rest: str) -> None:
                auth = self.headers.get("Authorization")
                fake.raw_auth.append(auth)
                prefix = f"{fake.repo}/"
                ref, _, path = rest.removeprefix(prefix).partition("/")
                ok_ref = ref in (fake.default_branch, COMMIT, "v1")
                if fake.token and auth != f"token {fake.token}":
                    ok_ref = False
                if not rest.startswith(prefix) or not ok_ref or path not in fake.files:
                    self.send(404, b"404: Not Found", ctype="text/plain")
                    return
                fake.stats["raw"] += 1
                self.send(200, fake.files[path], ctype="text/plain; charset=utf-8")

            def api(self, path: str, query: dict[str, list[str]]) -> None:
                auth = self.headers.get("Authorization")
                fake.api_auth.append(auth)
                now = time.time()
                with fake._lock:
                    refused = fake._rate(now)
                    remaining = max(fake.limit - fake._used, 0)
                    reset = int(fake._window_end)
                headers = {
                    "X-RateLimit-Limit": str(fake.limit),
                    "X-RateLimit-Remaining": str(remaining),
                    "X-RateLimit-Reset": str(reset),
                }
                if refused is not None:
                    status = refused[0]
                    if status == 403 and refused[1] == 0:
                        message = "API rate limit exceeded for 127.0.0.1."
                    else:
                        message = "You have exceeded a secondary rate limit."
                        if fake.secondary_headers:
                            headers = {"Retry-After": str(fake.secondary_after)}
                        else:
                            headers = {}
                    self.send(status, {"message": message}, headers)
                    return
                if fake.token and auth != f"Bearer {fake.token}":
                    self.send(401, {"message": "Bad credentials"}, headers)
                    return
                self.route(path, query, headers)

            def route(self, path: str, query: dict[str, list[str]], headers: dict[str, str]
                      ) -> None:  # fmt: skip
                base = f"/repos/{fake.repo}"
                if path == base:
                    body = {"full_name": fake.repo, "default_branch": fake.default_branch}
                    self.send(200, body, headers)
                elif path.startswith(f"{base}/commits/"):
                    ref = path.removeprefix(f"{base}/commits/")
                    if ref not in (fake.default_branch, COMMIT, "v1"):
                        self.send(422, {"message": f"No commit found for SHA: {ref}"}, headers)
                        return
                    body = {"sha": COMMIT, "commit": {"tree": {"sha": fake.root}}}
                    self.send(200, body, headers)
                elif path.startswith(f"{base}/git/trees/"):
                    sha = path.removeprefix(f"{base}/git/trees/")
                    if sha not in fake._trees:
                        self.send(404, {"message": "Not Found"}, headers)
                        return
                    fake.stats["trees"] += 1
                    truncated = False
                    if query.get("recursive"):
                        entries = fake._recursive(sha)
                        cut = fake.truncate_above
                        if cut and len(entries) > cut:
                            entries, truncated = entries[:cut], True
                            fake.stats["truncated"] += 1
                    else:
                        entries = fake._trees[sha]
                    body = {"sha": sha, "tree": entries, "truncated": truncated}
                    self.send(200, body, headers)
                else:
                    self.send(404, {"message": "Not Found"}, headers)

        return Handler
