"""Deterministic identities: one page, one ``doc_id``; one chunk, one Milvus primary key.

Delivery relies on these being pure functions of the input: a redelivered page produces the
same ids, so its upserts overwrite themselves instead of duplicating rows. Two spellings of
the same address (``HTTP://Example.com:80/a/./b?utm_source=x#top`` and
``http://example.com/a/b``) must therefore collapse to one normalised URL before hashing.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import SplitResult, urlsplit, urlunsplit

__all__ = ["chunk_id", "doc_id", "normalize_url", "text_hash"]

_DEFAULT_PORTS = {"http": 80, "https": 443}

#: Query parameters that only track where a click came from; they never change the page.
_TRACKING_EXACT = frozenset({"fbclid", "gclid"})
_TRACKING_PREFIX = "utm_"

#: RFC 3986 character classes.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SUB_DELIMS = "!$&'()*+,;="
_PATH_SAFE = frozenset(_UNRESERVED | set(_SUB_DELIMS) | set(":@/"))
_QUERY_SAFE = frozenset(_PATH_SAFE | set("?"))
_USERINFO_SAFE = frozenset(_UNRESERVED | set(_SUB_DELIMS) | set(":"))

_PCT = re.compile(r"%([0-9A-Fa-f]{2})")

#: Highest chunk index whose id keeps lexical order = numeric order (``:05d``).
MAX_CHUNK_INDEX = 99_999


def _blake16(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _normalize_pct(component: str, safe: frozenset[str]) -> str:
    """One canonical spelling of a URL component (RFC 3986 section 6.2.2).

    Escapes of unreserved characters are decoded (``%7E`` -> ``~``), other escapes get
    uppercase hex (``%2f`` -> ``%2F``: still a literal slash, not a separator), and
    characters that may not appear raw (spaces, non-ASCII, a lone ``%``) are UTF-8
    percent-encoded. Without this, ``/caf%c3%a9``, ``/caf%C3%A9`` and ``/café`` would be three
    documents.
    """
    out: list[str] = []
    i, n = 0, len(component)
    while i < n:
        ch = component[i]
        if ch == "%":
            m = _PCT.match(component, i)
            if m:
                byte = int(m.group(1), 16)
                decoded = chr(byte)
                out.append(decoded if decoded in _UNRESERVED else f"%{byte:02X}")
                i += 3
                continue
            out.append("%25")
        elif ch in safe:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", errors="surrogatepass"))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4: ``/a/b/../c/./d`` -> ``/a/c/d``; never climbs above the root.

    A path ending in ``.``/``..`` keeps a trailing slash (``/a/b/..`` -> ``/a/``), as the RFC
    says: it names a directory.
    """
    segments = path.split("/")
    out: list[str] = []
    for idx, seg in enumerate(segments):
        last = idx == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    if path.startswith("/") and not result.startswith("/"):
        result = "/" + result
    return result


def _is_tracking(raw_key: str) -> bool:
    key = _PCT.sub(lambda m: chr(int(m.group(1), 16)), raw_key).lower()
    return key in _TRACKING_EXACT or key.startswith(_TRACKING_PREFIX)


def _normalize_query(query: str) -> str:
    """Drop tracking parameters and sort the rest, keeping each pair's raw spelling.

    The pairs are not decoded (``+`` and ``%20`` stay distinct, ``a`` and ``a=`` stay
    distinct) because servers may tell them apart; only the order, which servers almost
    never care about, is made canonical.
    """
    pairs: list[str] = []
    for part in query.split("&"):
        if not part:
            continue
        key = part.split("=", 1)[0]
        if _is_tracking(key):
            continue
        pairs.append(_normalize_pct(part, _QUERY_SAFE))
    pairs.sort(key=lambda p: (p.split("=", 1)[0], p))
    return "&".join(pairs)


def _host(parts: SplitResult, url: str) -> str:
    host = parts.hostname  # already lowercased, IPv6 brackets removed
    if not host:
        raise ValueError(f"URL has no host: {url!r}")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"URL host is not a valid domain name: {url!r}") from exc
    return f"[{host}]" if ":" in host else host


