"""Reading dead letters back, and sending them to the topic they came from.

Listing is read-only: a consumer without a group (``group_id=None``), assigned every
partition of the dead-letter topics, reads from the beginning up to the end offsets taken
when it started, so a listing terminates even while stages keep dead-lettering, and it
moves no committed offset anywhere.

Redrive records its progress in the consumer group ``<app_id>-dlq-redrive`` (one committed
offset per dead-letter partition), so running it again does not send a letter twice.
Filters make that subtle: a letter the filters skip must stay available to a later redrive
with other filters, yet letters after it were sent. So the committed offset is the
contiguous prefix of handled letters (sent, or not a valid envelope, which can never be
sent), and the offsets of letters sent beyond that prefix travel in the commit's metadata
string (:class:`Progress`). A commit happens only after the broker acknowledged the re-sent
messages (acks=all): a crash in between re-sends at most that batch on the next run, which
the pipeline absorbs (deterministic ids make a repeated message overwrite itself).

What goes back, and where (:func:`redrive_action`): a ``urls`` letter goes back as it was;
a ``chunks`` or ``vectors`` letter is never re-applied (its content may be older than what
the index holds since: it would move the page backwards) but re-requests its page: a
``urls`` request with ``force`` for the letter's url. Every message sent back carries the
hop count (Kafka header ``ragstream-hops``) one higher than the letter's, and the stages
copy it into the letters they write and onto the messages they derive, so a letter that
has already been redriven ``dlq_max_redrives`` times is parked (listed, never sent again)
instead of looping. A letter that cannot be sent (no usable url where one is needed) is
refused with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRecord,
    OffsetAndMetadata,
    TopicPartition,
)

from streams import kafka
from streams.ids import normalize_url
from streams.messages import (
    DeadLetter,
    DecodeError,
    UrlRequest,
    decode_dead_letter,
    encode_url,
)
from streams.retry import HOPS
from streams.settings import Settings
from streams.topics import CRAWL, STAGES, URLS, dlq

log = logging.getLogger(__name__)

REDRIVE_GROUP = "dlq-redrive"
"""``settings.group(REDRIVE_GROUP)`` holds redrive's committed offsets."""

INVALID = "(invalid)"
"""The error class shown for a record on a dead-letter topic that is not a valid envelope."""

METADATA_PREFIX = "ragstream-dlq-redrive/1 sent="
METADATA_LIMIT = 3000
"""Bytes of commit metadata we allow ourselves; brokers refuse more than
``offset.metadata.max.bytes`` (4096 by default)."""

IDLE_TIMEOUT_S = 30.0
"""How long a read may see no record before it gives up (the range it waits for exists)."""


# --- filters and entries ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One record of a dead-letter topic: a decoded envelope, or why it is not one."""

    dlq_topic: str
    partition: int
    offset: int
    stage: str  # the envelope's; for an invalid record, the stage owning the topic
    time: datetime  # the envelope's failed_at, else the record's timestamp
    letter: DeadLetter | None
    raw: bytes | None  # the record value (None in a redrive plan, to keep plans small)
    problem: str | None = None  # why the record is not a valid envelope
    target: str | None = None  # in a redrive plan: the topic it is sent to

    @property
    def error_class(self) -> str:
        return self.letter.error_class if self.letter else INVALID

    @property
    def subject(self) -> str:
        """What the letter is about: its URL, else its key as text, else ``-``."""
        if self.letter and self.letter.url:
            return self.letter.url
        if self.letter and self.letter.key:
            return self.letter.key.decode("utf-8", "replace")
        return "-"

    def parked(self, max_redrives: int | None) -> bool:
        """Redriven ``max_redrives`` times already: redrive will not send it again."""
        return (
            self.letter is not None
            and max_redrives is not None
            and self.letter.hops >= max_redrives
        )

    def to_json(self, with_value: bool = False, max_redrives: int | None = None) -> dict[str, Any]:
        """The envelope as it is on the topic (plus where it is), ``value_b64`` on request."""
        where = {"dlq_topic": self.dlq_topic, "dlq_partition": self.partition}
        where["dlq_offset"] = self.offset
        if self.letter is None:
            out: dict[str, Any] = {**where, "stage": self.stage, "invalid": self.problem}
            if with_value and self.raw is not None:
                out["raw_b64"] = base64.b64encode(self.raw).decode()
            return out
        obj = orjson.loads(self.raw) if self.raw is not None else {}
        if not with_value:
            obj.pop("value_b64", None)
        if self.parked(max_redrives):
            obj["parked"] = True
        return {**where, **obj}


