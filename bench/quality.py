"""``python -m bench quality``: retrieval quality (recall@1, recall@5, MRR@10) of each chunker
and search mode, on labelled query sets, through the product's own search path.

Why: the speed bench says how fast pages become searchable, not whether the right passage
comes back. Each query set (``bench/queries/*.jsonl``) pairs a question with the file that
answers it and an *answer key*, a short verbatim phrase of the answer passage. A retrieved
chunk is relevant when it comes from that file and its normalised text contains the
normalised key (:func:`normalize`): a chunker that cuts the passage apart, or buries it in
unrelated text that drags its vector away, loses the question. Keys are exact phrases, not
judgements, so the sets are cheap to extend and check mechanically (tests/test_quality.py).

For every query set and chunker, the chosen pages are chunked, embedded with the product's
model (vectors cached by text hash, so reruns and chunks shared between chunkers cost
nothing), written to a fresh Milvus Lite collection through ``MilvusStore``, and searched
in each mode. Every chunker gets the same budget: what the model reads (254 MiniLM tokens),
32 tokens of overlap.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import random
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from streams.batching import plan_batches
from streams.chunking import Chunker
from streams.documents import page_chunks
from streams.ids import doc_id, text_hash
from streams.messages import Chunk, Vector
from streams.onnx_backend import BACKENDS, GRAPH_FORMAT
from streams.settings import MINILM, Settings

if TYPE_CHECKING:
    from rich.console import Console

    from streams.embedder import Embedder

__all__ = [
    "QUERY_DIR",
    "CorpusPage",
    "Query",
    "first_relevant",
    "is_relevant",
    "load_queries",
    "mrr_at",
    "normalize",
    "recall_at",
]

log = logging.getLogger(__name__)

QUERY_DIR = Path(__file__).with_name("queries")
#: Ranks searched per question: MRR@10 needs ten.
DEPTH = 10
#: Pages per query set by default: the pages that answer plus seeded random others.
DEFAULT_PAGES = 100
DEFAULT_SEED = 20261125
BASE_URL = "https://docs.example.org/django/"

# --- the labels --------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize(text: str) -> str:
    """Lowercase, every run of non-alphanumerics one space, trimmed: markup, punctuation,
    quotes and line breaks differ between formats and chunkers, the words do not."""
    return " ".join(_NON_ALNUM.sub(" ", text.lower()).split())


@dataclasses.dataclass(frozen=True, slots=True)
class Query:
    id: str
    question: str
    file: str  # the answering page, relative to the corpus root
    key: str  # a verbatim phrase of the answer passage

    @property
    def norm_key(self) -> str:
        return normalize(self.key)


def load_queries(path: Path) -> list[Query]:
    """A query set: one JSON object a line (``id``, ``question``, ``file``, ``key``)."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        try:
            out.append(Query(str(obj["id"]), str(obj["question"]), str(obj["file"]), obj["key"]))
        except KeyError as exc:
            raise ValueError(f"{path}:{n}: missing {exc}") from None
    return out


def is_relevant(file: str, text: str, query: Query) -> bool:
    """From the answering file, and holding the whole key in whole words: the file matters
    because a phrase may recur on another page that does not answer the question."""
    return file == query.file and f" {query.norm_key} " in f" {normalize(text)} "


def first_relevant(hits: Sequence[tuple[str, str]], query: Query) -> int | None:
    """The 1-based rank of the first relevant ``(file, text)`` hit, ``None`` if none is."""
    for rank, (file, text) in enumerate(hits, 1):
        if is_relevant(file, text, query):
            return rank
    return None


def recall_at(ranks: Sequence[int | None], k: int) -> float:
    """Share of questions with a relevant chunk in the top ``k``. Each question has one
    answer passage, so this is the hit rate at ``k``."""
    if not ranks:
        return 0.0
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)


def mrr_at(ranks: Sequence[int | None], k: int = DEPTH) -> float:
    """Mean reciprocal rank of the first relevant chunk, 0 for a question without one in
    the top ``k``."""
    if not ranks:
        return 0.0
    return sum(1.0 / r for r in ranks if r is not None and r <= k) / len(ranks)


