"""Search: the filter expressions (a filter is code), modes and weights, and on Milvus Lite
(``slow``) the legs themselves: BM25 finds an exact identifier, hybrid runs on a dense-only
collection and on a BGE-M3-shaped one, filters keep what they say, an older collection
falls back, and the CLI, the Python API and the HTTP route return the same hits."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streams.errors import BadRequest
from streams.ids import doc_id, normalize_url, text_hash
from streams.messages import Chunk, Sparse, Vector
from streams.settings import Settings
from streams.store import (
    Filters,
    MilvusStore,
    SearchMode,
    filter_expr,
    like_prefix,
    parse_mode,
    parse_weights,
    plan_search,
    reduce_window,
    row_of,
    string_literal,
)

# --- filters: pure ----------------------------------------------------------------------------

HOSTILE = [
    'a" or 1==1 or "',
    'a\\" or 1==1 or \\"',
    "100%",
    "a_b",
    "back\\slash",
    "trailing\\",
    '"',
    "\\",
    "it's",
    "ünïcødé/パス",
]


def unescape_literal(lit: str) -> str:
    """What Milvus reads from a double-quoted literal: the inverse of string_literal, and
    a proof that the literal ends where it should (no unescaped quote inside)."""
    assert lit[0] == '"' and lit[-1] == '"'
    out, i, body = [], 0, lit[1:-1]
    while i < len(body):
        ch = body[i]
        assert ch != '"', f"an unescaped quote ends the literal early: {lit}"
        if ch == "\\":
            assert i + 1 < len(body), f"a dangling backslash escapes the closing quote: {lit}"
            out.append(body[i + 1])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def like_matches(pattern: str, value: str) -> bool:
    """``like`` semantics (``%``, ``_``, ``\\`` escapes) as a regex, to check the escaping."""
    import re

    rx, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            rx.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        rx.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.fullmatch("".join(rx), value, re.S) is not None


@pytest.mark.parametrize("value", HOSTILE)
def test_string_literal_cannot_be_escaped_from(value: str) -> None:
    assert unescape_literal(string_literal(value)) == value


@pytest.mark.parametrize("prefix", HOSTILE)
def test_like_prefix_matches_the_prefix_literally(prefix: str) -> None:
    pattern = unescape_literal(like_prefix(prefix))
    assert like_matches(pattern, prefix)
    assert like_matches(pattern, prefix + "/anything %_\\")
    # a wildcard in the prefix matches only itself
    for ch in "%_":
        if ch in prefix:
            assert not like_matches(pattern, prefix.replace(ch, "X"))


def test_filter_expr_joins_the_filters() -> None:
    assert filter_expr(None) == ""
    assert filter_expr(Filters()) == ""
    assert filter_expr(Filters(url_prefix="http://e.org/a_b")) == 'url like "http://e.org/a\\\\_b%"'
    expr = filter_expr(Filters(url_prefix="x", source='cms" or "1', since_ms=1700000000000))
    assert expr == 'url like "x%" and source == "cms\\" or \\"1" and fetched_ms >= 1700000000000'


def test_a_hostile_prefix_stays_inside_its_literal() -> None:
    expr = filter_expr(Filters(url_prefix='a" or 1==1 or "'))
    assert expr.startswith("url like ")
    assert unescape_literal(expr[len("url like ") :]) == 'a" or 1==1 or "%'


@pytest.mark.parametrize("value", ["a\nb", "a\x00", "\x7f", "tab\there"])
def test_control_characters_are_refused(value: str) -> None:
    with pytest.raises(BadRequest):
        string_literal(value)
    with pytest.raises(BadRequest):
        filter_expr(Filters(source=value))


# --- modes and weights: pure ------------------------------------------------------------------


def test_parse_mode() -> None:
    assert [parse_mode(m) for m in ("hybrid", "Dense", " sparse ", "BM25")] == [
        "hybrid",
        "dense",
        "sparse",
        "bm25",
    ]
    with pytest.raises(BadRequest, match="hybrid, dense, sparse, bm25"):
        parse_mode("lexical")


def test_parse_weights() -> None:
    assert parse_weights("dense=1,sparse=0.5, bm25=0") == {"dense": 1, "sparse": 0.5, "bm25": 0}
    assert parse_weights("bm25=0.25") == {"bm25": 0.25}
    for bad in ("", "dense", "dense=x", "dense=2", "dense=-1", "dense=nan", "colbert=1",
                "dense=1,dense=1", "dense=0,bm25=0"):  # fmt: skip
        with pytest.raises(BadRequest):
            parse_weights(bad)


ALL = {"dense", "sparse", "bm25"}
MINI = {"dense", "bm25"}
OLD = {"dense"}


@pytest.mark.parametrize(
    ("mode", "available", "legs", "noted"),
    [
        ("hybrid", ALL, ("dense", "sparse", "bm25"), False),
        ("hybrid", MINI, ("dense", "bm25"), False),
        ("hybrid", OLD, ("dense",), True),
        ("dense", ALL, ("dense",), False),
        ("sparse", ALL, ("sparse",), False),
        ("sparse", MINI, ("bm25",), True),
        ("sparse", OLD, ("dense",), True),
        ("bm25", ALL, ("bm25",), False),
        ("bm25", OLD, ("dense",), True),
    ],
)
def test_plan_legs_and_fallbacks(
    mode: str, available: set[str], legs: tuple[str, ...], noted: bool
) -> None:
    plan = plan_search(parse_mode(mode), available)
    assert plan.legs == legs
    assert plan.weights is None  # RRF
    assert bool(plan.notes) == noted


def test_plan_weights() -> None:
    plan = plan_search("hybrid", ALL, {"bm25": 0.5})
    assert plan.legs == ("dense", "sparse", "bm25") and plan.weights == (1.0, 1.0, 0.5)
    plan = plan_search("hybrid", MINI, {"dense": 0, "sparse": 1})
    assert plan.legs == ("bm25",) and plan.weights == (1.0,)
    assert any("sparse" in n for n in plan.notes)
    with pytest.raises(BadRequest):
        plan_search("dense", ALL, {"dense": 0, "bm25": 1})


def test_row_of_writes_only_the_collections_fields() -> None:
    v = vector("a", "some text", section="Guide › Setup", source="cms")
    row = row_of(v, with_sparse=False)
    assert row["section"] == "Guide › Setup" and row["source"] == "cms"
    assert row["fetched_ms"] == 1767225600000  # 2026-01-01T00:00:00Z
    old = row_of(v, False, {"id", "doc_id", "chunk_index", "url", "title", "text", "dense"})
    assert set(old) == {"id", "doc_id", "chunk_index", "url", "title", "text", "dense"}


# --- on Milvus Lite ---------------------------------------------------------------------------


def vector(
    name: str,
    text: str,
    *,
    dense: np.ndarray | None = None,
    sparse: Sparse | None = None,
    section: str | None = None,
    source: str | None = None,
    fetched_at: str = "2026-01-01T00:00:00.000Z",
    url: str | None = None,
) -> Vector:
    u = normalize_url(url or f"http://docs.example.org/{name}")
    chunk = Chunk(
        op="upsert",
        doc_id=doc_id(u),
        url=u,
        chunk_count=1,
        chunk_index=0,
        text=text,
        text_hash=text_hash(text),
        doc_hash=text_hash(name),
        fetched_at=fetched_at,
        title=name,
        section=section,
        source=source,
    )
    d = np.ones(4, "float32") if dense is None else dense
    return Vector(chunk=chunk, model="test", dim=len(d), dense=d, sparse=sparse)


def release_lite() -> None:
    """Milvus Lite serves one data path per process: let the next test's client open it."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_all()


