"""The pipeline at a glance: each stage's progress and dead letters, and the live figures.

Progress is read from the topics' end offsets and the stages' committed offsets, so it
needs no worker and no Milvus, and it answers the same wherever the stages run. The live
figures (messages per second, the embedder's busy fraction, freshness p50/p99) come from
the ``/metrics`` of the stage processes this machine runs (:mod:`streams.runfiles`):
rates need two readings, so they appear from the second refresh of ``status --watch``.

Where Milvus is reached comes from the settings and the Lite discovery file, without
connecting to it: a user's own pymilvus client needs that address, and it changes while a
worker serves Lite.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import urllib.request
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

from ops.deadletters import dlq_topics
from streams import runfiles
from streams.milvus_lite import ServerInfo, connect_uri, find_server, lite_dir
from streams.settings import Settings
from streams.topics import StageLag, stage_lags, topic_end_offsets


@dataclasses.dataclass(frozen=True, slots=True)
class MilvusWhere:
    uri: str  # what a pymilvus client connects to now
    lite_dir: str | None  # the Milvus Lite directory, if Milvus is Lite
    served: ServerInfo | None  # the milvus-lite server serving it, if one runs


@dataclasses.dataclass(frozen=True, slots=True)
class Status:
    lags: list[StageLag]  # per stage: messages in its topic, committed, lag
    dead: dict[str, int]  # dead-letter topic -> letters ever written to it
    milvus: MilvusWhere


def milvus_where(settings: Settings) -> MilvusWhere:
    """The address every ragstream process would use now (``connect_uri``), and the server
    behind it when Lite is served."""
    data_dir = lite_dir(settings)
    served = find_server(data_dir) if data_dir is not None else None
    return MilvusWhere(
        connect_uri(settings), str(data_dir) if data_dir is not None else None, served
    )


async def pipeline_status(settings: Settings, timeout_s: float = 20.0) -> Status:
    """Each stage's lag and the dead letters per topic; ``TimeoutError`` after ``timeout_s``
    of a broker that accepts connections but does not answer."""
    lags = await asyncio.wait_for(stage_lags(settings), timeout_s)
    dead = await topic_end_offsets(settings, list(dlq_topics(settings)))
    return Status(lags, dead, milvus_where(settings))


# --- live figures from the stages' /metrics -----------------------------------------------

Sample = tuple[str, tuple[tuple[str, str], ...]]  # metric name, sorted labels


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    """Every sample of every local stage process, summed over processes, at ``at``."""

    at: float
    samples: dict[Sample, float]
    processes: int

    def total(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= set(ls))

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """A histogram's cumulative buckets ``(le, count)``, summed over processes."""
        out: dict[float, float] = {}
        for (n, ls), v in self.samples.items():
            if n == f"{name}_bucket":
                le = float(dict(ls)["le"])
                out[le] = out.get(le, 0.0) + v
        return sorted(out.items())


def parse_metrics(pages: Iterable[str]) -> dict[Sample, float]:
    """Prometheus text pages to one sum per (name, labels)."""
    out: dict[Sample, float] = {}
    for page in pages:
        for family in text_string_to_metric_families(page):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0.0) + s.value
    return out


def read_process(rec: runfiles.RunFile, timeout_s: float = 2.0) -> Reading | None:
    """One process's ``/metrics``; ``None`` when it does not answer (starting, stopping)."""
    try:
        with urllib.request.urlopen(rec.metrics_url, timeout=timeout_s) as resp:
            page = resp.read().decode()
    except OSError:
        return None
    return Reading(time.time(), parse_metrics([page]), 1)


def read_metrics(settings: Settings, timeout_s: float = 2.0) -> Reading:
    """One reading of every local stage's and the API's ``/metrics``, summed (a process
    that does not answer is skipped)."""
    samples: dict[Sample, float] = {}
    n = 0
    for rec in runfiles.read(settings):
        one = read_process(rec, timeout_s)
        if one is None:
            continue
        n += 1
        for key, value in one.samples.items():
            samples[key] = samples.get(key, 0.0) + value
    return Reading(time.time(), samples, n)


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """``histogram_quantile`` as Prometheus computes it: linear within the bucket holding
    the q-th observation; ``None`` without observations. Past the last finite bound the
    answer is that bound (the histogram cannot say more)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    count = buckets[-1][1]
    rank = q * count
    lower, below = 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            if math.isinf(le):
                return lower
            if cum == below:
                return le
            return lower + (le - lower) * (rank - below) / (cum - below)
        lower, below = le, cum
    return lower


Buckets = list[tuple[float, float]]


def delta(new: Buckets, old: Buckets) -> Buckets:
    """Buckets observed between two readings (for a quantile of the last interval)."""
    before = dict(old)
    return [(le, c - before.get(le, 0.0)) for le, c in new]


@dataclasses.dataclass(frozen=True, slots=True)
class Live:
    """What ``status`` prints beside the offsets."""

    processes: int
    rates: dict[str, float] | None  # stage -> messages out per second (None: one reading)
    busy: float | None  # the embedder's busy fraction over the interval
    fresh_p50: float | None  # per page, seconds (over the interval, else since start)
    fresh_p99: float | None
    chunk_p50: float | None
    chunk_p99: float | None
    dead: dict[str, float]  # stage -> dead letters (since the processes started)


def live(now: Reading, before: Reading | None = None) -> Live:
    """Figures from one reading, and rates from two."""
    rates: dict[str, float] | None = None
    busy: float | None = None
    page_b = now.buckets("ragstream_freshness_seconds")
    chunk_b = now.buckets("ragstream_chunk_freshness_seconds")
    if before is not None and now.at > before.at:
        span = now.at - before.at
        rates = {}
        for stage in ("fetch", "embed"):
            n = now.total("ragstream_messages_in_total", stage=stage)
            rates[stage] = (
                max(n - before.total("ragstream_messages_in_total", stage=stage), 0) / span
            )
        rows = now.total("ragstream_rows_written_total") - before.total(
            "ragstream_rows_written_total"
        )
        rates["write"] = max(rows, 0) / span
        busy_s = now.total("ragstream_embed_busy_seconds_total") - before.total(
            "ragstream_embed_busy_seconds_total"
        )
        busy = min(max(busy_s / span, 0.0), 1.0)
        recent = delta(page_b, before.buckets("ragstream_freshness_seconds"))
        if recent and recent[-1][1] > 0:
            page_b = recent
        recent = delta(chunk_b, before.buckets("ragstream_chunk_freshness_seconds"))
        if recent and recent[-1][1] > 0:
            chunk_b = recent
    dead: dict[str, float] = {}
    for (name, labels), v in now.samples.items():
        if name == "ragstream_dead_letters_total" and v:
            stage = dict(labels).get("stage", "?")
            dead[stage] = dead.get(stage, 0.0) + v
    return Live(
        processes=now.processes,
        rates=rates,
        busy=busy,
        fresh_p50=quantile(page_b, 0.5),
        fresh_p99=quantile(page_b, 0.99),
        chunk_p50=quantile(chunk_b, 0.5),
        chunk_p99=quantile(chunk_b, 0.99),
        dead=dead,
    )
