"""Politeness end to end: a rate-limited, flaky site is fetched at its pace and loses nothing.

The site allows 25 requests/s (429 + ``Retry-After: 1`` beyond), answers 15 % of the rest
with a 500 and cuts 5 % short (Content-Length larger than what is sent, then close); which
request fails is fixed by a seed, so a run is repeatable. Its robots.txt disallows one
folder. About 300 pages are published at once: every allowed page must be indexed and
none dead-lettered; the disallowed ones are dead letters ``robots_disallowed`` and were
never requested.
"""

from __future__ import annotations

import time

import pytest

from ops.progress import snapshot
from streams.topics import URLS
from tests.helpers import Worker, baseline, milvus_rows, publish_urls, run, wait_for
from tests.hostile import FlakySite
from tests.test_deadletters import read_dlq

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

N_PAGES = 300
ROBOTS = "User-agent: *\nDisallow: /p/private/\n"


def test_rate_limited_flaky_site_loses_no_page(settings) -> None:
    pages = {
        f"/p/{i}.txt": f"Page {i} of the handbook explains widget number {i * 7919 % 10007}."
        for i in range(N_PAGES)
    }
    private = {f"/p/private/{i}.txt": f"Private page {i}." for i in range(3)}
    # Delayed retries (urls.retry.N) take over from a page whose attempts all failed; short
    # delays keep the test quick. Everything else is the default fetch configuration.
    # The fetcher starts above the site's limit (40 requests/s against 25), as it would
    # with any site slower than the default start: it must back off, not lose pages.
    settings = settings.model_copy(update={"fetch_retry_delays": "2,5,10", "fetch_host_rate": 40.0})
    with FlakySite({**pages, **private}, rate=25, p500=0.15, p_cut=0.05, robots=ROBOTS) as site:
        base = baseline(settings)
        worker = Worker(settings)
        try:
            publish_urls(settings, [site.url(p) for p in [*pages, *private]])
            snap = wait_for(settings, base, N_PAGES + len(private), worker, timeout_s=420)
            # A page waiting in a delay topic counts as handled for `urls`: wait for it too.
            deadline = time.monotonic() + 120
            while snap.written < N_PAGES and time.monotonic() < deadline and worker.alive():
                time.sleep(1)
                snap = run(snapshot(settings, base))
            letters = run(read_dlq(settings, URLS, len(private) + 1, timeout_s=5))
        finally:
            worker.stop()
        counts = dict(site.count)
        hits = dict(site.server.hits)
    # the site's limits were hit, and honoured: nothing lost
    assert counts["500"] > 0 and counts["cut"] > 0, counts
    # ... and the fetcher slowed to the site's pace instead of hammering it: starting above
    # the limit it meets a few 429s (2 in a typical run; 0 if a busy machine never lets it
    # reach 25 requests/s), where without the per-host rate it got 423 on these pages
    assert counts["429"] <= N_PAGES // 10, counts
    missing = {p: site.served.get(p, 0) for p in pages if not site.ok.get(p)}
    assert not missing, (missing, [(d.url, d.error_class, d.error) for d in letters], snap)
    assert not any(p in hits for p in private), "a disallowed page was requested"
    assert sorted((d.url, d.error_class) for d in letters) == sorted(
        (site.url(p), "robots_disallowed") for p in private
    ), [(d.url, d.error_class, d.error) for d in letters]
    assert snap.written == N_PAGES, snap
    texts = {r["text"] for r in milvus_rows(settings)}
    assert texts == set(pages.values())