StoreOf = Callable[[str], MilvusStore]


@pytest.fixture
def store_of(tmp_path: Path) -> Iterator[StoreOf]:
    opened: list[MilvusStore] = []

    def make(collection: str) -> MilvusStore:
        s = Settings(home=tmp_path / "home", collection=collection)
        store = MilvusStore(s)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
    release_lite()


def rng_unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    v = rng.standard_normal(dim).astype("float32")
    return v / np.linalg.norm(v)


@pytest.mark.slow
def test_bge_m3_shaped_collection_runs_every_leg(store_of: StoreOf) -> None:
    """dense 1024 + learned sparse + bm25: hybrid fuses three legs; each mode finds the
    row its own query vector points at."""
    rng = np.random.default_rng(7)
    store = store_of("m3")
    vecs = []
    for n in range(30):
        idx = sorted(rng.choice(5000, size=12, replace=False).tolist())
        sp = Sparse(indices=idx, values=rng.random(12).astype("float32") + 0.01)
        vecs.append(vector(f"p{n}", f"page {n} word{n}", dense=rng_unit(rng, 1024), sparse=sp))
    store.write(reduce_window(vecs))
    assert store.legs() == {"dense", "sparse", "bm25"}
    target = vecs[3]
    assert target.sparse is not None and target.dense is not None
    q_sparse = target.sparse.as_dict()
    q_dense = rng_unit(rng, 1024)  # unrelated: the sparse and bm25 legs must carry it
    modes: tuple[SearchMode, ...] = ("sparse", "bm25", "hybrid")
    for mode in modes:
        hits = store.search(q_dense, 5, text="word3", sparse=q_sparse, mode=mode)
        assert hits[0].url == target.chunk.url, (mode, store.plan(mode), hits)
        assert all(h.score > 0 for h in hits), hits
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert store.plan("hybrid").legs == ("dense", "sparse", "bm25")
    weighted = store.search(
        target.dense, 3, text="word9", sparse=q_sparse, weights={"dense": 1, "sparse": 0, "bm25": 0}
    )
    assert weighted[0].url == target.chunk.url  # only the dense leg ran
    dense = store.search(target.dense, 3, mode="dense")
    assert dense[0].url == target.chunk.url and math.isclose(dense[0].score, 1.0, abs_tol=1e-3)


