"""The Milvus sink: one bulk upsert (plus one trim delete) per window, and search.

Primary keys are deterministic chunk ids, so writing a window twice (a redelivery after
a crash) leaves Milvus as if it was written once. Milvus Lite allows one process per data
path: only the writer stage opens it while a pipeline runs (see docs/decisions.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from streams.ids import chunk_id
from streams.messages import Vector
from streams.settings import Settings

log = logging.getLogger(__name__)

TEXT_MAX = 65535
MAX_REQUEST_ROWS = 1000  # keeps an upsert request well under Milvus' 64 MB limit


class StoreUnavailable(RuntimeError):
    """Milvus cannot be opened or written now; the caller retries (it is not the data)."""


class SchemaMismatch(ValueError):
    """A vector that does not fit the collection (another model or dimension)."""


@dataclasses.dataclass(slots=True)
class Window:
    """What one window does to Milvus: rows to upsert, and per document the chunk count
    beyond which its chunks are removed."""

    rows: dict[str, Vector] = dataclasses.field(default_factory=dict)
    trims: dict[str, int] = dataclasses.field(default_factory=dict)


def reduce_window(vectors: Iterable[Vector]) -> Window:
    """Fold a window's messages, in offset order, into its net effect on Milvus.

    The latest message of a document decides its chunk count; the latest version of a
    chunk wins; rows beyond the final count are not written at all.
    """
    win = Window()
    for vec in vectors:
        c = vec.chunk
        win.trims[c.doc_id] = c.chunk_count
        if c.op == "upsert":
            assert c.chunk_index is not None
            win.rows[chunk_id(c.doc_id, c.chunk_index)] = vec
    win.rows = {
        k: v for k, v in win.rows.items() if (v.chunk.chunk_index or 0) < win.trims[v.chunk.doc_id]
    }
    return win


def trim_filter(trims: dict[str, int]) -> str | None:
    """One boolean expression removing, for every document, the chunks beyond its count."""
    if not trims:
        return None
    by_count: dict[int, list[str]] = {}
    for doc, count in trims.items():
        by_count.setdefault(count, []).append(doc)
    parts = []
    for count, docs in sorted(by_count.items()):
        ids = ", ".join(f'"{d}"' for d in sorted(docs))
        parts.append(f"(doc_id in [{ids}] and chunk_index >= {count})")
    return " or ".join(parts)


def row_of(vec: Vector, with_sparse: bool) -> dict[str, Any]:
    c = vec.chunk
    row: dict[str, Any] = {
        "id": chunk_id(c.doc_id, c.chunk_index or 0),
        "doc_id": c.doc_id,
        "chunk_index": c.chunk_index,
        "url": c.url[:2048],
        "title": (c.title or "")[:512],
        "text": (c.text or "")[:TEXT_MAX],
        "text_hash": c.text_hash or "",
        "doc_hash": c.doc_hash or "",
        "dense": vec.dense,
    }
    if with_sparse:
        row["sparse"] = vec.sparse.as_dict() if vec.sparse is not None else {}
    return row


def _let_pymilvus_import() -> None:
    """pymilvus parses ``MILVUS_URI`` when imported and refuses a Lite path there; ragstream
    has already read it into Settings (where a Lite path is valid), so hide such a value
    from pymilvus."""
    uri = os.environ.get("MILVUS_URI", "")
    if uri and not uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:")):
        os.environ.pop("MILVUS_URI")


@dataclasses.dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    url: str
    title: str
    text: str
    chunk_index: int


class MilvusStore:
    """A Milvus collection of chunks; created on the first window, with its dimension."""

    def __init__(self, settings: Settings) -> None:
        _let_pymilvus_import()
        from pymilvus import MilvusClient  # noqa: PLC0415

        self.uri = settings.milvus_target
        self.name = settings.collection
        if settings.milvus_is_lite:
            from pathlib import Path  # noqa: PLC0415

            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client = MilvusClient(self.uri, token=settings.milvus_token or "")
        except Exception as exc:
            hint = ""
            if settings.milvus_is_lite:
                hint = (
                    " (Milvus Lite allows one process per file: is a ragstream worker with the "
                    "write stage running on it? Stop it, or serve the file with `milvus-lite "
                    "server` and set MILVUS_URI to that server)"
                )
            raise StoreUnavailable(f"cannot open Milvus at {self.uri}: {exc}{hint}") from exc
        self.dim: int | None = None
        self.sparse: bool = False
        self.model: str | None = None
        if self.client.has_collection(self.name):
            self._read_schema()

    def _read_schema(self) -> None:
        desc = self.client.describe_collection(self.name)
        for f in desc["fields"]:
            if f["name"] == "dense":
                self.dim = int(f["params"]["dim"])
            if f["name"] == "sparse":
                self.sparse = True
        self.model = desc.get("description") or None
        self.client.load_collection(self.name)

    def ensure_collection(self, model: str, dim: int, sparse: bool) -> None:
        if self.dim is not None:
            if dim != self.dim:
                raise SchemaMismatch(
                    f"vector of dimension {dim} ({model}) does not fit collection "
                    f"{self.name!r} (dimension {self.dim}, {self.model}); use another "
                    "RAGSTREAM_COLLECTION for another model"
                )
            return
        from pymilvus import DataType  # noqa: PLC0415

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("doc_id", DataType.VARCHAR, max_length=32)
        schema.add_field("chunk_index", DataType.INT64)
        schema.add_field("url", DataType.VARCHAR, max_length=2048)
        schema.add_field("title", DataType.VARCHAR, max_length=512)
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX)
        schema.add_field("text_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("doc_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
        index = self.client.prepare_index_params()
        index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
        if sparse:
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        self.client.create_collection(
            self.name, schema=schema, index_params=index, description=model
        )
        log.info("created collection %s (%s, dim %d, sparse=%s)", self.name, model, dim, sparse)
        self._read_schema()

    def write(self, window: Window) -> int:
        """Upsert the window's rows, then trim its documents. Idempotent; raises on failure."""
        rows = list(window.rows.values())
        if rows:
            first = rows[0]
            self.ensure_collection(
                first.model or "?", int(first.dim or 0), first.sparse is not None
            )
        elif self.dim is None:
            return 0  # nothing written yet and only trims: nothing to trim
        payload = [row_of(v, self.sparse) for v in rows]
        for start in range(0, len(payload), MAX_REQUEST_ROWS):
            self.client.upsert(self.name, payload[start : start + MAX_REQUEST_ROWS])
        expr = trim_filter(window.trims)
        if expr:
            self.client.delete(self.name, filter=expr)
        return len(rows)

    def count(self) -> int:
        if not self.client.has_collection(self.name):
            return 0
        res = self.client.query(self.name, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def search(self, dense: np.ndarray, k: int = 5) -> list[Hit]:
        if self.dim is None:
            return []
        res = self.client.search(
            self.name,
            data=[np.asarray(dense, dtype=np.float32)],
            anns_field="dense",
            limit=k,
            output_fields=["url", "title", "text", "chunk_index"],
            search_params={"metric_type": "COSINE"},
        )
        return [
            Hit(
                id=h["id"],
                score=float(h["distance"]),
                url=h["entity"]["url"],
                title=h["entity"]["title"],
                text=h["entity"]["text"],
                chunk_index=int(h["entity"]["chunk_index"]),
            )
            for h in res[0]
        ]

    def rows(self, fields: Sequence[str] = ("id", "text_hash")) -> list[dict[str, Any]]:
        """Every row (for tests and audits); iterates so it is not capped by query limits."""
        if not self.client.has_collection(self.name):
            return []
        it = self.client.query_iterator(
            self.name, filter="", output_fields=list(fields), batch_size=1000
        )
        out: list[dict[str, Any]] = []
        while True:
            batch = it.next()
            if not batch:
                it.close()
                return out
            out.extend(batch)

    def close(self) -> None:
        self.client.close()
