"""Hostile and unreliable local HTTP servers for the fetcher's tests (loopback only).

- ``SecretServer``: a socket server on another loopback address (127.0.0.2) that counts
  every TCP connection it accepts: the SSRF tests prove it saw none.
- ``HostileServer``: a threaded HTTP server on 127.0.0.1 whose paths are routes (redirects,
  compression bombs, slow drips, robots.txt...), counting requests per path.
- ``FlakySite``: a documentation site that rate-limits (429 + Retry-After past N
  requests/s) and, deterministically from a seed, answers 500 or cuts bodies short.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SECRET = "TOP-SECRET-7f3a: the launch codes are 0000"


class SecretServer:
    """Serves ``SECRET`` on ``host`` (a loopback alias) and counts accepted connections."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/secret.txt"

    def _serve(self) -> None:
        body = SECRET.encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                conn.recv(65536)
                conn.sendall(head + body)

    def __enter__(self) -> SecretServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


Route = Callable[[BaseHTTPRequestHandler], None]


def send(
    h: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    ctype: str | None = "text/plain; charset=utf-8",
    headers: dict[str, str] | None = None,
) -> None:
    h.send_response(status)
    if ctype:
        h.send_header("Content-Type", ctype)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if body:
        h.wfile.write(body)


def text(body: str, ctype: str = "text/plain; charset=utf-8") -> Route:
    return lambda h: send(h, 200, body.encode(), ctype)


def redirect(to: str, status: int = 302) -> Route:
    return lambda h: send(h, status, b"", None, {"Location": to})


def cut_off(h: BaseHTTPRequestHandler, body: bytes) -> None:
    """Declares the whole body, sends a part of it, and closes the connection."""
    h.send_response(200)
    h.send_header("Content-Type", "text/plain; charset=utf-8")
    h.send_header("Content-Length", str(len(body) + 5000))
    h.end_headers()
    h.wfile.write(body[: len(body) // 2])
    h.wfile.flush()
    h.close_connection = True
    with contextlib.suppress(OSError):
        h.connection.shutdown(socket.SHUT_RDWR)


@functools.cache
def zeros_gzip(mib: int, layers: int = 1) -> bytes:
    """``mib`` MiB of zeros, gzipped ``layers`` times (64 MiB, twice: a few hundred bytes)."""
    data = bytes(mib * 1024 * 1024)
    for _ in range(layers):
        data = gzip.compress(data, compresslevel=9)
    return data


def encoded(body: bytes, encoding: str, ctype: str = "text/plain; charset=utf-8") -> Route:
    return lambda h: send(h, 200, body, ctype, {"Content-Encoding": encoding})


def slow_drip(interval_s: float, total: int = 10_000) -> Route:
    """Declares ``total`` bytes and sends one every ``interval_s`` (each read succeeds).

    The drip ends when the client goes away or when its ``HostileServer`` closes, so a
    client that never gives up cannot leave the thread dripping after the test.
    """

    def route(h: BaseHTTPRequestHandler) -> None:
        closing: threading.Event = getattr(h.server, "closing", None) or threading.Event()
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(total))
        h.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(total):
                h.wfile.write(b"x")
                h.wfile.flush()
                if closing.wait(interval_s):
                    break
        h.close_connection = True

    return route


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that went away (cut-off bodies, deadlines): expected here


class HostileServer:
    """A threaded HTTP/1.1 server on 127.0.0.1: ``routes[path](handler)`` answers each GET
    (404 for other paths); ``hits[path]`` counts requests."""

    def __init__(self, routes: dict[str, Route] | None = None, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.hits: dict[str, int] = {}
        self.headers: dict[str, list[dict[str, str]]] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                server.hits[path] = server.hits.get(path, 0) + 1
                server.headers.setdefault(path, []).append(dict(self.headers))
                route = server.routes.get(path)
                if route is None:
                    send(self, 404, b"not found")
                else:
                    route(self)

        self.httpd = _QuietServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.closing = threading.Event()  # long routes (slow drips) stop on it
        self.port = self.httpd.server_address[1]
        self.host = host
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class FlakySite:
    """Pages ``/p/<i>.txt`` behind a rate limit and the usual share of failures.

    Past ``rate`` requests in the last second, a request gets ``429`` with
    ``Retry-After: 1``. Of the others, ``p500`` answer 500 and ``p_cut`` send half their
    body and close. Which request fails is decided by a hash of (seed, path, n-th served
    request of that path), so a run is repeatable whatever the order requests arrive in.
    """

    def __init__(
        self,
        pages: dict[str, str],
        rate: int = 25,
        p500: float = 0.15,
        p_cut: float = 0.05,
        seed: int = 8,
        robots: str | None = None,
    ) -> None:
        self.pages = pages
        self.rate = rate
        self.p500 = p500
        self.p_cut = p_cut
        self.seed = seed
        self.robots = robots
        self.lock = threading.Lock()
        self.recent: deque[float] = deque()
        self.served: dict[str, int] = {}
        self.ok: dict[str, int] = {}
        self.count = {"429": 0, "500": 0, "cut": 0, "200": 0}
        routes = {path: self._route for path in pages}
        if robots is not None:
            routes["/robots.txt"] = self._route
        self.server = HostileServer(routes)

    def roll(self, path: str, n: int) -> float:
        digest = hashlib.sha256(f"{self.seed}:{path}:{n}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def _route(self, h: BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0] <= now - 1.0:
                self.recent.popleft()
            limited = len(self.recent) >= self.rate
            if not limited:
                self.recent.append(now)
                n = self.served[path] = self.served.get(path, 0) + 1
                roll = self.roll(path, n)
                kind = (
                    "500" if roll < self.p500 else "cut" if roll < self.p500 + self.p_cut else "200"
                )
            else:
                kind = "429"
            self.count[kind] += 1
            if kind == "200":
                self.ok[path] = self.ok.get(path, 0) + 1
        body = (self.robots if path == "/robots.txt" else self.pages[path]) or ""
        if kind == "429":
            send(h, 429, b"slow down", headers={"Retry-After": "1"})
        elif kind == "500":
            send(h, 500, b"oops")
        elif kind == "cut":
            cut_off(h, body.encode())
        else:
            send(h, 200, body.encode())

    def url(self, path: str) -> str:
        return self.server.url(path)

    def __enter__(self) -> FlakySite:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)


def deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


# --- PDFs: made here, never committed as binaries ------------------------------------------


def _pdf_string(line: str) -> str:
    return "(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def make_pdf(pages: list[str], title: str | None = None, password: str | None = None) -> bytes:
    """A real PDF (written by pypdf) with one Helvetica text page per item of ``pages``
    (lines split on newlines, Latin-1 text), an optional ``/Title`` and an optional user
    password (pypdf's default encryption)."""
    import io

    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    font = writer._add_object(
        DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
            }
        )
    )
    for text in pages:
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
        ops = ["BT", "/F1 11 Tf", "13 TL", "72 740 Td"]
        ops += [f"{_pdf_string(line)} Tj T*" for line in text.split("\n")]
        ops.append("ET")
        content = DecodedStreamObject()
        content.set_data("\n".join(ops).encode("latin-1"))
        page[NameObject("/Contents")] = writer._add_object(content)
    if title is not None:
        writer.add_metadata({"/Title": title})
    if password is not None:
        writer.encrypt(password)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def raw_pdf(objects: list[bytes], root: int = 1) -> bytes:
    """A PDF file of ``objects`` (object ``n`` is ``objects[n - 1]``, its body without
    ``n 0 obj``) with a correct cross-reference table: hostile structures that no writer
    would make."""
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        root,
        xref,
    )
    return bytes(out)