MARCH = "2026-03-01T00:00:00Z"


@pytest.mark.slow
def test_filters_on_milvus(store_of: StoreOf) -> None:
    """url_prefix literally (``_`` and ``%`` are not wildcards), source, since; a hostile
    prefix matches nothing instead of everything."""
    store = store_of("filters")
    rows = [
        vector("a", "alpha", url="http://e.org/a_b/1", source="cms"),
        vector("b", "alpha", url="http://e.org/axb/2", source="cli"),
        vector("c", "alpha", url="http://e.org/100%25/3", source="cms", fetched_at=MARCH),
        vector("d", "alpha", url="http://e.org/100x/4", source='we"ird'),
    ]  # fmt: skip
    store.write(reduce_window(rows))

    def urls(**kw: Any) -> set[str]:
        hits = store.search(np.ones(4, "float32"), 10, text="alpha", filters=Filters(**kw))
        return {h.url.rsplit("/", 1)[-1] for h in hits}

    assert urls() == {"1", "2", "3", "4"}
    assert urls(url_prefix="http://e.org/a_b") == {"1"}
    assert urls(url_prefix="http://e.org/100%") == {"3"}
    assert urls(url_prefix="http://e.org/") == {"1", "2", "3", "4"}
    assert urls(url_prefix='a" or 1==1 or "') == set()
    assert urls(url_prefix='http://e.org/" or url like "%') == set()
    assert urls(source="cms") == {"1", "3"}
    assert urls(source='we"ird') == {"4"}
    assert urls(source='cms" or source != "') == set()
    assert urls(since_ms=1772323200000) == {"3"}  # 2026-03-01
    assert urls(source="cms", url_prefix="http://e.org/a") == {"1"}


def old_collection(store: MilvusStore, dim: int) -> None:
    """A collection exactly as ragstream created it before hybrid search."""
    from pymilvus import DataType

    c = store.client
    schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("doc_id", DataType.VARCHAR, max_length=32)
    schema.add_field("chunk_index", DataType.INT64)
    schema.add_field("url", DataType.VARCHAR, max_length=2048)
    schema.add_field("title", DataType.VARCHAR, max_length=512)
    schema.add_field("text", DataType.VARCHAR, max_length=65535)
    schema.add_field("text_hash", DataType.VARCHAR, max_length=64)
    schema.add_field("doc_hash", DataType.VARCHAR, max_length=64)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
    index = c.prepare_index_params()
    index.add_index("dense", index_type="AUTOINDEX", metric_type="COSINE")
    c.create_collection(store.name, schema=schema, index_params=index, description="test")