# --- the corpus --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CorpusPage:
    """A page as the fetch stage would receive it."""

    file: str  # relative to the corpus root; the query sets name it
    url: str
    body: bytes
    content_type: str

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


ChunkFn = Callable[[CorpusPage], list[str]]


def choose_files(
    all_files: Sequence[str], queries: Sequence[Query], pages: int | None, seed: int
) -> list[str]:
    """The answering files plus seeded random others up to ``pages`` (all with ``None``):
    the same arguments always give the same subset, so runs compare."""
    answering = sorted({q.file for q in queries})
    missing = [f for f in answering if f not in set(all_files)]
    if missing:
        raise ValueError(f"query files not in the corpus: {missing[:5]}")
    if pages is None:
        return sorted(all_files)
    others = sorted(set(all_files) - set(answering))
    extra = random.Random(seed).sample(others, max(0, min(len(others), pages - len(answering))))
    return sorted(answering + extra)


# --- the chunkers ------------------------------------------------------------------------


def _chunk_document() -> Callable[..., list[tuple[str | None, str]]] | None:
    """``streams.documents.chunk_document`` (one page to its ``(section, text)`` chunks by
    a named strategy), where the tree has it."""
    from streams import documents

    fn = getattr(documents, "chunk_document", None)
    return fn if callable(fn) else None


def flat_chunks(chunker: Chunker) -> ChunkFn:
    """The old chunker: extraction then token windows over the whole text. Named
    explicitly where the product can choose, since its default becomes structured."""
    by_strategy = _chunk_document()

    def run(page: CorpusPage) -> list[str]:
        if by_strategy is not None:
            pairs = by_strategy(page.body, page.content_type, page.url, chunker, "flat")
            return [text for _, text in pairs]
        return [c.text or "" for c in page_chunks(page.url, page.body, page.content_type, chunker)]

    return run


def structured_chunks(chunker: Chunker) -> ChunkFn | None:
    """The structure-aware chunker (``streams/structure.py``), exactly as the fetch stage
    cuts and embeds (heading path included); ``None`` where the tree does not have it yet,
    so the bench runs without it."""
    by_strategy = _chunk_document()
    if by_strategy is None:
        return None

    def run(page: CorpusPage) -> list[str]:
        pairs = by_strategy(page.body, page.content_type, page.url, chunker, "structured")
        return [text for _, text in pairs]

    return run


def _token_splitter(chunker: Chunker, **kwargs: Any) -> Any:
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    def length(text: str) -> int:
        return chunker.count_tokens([text])[0]

    language = kwargs.pop("language", None)
    common: dict[str, Any] = {
        "chunk_size": chunker.max_tokens,
        "chunk_overlap": chunker.overlap,
        "length_function": length,
    }
    if language is not None:
        return RecursiveCharacterTextSplitter.from_language(language, **common, **kwargs)
    return RecursiveCharacterTextSplitter(**common, **kwargs)


def langchain_rst(chunker: Chunker) -> ChunkFn:
    """LangChain's RST separators (sections, directives, paragraphs) on the raw page,
    measured in the model's tokens."""
    from langchain_text_splitters import Language

    splitter = _token_splitter(chunker, language=Language.RST)

    def run(page: CorpusPage) -> list[str]:
        return [t for t in splitter.split_text(page.text) if t.strip()]

    return run


def langchain_html(chunker: Chunker) -> ChunkFn:
    """LangChain's ``HTMLHeaderTextSplitter`` (h1-h3), then the token splitter on each
    section; what it returns is embedded as it is (headers in metadata, LangChain's way)."""
    from langchain_text_splitters import HTMLHeaderTextSplitter

    headers = HTMLHeaderTextSplitter([("h1", "h1"), ("h2", "h2"), ("h3", "h3")])
    splitter = _token_splitter(chunker)

    def run(page: CorpusPage) -> list[str]:
        docs = headers.split_text(page.text)
        return [d.page_content for d in splitter.split_documents(docs) if d.page_content.strip()]

    return run


def langchain_markdown(chunker: Chunker) -> ChunkFn:
    """LangChain's ``MarkdownHeaderTextSplitter`` (#-###), then the token splitter."""
    from langchain_text_splitters import MarkdownHeaderTextSplitter

    headers = MarkdownHeaderTextSplitter([("#", "h1"), ("##", "h2"), ("###", "h3")])
    splitter = _token_splitter(chunker)

    def run(page: CorpusPage) -> list[str]:
        docs = headers.split_text(page.text)
        return [d.page_content for d in splitter.split_documents(docs) if d.page_content.strip()]

    return run