_FONT = b"/Resources << /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >>"
_PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R " + _FONT + b" >>"
_TEXT = b"<< /Length 38 >>\nstream\nBT /F1 11 Tf 72 740 Td (hostile) Tj ET\nendstream"


def pdf_page_cycle() -> bytes:
    """A page tree whose ``/Pages`` node lists itself among its kids: a naive walk never
    ends."""
    return raw_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R 2 0 R] /Count 2 >>",
            _PAGE,
            _TEXT,
        ]
    )


def pdf_deep_tree(depth: int = 5000) -> bytes:
    """``/Pages`` nodes nested ``depth`` deep above one page: a recursive walk overflows."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    first = 2
    for i in range(depth):
        n = first + i
        parent = b"" if i == 0 else b" /Parent %d 0 R" % (n - 1)
        objects.append(b"<< /Type /Pages /Kids [%d 0 R] /Count 1%s >>" % (n + 1, parent))
    leaf = first + depth
    contents = leaf + 1
    objects.append(
        b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Contents %d 0 R %s >>"
        % (leaf - 1, contents, _FONT)
    )
    objects.append(_TEXT)
    return raw_pdf(objects)


def pdf_many_pages(pages: int) -> bytes:
    """``pages`` entries in one ``/Kids`` array, every one the same small page object: a
    file of a few bytes a page that claims a book."""
    kids = b" ".join([b"3 0 R"] * pages)
    return raw_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
            _PAGE,
            _TEXT,
        ]
    )


def pdf_stream_bomb(mib: int) -> bytes:
    """One page whose content stream inflates (FlateDecode) to ``mib`` MiB: a line of text,
    then spaces."""
    packed = zlib.compress(b"BT /F1 11 Tf 72 740 Td (bomb) Tj ET" + b" " * (mib * 1024 * 1024), 9)
    return raw_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            _PAGE,
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed)
            + packed
            + b"\nendstream",
        ]
    )


def pdf_operator_bomb(operators: int) -> bytes:
    """One page whose content stream shows ``operators`` one-letter strings: a few KB that
    cost pypdf ~20 us each (a million: about 20 s), within every size limit; only the
    extraction deadline stops it."""
    data = b"BT /F1 11 Tf 72 740 Td " + b"(a) Tj " * operators + b"ET"
    packed = zlib.compress(data, 9)
    return raw_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            _PAGE,
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed)
            + packed
            + b"\nendstream",
        ]
    )