@pytest.mark.slow
def test_an_older_collection_is_written_and_searched(store_of: StoreOf) -> None:
    """A collection without section/source/fetched_ms/bm25: the writer writes the fields it
    has, every mode falls back to dense with a note, a filter on a missing field says so."""
    store = store_of("old")
    old_collection(store, 4)
    store.close()
    release_lite()
    store = store_of("old")
    rows = [vector(f"o{n}", f"old {n}", dense=np.eye(4, dtype="float32")[n]) for n in range(4)]
    result = store.write(reduce_window(rows))
    assert result.upserted == 4 and not result.refused_rows
    assert store.legs() == {"dense"}
    modes: tuple[SearchMode, ...] = ("hybrid", "bm25", "sparse")
    for mode in modes:
        plan = store.plan(mode)
        assert plan.legs == ("dense",) and "older ragstream" in " ".join(plan.notes), plan
        hits = store.search(np.eye(4, dtype="float32")[2], 2, text="old", mode=mode)
        assert hits[0].url == rows[2].chunk.url and hits[0].section == ""
    assert store.search(np.eye(4, dtype="float32")[1], 1, filters=Filters(url_prefix="http://"))
    with pytest.raises(BadRequest, match="no source field"):
        store.search(np.ones(4, "float32"), 1, filters=Filters(source="cms"))
    with pytest.raises(BadRequest, match="no fetched_ms field"):
        store.search(np.ones(4, "float32"), 1, filters=Filters(since_ms=0))


# --- with the real MiniLM model: BM25, hybrid, and the three front doors agree -----------------

TARGET = "settings-index"
CORPUS = {
    TARGET: "Settings reference, part 7: DEFAULT_CHARSET, CSRF_COOKIE_SECURE, DATE_FORMAT, "
    "EMAIL_HOST, FIRST_DAY_OF_WEEK, LANGUAGE_CODE and MEDIA_ROOT are listed below.",
    "csrf-https": "To protect against cross-site request forgery, mark the CSRF cookie as secure "
    "so that browsers only send it over HTTPS connections.",
    "session-secure": "Set SESSION_COOKIE_SECURE to send the session cookie over HTTPS only.",
    "csrf-httponly": "CSRF_COOKIE_HTTPONLY keeps JavaScript from reading the CSRF cookie.",
    "csrf-middleware": "The CSRF middleware checks a secret token in each POST request against "
    "the CSRF cookie.",
    "files": "Reading a file: open it with a context manager and iterate over its lines.",
    "templates": "Templates render context variables; filters change how a value is shown.",
    "models": "A model is the single, definitive source of information about your data.",
}
SECTIONS = {name: f"Docs › {name.replace('-', ' ').title()}" for name in CORPUS}


@pytest.fixture
def minilm_index(unit_settings: Settings) -> Iterator[Settings]:
    """The corpus above embedded with MiniLM and written through MilvusStore (Lite, embedded
    in this process); the settings to search it with."""
    from streams.embedder import Embedder

    settings = unit_settings.model_copy(update={"collection": "minilm"})
    embedder = Embedder(settings)
    names = list(CORPUS)
    enc = embedder.encode([CORPUS[n] for n in names])
    vecs = [
        dataclasses.replace(
            vector(
                n,
                CORPUS[n],
                dense=enc.dense[i],
                section=SECTIONS[n],
                source="cms" if i % 2 else "cli",
            ),
            model=embedder.name,
        )
        for i, n in enumerate(names)
    ]
    store = MilvusStore(settings)
    try:
        store.write(reduce_window(vecs))
        assert store.count() == len(CORPUS)
    finally:
        store.close()
    yield settings
    release_lite()


def name_of(url: str) -> str:
    return url.rsplit("/", 1)[-1]


@pytest.mark.slow
def test_bm25_finds_an_identifier_that_dense_ranks_lower(minilm_index: Settings) -> None:
    from ops.search import Searcher

    with Searcher(minilm_index) as searcher:
        bm25 = searcher.search("CSRF_COOKIE_SECURE", 5, mode="bm25")
        dense = searcher.search("CSRF_COOKIE_SECURE", 5, mode="dense")
        hybrid = searcher.search("CSRF_COOKIE_SECURE", 5)
        ranked = {mode: [name_of(h.url) for h in r.hits] for mode, r in
                  (("bm25", bm25), ("dense", dense), ("hybrid", hybrid))}  # fmt: skip
        assert bm25.legs == ("bm25",) and hybrid.legs == ("dense", "bm25"), ranked
        assert ranked["bm25"] == [TARGET], ranked  # the only chunk with that token
        assert ranked["dense"][0] != TARGET, ranked
        assert ranked["hybrid"].index(TARGET) < ranked["dense"].index(TARGET)
        assert bm25.hits[0].section == SECTIONS[TARGET] and bm25.hits[0].score > 0
        # a question in words: dense (and hybrid) find the meaning
        words = searcher.search("how do I read a file line by line", 3)
        assert name_of(words.hits[0].url) == "files", words
        # filters through the whole path
        only = searcher.search(
            "cookie", 10, mode="bm25", url_prefix="http://docs.example.org/csrf-"
        )
        assert {name_of(h.url) for h in only.hits} == {
            "csrf-https",
            "csrf-httponly",
            "csrf-middleware",
        }
        cms = searcher.search("cookie", 10, source="cms")
        assert cms.hits and all(CORPUS_SOURCE[name_of(h.url)] == "cms" for h in cms.hits)
        assert not searcher.search("cookie", 10, since="1h").hits  # fetched 2026-01-01
        assert len(searcher.search("cookie", 10, since="2025-12-31").hits) == 8


