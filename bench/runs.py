"""The two in-process runs: the bare model (the limit) and the naive loop (the floor).

Both use the chunk texts the pipeline produces, computed here with the same pure code the
fetch stage runs (``streams.documents.page_chunks`` and the ``Chunker``), so the three runs
encode exactly the same texts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streams.batching import plan_batches
from streams.chunking import Chunker
from streams.documents import page_chunks
from streams.ids import normalize_url
from streams.messages import Chunk, Sparse, Vector
from streams.settings import Settings
from streams.store import MAX_REQUEST_ROWS, MilvusStore, row_of

if TYPE_CHECKING:
    from devtools.corpus import CorpusServer
    from streams.embedder import Embedder, Prepared

#: Fixed-size batching the bare run also tries: sorted by length, this many texts a call.
FIXED_BATCH = 32


def content_type_of(path: Path) -> str:
    """What the corpus server answers for ``path`` (the bench's pages are its files)."""
    return "text/html; charset=utf-8" if path.suffix == ".html" else "text/plain; charset=utf-8"


@dataclasses.dataclass(frozen=True)
class Page:
    path: Path
    url: str
    chunks: list[Chunk]


@dataclasses.dataclass(frozen=True)
class Workload:
    """The pages of one run and every chunk text the pipeline will embed for them."""

    pages: list[Page]
    texts: list[str]
    lengths: list[int]  # tokens per text as the model sees it (special tokens included)

    @property
    def docs(self) -> int:
        return len(self.pages)

    @property
    def chunks(self) -> int:
        return len(self.texts)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def messages(self) -> int:
        """Messages the fetch stage sends to ``chunks``: a page without text sends one trim."""
        return sum(max(len(p.chunks), 1) for p in self.pages)


def model_lengths(chunker: Chunker, texts: list[str]) -> list[int]:
    """Tokens per text with the special tokens the encoder adds (what a batch costs).

    Chunks never exceed what the model reads, so this equals ``Embedder.token_lengths``
    without loading the model.
    """
    specials = chunker.tokenizer.num_special_tokens_to_add(False)  # tokenizers or transformers
    return [n + specials for n in chunker.count_tokens(texts)]


def build_workload(files: list[Path], server: CorpusServer, chunker: Chunker) -> Workload:
    """Read the pages from disk (no HTTP) and chunk them as the fetch stage will."""
    pages = []
    for path in files:
        url = normalize_url(server.url_of(path))
        chunks = page_chunks(url, path.read_bytes(), content_type_of(path), chunker)
        pages.append(Page(path, url, chunks))
    texts = [c.text or "" for p in pages for c in p.chunks]
    return Workload(pages, texts, model_lengths(chunker, texts))


def fixed_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Indices sorted longest first, cut into batches of ``size`` (the usual way to batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def batchings(lengths: list[int], settings: Settings) -> dict[str, list[list[int]]]:
    """The batchings the bare run times: the pipeline's token budget, and fixed-size."""
    budget = settings.embed_batch_tokens
    return {
        f"token budget {budget}/{settings.embed_max_batch}": plan_batches(
            lengths, budget, settings.embed_max_batch
        ),
        f"fixed {FIXED_BATCH} by length": fixed_batches(lengths, FIXED_BATCH),
    }


def run_bare(
    embedder: Embedder,
    work: Workload,
    settings: Settings,
    on_done: Callable[[str, float], None] | None = None,
) -> dict[str, float]:
    """Seconds to encode every chunk text, per batching; only the encode calls are timed.

    One untimed call first, so that lazy initialisation (kernels, allocator) is not charged
    to whichever batching runs first; the pipeline's model is warm too (see the warm-up).
    Tokenizing is timed, as the embed stage pays it too (:func:`encode_all`).
    """
    if not work.texts:
        return {}
    plans = batchings(work.lengths, settings)
    first = next(iter(plans.values()))[0]
    embedder.encode([work.texts[i] for i in first])
    out: dict[str, float] = {}
    for name, batches in plans.items():
        texts = [[work.texts[i] for i in b] for b in batches]
        t0 = time.perf_counter()
        encode_all(embedder, texts)
        out[name] = time.perf_counter() - t0
        if on_done:
            on_done(name, out[name])
    return out


def encode_all(embedder: Embedder, batches: list[list[str]]) -> None:
    """Encode the batches in order, the best the embedder can.

    On a GPU the next batch is tokenized, padded and copied (``Embedder.prepare``) in a
    thread while the current one runs, so the GPU does not wait on the host between
    batches. On a CPU, one after the other as before: the host work would take cores from
    the model, and the bare figure stays comparable with earlier runs.
    """
    if not embedder.device.startswith("cuda"):
        for batch in batches:
            embedder.encode(batch)
        return
    if not batches:
        return

    def prepare(texts: list[str]) -> Prepared:
        return embedder.prepare(embedder.tokenize(texts))

    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as ahead:
        pending = ahead.submit(prepare, batches[0])
        for following in [*batches[1:], None]:
            current = pending.result()
            if following is not None:  # batch k+1 is prepared while batch k runs
                pending = ahead.submit(prepare, following)
            embedder.encode_prepared(current)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The backend in use against torch fp32 on the same batches, timed in turns."""

    backend: str
    backend_s: float
    torch_s: float
    mean_cos: float
    min_cos: float


def run_compare(
    embedder: Embedder,
    reference: Embedder,
    work: Workload,
    settings: Settings,
) -> Comparison:
    """Both models on the pipeline's token-budget batches, batch by batch in turns (A B,
    then B A), so that whatever else the shared machine does at a moment falls on both
    alike; only the encode calls are timed. The vectors of every chunk are compared.
    """
    from streams.onnx_backend import agreement

    if not work.texts:
        raise ValueError("no chunk texts to compare")
    batches = plan_batches(work.lengths, settings.embed_batch_tokens, settings.embed_max_batch)
    ours = np.zeros((work.chunks, embedder.dim), dtype=np.float32)
    ref = np.zeros((work.chunks, reference.dim), dtype=np.float32)
    spent = {"ours": 0.0, "ref": 0.0}
    warm = [work.texts[i] for i in batches[0]]
    embedder.encode(warm)
    reference.encode(warm)
    for n, batch in enumerate(batches):
        texts = [work.texts[i] for i in batch]
        turns = [("ours", embedder, ours), ("ref", reference, ref)]
        for key, model, into in turns if n % 2 == 0 else turns[::-1]:
            t0 = time.perf_counter()
            dense = model.encode(texts).dense
            spent[key] += time.perf_counter() - t0
            into[batch] = dense
    mean, low = agreement(ours, ref)
    return Comparison(embedder.backend, spent["ours"], spent["ref"], mean, low)


def naive_settings(settings: Settings, run_dir: Path) -> Settings:
    """A Milvus target of its own for the naive run: a fresh Lite file, or on a server a
    fresh collection."""
    if settings.milvus_is_lite:
        uri = str((run_dir / "naive-milvus.db").resolve())
        return settings.model_copy(update={"milvus_uri": uri, "collection": "naive"})
    return settings.model_copy(update={"collection": f"bench_naive_{run_dir.name}"})


def run_naive(
    embedder: Embedder,
    chunker: Chunker,
    work: Workload,
    settings: Settings,
    on_page: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """The design ragstream replaces: per page, in sequence, fetch -> chunk -> embed (the
    page's chunks as one call) -> upsert into Milvus. Returns (seconds, rows written).

    Opening Milvus (Lite starts a server in the process) is not timed; every page's work,
    HTTP included, is.
    """
    import httpx

    store = MilvusStore(settings)
    store.ensure_collection(embedder.name, embedder.dim, embedder.sparse)
    written = 0
    try:
        with httpx.Client(timeout=settings.fetch_timeout_s) as client:
            t0 = time.perf_counter()
            for n, page in enumerate(work.pages, 1):
                resp = client.get(page.url)
                resp.raise_for_status()
                chunks = page_chunks(
                    page.url, resp.content, resp.headers.get("content-type"), chunker
                )
                if chunks:
                    enc = embedder.encode([c.text or "" for c in chunks])
                    rows = [
                        row_of(
                            Vector(
                                chunk=c,
                                model=embedder.name,
                                dim=embedder.dim,
                                dense=enc.dense[j],
                                sparse=_sparse(enc.sparse[j]) if enc.sparse else None,
                            ),
                            store.sparse,
                        )
                        for j, c in enumerate(chunks)
                    ]
                    for start in range(0, len(rows), MAX_REQUEST_ROWS):
                        store.client.upsert(store.name, rows[start : start + MAX_REQUEST_ROWS])
                    written += len(rows)
                if on_page:
                    on_page(n)
            elapsed = time.perf_counter() - t0
    finally:
        store.close()
    return elapsed, written


def _sparse(weights: dict[int, float]) -> Sparse:
    return Sparse(list(weights), np.fromiter(weights.values(), dtype=np.float32))
