"""``ragstream replay``: the pure plan, then the real broker (plans, apply, refusals)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from devtools.corpus import CorpusServer
from ops.replay import (
    PartitionState,
    Target,
    apply_plan,
    describe_group,
    format_plan,
    make_plan,
    parse_datetime,
    plan_partition,
    read_plan,
    resume_offset,
)
from streams.errors import RagstreamError
from streams.kafka import admin
from streams.settings import Settings
from streams.topics import CHUNKS, ensure_topics, stage_lags
from tests.helpers import Worker, baseline, expected_index, milvus_rows, publish_urls, wait_for

# --- the pure plan ------------------------------------------------------------------------


def state(committed: int | None, earliest: int = 10, end: int = 50, p: int = 0) -> PartitionState:
    return PartitionState(partition=p, earliest=earliest, end=end, committed=committed)


def test_earliest_goes_back_to_the_first_kept_message() -> None:
    plan = plan_partition(state(40), Target("earliest"))
    assert (plan.current, plan.new, plan.reprocess) == (40, 10, 30)
    assert not plan.clamped and plan.changes


def test_offset_target_is_clamped_to_the_partition() -> None:
    low = plan_partition(state(40), Target("offset", 3))  # before retention's start
    high = plan_partition(state(40), Target("offset", 999))  # past the end
    assert (low.new, low.requested, low.clamped, low.reprocess) == (10, 3, True, 30)
    assert (high.new, high.clamped, high.reprocess) == (50, True, -10)


def test_shift_is_relative_to_the_current_offset_and_clamped() -> None:
    assert plan_partition(state(40), Target("shift", -5)).new == 35
    assert plan_partition(state(40), Target("shift", -500)).new == 10
    fwd = plan_partition(state(40), Target("shift", 4))
    assert (fwd.new, fwd.reprocess) == (44, -4)
    assert plan_partition(state(40), Target("shift", 500)).new == 50


def test_no_committed_offset_means_the_group_would_start_at_earliest() -> None:
    plan = plan_partition(state(None), Target("shift", 5))
    assert plan.current == 10 and plan.new == 15 and plan.reprocess == -5
    assert "no committed offset" in plan.note
    # nothing moves, but the commit becomes explicit
    same = plan_partition(state(None), Target("earliest"))
    assert same.reprocess == 0 and same.changes


def test_a_commit_outside_the_partition_resumes_at_earliest() -> None:
    assert resume_offset(state(4)) == (
        10,
        "committed 4 was deleted by retention: resumes at earliest",
    )
    current, note = resume_offset(state(80))
    assert current == 10 and "past the end" in note
    assert resume_offset(state(50)) == (50, "")  # at the end: nothing left to read


def test_datetime_uses_the_broker_offset_or_the_end_when_all_messages_are_older() -> None:
    assert plan_partition(state(40), Target("datetime", 1), by_time=25).new == 25
    after_last = plan_partition(state(40), Target("datetime", 1), by_time=None)
    assert (after_last.new, after_last.reprocess) == (50, -10)


def test_unchanged_partition_needs_no_commit() -> None:
    plan = make_plan("embed", "g", "t", Target("offset", 40), [state(40)])
    assert not plan.changes and plan.offsets() == {}


def test_plan_totals_and_forward_move_warning() -> None:
    plan = make_plan(
        "embed",
        "g-embed",
        "t.chunks",
        Target("offset", 30),
        [state(40, p=1), state(20, p=0), state(None, p=2)],
    )
    assert [p.partition for p in plan.partitions] == [0, 1, 2]
    assert plan.reprocess == 10  # partition 1 goes back 10
    assert plan.skipped == 10 + 20  # partition 0 skips 10; partition 2 skips 20 (from earliest)
    assert plan.offsets() == {0: 30, 1: 30, 2: 30}
    text = "\n".join(format_plan(plan))
    assert "WARNING: partition 0 moves forward: 10 messages will be SKIPPED by embed" in text
    assert "WARNING: partition 2 moves forward" in text
    assert "WARNING: partition 1" not in text
    assert "no committed offset: the group would start at earliest" in text
    assert "total: 10 messages to reprocess" in text


def test_parse_datetime() -> None:
    utc = int(datetime(2026, 5, 1, 14, 30, tzinfo=UTC).timestamp() * 1000)
    assert parse_datetime("2026-05-01T14:30:00Z") == utc
    assert parse_datetime("2026-05-01T14:30") == utc  # no zone: UTC
    plus2 = timezone(timedelta(hours=2))
    assert parse_datetime("2026-05-01T16:30:00.250+02:00") == int(
        datetime(2026, 5, 1, 16, 30, 0, 250000, tzinfo=plus2).timestamp() * 1000
    )
    assert parse_datetime("2h", now_ms=10_000_000) == 10_000_000 - 7_200_000
    assert parse_datetime("90s", now_ms=100_000) == 10_000
    with pytest.raises(RagstreamError, match="neither an ISO 8601 time"):
        parse_datetime("yesterday")


# --- on the real broker -------------------------------------------------------------------

PER_BATCH = 3  # messages per partition per batch; two batches an hour apart
HOUR_MS = 3_600_000


class Loaded:
    """chunks with 2 partitions, 6 messages each (two batches with known timestamps), and
    the embed group committed at 5 on partition 0 and 4 on partition 1."""

    def __init__(self, settings: Settings, t0: int) -> None:
        self.settings = settings
        self.topic = settings.topic(CHUNKS)
        self.group = settings.group("embed")
        self.t0 = t0  # first batch at t0 + i ms, second at t0 + 1 h + i ms
        self.tps = [TopicPartition(self.topic, p) for p in (0, 1)]


async def _load(settings: Settings) -> Loaded:
    await ensure_topics(settings)
    t0 = (int(time.time() * 1000) - 2 * HOUR_MS) // 1000 * 1000
    loaded = Loaded(settings, t0)
    producer = AIOKafkaProducer(bootstrap_servers=settings.broker, acks="all")
    await producer.start()
    try:
        for batch in (0, 1):
            for p in (0, 1):
                for i in range(PER_BATCH):
                    await producer.send_and_wait(
                        loaded.topic,
                        f"b{batch}p{p}m{i}".encode(),
                        partition=p,
                        timestamp_ms=t0 + batch * HOUR_MS + i,
                    )
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        loaded.topic,
        bootstrap_servers=settings.broker,
        group_id=loaded.group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        seen = 0
        while seen < 4 * PER_BATCH:
            got = await consumer.getmany(timeout_ms=5000)
            seen += sum(len(v) for v in got.values())
        await consumer.commit({loaded.tps[0]: 5, loaded.tps[1]: 4})
    finally:
        await consumer.stop()
    return loaded


async def committed(loaded: Loaded) -> dict[int, int]:
    client = admin(loaded.settings)
    await client.start()
    try:
        held = await client.list_consumer_group_offsets(loaded.group, partitions=loaded.tps)
    finally:
        await client.close()
    return {tp.partition: meta.offset for tp, meta in held.items()}


@pytest.fixture
def loaded(settings: Settings) -> Loaded:
    return asyncio.run(_load(settings.model_copy(update={"chunk_partitions": 2})))


async def cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    """``ragstream replay ...`` as a subprocess (stdin is not a terminal)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ragstream.cli",
        "replay",
        *args,
        env={**os.environ, **settings.to_env()},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


