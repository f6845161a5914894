"""From a fetched page to its chunk messages: pure, so the expected index can be computed
without Kafka (tests, the benchmark's naive and bare runs) and agrees with the pipeline."""

from __future__ import annotations

import dataclasses
import time
from typing import Literal, NotRequired, TypedDict

from streams.chunking import Chunker
from streams.errors import TooManyChunks
from streams.extract import MAX_DEPTH, MAX_TEXT_CHARS, Extracted, extract_text
from streams.ids import doc_id, text_hash
from streams.messages import Chunk, utcnow
from streams.settings import Settings
from streams.structure import chunk_sections

#: Default of ``Settings.chunk_max_per_page`` (a test keeps them equal).
MAX_CHUNKS_PER_PAGE = 10_000

#: How pages are cut into chunks: ``structured`` (sections, each chunk prefixed by its
#: heading path; ``streams/structure.py``) or ``flat`` (the text as one stream of tokens, as
#: before version 2; kept for the quality benchmark).
ChunkStrategy = Literal["flat", "structured"]

CHUNKER_VERSION = 2
"""The chunker the fetch stage uses, recorded in each page's state. A page whose state was
made by another version is re-embedded whole (and fetched without HTTP validators: a 304
would leave it on the old chunks). 1: flat token windows; 2: structured sections with a
heading path. Raise it whenever the same page would give other chunk texts."""


@dataclasses.dataclass(frozen=True, slots=True)
class PageLimits:
    """What one page may cost to extract and chunk (docs/security.md); over it, the page is
    refused with a ``PageRefused`` naming the limit."""

    text_chars: int = MAX_TEXT_CHARS
    depth: int = MAX_DEPTH
    chunks: int = MAX_CHUNKS_PER_PAGE

    @classmethod
    def from_settings(cls, settings: Settings) -> PageLimits:
        return cls(
            text_chars=settings.extract_max_chars,
            depth=settings.extract_max_depth,
            chunks=settings.chunk_max_per_page,
        )


def _extract_and_chunk(
    url: str,
    body: bytes,
    content_type: str | None,
    chunker: Chunker,
    strategy: ChunkStrategy,
    limits: PageLimits,
) -> tuple[Extracted, list[tuple[str | None, str]]]:
    """The extracted page and its ``(section, text)`` chunks; refusals as ``PageRefused``."""
    if strategy not in ("flat", "structured"):
        raise ValueError(f"unknown chunk strategy {strategy!r}: 'flat' or 'structured'")
    structured = strategy == "structured"
    extracted = extract_text(
        body,
        content_type,
        url,
        max_chars=limits.text_chars,
        max_depth=limits.depth,
        structured=structured,
    )
    pairs: list[tuple[str | None, str]]
    if structured:
        pairs = [
            (section or None, text)
            for section, text in chunk_sections(
                extracted.sections, extracted.title, chunker, max_chunks=limits.chunks
            )
        ]
    else:
        pairs = [(None, t) for t in chunker.chunk(extracted.text)]
    if len(pairs) > limits.chunks:
        raise TooManyChunks(
            f"the page makes {len(pairs)} chunks, more than the limit {limits.chunks}"
        )
    return extracted, pairs


def chunk_document(
    body: bytes | str,
    content_type: str | None,
    url: str,
    chunker: Chunker,
    strategy: ChunkStrategy = "structured",
    *,
    limits: PageLimits = PageLimits(),  # frozen: one shared default is safe
) -> list[tuple[str | None, str]]:
    """``(section, text)`` of each chunk of one page, exactly as :func:`page_chunks` cuts
    it, without Kafka or messages: for the quality benchmark and tests. ``section`` is the
    heading path (``Page › Section``, ``None`` with ``flat``); ``text`` is what the model
    embeds. A ``str`` body is read as UTF-8 whatever charset ``content_type`` names.
    """
    if isinstance(body, str):
        mime = (content_type or "").split(";", 1)[0].strip()
        content_type = f"{mime}; charset=utf-8" if mime else None
        body = body.encode("utf-8", "surrogatepass")
    return _extract_and_chunk(url, body, content_type, chunker, strategy, limits)[1]