CORPUS_SOURCE = {n: "cms" if i % 2 else "cli" for i, n in enumerate(CORPUS)}
QUERIES = [("secure cookie over https", "hybrid"), ("CSRF_COOKIE_SECURE", "bm25"),
           ("csrf token", "dense")]  # fmt: skip


@pytest.mark.slow
def test_cli_api_and_http_return_the_same_hits(
    minilm_index: Settings,
    cli_environ: Callable[[Settings], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import asyncio

    import orjson
    from aiohttp.test_utils import TestClient, TestServer

    from ops.webhooks import create_app
    from ragstream import Index
    from ragstream.cli import main

    cli_environ(minilm_index)

    cli: dict[tuple[str, str], list[str]] = {}
    for q, mode in QUERIES:
        assert main(["search", q, "-k", "4", "--mode", mode, "--json"]) == 0
        out = orjson.loads(capsys.readouterr().out)
        assert out["mode"] == mode and set(out["hits"][0]) >= {
            "id", "score", "url", "title", "section", "text", "chunk_index"}  # fmt: skip
        cli[(q, mode)] = [h["id"] for h in out["hits"]]

    with Index() as index:  # settings from the environment
        api = {(q, m): [h.id for h in index.search(q, k=4, mode=m)] for q, m in QUERIES}

    async def over_http() -> dict[tuple[str, str], list[str]]:
        app = create_app(minilm_index, insecure_no_signature=True)
        out = {}
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            for q, mode in QUERIES:
                resp = await client.get("/v1/search", params={"q": q, "k": "4", "mode": mode})
                assert resp.status == 200, await resp.text()
                out[(q, mode)] = [h["id"] for h in (await resp.json())["hits"]]
        return out

    http = asyncio.run(over_http())
    assert cli == api == http, (cli, api, http)
    assert all(len(ids) == 4 for (_, m), ids in cli.items() if m != "bm25")


# --- the HTTP route's hardening (no model, no Milvus: the fast tier) ---------------------------


def test_search_args_refuse_what_they_do_not_know() -> None:
    from multidict import MultiDict

    from ops.search import MAX_K, MAX_QUERY_CHARS
    from ops.webhooks import search_args

    ok = search_args(MultiDict(q="x", k="7", mode="bm25", url_prefix="http://a/", since="2h"))
    assert ok == {"query": "x", "k": 7, "mode": "bm25", "url_prefix": "http://a/", "since": "2h"}
    assert search_args(MultiDict(q="x"))["k"] == 5
    for bad in (
        MultiDict(),
        MultiDict(q=""),
        MultiDict(q="   "),
        MultiDict(q="x" * (MAX_QUERY_CHARS + 1)),
        MultiDict(q="x", k="0"),
        MultiDict(q="x", k=str(MAX_K + 1)),
        MultiDict(q="x", k="-1"),
        MultiDict(q="x", k="1e3"),
        MultiDict(q="x", urlprefix="a"),
        MultiDict([("q", "x"), ("q", "y")]),
        MultiDict([("q", "x"), ("source", "a"), ("source", "b")]),
    ):
        with pytest.raises(BadRequest):
            search_args(bad)


async def _get(settings: Settings, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    from aiohttp.test_utils import TestClient, TestServer

    from ops.webhooks import create_app

    app = create_app(settings, insecure_no_signature=True)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        resp = await client.get("/v1/search", params=params)
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"q": "x", "k": "101"},
        {"q": "x", "k": "many"},
        {"q": "x", "mode": "lexical"},
        {"q": "x", "weights": "dense=2"},
        {"q": "x", "since": "yesterday"},
        {"q": "x", "url_prefix": "a\nb"},
        {"q": "x", "limit": "5"},
        {"q": "x" * 5000},
    ],
)
def test_bad_search_parameters_are_400_json(
    unit_settings: Settings, params: dict[str, str]
) -> None:
    """Refused before Milvus or the model is touched: ``MILVUS_URI`` points nowhere."""
    import asyncio

    settings = unit_settings.model_copy(update={"milvus_uri": "http://127.0.0.1:9"})
    status, body = asyncio.run(_get(settings, params))
    assert status == 400, body
    assert body["error"]