def entry_of(record: ConsumerRecord, stage: str) -> Entry:
    """Decode one dead-letter record; a record that is no envelope becomes an invalid entry."""
    stamp = datetime.fromtimestamp(record.timestamp / 1000, UTC)
    base = {"dlq_topic": record.topic, "partition": record.partition, "offset": record.offset}
    try:
        letter = decode_dead_letter(record.value)
    except (DecodeError, ValueError, KeyError, TypeError) as exc:
        return Entry(
            **base, stage=stage, time=stamp, letter=None, raw=record.value, problem=str(exc)
        )
    try:
        failed = datetime.fromisoformat(letter.failed_at)
        failed = failed if failed.tzinfo else failed.replace(tzinfo=UTC)
    except ValueError:
        failed = stamp
    return Entry(**base, stage=letter.stage, time=failed, letter=letter, raw=record.value)


@dataclasses.dataclass(frozen=True, slots=True)
class Filters:
    """Which letters a command looks at; empty sets mean any."""

    stages: frozenset[str] = frozenset()
    error_classes: frozenset[str] = frozenset()
    since: datetime | None = None

    def matches(self, entry: Entry) -> bool:
        if self.stages and entry.stage not in self.stages:
            return False
        if self.error_classes and entry.error_class not in self.error_classes:
            return False
        return self.since is None or entry.time >= self.since


def dlq_topics(
    settings: Settings, stages: frozenset[str] | set[str] = frozenset()
) -> dict[str, str]:
    """Dead-letter topic name -> the stage that writes it (every stage when none given):
    the three stages', and the crawl frontier's (unreadable crawl reports; it runs in the
    fetch worker, so ``fetch`` selects it too)."""
    out = {
        settings.topic(dlq(topic)): stage
        for stage, topic in STAGES.items()
        if not stages or stage in stages
    }
    if not stages or "fetch" in stages:
        out[settings.topic(dlq(CRAWL))] = "frontier"
    return out


# --- reading ------------------------------------------------------------------------------


async def _partitions(settings: Settings, topics: list[str]) -> list[TopicPartition]:
    """Every partition of the topics that exist (a missing topic just has no letters, and
    asking does not create it: :func:`streams.kafka.partitions`)."""
    async with kafka.started(kafka.admin(settings), settings) as client:
        return await kafka.partitions(client, topics)


async def _committed(
    settings: Settings, group: str, tps: list[TopicPartition]
) -> dict[TopicPartition, OffsetAndMetadata]:
    """``group``'s commits (offset and metadata) on ``tps``; waits out a broker whose
    offsets topic is not ready yet."""
    async with kafka.started(kafka.admin(settings), settings) as client:
        return await kafka.retrying(
            f"reading the offsets of group {group}",
            lambda: client.list_consumer_group_offsets(group, partitions=tps),
            deadline_s=IDLE_TIMEOUT_S,
            broker=settings.broker,
        )


async def _read_range(
    consumer: AIOKafkaConsumer, bounds: dict[TopicPartition, tuple[int, int]]
) -> AsyncIterator[ConsumerRecord]:
    """Records of each partition in ``[start, end)``, in offset order per partition."""
    pending = {tp: end for tp, (start, end) in bounds.items() if start < end}
    for tp, (start, _) in bounds.items():
        consumer.seek(tp, start)
    consumer.pause(*(tp for tp in bounds if tp not in pending))
    consumer.resume(*pending)
    last_seen = time.monotonic()
    while pending:
        batch = await consumer.getmany(*pending, timeout_ms=500, max_records=500)
        if batch:
            last_seen = time.monotonic()
        for tp, records in batch.items():
            for record in records:
                if record.offset < pending.get(tp, -1):
                    yield record
        for tp in list(pending):
            if await consumer.position(tp) >= pending[tp]:
                del pending[tp]
                consumer.pause(tp)
        if pending and time.monotonic() - last_seen > IDLE_TIMEOUT_S:
            left = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in pending)
            raise TimeoutError(f"no records for {IDLE_TIMEOUT_S:.0f}s while reading {left}")


async def _reader(settings: Settings, group_id: str | None = None) -> AIOKafkaConsumer:
    """A started consumer of dead letters (the caller stops it); KafkaUnavailable when the
    broker is away."""
    consumer = kafka.consumer(settings, group_id=group_id, request_timeout_ms=15000)
    try:
        with kafka.translated(settings, "reading dead letters"):
            await consumer.start()
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def end_positions(
    settings: Settings, stages: frozenset[str] | set[str] = frozenset()
) -> dict[TopicPartition, int]:
    """The end offset of every dead-letter partition now: pass it as ``since`` to
    :func:`iter_entries` later to read only the letters written in between."""
    consumer = await _reader(settings)
    try:
        tps = await _partitions(settings, list(dlq_topics(settings, stages)))
        return dict(await consumer.end_offsets(tps)) if tps else {}
    finally:
        await consumer.stop()


