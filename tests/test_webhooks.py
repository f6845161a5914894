"""The webhook server against the real broker: what is published, and that refusals publish nothing.

Each test runs the aiohttp application in-process (``TestServer``) with its own topic
prefix, and reads the ``urls`` topic back with a plain aiokafka consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaConsumer, TopicPartition

from ragstream import kafka_local
from ragstream.errors import RagstreamError
from ragstream.webhooks import create_app, glob_regex, sign, signature_ok
from streams.messages import UrlRequest, decode_url
from streams.settings import Settings
from streams.topics import URLS, topic_end_offsets

SECRET = "generic-s3cret"
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


def signed(body: bytes, secret: str = SECRET, header: str = "X-Ragstream-Signature-256") -> dict:
    return {header: sign(secret, body), "Content-Type": "application/json"}


async def published(settings: Settings) -> list[tuple[bytes, UrlRequest]]:
    """Every message of the test's ``urls`` topic: (key, request)."""
    topic = settings.topic(URLS)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.broker, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not tps:
            await consumer._client.force_metadata_update()  # noqa: SLF001
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
                (401, "wrong signature", ok, {"X-Ragstream-Signature-256": sign(SECRET, ok)[7:]}),
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