# --- embeddings --------------------------------------------------------------------------


class Encoder(Protocol):
    """What the bench needs of a model: L2-normalised vectors for texts."""

    name: str

    def vectors(self, texts: Sequence[str]) -> np.ndarray: ...


class EmbeddingCache:
    """Vectors by (model, text hash) in one SQLite file: a rerun, or a chunk two chunkers
    share, is never encoded twice."""

    def __init__(self, path: Path, model: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS vec (key TEXT PRIMARY KEY, v BLOB)")
        self._model = model

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self._model}\0{text}".encode()).hexdigest()

    def get(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        keys = {self._key(t): t for t in set(texts)}
        out: dict[str, np.ndarray] = {}
        items = list(keys)
        for start in range(0, len(items), 500):
            part = items[start : start + 500]
            marks = ",".join("?" * len(part))
            for key, blob in self._db.execute(
                f"SELECT key, v FROM vec WHERE key IN ({marks})", part
            ):
                out[keys[key]] = np.frombuffer(blob, dtype="<f4")
        return out

    def put(self, pairs: Iterable[tuple[str, np.ndarray]]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO vec VALUES (?, ?)",
            [(self._key(t), np.asarray(v, dtype="<f4").tobytes()) for t, v in pairs],
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()


def cache_key(model: str, backend: str) -> str:
    """What the vectors are cached under: the model, and the backend unless torch (whose
    vectors were cached under the model's name alone before there was a choice)."""
    return model if backend == "torch" else f"{model}|{backend}|{GRAPH_FORMAT}"


class CachedEncoder:
    """The product's ``Embedder`` behind the cache, loaded only when a text is missing,
    encoding in the pipeline's token-budget batches."""

    def __init__(self, settings: Settings, cache: EmbeddingCache, console: Console) -> None:
        self.name = settings.model
        self._settings = settings
        self._cache = cache
        self._console = console
        self._model: Embedder | None = None
        self.encoded_texts = 0
        self.encoded_tokens = 0
        self.encode_s = 0.0

    def _embedder(self) -> Embedder:
        if self._model is None:
            from streams.embedder import Embedder

            t0 = time.perf_counter()
            self._model = Embedder(self._settings)
            self._console.print(
                f"model {self.name} loaded on {self._model.device} in "
                f"{time.perf_counter() - t0:.1f}s"
            )
        return self._model

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        have = self._cache.get(texts)
        todo = sorted({t for t in texts if t not in have})
        if todo:
            model = self._embedder()
            ids = model.tokenize(todo)
            lengths = [len(x) for x in ids]
            t0 = time.perf_counter()
            batches = plan_batches(
                lengths, self._settings.embed_batch_tokens, self._settings.embed_max_batch
            )
            for n, batch in enumerate(batches, 1):
                dense = model.encode_ids([ids[i] for i in batch]).dense
                pairs = [(todo[i], dense[j]) for j, i in enumerate(batch)]
                self._cache.put(pairs)
                have.update(pairs)
                if n % 50 == 0:
                    self._console.print(f"  encoded {n}/{len(batches)} batches", style="dim")
            self.encode_s += time.perf_counter() - t0
            self.encoded_texts += len(todo)
            self.encoded_tokens += sum(lengths)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([have[t] for t in texts]).astype(np.float32)


# --- the index ---------------------------------------------------------------------------


class Index(Protocol):
    """Where chunks are written and searched: the product's Milvus store in a run, an
    in-memory stand-in in the fast tests."""

    def modes(self) -> list[str]: ...

    def add(self, chunks: Sequence[Chunk], dense: np.ndarray, model: str) -> None: ...

    def search(self, query: str, dense: np.ndarray, mode: str, k: int) -> list[tuple[str, str]]:
        """``(url, text)`` of the top ``k`` chunks, best first."""
        ...

    def close(self) -> None: ...


class MilvusIndex:
    """A fresh Milvus Lite collection through ``MilvusStore``: written with the writer's
    own window fold and bulk upsert, searched with its own ``search``."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        from streams.store import MilvusStore

        uri = str((folder / "milvus.db").resolve())
        self._store = MilvusStore(
            settings.model_copy(update={"milvus_uri": uri, "collection": "quality"})
        )

    def modes(self) -> list[str]:
        """``dense`` always; ``hybrid`` (dense + BM25, fused) where ``MilvusStore.search``
        takes a mode and the collection has a BM25 field."""
        params = inspect.signature(self._store.search).parameters
        if "mode" not in params:
            return ["dense"]
        legs = getattr(self._store, "legs", None)
        have = set(legs() if callable(legs) else ())
        return ["dense", "hybrid"] if "bm25" in have else ["dense"]

    def add(self, chunks: Sequence[Chunk], dense: np.ndarray, model: str) -> None:
        from streams.store import reduce_window

        dim = int(dense.shape[1])
        for start in range(0, len(chunks), 1000):
            part = chunks[start : start + 1000]
            vecs = [
                Vector(chunk=c, model=model, dim=dim, dense=dense[start + j])
                for j, c in enumerate(part)
            ]
            result = self._store.write(reduce_window(vecs))
            if result.refused_rows:
                raise RuntimeError(f"Milvus refused rows: {result.refused_rows[0][1]}")
        self._store.client.flush(self._store.name)

    def search(self, query: str, dense: np.ndarray, mode: str, k: int) -> list[tuple[str, str]]:
        store: Any = self._store
        if mode == "dense" and "mode" not in inspect.signature(store.search).parameters:
            hits = store.search(dense, k=k)
        else:
            hits = store.search(dense, k=k, mode=mode, text=query)
        return [(h.url, h.text) for h in hits]

    def close(self) -> None:
        self._store.close()


# --- a run -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuerySet:
    name: str
    queries: list[Query]
    pages: list[CorpusPage]
    chunkers: dict[str, ChunkFn | None]  # None: not available in this tree


@dataclasses.dataclass
class Outcome:
    """One (query set, chunker, mode): the figures and what the index held."""

    set: str
    chunker: str
    mode: str
    questions: int
    recall_at_1: float
    recall_at_5: float
    mrr_at_10: float
    pages: int
    chunks: int
    tokens: int
    over_budget: int  # chunks longer than the model reads (truncated when embedded)
    missed: list[str]  # ids of the questions with nothing relevant in the top 10
    ranks: dict[str, int | None]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("ranks")
        for name in ("recall_at_1", "recall_at_5", "mrr_at_10"):
            out[name] = round(out[name], 4)
        return out


def page_chunk_messages(page: CorpusPage, texts: Sequence[str]) -> list[Chunk]:
    """The chunk messages the fetch stage would send for these texts (ids, hashes)."""
    did = doc_id(page.url)
    doc_hash = text_hash(page.text)
    return [
        Chunk(
            op="upsert",
            doc_id=did,
            url=page.url,
            chunk_count=len(texts),
            chunk_index=i,
            text=t,
            text_hash=text_hash(t),
            doc_hash=doc_hash,
            fetched_at="2026-01-01T00:00:00+00:00",
        )
        for i, t in enumerate(texts)
    ]


def evaluate(
    qset: QuerySet,
    chunker_name: str,
    chunk_fn: ChunkFn,
    counter: Chunker,
    encoder: Encoder,
    make_index: Callable[[], Index],
    console: Console | None = None,
) -> list[Outcome]:
    """Chunk, embed, index and search one query set with one chunker, in every mode the
    index has."""
    chunks: list[Chunk] = []
    for page in qset.pages:
        chunks.extend(page_chunk_messages(page, chunk_fn(page)))
    texts = [c.text or "" for c in chunks]
    lengths = counter.count_tokens(texts) if texts else []
    if console:
        console.print(
            f"[bold]{qset.name} / {chunker_name}:[/] {len(qset.pages)} pages, {len(chunks)} "
            f"chunks, {sum(lengths):,} tokens"
        )
    dense = encoder.vectors(texts)
    qvecs = encoder.vectors([q.question for q in qset.queries])
    file_of = {p.url: p.file for p in qset.pages}
    index = make_index()
    try:
        index.add(chunks, dense, encoder.name)
        out = []
        for mode in index.modes():
            ranks: dict[str, int | None] = {}
            for q, v in zip(qset.queries, qvecs, strict=True):
                hits = index.search(q.question, v, mode, DEPTH)
                ranks[q.id] = first_relevant([(file_of.get(u, u), t) for u, t in hits], q)
            values = list(ranks.values())
            out.append(
                Outcome(
                    set=qset.name,
                    chunker=chunker_name,
                    mode=mode,
                    questions=len(values),
                    recall_at_1=recall_at(values, 1),
                    recall_at_5=recall_at(values, 5),
                    mrr_at_10=mrr_at(values, DEPTH),
                    pages=len(qset.pages),
                    chunks=len(chunks),
                    tokens=sum(lengths),
                    over_budget=sum(1 for n in lengths if n > counter.max_tokens),
                    missed=[i for i, r in ranks.items() if r is None],
                    ranks=ranks,
                )
            )
        return out
    finally:
        index.close()


# --- the query sets ----------------------------------------------------------------------


def django_sets(
    settings: Settings,
    chunker: Chunker,
    names: Sequence[str],
    pages: int | None,
    seed: int,
    console: Console,
) -> list[QuerySet]:
    """``django`` (the RST sources as the pipeline fetches them) and ``django-html`` (the
    same pages rendered to HTML, the same questions)."""
    from devtools.corpus import corpus_files, ensure_django_docs

    root = ensure_django_docs(settings.cache_dir)
    queries = load_queries(QUERY_DIR / "django.jsonl")
    all_files = [p.relative_to(root).as_posix() for p in corpus_files(root)]
    files = choose_files(all_files, queries, pages, seed)
    out = []
    if "django" in names:
        rst = [
            CorpusPage(f, BASE_URL + f, (root / f).read_bytes(), "text/plain; charset=utf-8")
            for f in files
        ]
        out.append(
            QuerySet(
                "django",
                queries,
                rst,
                {
                    "flat": flat_chunks(chunker),
                    "structured": structured_chunks(chunker),
                    "langchain-rst": langchain_rst(chunker),
                },
            )
        )
    if "django-html" in names:
        from bench.rst_html import rendered_corpus

        t0 = time.perf_counter()
        html = rendered_corpus(root, files, settings.cache_dir / "quality" / "django-html")
        took = time.perf_counter() - t0
        console.print(f"django-html: {len(files)} pages rendered in {took:.1f}s")
        hpages = [
            CorpusPage(
                f,
                BASE_URL + f.removesuffix(".txt") + ".html",
                html[f].read_bytes(),
                "text/html; charset=utf-8",
            )
            for f in files
        ]
        out.append(
            QuerySet(
                "django-html",
                queries,
                hpages,
                {
                    "flat": flat_chunks(chunker),
                    "structured": structured_chunks(chunker),
                    "langchain-html": langchain_html(chunker),
                },
            )
        )
    return out


SETS = ("django", "django-html")


# --- the command -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench quality",
        description="Retrieval quality (recall@1, recall@5, MRR@10) per query set, chunker "
        "and search mode, through MilvusStore and the product's model.",
    )
    p.add_argument(
        "--sets", default=",".join(SETS), help=f"query sets, comma-separated ({','.join(SETS)})"
    )
    p.add_argument("--chunkers", default="", help="only these chunkers (default: all)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--pages",
        type=int,
        default=DEFAULT_PAGES,
        help=f"pages per set: the answering ones plus random others ({DEFAULT_PAGES})",
    )
    size.add_argument("--all", action="store_true", help="the whole corpus")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the distractor pages")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="the embedder's backend (default: RAGSTREAM_BACKEND); vectors are cached per backend",
    )
    p.add_argument("--json-only", action="store_true", help="print only the JSON lines")
    p.add_argument("--show-misses", action="store_true", help="list each missed question")
    return p


def quality_settings() -> Settings:
    """The environment's settings, with MiniLM unless ``RAGSTREAM_MODEL`` names a model."""
    settings = Settings()
    if "model" not in settings.model_fields_set:
        settings = settings.model_copy(update={"model": MINILM})
    return settings


def render_table(outcomes: Sequence[Outcome], console: Console) -> None:
    from rich.table import Table

    table = Table(title="Retrieval quality")
    for col in ("set", "chunker", "mode", "R@1", "R@5", "MRR@10", "pages", "chunks", "tokens"):
        table.add_column(col, justify="left" if col in ("set", "chunker", "mode") else "right")
    for o in outcomes:
        table.add_row(
            o.set,
            o.chunker,
            o.mode,
            f"{o.recall_at_1:.3f}",
            f"{o.recall_at_5:.3f}",
            f"{o.mrr_at_10:.3f}",
            str(o.pages),
            f"{o.chunks:,}",
            f"{o.tokens:,}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import pymilvus  # noqa: F401 - configures its loggers on import: quiet them after

    for noisy in ("grpc._server", "pymilvus"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    err = Console(stderr=True, quiet=args.json_only, soft_wrap=True)
    out = Console(quiet=args.json_only, width=None if sys.stdout.isatty() else 120)
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SETS))
    if unknown:
        raise SystemExit(f"unknown query sets {unknown}: choose from {', '.join(SETS)}")
    only = {c.strip() for c in args.chunkers.split(",") if c.strip()}

    settings = quality_settings()
    if args.backend:
        settings = settings.model_copy(update={"backend": args.backend})
    from streams.embedder import device_and_backend
    from streams.model import resolve_model_path

    device, backend = device_and_backend(settings)
    err.print(f"model {settings.model}, backend {backend} on {device}")

    chunker = Chunker.from_model(
        resolve_model_path(settings.model), settings.chunk_tokens, settings.chunk_overlap
    )
    cache = EmbeddingCache(
        settings.cache_dir / "quality" / "embeddings.sqlite", cache_key(settings.model, backend)
    )
    encoder = CachedEncoder(settings, cache, err)
    pages = None if args.all else args.pages
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    try:
        qsets = django_sets(settings, chunker, names, pages, args.seed, err)
        with tempfile.TemporaryDirectory(prefix="ragstream-quality-") as tmp:
            for qset in qsets:
                for name, fn in qset.chunkers.items():
                    if only and name not in only:
                        continue
                    if fn is None:
                        err.print(f"{qset.name} / {name}: not in this tree yet, skipped")
                        continue
                    folder = Path(tmp) / f"{qset.name}-{name}"
                    folder.mkdir()
                    make = functools.partial(MilvusIndex, settings, folder)
                    for o in evaluate(qset, name, fn, chunker, encoder, make, err):
                        outcomes.append(o)
                        print(json.dumps({**o.to_json(), "backend": backend}), flush=True)
    finally:
        cache.close()
    render_table(outcomes, out)
    err.print(
        f"{time.perf_counter() - t0:.0f}s in all; encoded {encoder.encoded_texts:,} new texts "
        f"({encoder.encoded_tokens:,} tokens) in {encoder.encode_s:.0f}s, the rest from the "
        "cache"
    )
    for qset_name, mode, qid, r, n in regressions(outcomes):
        out.print(f"structured loses {qset_name}/{mode} {qid}: flat rank {r}, structured {n}")
    if args.show_misses:
        by_id = {q.id: q for qs in qsets for q in qs.queries}
        for o in outcomes:
            for qid in o.missed:
                out.print(f"missed {o.set}/{o.chunker}/{o.mode}: {qid}: {by_id[qid].question}")
    return 0


def regressions(
    outcomes: Iterable[Outcome], base: str = "flat", new: str = "structured", k: int = 5
) -> list[tuple[str, str, str, int | None, int | None]]:
    """``(set, mode, question id, base rank, new rank)`` for each question ``base`` found in
    its top ``k`` and ``new`` did not: what the acceptance bar asks to explain."""
    rows: dict[tuple[str, str], dict[str, Outcome]] = {}
    for o in outcomes:
        rows.setdefault((o.set, o.mode), {})[o.chunker] = o
    out: list[tuple[str, str, str, int | None, int | None]] = []
    for (qset, mode), by in sorted(rows.items()):
        if base not in by or new not in by:
            continue
        for qid, r in by[base].ranks.items():
            n = by[new].ranks.get(qid)
            if r is not None and r <= k and (n is None or n > k):
                out.append((qset, mode, qid, r, n))
    return out


if __name__ == "__main__":
    sys.exit(main())