async def iter_entries(
    settings: Settings,
    stages: frozenset[str] | set[str] = frozenset(),
    since: Mapping[TopicPartition, int] | None = None,
) -> AsyncIterator[Entry]:
    """Every record of the dead-letter topics, from the beginning (or from the offsets
    ``since``, taken by :func:`end_positions`) to the end seen at start.

    This is the one reader of dead letters: ``dlq list``, redrive's plan and ``publish
    --wait``'s failure summary all read through it (or its ``_read_range``).
    """
    topics = dlq_topics(settings, stages)
    consumer = await _reader(settings)
    try:
        tps = await _partitions(settings, list(topics))
        if not tps:
            return
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        if since is not None:  # a partition that did not exist then: all its letters are new
            starts = {tp: max(since.get(tp, starts[tp]), starts[tp]) for tp in tps}
        async for record in _read_range(consumer, {tp: (starts[tp], ends[tp]) for tp in tps}):
            yield entry_of(record, topics[record.topic])
    finally:
        await consumer.stop()


@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    entries: list[Entry]  # the first ``limit`` matching entries, oldest first
    matched: int  # how many entries matched in all
    counts: dict[tuple[str, str], int]  # (stage, error_class) -> matching entries
    parked: int = 0  # matching letters redriven dlq_max_redrives times (never sent again)


async def list_letters(settings: Settings, filters: Filters, limit: int | None = None) -> Listing:
    """The matching dead letters (oldest first, at most ``limit``) and counts of all matching."""
    kept: dict[tuple[str, int], list[Entry]] = collections.defaultdict(list)
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    parked = 0
    async for entry in iter_entries(settings, filters.stages):
        if not filters.matches(entry):
            continue
        counts[entry.stage, entry.error_class] += 1
        parked += entry.parked(settings.dlq_max_redrives)
        shelf = kept[entry.dlq_topic, entry.partition]
        if limit is None or len(shelf) < limit:  # a partition is (nearly) in time order
            shelf.append(entry)
    entries = sorted(
        (e for shelf in kept.values() for e in shelf),
        key=lambda e: (e.time, e.dlq_topic, e.partition, e.offset),
    )
    if limit is not None:
        entries = entries[:limit]
    return Listing(entries, sum(counts.values()), dict(sorted(counts.items())), parked)


# --- redrive progress ---------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Progress:
    """Which offsets of one dead-letter partition redrive has handled.

    ``base`` is the committed offset: every offset below it is handled. ``done`` holds the
    handled offsets above it as sorted, disjoint, half-open ranges; it is empty unless a
    filter skipped the letter at ``base``.
    """

    base: int
    done: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def is_done(self, offset: int) -> bool:
        if offset < self.base:
            return True
        i = bisect.bisect_right(self.done, (offset, float("inf"))) - 1
        return i >= 0 and self.done[i][0] <= offset < self.done[i][1]

    def mark(self, offset: int) -> None:
        if self.is_done(offset):
            return
        i = bisect.bisect_left(self.done, (offset,))
        start, end = offset, offset + 1
        if i > 0 and self.done[i - 1][1] == start:
            i -= 1
            start = self.done.pop(i)[0]
        if i < len(self.done) and self.done[i][0] == end:
            end = self.done.pop(i)[1]
        self.done.insert(i, (start, end))
        self._settle()

    def advance_to(self, offset: int) -> None:
        """Treat everything below ``offset`` as handled (letters the broker already deleted)."""
        if offset > self.base:
            self.base = offset
            self.done = [(max(s, offset), e) for s, e in self.done if e > offset]
            self._settle()

    def _settle(self) -> None:
        while self.done and self.done[0][0] <= self.base:
            self.base = max(self.base, self.done.pop(0)[1])

    def metadata(self) -> str:
        ranges = ",".join(f"{s}-{e - 1}" if e - s > 1 else str(s) for s, e in self.done)
        return METADATA_PREFIX + ranges if ranges else ""

    def fit(self, limit: int = METADATA_LIMIT) -> int:
        """Shrink the metadata to ``limit`` bytes by passing over the oldest skipped letters.

        Returns how many offsets were passed over (they will not be offered again); zero
        unless filters left hundreds of scattered gaps.
        """
        passed = 0
        while len(self.metadata().encode()) > limit and self.done:
            start, end = self.done.pop(0)
            passed += start - self.base
            self.base = end
            self._settle()
        return passed

    @classmethod
    def load(cls, committed: int, metadata: str | None) -> Progress:
        """From a committed offset and its metadata; unknown metadata counts as none."""
        progress = cls(base=max(committed, 0))
        if not metadata:
            return progress
        if not metadata.startswith(METADATA_PREFIX):
            log.warning("ignoring unknown commit metadata %r", metadata[:80])
            return progress
        try:
            for part in filter(None, metadata[len(METADATA_PREFIX) :].split(",")):
                lo, _, hi = part.partition("-")
                progress.done.append((int(lo), int(hi or lo) + 1))
        except ValueError:
            log.warning("ignoring malformed commit metadata %r", metadata[:80])
            return cls(base=max(committed, 0))
        progress.done.sort()
        progress._settle()
        return progress