@pytest.mark.kafka
def test_plans_match_the_broker_offsets(loaded: Loaded) -> None:
    s = loaded.settings

    def plan(target: Target, partitions: list[int] | None = None) -> dict[int, tuple[int, int]]:
        p = asyncio.run(read_plan(s, "embed", target, partitions))
        assert (p.group, p.topic) == (loaded.group, loaded.topic)
        assert all((x.earliest, x.end) == (0, 2 * PER_BATCH) for x in p.partitions)
        return {x.partition: (x.current, x.new) for x in p.partitions}

    assert plan(Target("earliest")) == {0: (5, 0), 1: (4, 0)}
    between = loaded.t0 + HOUR_MS // 2  # after batch 1, before batch 2
    assert plan(Target("datetime", between)) == {0: (5, 3), 1: (4, 3)}
    assert plan(Target("datetime", loaded.t0 + 1)) == {0: (5, 1), 1: (4, 1)}
    assert plan(Target("datetime", loaded.t0 + 3 * HOUR_MS)) == {0: (5, 6), 1: (4, 6)}
    assert plan(Target("shift", -2)) == {0: (5, 3), 1: (4, 2)}
    assert plan(Target("shift", -100)) == {0: (5, 0), 1: (4, 0)}
    assert plan(Target("offset", 1)) == {0: (5, 1), 1: (4, 1)}
    assert plan(Target("offset", 99)) == {0: (5, 6), 1: (4, 6)}
    assert plan(Target("earliest"), [1]) == {1: (4, 0)}
    # a stage whose group never committed: current is where it would start (earliest)
    fetch = asyncio.run(read_plan(s, "fetch", Target("earliest")))
    assert all(p.committed is None and p.note for p in fetch.partitions)
    with pytest.raises(RagstreamError, match="no partition 7"):
        asyncio.run(read_plan(s, "embed", Target("earliest"), [7]))


