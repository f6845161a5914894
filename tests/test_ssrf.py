"""SSRF end to end: a secret on a forbidden loopback alias is never reached, never indexed.

The secret server listens on 127.0.0.2 and counts every TCP connection; the allow list
holds 127.0.0.1/32 only (the ``settings`` fixture). URLs reach the fetch stage through
every door (published directly in every address form, a redirect from an allowed server,
a sitemap entry, a webhook) and each must end as a ``forbidden_address`` dead letter with
no connection made. Other forbidden ranges (10/8, 169.254.169.254, ...) are covered by the
unit tests, since no packet may go to a non-loopback address from here.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ops.sitemaps import read_sitemaps
from ops.webhooks import create_app
from streams.ids import normalize_url
from streams.settings import Settings
from streams.topics import URLS
from tests.helpers import Worker, baseline, milvus_rows, publish_urls, run, wait_for
from tests.hostile import SECRET, HostileServer, SecretServer, redirect, send, text
from tests.test_deadletters import read_dlq

pytestmark = [pytest.mark.kafka]

GOOD = "A good page about sprockets and widgets."
NS = "http://www.sitemaps.org/schemas/sitemap/0.9"


def urlset(*locs: str) -> bytes:
    items = "".join(f"<url><loc>{loc}</loc></url>" for loc in locs)
    return f'<?xml version="1.0"?><urlset xmlns="{NS}">{items}</urlset>'.encode()


def sitemap_index(*locs: str) -> bytes:
    items = "".join(f"<sitemap><loc>{loc}</loc></sitemap>" for loc in locs)
    return f'<?xml version="1.0"?><sitemapindex xmlns="{NS}">{items}</sitemapindex>'.encode()


async def post_webhook(settings: Settings, urls: list[str]) -> int:
    app = create_app(settings, insecure_no_signature=True)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        deadline = time.monotonic() + 30
        while (await client.get("/readyz")).status != 200:
            assert time.monotonic() < deadline, "webhooks never became ready"
            await asyncio.sleep(0.2)
        body = orjson.dumps({"urls": urls})
        resp = await client.post(
            "/v1/urls", data=body, headers={"Content-Type": "application/json"}
        )
        assert resp.status == 202, await resp.text()
        return resp.status


def test_secret_on_a_forbidden_address_is_never_reached(settings: Settings) -> None:
    settings = settings.model_copy(update={"webhook_secret": ""})
    with SecretServer("127.0.0.2") as secret, HostileServer() as allowed:
        p = secret.port
        direct = [
            f"http://127.0.0.2:{p}/plain",
            f"http://2130706434:{p}/decimal",
            f"http://0177.0.0.2:{p}/octal",
            f"http://0x7f.0.0.2:{p}/hex",
            f"http://[::ffff:127.0.0.2]:{p}/mapped",
            f"http://[::127.0.0.2]:{p}/compatible",
            allowed.url("/redirect"),
        ]
        allowed.routes["/redirect"] = redirect(f"http://127.0.0.2:{p}/redirected")
        allowed.routes["/good.txt"] = text(GOOD)
        in_sitemap = [f"http://127.0.0.2:{p}/from-sitemap", f"http://2130706434:{p}/from-map"]
        allowed.routes["/sitemap.xml"] = lambda h: send(
            h, 200, urlset(*in_sitemap), "application/xml"
        )
        allowed.routes["/index.xml"] = lambda h: send(
            h,
            200,
            sitemap_index(allowed.url("/sitemap.xml"), f"http://127.0.0.2:{p}/secret-map.xml"),
            "application/xml",
        )
        by_webhook = [f"http://127.0.0.2:{p}/from-webhook"]
        good = allowed.url("/good.txt")

        base = baseline(settings)
        worker = Worker(settings)
        try:
            publish_urls(settings, direct)
            # a sitemap index with one forbidden sitemap, and a sitemap with forbidden entries,
            # read by the code `ragstream publish --sitemap` runs
            crawl = run(read_sitemaps([allowed.url("/index.xml")], settings=settings))
            assert crawl.urls == in_sitemap
            assert len(crawl.errors) == 1 and "forbidden_address" in crawl.errors[0]
            publish_urls(settings, crawl.urls)
            run(post_webhook(settings, by_webhook))
            publish_urls(settings, [good])
            n = len(direct) + len(in_sitemap) + len(by_webhook) + 1
            letters = run(read_dlq(settings, URLS, n - 1))
            snap = wait_for(settings, base, n, worker)
        finally:
            worker.stop()
        time.sleep(0.3)
        assert secret.connections == 0  # not one TCP connection, through any door
    by_url = {dl.url: dl for dl in letters}
    expected = [normalize_url(u) for u in direct + in_sitemap + by_webhook]
    assert sorted(by_url) == sorted(expected), [(d.url, d.error_class, d.error) for d in letters]
    for dl in letters:
        assert dl.error_class == "forbidden_address", (dl.url, dl.error_class, dl.error)
        assert "127.0.0.2" in dl.error and "RAGSTREAM_FETCH_ALLOW" in dl.error
    assert "redirects to" in by_url[normalize_url(allowed.url("/redirect"))].error
    assert allowed.hits["/redirect"] == 1
    # the stage went on, and only the good page is searchable
    assert snap.written == 1
    texts = [r["text"] for r in milvus_rows(settings)]
    assert texts == [GOOD]
    assert not any(SECRET in t for t in texts)


def test_a_name_resolving_to_loopback_is_refused_when_nothing_is_allowed(
    settings: Settings, tmp_path: Path
) -> None:
    """``localhost`` (and 127.0.0.1 itself) with an empty allow list: the guard's default."""
    settings = settings.model_copy(update={"fetch_allow": ""})
    with HostileServer({"/page.txt": text("local secret")}) as server:
        urls = [
            f"http://localhost:{server.port}/page.txt",
            f"http://LOCALHOST.:{server.port}/page.txt?x=1",
            f"http://127.0.0.1:{server.port}/page.txt",
        ]
        base = baseline(settings)
        worker = Worker(settings)
        try:
            publish_urls(settings, urls)
            letters = run(read_dlq(settings, URLS, len(urls)))
            wait_for(settings, base, len(urls), worker)
        finally:
            worker.stop()
        assert server.hits == {}
    assert sorted(d.error_class for d in letters) == ["forbidden_address"] * 3
    assert any("localhost -> 127.0.0.1" in d.error.lower() for d in letters)
