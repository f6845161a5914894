"""The webhook server against the real broker: what is published, and that refusals publish nothing.

Each test runs the aiohttp application in-process (``TestServer``) with its own topic
prefix, and reads the ``urls`` topic back with a plain aiokafka consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from subprocess import PIPE

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer, TopicPartition

from devtools import kafka_local
from ops.webhooks import PUBLISHER, create_app, sign, signature_ok
from streams.errors import RagstreamError
from streams.github import glob_regex
from streams.messages import UrlRequest, decode_url
from streams.settings import Settings
from streams.topics import URLS, topic_end_offsets

SECRET = "generic-s3cret"
SIG = "X-Ragstream-Signature-256"
GH_SECRET = "github-s3cret"
RAW = "http://127.0.0.1:9/raw"


def configured(settings: Settings, **kw: object) -> Settings:
    values = {
        "webhook_secret": SECRET,
        "github_secret": GH_SECRET,
        "github_raw_base": RAW,
        "webhook_max_bytes": 4096,
        **kw,
    }
    return settings.model_copy(update=values)


@contextlib.asynccontextmanager
async def serve(settings: Settings, ready: bool = True, **kw: bool) -> AsyncIterator[TestClient]:
    """The app on a free port; with ``ready``, once its producer is connected."""
    async with TestClient(TestServer(create_app(settings, **kw), host="127.0.0.1")) as client:
        if ready:
            deadline = time.monotonic() + 30
            while (resp := await client.get("/readyz")).status != 200:
                assert time.monotonic() < deadline, await resp.text()
                await asyncio.sleep(0.2)
        yield client


def signed(
    body: bytes,
    secret: str = SECRET,
    header: str = "X-Ragstream-Signature-256",
    *,
    ts: int | None = None,
    delivery: str | None = None,
) -> dict:
    """Headers of a signed request. ``/v1/urls``' signature covers ``"<timestamp>.<body>"``;
    computed here from the documented scheme, not by the module under test."""
    if header != "X-Ragstream-Signature-256":  # GitHub's scheme: the body alone
        return {header: sign(secret, body), "Content-Type": "application/json"}
    ts = int(time.time()) if ts is None else ts
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    headers = {
        header: f"sha256={mac}",
        "X-Ragstream-Timestamp": str(ts),
        "Content-Type": "application/json",
    }
    if delivery is not None:
        headers["X-Ragstream-Delivery"] = delivery
    return headers


async def published(settings: Settings) -> list[tuple[bytes, UrlRequest]]:
    """Every message of the test's ``urls`` topic: (key, request)."""
    topic = settings.topic(URLS)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not tps:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or []
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
        assert tps, f"topic {topic} does not exist"
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out = []
        async with asyncio.timeout(15):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    out.extend((r.key, decode_url(r.value)) for r in records)
        return out
    finally:
        await consumer.stop()


async def count(settings: Settings) -> int:
    topic = settings.topic(URLS)
    return (await topic_end_offsets(settings, [topic]))[topic]


# --- pure logic (no broker) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "hit"),
    [
        ("**/*", "README.md", True),
        ("**/*", "a/b/c.txt", True),
        ("*.md", "README.md", True),
        ("*.md", "docs/a.md", False),
        ("docs/**/*.md", "docs/a.md", True),
        ("docs/**/*.md", "docs/x/y/a.md", True),
        ("docs/**/*.md", "docs/a.txt", False),
        ("docs/**/*.md", "src/docs/a.md", False),
        ("docs/*.md", "docs/x/a.md", False),
        ("docs/**", "docs/x/a.md", True),
        ("?.txt", "a.txt", True),
        ("?.txt", "ab.txt", False),
        ("[!_]*.py", "_x.py", False),
        ("[!_]*.py", "x.py", True),
        ("a+b.md", "a+b.md", True),
        ("a+b.md", "aab.md", False),
    ],
)
def test_glob(pattern: str, path: str, hit: bool) -> None:
    assert bool(glob_regex(pattern).match(path)) is hit


