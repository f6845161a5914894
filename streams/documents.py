"""From a fetched page to its chunk messages: pure, so the expected index can be computed
without Kafka (tests, the benchmark's naive and bare runs) and agrees with the pipeline."""

from __future__ import annotations

from streams.chunking import Chunker
from streams.extract import extract_text
from streams.ids import doc_id, text_hash
from streams.messages import Chunk, utcnow


def page_chunks(
    url: str,
    body: bytes,
    content_type: str | None,
    chunker: Chunker,
    fetched_at: str | None = None,
) -> list[Chunk]:
    """The ``upsert`` chunks of one page (raises ``UnsupportedContent`` for non-text).

    A page with no text yields no chunks; the caller still sends a trim to count 0 so a
    page that became empty loses its old chunks.
    """
    extracted = extract_text(body, content_type, url)
    texts = chunker.chunk(extracted.text)
    did = doc_id(url)
    when = fetched_at or utcnow()
    dhash = text_hash(extracted.text)
    return [
        Chunk(
            op="upsert",
            doc_id=did,
            url=url,
            chunk_count=len(texts),
            chunk_index=i,
            text=t,
            text_hash=text_hash(t),
            doc_hash=dhash,
            fetched_at=when,
            title=extracted.title,
        )
        for i, t in enumerate(texts)
    ]


def trim(url: str, count: int) -> Chunk:
    """A document-level message: drop this page's chunks from ``count`` on (0 = all)."""
    return Chunk(op="delete", doc_id=doc_id(url), url=url, chunk_count=count)