# --- redrive ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    """What redrive does with one letter: send ``value`` (None: the letter's original
    bytes) to ``topic`` under ``key``, with hop count ``hops``; or refuse, and why."""

    topic: str | None = None
    key: bytes | None = None
    value: bytes | None = None
    hops: int = 0
    refused: str | None = None

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return [(HOPS, str(self.hops).encode())]


def _request(settings: Settings, letter: DeadLetter, why: str) -> Action:
    """A forced ``urls`` request for the letter's page (or a refusal when it has none)."""
    try:
        url = normalize_url(letter.url or "")
    except ValueError:
        return Action(refused=f"{why}, and the letter has no usable url")
    req = UrlRequest(url=url, source="redrive", force=True)
    return Action(settings.topic(URLS), req.key(), encode_url(req), letter.hops + 1)


def redrive_action(settings: Settings, letter: DeadLetter) -> Action:
    """Where one letter goes back to, and as what (see the module's docstring)."""
    if letter.stage != "fetch":
        return _request(settings, letter, f"{letter.stage} letters re-request their page")
    if letter.value_truncated:
        return _request(settings, letter, "its value was truncated")
    return Action(letter.topic, letter.key, None, letter.hops + 1)


@dataclasses.dataclass(slots=True)
class PartitionPlan:
    tp: TopicPartition
    stage: str
    committed: int | None  # what the group had (None: nothing)
    progress: Progress
    end: int
    send: list[Entry] = dataclasses.field(default_factory=list)  # without their bytes
    skipped: int = 0  # valid letters the filters left for another redrive
    already: int = 0  # letters an earlier redrive sent
    invalid: int = 0  # records that are no envelope (passed: they cannot be sent)
    parked: list[Entry] = dataclasses.field(default_factory=list)  # redriven too often
    refused: list[tuple[Entry, str]] = dataclasses.field(default_factory=list)  # and why


@dataclasses.dataclass(slots=True)
class RedriveResult:
    plan: list[PartitionPlan]
    sent: dict[str, int] = dataclasses.field(default_factory=dict)  # target topic -> messages
    dry_run: bool = False
    confirmed: bool = False
    passed_over: int = 0  # skipped letters given up to keep commit metadata small

    @property
    def letters(self) -> list[Entry]:
        return [e for p in self.plan for e in p.send]

    @property
    def targets(self) -> dict[str, int]:
        """Target topic -> letters the plan sends there."""
        out = collections.Counter(e.target for e in self.letters if e.target)
        return dict(sorted(out.items()))

    @property
    def parked(self) -> list[Entry]:
        return [e for p in self.plan for e in p.parked]

    @property
    def refused(self) -> list[tuple[Entry, str]]:
        return [r for p in self.plan for r in p.refused]

    def total(self, field: str) -> int:
        return sum(getattr(p, field) for p in self.plan)


def _light(entry: Entry, target: str | None = None) -> Entry:
    """The entry without its bytes, for a plan that must stay small for big dead-letter topics."""
    assert entry.letter is not None
    letter = dataclasses.replace(entry.letter, value=b"")
    return dataclasses.replace(entry, letter=letter, raw=None, target=target)


async def _commit(consumer: AIOKafkaConsumer, part: PartitionPlan) -> int:
    passed = part.progress.fit()
    offset, metadata = part.progress.base, part.progress.metadata()
    if part.committed is None and offset == 0 and not metadata:
        return passed  # nothing to record
    await consumer.commit({part.tp: (offset, metadata)})
    part.committed = offset
    return passed


