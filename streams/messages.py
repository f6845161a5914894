"""Message records and their JSON codecs, one pair per topic, validated against ``schemas/``.

Topics carry raw bytes; stages decode here so that a message that cannot be parsed is a
value they can dead-letter with its original bytes, instead of an exception deep inside
Faust's deserializer. Vectors are packed as little-endian float32 in base64: about four
times smaller than JSON number lists and far cheaper to code (see docs/decisions.md).
"""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
from jsonschema import Draft202012Validator, ValidationError, validators

from streams.crawl import Crawl
from streams.errors import DecodeError
from streams.ids import normalize_url

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
VERSION = 1

Op = Literal["upsert", "delete"]


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _strict_integer(_checker: object, instance: object) -> bool:
    """``1.0`` is not an integer here: JSON Schema's ``integer`` accepts it, Milvus' INT64
    and Python's indexing do not (a chunk_index of 1.0 would pass the schema and then
    fail the write forever)."""
    return isinstance(instance, int) and not isinstance(instance, bool)


def _ecma_pattern(
    validator: Draft202012Validator, pattern: str, instance: object, _schema: object
) -> Iterator[ValidationError]:
    """``pattern`` with ECMA-262's ``$`` (the end of the string), as JSON Schema defines it.

    Python's ``$`` also matches before a final newline, so ``^[0-9a-f]{32}$`` would pass a
    doc_id followed by ``\\n``; a trailing ``$`` is read as ``\\Z`` here.
    """
    if not isinstance(instance, str):
        return
    python = (
        pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern
    )
    if re.search(python, instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


StrictValidator = validators.extend(
    Draft202012Validator,
    validators={"pattern": _ecma_pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer),
)


@cache
def schema(name: str) -> dict[str, Any]:
    """``schemas/<name>.v1.json``, checked against the metaschema (read once per process):
    the one place a limit written in a schema is read from. Shared: do not modify it."""
    loaded: dict[str, Any] = orjson.loads((SCHEMA_DIR / f"{name}.v{VERSION}.json").read_bytes())
    Draft202012Validator.check_schema(loaded)
    return loaded


@cache
def validator(name: str) -> Draft202012Validator:
    """The compiled validator of ``schemas/<name>.v1.json`` (compiled once per process):
    strict integers and end-anchored patterns (see ``StrictValidator``)."""
    return StrictValidator(schema(name))


def _parse(name: str, raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise DecodeError("decode", "empty message (no value)")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("decode", f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError("schema", f"expected a JSON object, got {type(obj).__name__}")
    error = next(iter(validator(name).iter_errors(obj)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise DecodeError("schema", f"{name} v{VERSION}: {where}: {error.message}")
    return obj


def _dump(obj: dict[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in obj.items() if v is not None})


# --- urls ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class UrlRequest:
    url: str
    source: str = "cli"
    requested_at: str = dataclasses.field(default_factory=utcnow)
    priority: int | None = None
    force: bool = False
    delete: bool = False
    metadata: dict[str, Any] | None = None
    #: Set on a request of a crawl: the spec and this page's depth (``streams/crawl.py``).
    crawl: Crawl | None = None

    def key(self) -> bytes:
        """The normalised URL: every producer puts one page on one partition, where the
        fetch stage keeps that page's state."""
        try:
            return normalize_url(self.url).encode()
        except ValueError:
            return self.url.encode()


def encode_url(req: UrlRequest) -> bytes:
    obj = {"v": VERSION, **dataclasses.asdict(req)}
    obj["force"] = obj["force"] or None
    obj["delete"] = obj["delete"] or None
    obj["crawl"] = req.crawl.to_json() if req.crawl is not None else None
    return _dump(obj)


def decode_url(raw: bytes | None) -> UrlRequest:
    obj = _parse("urls", raw)
    obj.pop("v")
    crawl = obj.pop("crawl", None)
    return UrlRequest(**obj, crawl=Crawl.from_json(crawl) if crawl is not None else None)


# --- crawl --------------------------------------------------------------------------------

CrawlOutcome = Literal["indexed", "unchanged", "canonical", "failed"]


@dataclasses.dataclass(frozen=True, slots=True)
class CrawlReport:
    """The fetch stage's word on one page of a crawl: what became of it and the links to
    follow (none for a failed page: the frontier still counts it as done)."""

    crawl: Crawl
    url: str
    outcome: CrawlOutcome
    links: tuple[str, ...] = ()
    reported_at: str = dataclasses.field(default_factory=utcnow)

    def key(self) -> bytes:
        """The crawl id: every report of one crawl reaches the one frontier that owns it."""
        return self.crawl.id.encode()


def encode_crawl(report: CrawlReport) -> bytes:
    return _dump(
        {
            "v": VERSION,
            "crawl": report.crawl.to_json(),
            "url": report.url,
            "outcome": report.outcome,
            "links": list(report.links),
            "reported_at": report.reported_at,
        }
    )


def decode_crawl(raw: bytes | None) -> CrawlReport:
    obj = _parse("crawl", raw)
    return CrawlReport(
        crawl=Crawl.from_json(obj["crawl"]),
        url=obj["url"],
        outcome=obj["outcome"],
        links=tuple(obj["links"]),
        reported_at=obj.get("reported_at") or utcnow(),
    )


# --- chunks -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk to embed, or (``op='delete'``) a trim of a document to ``chunk_count``."""

    op: Op
    doc_id: str
    url: str
    chunk_count: int
    chunk_index: int | None = None
    text: str | None = None
    text_hash: str | None = None
    doc_hash: str | None = None
    fetched_at: str | None = None
    title: str | None = None
    section: str | None = None
    #: Who asked for the page (the ``urls`` request's ``source``: ``cli``, ``webhook``,
    #: ``sitemap``...), copied to every chunk so a search can filter by it.
    source: str | None = None
    #: The document's version: grows with each fetch of the page (fetch time in ms x 10^6
    #: + the urls offset's last six digits). The writer drops a message older than what
    #: Milvus holds for its document; ``None`` (older producers) is applied unconditionally.
    version: int | None = None
    #: When the page's ``urls`` request was published: where the writer's freshness
    #: (publish to searchable) starts. ``None`` from older producers: not measured.
    requested_at: str | None = None

    def key(self) -> bytes:
        return self.doc_id.encode()


def encode_chunk(chunk: Chunk) -> bytes:
    return _dump({"v": VERSION, **dataclasses.asdict(chunk)})


def decode_chunk(raw: bytes | None) -> Chunk:
    obj = _parse("chunks", raw)
    obj.pop("v")
    return Chunk(**obj)


# --- vectors ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Sparse:
    indices: list[int]
    values: np.ndarray  # float32

    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.indices, self.values.tolist(), strict=True))


@dataclasses.dataclass(frozen=True, slots=True)
class Vector:
    chunk: Chunk
    model: str | None = None
    dim: int | None = None
    dense: np.ndarray | None = None  # float32, shape (dim,)
    sparse: Sparse | None = None


def pack_f32(values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")


def unpack_f32(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4")


def encode_vector(vec: Vector) -> bytes:
    obj: dict[str, Any] = {"v": VERSION, **dataclasses.asdict(vec.chunk)}
    if vec.dense is not None:
        obj["model"] = {"name": vec.model, "dim": int(vec.dim or len(vec.dense))}
        obj["dense"] = pack_f32(vec.dense)
    if vec.sparse is not None:
        obj["sparse"] = {"indices": vec.sparse.indices, "values": pack_f32(vec.sparse.values)}
    return _dump(obj)


def decode_vector(raw: bytes | None) -> Vector:
    obj = _parse("vectors", raw)
    obj.pop("v")
    model = obj.pop("model", None)
    dense_b64 = obj.pop("dense", None)
    sparse_obj = obj.pop("sparse", None)
    chunk = Chunk(**obj)
    if dense_b64 is None:
        return Vector(chunk=chunk)
    try:
        dense = unpack_f32(dense_b64)
        sparse = None
        if sparse_obj is not None:
            sparse = Sparse(list(sparse_obj["indices"]), unpack_f32(sparse_obj["values"]))
    except ValueError as exc:
        raise DecodeError("schema", f"vectors v{VERSION}: bad packed floats: {exc}") from None
    if len(dense) != model["dim"]:
        raise DecodeError("schema", f"dense has {len(dense)} values, model.dim is {model['dim']}")
    if sparse is not None and len(sparse.indices) != len(sparse.values):
        raise DecodeError("schema", "sparse indices and values differ in length")
    return Vector(chunk=chunk, model=model["name"], dim=model["dim"], dense=dense, sparse=sparse)


# --- dead letters -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    stage: str
    topic: str
    error_class: str
    error: str
    value: bytes
    key: bytes | None = None
    partition: int | None = None
    offset: int | None = None
    attempts: int = 1
    url: str | None = None
    failed_at: str = dataclasses.field(default_factory=utcnow)
    hops: int = 0  # how many times the message was redriven before it failed (again)
    value_size: int | None = None  # the original value's size, when ``value`` is a prefix
    value_truncated: bool = False  # ``value`` is only the first bytes of the original
    key_truncated: bool = False


ERROR_MAX_CHARS = 4000
KEY_MAX_BYTES = 4096
"""The envelope copies at most this much of the original key (keys are short by design)."""


def encode_dead_letter(dl: DeadLetter, max_bytes: int | None = None) -> bytes:
    """The envelope; with ``max_bytes``, the original value is cut so that it fits.

    A dead letter that cannot be produced would stop its stage, so the envelope never
    copies more than the topic takes: the value whole when it fits, else its first bytes
    with ``value_truncated`` and ``value_size`` saying so.
    """
    key = dl.key
    key_cut = dl.key_truncated
    if key is not None and len(key) > KEY_MAX_BYTES:
        key, key_cut = key[:KEY_MAX_BYTES], True
    obj: dict[str, Any] = {
        "v": VERSION,
        "stage": dl.stage,
        "topic": dl.topic,
        "partition": dl.partition,
        "offset": dl.offset,
        "error_class": dl.error_class,
        "error": dl.error[:ERROR_MAX_CHARS],
        "attempts": dl.attempts,
        "failed_at": dl.failed_at,
        "url": dl.url[:8192] if dl.url is not None else None,
        "key_b64": base64.b64encode(key).decode() if key is not None else None,
        "value_b64": base64.b64encode(dl.value).decode(),
    }
    if dl.hops:
        obj["hops"] = dl.hops
    if key_cut:
        obj["key_truncated"] = True
    if dl.value_truncated:
        obj["value_truncated"] = True
        obj["value_size"] = dl.value_size if dl.value_size is not None else len(dl.value)
    raw = orjson.dumps(obj)
    if max_bytes is None or len(raw) <= max_bytes:
        return raw
    # Cut the value: room left for its base64 (4 characters per 3 bytes), plus the two
    # fields that say so; what stays is the first bytes, enough to recognise the message.
    obj["value_b64"] = ""
    obj["value_truncated"] = True
    obj["value_size"] = dl.value_size if dl.value_size is not None else len(dl.value)
    room = max_bytes - len(orjson.dumps(obj))
    keep = max(room, 0) // 4 * 3
    obj["value_b64"] = base64.b64encode(dl.value[:keep]).decode()
    return orjson.dumps(obj)


def decode_dead_letter(raw: bytes | None) -> DeadLetter:
    obj = _parse("deadletter", raw)
    key = obj.get("key_b64")
    return DeadLetter(
        stage=obj["stage"],
        topic=obj["topic"],
        error_class=obj["error_class"],
        error=obj["error"],
        value=base64.b64decode(obj["value_b64"]),
        key=base64.b64decode(key) if key is not None else None,
        partition=obj.get("partition"),
        offset=obj.get("offset"),
        attempts=obj["attempts"],
        url=obj.get("url"),
        failed_at=obj["failed_at"],
        hops=obj.get("hops", 0),
        value_size=obj.get("value_size"),
        value_truncated=obj.get("value_truncated", False),
        key_truncated=obj.get("key_truncated", False),
    )