def test_milvus_away_is_503_and_the_server_starts_without_a_model(unit_settings: Settings) -> None:
    import asyncio

    # no model at that path: the app is made and answers without loading one
    settings = unit_settings.model_copy(
        update={"milvus_uri": "http://127.0.0.1:9", "model": "/nonexistent/model"}
    )
    status, body = asyncio.run(_get(settings, {"q": "anything"}))
    assert status == 503, body
    assert "cannot open Milvus" in body["error"]


@pytest.mark.slow
def test_cli_hybrid_on_a_bge_m3_shaped_model(
    random_m3: Path,
    unit_settings: Settings,
    cli_environ: Callable[[Settings], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The whole way with a model of BGE-M3's shape (random weights): the embedder gives
    dense 1024 + learned sparse, the writer makes a collection with all three legs, and
    ``ragstream search --mode hybrid`` encodes the query with the same model and fuses them.
    With random weights only the lexical legs mean anything, so the query is a page's own
    text: its learned-sparse and bm25 legs rank it first whatever the dense leg says."""
    import orjson

    from ragstream.cli import main
    from streams.embedder import Embedder

    settings = unit_settings.model_copy(update={"model": str(random_m3), "collection": "m3"})
    embedder = Embedder(settings)
    names = list(CORPUS)
    enc = embedder.encode([CORPUS[n] for n in names])
    assert enc.sparse is not None and enc.dense.shape[1] == 1024
    vecs = [
        dataclasses.replace(
            vector(n, CORPUS[n], dense=enc.dense[i],
                   sparse=Sparse(list(enc.sparse[i]), np.array(list(enc.sparse[i].values()),
                                                               dtype="float32"))),
            model=embedder.name,
        )
        for i, n in enumerate(names)
    ]  # fmt: skip
    store = MilvusStore(settings)
    try:
        store.write(reduce_window(vecs))
        assert store.legs() == {"dense", "sparse", "bm25"}
    finally:
        store.close()
    release_lite()
    cli_environ(settings)
    query = CORPUS[TARGET]
    for mode, legs in (("hybrid", ["dense", "sparse", "bm25"]), ("sparse", ["sparse"])):
        assert main(["search", query, "-k", "3", "--mode", mode, "--json"]) == 0
        out = orjson.loads(capsys.readouterr().out)
        assert out["legs"] == legs, out
        assert name_of(out["hits"][0]["url"]) == TARGET, out
    release_lite()


@pytest.mark.slow
def test_weighted_fusion_follows_the_weights(store_of: StoreOf) -> None:
    """Milvus Lite reports BM25 distances negated; a weighted fusion must still read them
    as larger-is-better: weighting bm25 up puts its hits first, weighting dense up puts
    dense's first."""
    rng = np.random.default_rng(1)
    store = store_of("weighted")
    texts = {f"p{i}": " ".join(f"w{rng.integers(0, 40)}" for _ in range(20)) for i in range(40)}
    texts["p7"] = "zebra zebra zebra quagga " + texts["p7"]
    texts["p8"] = "zebra " + texts["p8"]
    store.write(reduce_window([vector(n, t, dense=rng_unit(rng, 8)) for n, t in texts.items()]))
    q = rng_unit(rng, 8)
    lexical = [name_of(h.url) for h in store.search(q, 5, text="zebra quagga", mode="bm25")]
    dense = [name_of(h.url) for h in store.search(q, 5, mode="dense")]
    assert lexical == ["p7", "p8"] and dense[0] not in lexical
    to_bm25 = store.search(q, 5, text="zebra quagga", weights={"dense": 0.01, "bm25": 1.0})
    to_dense = store.search(q, 5, text="zebra quagga", weights={"dense": 1.0, "bm25": 0.01})
    assert [name_of(h.url) for h in to_bm25][:2] == lexical
    assert [name_of(h.url) for h in to_dense][:2] == dense[:2]