async def redrive(
    settings: Settings,
    filters: Filters,
    *,
    dry_run: bool = False,
    confirm: Callable[[RedriveResult], bool] | None = None,
    batch: int = 500,
) -> RedriveResult:
    """Send matching dead letters (original key and value) back to their original topics.

    Reads each dead-letter partition from the group's committed position to the end seen
    at start, plans, asks ``confirm`` (none: go ahead), then reads the same range again,
    sending the planned letters with acks=all and committing after each acknowledged batch.
    Non-matching letters stay available; invalid records are passed (they cannot be sent).
    """
    topics = dlq_topics(settings, filters.stages)
    group = settings.group(REDRIVE_GROUP)
    consumer = await _reader(settings, group_id=group)
    try:
        tps = await _partitions(settings, list(topics))
        result = RedriveResult(plan=[], dry_run=dry_run)
        if not tps:
            return result
        consumer.assign(tps)
        committed = await _committed(settings, group, tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            meta = committed.get(tp)
            if meta is None or meta.offset < 0:
                had, progress = None, Progress.load(0, None)
            else:
                had, progress = meta.offset, Progress.load(meta.offset, meta.metadata)
            progress.advance_to(starts[tp])
            result.plan.append(PartitionPlan(tp, topics[tp.topic], had, progress, ends[tp]))
        parts = {p.tp: p for p in result.plan}
        bounds = {p.tp: (p.progress.base, p.end) for p in result.plan}

        async for record in _read_range(consumer, bounds):
            part = parts[TopicPartition(record.topic, record.partition)]
            entry = entry_of(record, part.stage)
            if part.progress.is_done(record.offset):
                part.already += 1
            elif entry.letter is None:
                part.invalid += 1
                part.progress.mark(record.offset)
            elif not filters.matches(entry):
                part.skipped += 1
            elif entry.parked(settings.dlq_max_redrives):
                part.parked.append(_light(entry))
            else:
                action = redrive_action(settings, entry.letter)
                if action.refused:
                    part.refused.append((_light(entry), action.refused))
                else:
                    part.send.append(_light(entry, action.topic))

        if dry_run:
            return result
        if result.letters:
            result.confirmed = confirm is None or confirm(result)
            if not result.confirmed:
                return result
            await _check_targets(settings, result.targets)
            await _send(settings, consumer, result, batch)
        for part in result.plan:
            # Parked and refused letters are handled: they can never be sent (they stay
            # listed by `dlq list`). Invalid records passed; refreshes the commit's age too.
            for entry in [*part.parked, *(e for e, _ in part.refused)]:
                part.progress.mark(entry.offset)
            result.passed_over += await _commit(consumer, part)
        return result
    finally:
        await consumer.stop()


async def _check_targets(settings: Settings, targets: dict[str, int]) -> None:
    found = {tp.topic for tp in await _partitions(settings, list(targets))}
    missing = [t for t in targets if t not in found]
    if missing:
        raise LookupError(f"target topic(s) do not exist: {', '.join(missing)}; nothing sent")


async def _send(
    settings: Settings, consumer: AIOKafkaConsumer, result: RedriveResult, batch: int
) -> None:
    async with kafka.started(kafka.producer(settings), settings) as producer:
        for part in result.plan:
            if part.send:
                await _send_partition(settings, producer, consumer, result, part, batch)


async def _send_partition(
    settings: Settings,
    producer: AIOKafkaProducer,
    consumer: AIOKafkaConsumer,
    result: RedriveResult,
    part: PartitionPlan,
    batch: int,
) -> None:
    """Re-read the planned range of one partition and send its planned letters."""
    wanted = {e.offset for e in part.send}
    pending: list[tuple[int, str, asyncio.Future]] = []

    async def flush() -> None:
        await asyncio.gather(*(fut for _, _, fut in pending))
        for offset, target, _ in pending:
            part.progress.mark(offset)
            result.sent[target] = result.sent.get(target, 0) + 1
        pending.clear()
        result.passed_over += await _commit(consumer, part)

    bounds = {part.tp: (part.progress.base, max(wanted) + 1)}
    async for record in _read_range(consumer, bounds):
        if record.offset not in wanted:
            continue
        letter = decode_dead_letter(record.value)  # it decoded when planned
        action = redrive_action(settings, letter)
        assert action.topic is not None
        value = letter.value if action.value is None else action.value
        pending.append(
            (
                record.offset,
                action.topic,
                await producer.send(action.topic, value, key=action.key, headers=action.headers),
            )
        )
        if len(pending) >= batch:
            await flush()
    if pending:
        await flush()