def page_chunks(
    url: str,
    body: bytes,
    content_type: str | None,
    chunker: Chunker,
    fetched_at: str | None = None,
    version: int | None = None,
    *,
    limits: PageLimits = PageLimits(),  # frozen: one shared default is safe
    strategy: ChunkStrategy = "structured",
    source: str | None = None,
) -> list[Chunk]:
    """The ``upsert`` chunks of one page.

    Raises a ``PageRefused`` (``streams.extract``) whose ``error_class`` is the dead-letter
    class: ``unsupported_content``, ``too_large``, ``too_deep``, ``too_many_chunks``.

    A page with no text yields no chunks; the caller still sends a trim to count 0 so a
    page that became empty loses its old chunks. ``version`` (see :func:`page_version`)
    lets the writer refuse to replace a newer version of the page with these chunks.
    ``source`` is the ``urls`` request's, for search filters. ``strategy`` picks the
    chunker (:data:`ChunkStrategy`); the pipeline uses the default, :data:`CHUNKER_VERSION`.
    """
    extracted, pairs = _extract_and_chunk(url, body, content_type, chunker, strategy, limits)
    did = doc_id(url)
    when = fetched_at or utcnow()
    dhash = text_hash(extracted.text)
    return [
        Chunk(
            op="upsert",
            doc_id=did,
            url=url,
            chunk_count=len(pairs),
            chunk_index=i,
            text=t,
            text_hash=text_hash(t),
            doc_hash=dhash,
            fetched_at=when,
            title=extracted.title,
            section=section,
            version=version,
            source=source,
        )
        for i, (section, t) in enumerate(pairs)
    ]


def trim(url: str, count: int, version: int | None = None) -> Chunk:
    """A document-level message: drop this page's chunks from ``count`` on (0 = all).

    With a ``version``, the writer remembers it as the page's (a tombstone when the count
    is 0): an older chunk that arrives later, e.g. a redriven dead letter, is dropped.
    """
    return Chunk(op="delete", doc_id=doc_id(url), url=url, chunk_count=count, version=version)


VERSION_SLOTS = 1_000_000
"""Versions per millisecond: the urls offset's last six digits order two fetches of one
page within the same millisecond."""


def page_version(
    offset: int,
    timestamp_s: float | None = None,
    now_s: float | None = None,
    after: int | None = None,
) -> int:
    """The version of a page fetched now for the ``urls`` message at ``offset``: epoch
    milliseconds x 10^6 + offset mod 10^6, so a later fetch of a page has a higher one.

    The clock is the later of this machine's and the message's timestamp (``timestamp_s``),
    so a fetch worker whose clock lags cannot give a newer fetch a version below the
    previous one by more than the lag between the clocks that stamped them; ``after``, the
    version the page state remembers, closes that gap: the result is always above it, so
    workers with skewed clocks still hand out increasing versions for one page. Fits INT64
    until the year 2262.
    """
    now = time.time() if now_s is None else now_s
    ms = int(max(now, timestamp_s or 0.0) * 1000)
    version = ms * VERSION_SLOTS + offset % VERSION_SLOTS
    return version if after is None else max(version, after + 1)


STATE_MAX_HASHES = 10_000
"""Chunk hashes a page's state keeps; chunks past it are re-embedded on every change."""
VALIDATOR_MAX_CHARS = 1024
"""Longest ETag / Last-Modified kept; a longer one is dropped (the page is fetched whole)."""
STATE_MAX_LINKS = 1000
"""Out-links a crawled page's state keeps (``streams.crawl.MAX_LINKS`` per page are read)."""


class DocStateRecord(TypedDict):
    """A ``DocState`` as JSON in the page-state topic; the optional keys are absent when unset
    (records written before they existed lack them too)."""

    doc_hash: str
    hashes: list[str]
    etag: str | None
    last_modified: str | None
    requested_at: NotRequired[str]
    version: NotRequired[int]
    chunker_version: NotRequired[int]  # absent in records of chunker version 1
    links: NotRequired[list[str]]  # a crawled page's out-links; absent: never crawled
    canonical: NotRequired[str]  # the crawled page named this URL its canonical one