def _normalize_file(parts: SplitResult, url: str) -> str:
    """``file:///path`` (``localhost`` as host drops out): percent-escapes canonical, no
    fragment; the path as written otherwise (the fetch policy refuses ``..`` in it)."""
    if parts.netloc.lower() not in ("", "localhost"):
        raise ValueError(f"a file URL names a local path (file:///path), not a host: {url!r}")
    if parts.query:
        raise ValueError(f"a file URL has no query: {url!r}")
    if not parts.path.startswith("/"):
        raise ValueError(f"a file URL needs an absolute path: {url!r}")
    return "file://" + _normalize_pct(parts.path, _PATH_SAFE)


def normalize_url(url: str) -> str:
    """The canonical form of an http(s) or ``file://`` URL, the input of :func:`doc_id`.

    Lowercases scheme and host, drops the default port, the fragment (it never reaches the
    server) and tracking parameters (``utm_*``, ``fbclid``, ``gclid``), sorts the remaining
    query parameters, resolves ``.``/``..`` segments and canonicalises percent-escapes. An
    empty path becomes ``/`` (the same request); a trailing slash is otherwise kept as given,
    since ``/a`` and ``/a/`` may be different resources.

    Raises ``ValueError`` for anything but an absolute http(s) URL with a host or a
    ``file:///path`` URL (a local file: whether it may be read is the fetch policy's call,
    ``streams/netpolicy.py``; the webhook server refuses file URLs).
    """
    if not isinstance(url, str):
        raise ValueError(f"URL must be a string, got {type(url).__name__}")
    raw = url.strip()
    try:
        parts = urlsplit(raw)
    except ValueError as exc:  # e.g. an unbalanced IPv6 bracket
        raise ValueError(f"not a valid URL: {url!r} ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _normalize_file(parts, url)
    if scheme not in _DEFAULT_PORTS:
        shown = scheme or "none"
        raise ValueError(f"only http and https URLs are supported (scheme {shown}): {url!r}")
    host = _host(parts, url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"URL has an invalid port: {url!r}") from exc
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        netloc = f"{_normalize_pct(userinfo, _USERINFO_SAFE)}@{netloc}"
    path = _remove_dot_segments(_normalize_pct(parts.path, _PATH_SAFE)) or "/"
    query = _normalize_query(parts.query)
    return urlunsplit((scheme, netloc, path, query, ""))


def doc_id(url: str) -> str:
    """32 hex chars identifying a page: blake2b-128 of its normalised URL.

    Normalising first means every spelling of an address maps to one document, so its chunks
    are replaced rather than duplicated when it is requested again under another spelling.
    """
    return _blake16(normalize_url(url).encode("utf-8"))


_DOC_ID = re.compile(r"[0-9a-f]{32}")


def is_doc_id(value: str) -> bool:
    """Whether ``value`` has the shape :func:`doc_id` gives (what schemas/*.json require)."""
    return _DOC_ID.fullmatch(value) is not None


def chunk_id(doc_id: str, chunk_index: int) -> str:
    """The Milvus primary key of a chunk: ``<doc_id>:<index, 5 digits>``.

    Deterministic, so a redelivered chunk overwrites itself; zero-padded, so lexical order is
    chunk order and ``doc_id:`` prefixes select one document. Indexes outside 0..99999 are
    refused because they would break that order (a 20 MB page gives ~20,000 chunks).
    """
    if isinstance(chunk_index, bool) or not isinstance(chunk_index, int):
        raise ValueError(f"chunk_index must be an int, got {chunk_index!r}")
    if not 0 <= chunk_index <= MAX_CHUNK_INDEX:
        raise ValueError(f"chunk_index must be in 0..{MAX_CHUNK_INDEX}, got {chunk_index}")
    return f"{doc_id}:{chunk_index:05d}"


def text_hash(text: str) -> str:
    """blake2b-128 hex of the UTF-8 text: tells whether a chunk or document changed.

    ``surrogatepass`` keeps the function total: text decoded with ``surrogateescape`` still
    hashes instead of raising deep inside the pipeline.
    """
    return _blake16(text.encode("utf-8", errors="surrogatepass"))