@pytest.mark.kafka
def test_replay_applies_the_plan_and_the_group_resumes_there(loaded: Loaded) -> None:
    s = loaded.settings
    between = iso(loaded.t0 + HOUR_MS // 2)
    rc, out, err = asyncio.run(cli(s, "--stage", "embed", "--to-datetime", between, "--yes"))
    assert rc == 0, err
    assert f"group {loaded.group} on topic {loaded.topic}" in out
    assert "total: 3 messages to reprocess" in out  # 5 -> 3 and 4 -> 3
    assert "reset group" in out and "2 partitions committed" in out
    assert asyncio.run(committed(loaded)) == {0: 3, 1: 3}

    rc, out, err = asyncio.run(
        cli(s, "--stage", "embed", "--to-offset", "1", "--partition", "1", "--yes")
    )
    assert rc == 0, err
    assert asyncio.run(committed(loaded)) == {0: 3, 1: 1}

    rc, out, err = asyncio.run(cli(s, "--stage", "embed", "--shift-by", "2", "--yes"))
    assert rc == 0, err
    assert "WARNING: partition 0 moves forward: 2 messages will be SKIPPED by embed" in out
    assert asyncio.run(committed(loaded)) == {0: 5, 1: 3}

    async def first_offsets() -> dict[int, int]:
        consumer = AIOKafkaConsumer(
            loaded.topic,
            bootstrap_servers=s.broker,
            group_id=loaded.group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        first: dict[int, int] = {}
        try:
            deadline = time.monotonic() + 60
            while len(first) < 2 and time.monotonic() < deadline:
                for tp, msgs in (await consumer.getmany(timeout_ms=1000)).items():
                    first.setdefault(tp.partition, msgs[0].offset)
        finally:
            await consumer.stop()
        return first

    assert asyncio.run(first_offsets()) == {0: 5, 1: 3}


@pytest.mark.kafka
def test_dry_run_and_unconfirmed_runs_change_nothing(loaded: Loaded) -> None:
    s = loaded.settings
    rc, out, _ = asyncio.run(cli(s, "--stage", "embed", "--to-earliest", "--dry-run"))
    assert rc == 0
    assert "total: 9 messages to reprocess" in out and "dry run: nothing changed" in out
    rc, out, err = asyncio.run(cli(s, "--stage", "embed", "--to-earliest"))
    assert rc == 2
    assert "total: 9 messages to reprocess" in out  # the plan first, then the refusal
    assert "stdin is not a terminal; pass --yes" in err
    assert asyncio.run(committed(loaded)) == {0: 5, 1: 4}


@pytest.mark.kafka
def test_refuses_while_the_group_has_live_members(loaded: Loaded) -> None:
    s = loaded.settings

    async def scenario() -> None:
        live = AIOKafkaConsumer(
            loaded.topic,
            bootstrap_servers=s.broker,
            group_id=loaded.group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await live.start()
        try:
            while not live.assignment():
                await live.getmany(timeout_ms=500)
            rc, out, err = await cli(s, "--stage", "embed", "--to-earliest", "--yes")
            assert rc == 2, (out, err)
            assert f"group {loaded.group} has 1 live member" in err
            assert "127.0.0.1" in err
            assert "stop the embed workers first, then run replay again" in err
            # the dry run still shows the plan, with the same warning
            rc, out, _ = await cli(s, "--stage", "embed", "--to-earliest", "--dry-run")
            assert rc == 0 and "has 1 live member" in out
            # the apply step checks again by itself (a worker may start after the plan)
            plan = await read_plan(s, "embed", Target("earliest"))
            with pytest.raises(RagstreamError, match="1 live member"):
                await apply_plan(s, plan)
            assert await committed(loaded) == {0: 5, 1: 4}
        finally:
            await live.stop()
        # once the member left, the same reset goes through
        assert await apply_plan(s, plan) == {0: 0, 1: 0}

    asyncio.run(scenario())


# --- with real workers --------------------------------------------------------------------

PAGES = {
    "a.txt": "Replaying a stage resets its consumer group to an earlier offset.",
    "b.txt": "Deterministic chunk ids make a re-embedded chunk overwrite itself in Milvus.",
    "c.txt": "Stop the workers of a stage before resetting the offsets of its group.",
}


@pytest.mark.kafka
def test_a_replayed_stage_processes_again_with_real_workers(
    settings: Settings, tmp_path: Path, chunker
) -> None:
    root = tmp_path / "site"
    root.mkdir()
    for name, text in PAGES.items():
        (root / name).write_text(text + "\n", encoding="utf-8")
    files = [root / n for n in PAGES]
    with CorpusServer(root) as server:
        expected = expected_index(chunker, server, files)
        base = baseline(settings)
        worker = Worker(settings)
        try:
            assert publish_urls(settings, [server.url_of(f) for f in files]) == len(files)
            wait_for(settings, base, len(files), worker)
            # a running Faust stage is a live member: refused, nothing changes
            rc, _, err = asyncio.run(cli(settings, "--stage", "embed", "--to-earliest", "--yes"))
            assert rc == 2, err
            assert "live member" in err and "stop the embed workers first" in err
        finally:
            worker.stop()

    def lags() -> dict[str, tuple[int, int]]:
        return {x.stage: (x.end, x.committed) for x in asyncio.run(stage_lags(settings))}

    before = lags()
    assert before["embed"] == (len(expected), len(expected))
    deadline = time.monotonic() + 60  # a stopped worker's members leave (or time out)
    while not asyncio.run(describe_group(settings, settings.group("embed"))).idle:
        assert time.monotonic() < deadline, "the embed group never became empty"
        time.sleep(0.5)
    rc, out, err = asyncio.run(cli(settings, "--stage", "embed", "--to-earliest", "--yes"))
    assert rc == 0, err
    assert f"total: {len(expected)} messages to reprocess" in out
    assert lags()["embed"] == (len(expected), 0)

    worker = Worker(settings, stages="embed,write")
    try:
        deadline = time.monotonic() + 240
        while True:
            now = lags()
            # embed re-produced every chunk, and both stages caught up again
            if (
                now["embed"] == (len(expected), len(expected))
                and now["write"][0] == before["write"][0] + len(expected)
                and now["write"][1] == now["write"][0]
            ):
                break
            assert worker.alive(), worker.tail()
            assert time.monotonic() < deadline, (now, worker.tail())
            time.sleep(0.5)
    finally:
        worker.stop()
    rows = milvus_rows(settings, ("id", "text"))
    assert {r["id"]: r["text"] for r in rows} == expected and len(rows) == len(expected)