@dataclasses.dataclass(frozen=True, slots=True)
class DocState:
    """What the fetch stage remembers of a page: HTTP validators, its chunks' hashes, and
    the ``requested_at`` of the newest request handled for it (a delayed retry older than
    that is superseded). A page deleted or gone keeps a state with no hashes, so that an
    older retry cannot bring it back."""

    doc_hash: str
    hashes: tuple[str, ...]
    etag: str | None = None
    last_modified: str | None = None
    requested_at: str | None = None
    version: int | None = None  # of the last update sent for the page
    #: The chunker that made ``hashes`` (:data:`CHUNKER_VERSION`); another one means the
    #: page is re-fetched without validators and re-embedded whole.
    chunker_version: int = CHUNKER_VERSION
    #: A crawled page's out-links (``streams/crawl.py``), at most :data:`STATE_MAX_LINKS`:
    #: a 304 has no body, and a re-crawl of an unchanged page must still find its links.
    #: ``None``: the page's links were never read (a crawl fetches it without validators).
    links: tuple[str, ...] | None = None
    #: The crawled page named this other URL its canonical one: it is not indexed itself.
    canonical: str | None = None

    @property
    def current(self) -> bool:
        """Whether this page was chunked by the chunker of this code."""
        return self.chunker_version == CHUNKER_VERSION

    def capped(self) -> DocState:
        """Within the caps above: a state record must always fit its topic's limit."""
        etag, modified = self.etag, self.last_modified
        return dataclasses.replace(
            self,
            hashes=self.hashes[:STATE_MAX_HASHES],
            links=self.links[:STATE_MAX_LINKS] if self.links is not None else None,
            etag=etag if etag is None or len(etag) <= VALIDATOR_MAX_CHARS else None,
            last_modified=(
                modified if modified is None or len(modified) <= VALIDATOR_MAX_CHARS else None
            ),
        )

    def to_json(self) -> DocStateRecord:
        out = DocStateRecord(
            doc_hash=self.doc_hash,
            hashes=list(self.hashes),
            etag=self.etag,
            last_modified=self.last_modified,
        )
        if self.requested_at is not None:
            out["requested_at"] = self.requested_at
        if self.version is not None:
            out["version"] = self.version
        out["chunker_version"] = self.chunker_version
        if self.links is not None:
            out["links"] = list(self.links)
        if self.canonical is not None:
            out["canonical"] = self.canonical
        return out

    @classmethod
    def from_json(cls, obj: DocStateRecord | None) -> DocState | None:
        if not obj:
            return None
        return cls(
            doc_hash=str(obj["doc_hash"]),
            hashes=tuple(obj["hashes"]),
            etag=obj.get("etag"),
            last_modified=obj.get("last_modified"),
            requested_at=obj.get("requested_at"),
            version=obj.get("version"),
            # Records from before the field were made by the flat chunker: version 1.
            chunker_version=int(obj.get("chunker_version", 1)),
            links=tuple(obj["links"]) if "links" in obj else None,
            canonical=obj.get("canonical"),
        )


def plan_update(url: str, new: list[Chunk], prev: DocState | None, force: bool) -> list[Chunk]:
    """The messages that bring the index from ``prev`` to ``new``, re-embedding only what
    changed.

    Chunks whose text is unchanged at their index are not sent (their vectors stay); every
    sent chunk carries the new ``chunk_count``, so the writer trims a page that shrank; a
    page that shrank without any changed chunk gets a trim of its own; an empty page loses
    all its chunks. Because chunks are overwritten in place, a page is never left with
    neither its old nor its new chunks. A page whose state another chunker version made
    sends every chunk, as with ``force``: its hashes describe other chunks.
    """
    if not new:
        return [trim(url, 0)]
    if prev is None or force or not prev.current:
        return list(new)
    changed = [
        c
        for c in new
        if c.chunk_index is None
        or c.chunk_index >= len(prev.hashes)
        or prev.hashes[c.chunk_index] != c.text_hash
    ]
    if not changed and len(new) < len(prev.hashes):
        return [trim(url, len(new))]
    return changed