def test_signature() -> None:
    body = b'{"urls": ["https://example.com/"]}'
    good = sign("k", body)
    assert good.startswith("sha256=") and len(good) == 7 + 64
    assert signature_ok("k", body, good)
    assert signature_ok("k", body, "SHA256=" + good[7:].upper())  # hex case is not a secret
    assert not signature_ok("k", body + b" ", good)
    assert not signature_ok("other", body, good)
    assert not signature_ok("k", body, good[7:])  # the "sha256=" prefix is required
    assert not signature_ok("k", body, None)
    assert not signature_ok("k", body, "sha256=\u00e9")  # non-ASCII does not raise


def test_refuses_bad_configuration() -> None:
    with pytest.raises(RagstreamError, match="RAGSTREAM_WEBHOOK_SECRET"):
        create_app(Settings(webhook_secret="", github_secret="x"))
    with pytest.raises(RagstreamError, match="RAGSTREAM_GITHUB_RAW_BASE"):
        create_app(Settings(webhook_secret="x", github_raw_base="raw.githubusercontent.com"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGSTREAM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "ragstream.cli", "webhooks", "--port", "0"],
        env={**env, "RAGSTREAM_BROKER": "127.0.0.1:9"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "--insecure-no-signature" in proc.stderr


def test_unreachable_broker() -> None:
    """Up while Kafka is away: alive, not ready, and a valid request gets 503."""
    settings = configured(Settings(broker=f"127.0.0.1:{kafka_local.free_port()}"))

    async def scenario() -> None:
        async with serve(settings, ready=False) as client:
            assert (await client.get("/healthz")).status == 200
            resp = await client.get("/readyz")
            assert resp.status == 503 and (await resp.json())["ready"] is False
            body = b'{"urls": ["https://example.com/a"]}'
            resp = await client.post("/v1/urls", data=body, headers=signed(body))
            assert resp.status == 503, await resp.text()
            assert "Kafka" in (await resp.json())["error"]

    asyncio.run(scenario())


# --- POST /v1/urls -----------------------------------------------------------------------


@pytest.mark.kafka
def test_urls_route(settings: Settings) -> None:
    settings = configured(settings)

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    async def scenario() -> None:
        async with serve(settings) as client:
            assert (await client.get("/healthz")).status == 200
            body = orjson.dumps(
                {
                    "urls": [
                        "https://example.com/a",
                        " https://example.com/b",
                        "https://example.com/a",
                    ],
                    "source": "crm",
                    "force": True,
                }
            )
            resp = await client.post("/v1/urls", data=body, headers=signed(body))
            assert resp.status == 202, await resp.text()
            assert await resp.json() == {"accepted": 2}
            got = await published(settings)
            assert sorted((k, r.url, r.source, r.force, r.delete) for k, r in got) == [
                (b"https://example.com/a", "https://example.com/a", "crm", True, False),
                (b"https://example.com/b", "https://example.com/b", "crm", True, False),
            ]
            body = b'{"urls": ["http://example.org/x"]}'
            resp = await client.post("/v1/urls", data=body, headers=signed(body))
            assert resp.status == 202 and await resp.json() == {"accepted": 1}
            assert {r.source for _, r in await published(settings)} == {"crm", "webhook"}
            before = await count(settings)
            assert before == 3

            ok = b'{"urls": ["https://example.com/c"]}'
            rejected: list[tuple[int, str, bytes, dict]] = [
                (401, "missing signature", ok, {"Content-Type": "application/json"}),
                (401, "wrong signature", ok, signed(ok, secret="not-the-secret")),
                (401, "wrong signature", ok, signed(ok + b" ")),
                (401, "wrong signature", ok, {**signed(ok), "X-Ragstream-Timestamp": "1"}),
                (
                    401,
                    "wrong signature",
                    ok,
                    {**signed(ok), "X-Ragstream-Signature-256": signed(ok)[SIG][7:]},
                ),
                (401, "missing", ok, signed(ok, secret=SECRET, header="X-Hub-Signature-256")),
            ]
            big = orjson.dumps({"urls": [f"https://example.com/{i:05d}" for i in range(400)]})
            assert len(big) > settings.webhook_max_bytes
            rejected.append((413, "limit", big, signed(big)))
            bad_bodies = {
                b'{"urls": ["https://example.com/c"]': "not valid JSON",
                b"": "not valid JSON",
                b'["https://example.com/c"]': "must be a JSON object",
                b'{"url": "https://example.com/c"}': "unknown field(s): url",
                b'{"source": "x"}': "missing field 'urls'",
                b'{"urls": "https://example.com/c"}': "'urls' must be a list",
                b'{"urls": []}': "'urls' is empty",
                b'{"urls": ["https://example.com/c", 7]}': "urls[1] must be a string",
                b'{"urls": ["https://example.com/c", "ftp://example.com/f"]}': "urls[1]: only http",
                b'{"urls": ["https://example.com/c", "example.com"]}': "urls[1]",
                b'{"urls": ["https://example.com/c"], "force": "yes"}': "'force' must be true",
                b'{"urls": ["https://example.com/c"], "source": 3}': "'source' must be",
                b'{"urls": ["https://example.com/c"], "delete": true}': "unknown field(s): delete",
                orjson.dumps({"urls": ["https://example.com/" + "x" * 9000]}): "limit",
                orjson.dumps({"urls": ["https://example.com/c"], "source": "s" * 300}): "urls[0]",
            }
            for body, message in bad_bodies.items():
                status = 413 if message == "limit" else 400
                rejected.append((status, message, body, signed(body)))
            for status, message, body, headers in rejected:
                resp = await client.post("/v1/urls", data=body, headers=headers)
                text = await resp.text()
                assert resp.status == status, (body[:80], text)
                assert resp.content_type == "application/json", text
                assert message in json.loads(text)["error"], (body[:80], text)
            # Over the limit without a Content-Length (chunked): caught while reading.
            resp = await client.post("/v1/urls", data=chunked(big), headers=signed(big))
            assert resp.status == 413, await resp.text()
            # A declared Content-Length over the limit is refused before any body is sent.
            reader, writer = await asyncio.open_connection(client.host, client.port)
            writer.write(
                b"POST /v1/urls HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10000000\r\n\r\n"
            )
            try:
                async with asyncio.timeout(5):
                    status_line = await reader.readline()
            finally:
                writer.close()
            assert status_line.split()[1] == b"413", status_line
            assert await count(settings) == before  # nothing published for any refusal

    asyncio.run(scenario())


@pytest.mark.kafka
def test_insecure_mode(settings: Settings) -> None:
    """Without a secret only when asked; a route that has a secret still checks it."""
    settings = configured(settings, webhook_secret="", github_secret=GH_SECRET)
    with pytest.raises(RagstreamError):
        create_app(settings)

    async def scenario() -> None:
        async with serve(settings, insecure_no_signature=True) as client:
            body = b'{"urls": ["https://example.com/unsigned"]}'
            resp = await client.post("/v1/urls", data=body)
            assert resp.status == 202, await resp.text()
            assert [r.url for _, r in await published(settings)] == ["https://example.com/unsigned"]
            resp = await client.post("/v1/github", data=b"{}", headers={"X-GitHub-Event": "ping"})
            assert resp.status == 401

    asyncio.run(scenario())


# --- POST /v1/github ---------------------------------------------------------------------


def push(ref: str, commits: list[dict]) -> bytes:
    return orjson.dumps(
        {
            "ref": ref,
            "before": "1" * 40,
            "after": "2" * 40,
            "repository": {"full_name": "acme/handbook", "name": "handbook"},
            "commits": [{"id": str(i) * 40, **c} for i, c in enumerate(commits)],
        }
    )


def gh(body: bytes, event: str = "push", secret: str = GH_SECRET) -> dict:
    return {**signed(body, secret, "X-Hub-Signature-256"), "X-GitHub-Event": event}


@pytest.mark.kafka
def test_github_route(settings: Settings) -> None:
    settings = configured(settings, github_globs="docs/**/*.md, README.md")
    base = f"{RAW}/acme/handbook/main"
    commits = [
        {
            "added": ["docs/a.md", "docs/b.md", "src/x.py", "docs/with space.md"],
            "modified": ["README.md", "docs/notes.txt"],
            "removed": ["docs/old.md", "src/gone.py"],
        },
        {
            "added": ["docs/old.md"],  # removed, then re-added: ingested
            "modified": ["docs/sub/c.md"],
            "removed": ["docs/a.md"],  # added, then removed: deleted
        },
    ]

    async def scenario() -> None:
        async with serve(settings) as client:
            resp = await client.post("/v1/github", data=b"{}", headers=gh(b"{}", "ping"))
            assert resp.status == 200 and await resp.json() == {"pong": True}

            body = push("refs/heads/main", commits)
            resp = await client.post("/v1/github", data=body, headers=gh(body))
            assert resp.status == 202, await resp.text()
            assert await resp.json() == {"accepted": 6}
            got = await published(settings)
            by_url = {r.url: r for _, r in got}
            assert {u: r.delete for u, r in by_url.items()} == {
                f"{base}/README.md": False,
                f"{base}/docs/a.md": True,
                f"{base}/docs/b.md": False,
                f"{base}/docs/old.md": False,
                f"{base}/docs/sub/c.md": False,
                f"{base}/docs/with%20space.md": False,
            }
            assert len(got) == 6  # one message per path, none for src/ or .txt files
            assert all(k == r.url.encode() and r.source == "github" for k, r in got)
            assert by_url[f"{base}/docs/b.md"].metadata == {
                "repository": "acme/handbook",
                "ref": "refs/heads/main",
                "commit": "2" * 40,
                "path": "docs/b.md",
            }
            before = await count(settings)

            for ref in ("refs/heads/dev", "refs/tags/v1.0"):  # not a listed branch
                body = push(ref, commits)
                resp = await client.post("/v1/github", data=body, headers=gh(body))
                assert resp.status == 202, await resp.text()
                assert (await resp.json())["accepted"] == 0
            body = push("refs/heads/main", commits)
            refused = [
                (401, gh(body, secret=SECRET)),  # the generic secret is not GitHub's
                (401, {"X-GitHub-Event": "push", "Content-Type": "application/json"}),
                (401, {**signed(body, GH_SECRET), "X-GitHub-Event": "push"}),  # wrong header
            ]
            for status, headers in refused:
                resp = await client.post("/v1/github", data=body, headers=headers)
                assert resp.status == status, await resp.text()
            resp = await client.post("/v1/github", data=b"{}", headers={"X-GitHub-Event": "ping"})
            assert resp.status == 401  # even a ping must be signed
            for bad, message in [
                (b"{not json", "not valid JSON"),
                (b'{"ref": "refs/heads/main"}', "repository.full_name"),
                (push("refs/heads/main", [{"added": "docs/a.md"}]), "commits[0].added"),
            ]:
                resp = await client.post("/v1/github", data=bad, headers=gh(bad))
                assert resp.status == 400 and message in (await resp.json())["error"]
            resp = await client.post("/v1/github", data=body, headers=gh(body, "issues"))
            assert resp.status == 202 and await resp.json() == {"ignored": "issues"}
            assert await count(settings) == before  # nothing more was published

    asyncio.run(scenario())


# --- replays (issue 8) -------------------------------------------------------------------


def gh_push(body: bytes, delivery: str) -> dict:
    return {**gh(body), "X-GitHub-Delivery": delivery}


def test_delivery_log() -> None:
    """Pure: claimed keys are in flight until committed or released; expiry; the size cap."""
    from ops.webhooks import DeliveryLog

    log = DeliveryLog(retention_s=100, max_entries=3)
    assert log.claim(["a", "b"], now=0) is None
    assert log.claim(["b"], now=1) == "busy"  # in flight: neither new nor a known duplicate
    log.release(["a", "b"])  # publishing failed: the sender's retry must go through
    assert log.claim(["b", "c"], now=2) is None
    log.commit(["b", "c"], now=3)
    assert log.claim(["c"], now=4) == "duplicate"
    assert log.claim(["x", "b"], now=4) == "duplicate"  # any known key is enough
    assert log.claim(["c"], now=103.5) is None  # expired after the retention
    log.release(["c"])
    log.remember("old", at=0, now=200)  # read back from the topic, already expired
    assert "old" not in log
    for i, key in enumerate(["k1", "k2", "k3", "k4"]):
        log.remember(key, at=300 + i, now=300 + i)
    assert len(log) == 3 and "k1" not in log and log.evicted_early == 1  # oldest dropped


def test_urls_headers_match_the_documented_scheme() -> None:
    """The helper senders can import signs exactly what docs/webhooks.md says."""
    from ops.webhooks import urls_headers

    body = b'{"urls": ["https://example.com/"]}'
    got = urls_headers(SECRET, body, timestamp=1_700_000_000, delivery="d-1")
    assert got == signed(body, ts=1_700_000_000, delivery="d-1")


def test_every_url_is_validated() -> None:
    """Pure: a bad 3rd message is found, not only a bad 1st (the old check validated the
    first message against the schema and the others' URL length only)."""
    from ops.webhooks import BadRequest, check_requests, plan_urls

    ok = [UrlRequest(url=f"https://example.com/{i}", source="x") for i in range(2)]
    bad = UrlRequest(url="https://example.com/2", source="s" * 300)
    with pytest.raises(BadRequest, match=r"urls\[2\]"):
        check_requests([*ok, bad], ["urls[0]", "urls[1]", "urls[2]"])
    for url in ["http://exa mple.com/", "https://example.com/a\nb", "https://ex\x00.com/"]:
        with pytest.raises(BadRequest, match=r"urls\[2\]"):
            plan_urls({"urls": ["https://example.com/0", "https://example.com/1", url]})
    for url in ["http://[::1]:8080/a", "http://user@Example.com:81/x", "https://bücher.de/"]:
        assert len(plan_urls({"urls": [url]})) == 1  # valid hosts of other forms pass


@pytest.mark.kafka
def test_timestamp_window(settings: Settings) -> None:
    """/v1/urls signs a timestamp: outside the tolerance, or a signature of the body alone
    (replayable forever), is 401 with a message saying what to send; nothing is published."""
    settings = configured(settings, webhook_tolerance_s=60)
    body = b'{"urls": ["https://example.com/stamped"]}'

    async def scenario() -> None:
        async with serve(settings) as client:
            now = int(time.time())
            old_style = {SIG: sign(SECRET, body), "Content-Type": "application/json"}
            refused = [
                (signed(body, ts=now - 120), "tolerance is 60"),
                (signed(body, ts=now + 120), "in the future"),
                (old_style, "missing X-Ragstream-Timestamp"),
                ({**old_style, "X-Ragstream-Timestamp": str(now)}, "signs the body alone"),
                ({**signed(body), "X-Ragstream-Timestamp": "soon"}, "unix seconds"),
            ]
            for headers, message in refused:
                resp = await client.post("/v1/urls", data=body, headers=headers)
                text = await resp.text()
                assert resp.status == 401, text
                assert message in json.loads(text)["error"], text
            assert await count(settings) == 0
            resp = await client.post("/v1/urls", data=body, headers=signed(body, ts=now - 50))
            assert resp.status == 202, await resp.text()
            assert await count(settings) == 1

    asyncio.run(scenario())


@pytest.mark.kafka
def test_third_url_bad_publishes_nothing(settings: Settings) -> None:
    settings = configured(settings)
    good = ["https://example.com/1", "https://example.com/2"]

    async def scenario() -> None:
        async with serve(settings) as client:
            for bad in ["http://exa mple.com/x", "https://example.com/a\nb", "mailto:x@y.z"]:
                body = orjson.dumps({"urls": [*good, bad]})
                resp = await client.post("/v1/urls", data=body, headers=signed(body))
                text = await resp.text()
                assert resp.status == 400, text
                assert json.loads(text)["error"].startswith("urls[2]: "), text
            assert await count(settings) == 0

    asyncio.run(scenario())


@pytest.mark.kafka
def test_replayed_urls_request(settings: Settings) -> None:
    """A repeat publishes nothing: the same signed request (whatever delivery header it is
    given, or however the signature is spelt) and a retry carrying the same delivery id."""
    settings = configured(settings)
    body = b'{"urls": ["https://example.com/once"]}'

    async def scenario() -> None:
        async with serve(settings) as client:
            first = signed(body, delivery="evt-1")
            resp = await client.post("/v1/urls", data=body, headers=first)
            assert resp.status == 202 and await resp.json() == {"accepted": 1}
            upper = {**first, SIG: "SHA256=" + first[SIG][7:].upper()}
            for headers in [
                first,  # an exact replay
                {**first, "X-Ragstream-Delivery": "evt-forged"},  # the id is not signed
                {k: v for k, v in first.items() if k != "X-Ragstream-Delivery"},
                upper,
                signed(body, ts=int(time.time()) + 5, delivery="evt-1"),  # the sender's retry
            ]:
                resp = await client.post("/v1/urls", data=body, headers=headers)
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["duplicate"] is True
            assert await count(settings) == 1
            # The same URLs as a new request (new timestamp, no or another id) are published.
            later = signed(body, ts=int(time.time()) + 7, delivery="evt-2")
            resp = await client.post("/v1/urls", data=body, headers=later)
            assert resp.status == 202, await resp.text()
            assert await count(settings) == 2

    asyncio.run(scenario())


@pytest.mark.kafka
def test_replayed_push_does_not_delete_a_restored_page(settings: Settings) -> None:
    """A captured push that removed a file, replayed after the file was restored, publishes
    nothing: the last word on the page stays the restoring push (a delete message would
    remove it from the index). A forged X-GitHub-Delivery does not help: the body is a key."""
    settings = configured(settings, github_globs="docs/**/*.md")
    url = f"{RAW}/acme/handbook/main/docs/a.md"
    removal = push("refs/heads/main", [{"removed": ["docs/a.md"]}])
    restore = push("refs/heads/main", [{"added": ["docs/a.md"]}]).replace(b"2222", b"3333")

    async def scenario() -> None:
        async with serve(settings) as client:
            for body, delivery in [(removal, "guid-1"), (restore, "guid-2")]:
                resp = await client.post("/v1/github", data=body, headers=gh_push(body, delivery))
                assert resp.status == 202 and await resp.json() == {"accepted": 1}
            for delivery in ["guid-1", "guid-3"]:
                resp = await client.post(
                    "/v1/github", data=removal, headers=gh_push(removal, delivery)
                )
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["duplicate"] is True
            got = [r for _, r in await published(settings) if r.url == url]
            assert [r.delete for r in got] == [True, False]  # the page stays
            # A push older than the retention may have been forgotten: refused outright.
            stale = orjson.loads(removal)
            stale["repository"]["pushed_at"] = int(time.time()) - settings.webhook_dedup_s - 60
            body = orjson.dumps(stale)
            resp = await client.post("/v1/github", data=body, headers=gh_push(body, "guid-4"))
            assert resp.status == 401 and "pushed_at" in (await resp.json())["error"]
            fresh = {**stale, "repository": {**stale["repository"], "pushed_at": time.time()}}
            body = orjson.dumps(fresh)
            resp = await client.post("/v1/github", data=body, headers=gh_push(body, "guid-5"))
            assert resp.status == 202, await resp.text()
            assert await count(settings) == 3

    asyncio.run(scenario())


@pytest.mark.kafka
def test_delivery_ids_survive_a_restart(settings: Settings) -> None:
    """Ids persist in <prefix>webhooks.deliveries: a new server reads them before it is
    ready, and a running one follows what its peers write."""
    settings = configured(settings)
    body = b'{"urls": ["https://example.com/restart"]}'
    headers = signed(body, delivery="evt-r")
    pushed = push("refs/heads/main", [{"removed": ["README.md"]}])

    async def scenario() -> None:
        async with serve(settings) as client:
            resp = await client.post("/v1/urls", data=body, headers=headers)
            assert resp.status == 202, await resp.text()
            resp = await client.post("/v1/github", data=pushed, headers=gh_push(pushed, "g-1"))
            assert resp.status == 202, await resp.text()
        assert await count(settings) == 2
        async with serve(settings) as client, serve(settings) as peer:  # two new processes
            resp = await client.post("/v1/urls", data=body, headers=headers)
            assert resp.status == 200 and (await resp.json())["duplicate"] is True
            resp = await client.post("/v1/github", data=pushed, headers=gh_push(pushed, "g-1"))
            assert resp.status == 200 and (await resp.json())["duplicate"] is True
            new = b'{"urls": ["https://example.com/peer"]}'
            new_headers = signed(new, delivery="evt-p")
            resp = await client.post("/v1/urls", data=new, headers=new_headers)
            assert resp.status == 202, await resp.text()
            peer_log = peer.server.app[PUBLISHER].deliveries.log
            deadline = time.monotonic() + 10
            while "urls:id:evt-p" not in peer_log:  # the peer follows the topic
                assert time.monotonic() < deadline, "the peer never learned the id"
                await asyncio.sleep(0.1)
            resp = await peer.post("/v1/urls", data=new, headers=new_headers)
            assert resp.status == 200 and (await resp.json())["duplicate"] is True
        assert await count(settings) == 3

    asyncio.run(scenario())


@pytest.mark.kafka
def test_documented_curl_examples(settings: Settings) -> None:
    """The shell examples of README.md and docs/webhooks.md, run as written (port aside)."""
    settings = configured(settings)
    root = Path(__file__).resolve().parent.parent

    def snippet(doc: str, start: str, host: str, port: int) -> str:
        text = (root / doc).read_text()
        block = text[text.index(start) :]
        block = block[: block.index("```")]
        return block.replace(host, f"127.0.0.1:{port}")

    async def scenario() -> None:
        async with serve(settings) as client:
            scripts = [
                snippet("README.md", "body='", "localhost:8088", client.port),
                snippet(
                    "docs/webhooks.md",
                    'SECRET="$RAGSTREAM_WEBHOOK_SECRET"',
                    "127.0.0.1:8088",
                    client.port,
                ),
            ]
            env = {**os.environ, "RAGSTREAM_WEBHOOK_SECRET": SECRET}
            for script in scripts:
                proc = await asyncio.create_subprocess_exec(
                    "bash", "-euo", "pipefail", "-c", script, env=env, stdout=PIPE, stderr=PIPE
                )
                try:
                    async with asyncio.timeout(30):
                        out, err = await proc.communicate()
                finally:
                    if proc.returncode is None:
                        proc.kill()
                assert proc.returncode == 0, err.decode()
                assert b'{"accepted":1}' in out, (script, out, err)
            assert await count(settings) == 2

    asyncio.run(scenario())


# --- health and the real process ---------------------------------------------------------


@pytest.mark.kafka
def test_cli_serves_until_sigterm(settings: Settings) -> None:
    """``ragstream webhooks`` as a process: ready, 202, then a clean exit on SIGTERM."""
    settings = configured(settings)
    port = kafka_local.free_port()
    env = {**os.environ, **settings.to_env()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ragstream.cli", "webhooks", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as resp:
                    assert json.load(resp) == {"ready": True}
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "webhooks never became ready"
                time.sleep(0.2)
        body = b'{"urls": ["https://example.com/cli"]}'
        req = urllib.request.Request(f"{base}/v1/urls", data=body, headers=signed(body))
        with urllib.request.urlopen(req, timeout=15) as resp:
            assert resp.status == 202
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [r.url for _, r in asyncio.run(published(settings))] == ["https://example.com/cli"]
