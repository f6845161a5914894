"""Replaying a stage: moving its consumer group's committed offsets, safely.

Every stage is its own consumer group on the topic it consumes (``streams.topics.STAGES``),
so replaying a stage is resetting that group's offsets, like ``kafka-consumer-groups.sh
--reset-offsets``. The planning is pure (numbers in, a per-partition plan out) so the edge
cases are unit tests; the I/O around it reads the partition bounds and the committed
offsets, refuses while the group has live members (a running worker would overwrite the
reset with its next commit, and the broker refuses an outsider's commit anyway), and
commits the new offsets as a member-less client of the group.

Kafka's committed offset is the *next* offset to read, so ``current - new`` is exactly the
number of messages the stage will see again (negative: messages it will skip).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal, TypeVar

from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from streams import kafka
from streams.errors import InvalidTime, RagstreamError
from streams.settings import Settings
from streams.timeparse import parse_time, to_epoch_ms
from streams.topics import STAGES

log = logging.getLogger(__name__)

T = TypeVar("T")

Kind = Literal["earliest", "datetime", "shift", "offset"]

#: Group states in which nobody consumes: a reset is safe and the broker accepts it.
IDLE_STATES = frozenset({"Empty", "Dead"})


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where to move: ``earliest``; ``datetime`` (``value`` = epoch ms); ``shift`` (``value``
    = messages, negative goes back); ``offset`` (``value`` = an absolute offset)."""

    kind: Kind
    value: int = 0

    def describe(self) -> str:
        if self.kind == "earliest":
            return "earliest"
        if self.kind == "datetime":
            when = datetime.fromtimestamp(self.value / 1000, UTC)
            return f"datetime {when.isoformat(timespec='milliseconds').replace('+00:00', 'Z')}"
        if self.kind == "shift":
            return f"shift by {self.value:+d}"
        return f"offset {self.value}"


@dataclasses.dataclass(frozen=True, slots=True)
class PartitionState:
    """What the broker says about one partition: its bounds and the group's commit, if any."""

    partition: int
    earliest: int
    end: int
    committed: int | None  # None: the group never committed on this partition


@dataclasses.dataclass(frozen=True, slots=True)
class PartitionPlan:
    partition: int
    earliest: int
    end: int
    committed: int | None
    current: int  # where the group resumes today
    new: int  # where it resumes after the reset
    requested: int  # the target before clamping to [earliest, end]
    note: str = ""  # why ``current`` is not simply the committed offset

    @property
    def reprocess(self) -> int:
        """Messages the stage handles again; negative when the move skips messages."""
        return self.current - self.new

    @property
    def clamped(self) -> bool:
        return self.requested != self.new

    @property
    def changes(self) -> bool:
        """Whether a commit is needed: the offset moves, or it becomes explicit."""
        return self.new != self.committed


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    stage: str
    group: str
    topic: str
    target: Target
    partitions: tuple[PartitionPlan, ...]

    @property
    def reprocess(self) -> int:
        return sum(p.reprocess for p in self.partitions if p.reprocess > 0)

    @property
    def skipped(self) -> int:
        return -sum(p.reprocess for p in self.partitions if p.reprocess < 0)

    @property
    def changes(self) -> bool:
        return any(p.changes for p in self.partitions)

    def offsets(self) -> dict[int, int]:
        """partition -> new offset, for the partitions whose commit changes."""
        return {p.partition: p.new for p in self.partitions if p.changes}


def clamp(offset: int, earliest: int, end: int) -> int:
    return max(earliest, min(offset, end))


def resume_offset(state: PartitionState) -> tuple[int, str]:
    """Where the group resumes on this partition today, and a note when it is not the commit.

    ragstream's consumers use ``auto_offset_reset=earliest``: with no commit, or a commit
    outside ``[earliest, end]`` (retention deleted it, or the topic was recreated), the
    group starts at the earliest offset still there.
    """
    c = state.committed
    if c is None or c < 0:
        return state.earliest, "no committed offset: the group would start at earliest"
    if c < state.earliest:
        return state.earliest, f"committed {c} was deleted by retention: resumes at earliest"
    if c > state.end:
        return state.earliest, f"committed {c} is past the end {state.end}: resumes at earliest"
    return c, ""


def plan_partition(
    state: PartitionState, target: Target, by_time: int | None = None
) -> PartitionPlan:
    """The reset of one partition. ``by_time`` is the broker's answer to ``offsets_for_times``
    for a ``datetime`` target: the first offset at or after that time, None when every
    message is older (the move then goes to the end)."""
    current, note = resume_offset(state)
    if target.kind == "earliest":
        requested = state.earliest
    elif target.kind == "datetime":
        requested = state.end if by_time is None else by_time
    elif target.kind == "shift":
        requested = current + target.value
    elif target.kind == "offset":
        requested = target.value
    else:  # pragma: no cover - Literal guards it
        raise ValueError(f"unknown target {target.kind!r}")
    return PartitionPlan(
        partition=state.partition,
        earliest=state.earliest,
        end=state.end,
        committed=state.committed if state.committed is None or state.committed >= 0 else None,
        current=current,
        new=clamp(requested, state.earliest, state.end),
        requested=requested,
        note=note,
    )


def make_plan(
    stage: str,
    group: str,
    topic: str,
    target: Target,
    states: list[PartitionState],
    by_time: dict[int, int | None] | None = None,
) -> Plan:
    by_time = by_time or {}
    parts = tuple(
        plan_partition(s, target, by_time.get(s.partition))
        for s in sorted(states, key=lambda s: s.partition)
    )
    return Plan(stage, group, topic, target, parts)


def format_plan(plan: Plan) -> list[str]:
    """The plan as the lines an operator reads before saying yes."""
    lines = [
        f"replay stage {plan.stage}: group {plan.group} on topic {plan.topic}, "
        f"to {plan.target.describe()}",
        f"  {'partition':>9}  {'current':>9}  {'new':>9}  {'reprocess':>9}  range",
    ]
    for p in plan.partitions:
        extra = []
        if p.note:
            extra.append(p.note)
        if p.clamped:
            extra.append(f"requested {p.requested}, clamped")
        lines.append(
            f"  {p.partition:>9}  {p.current:>9}  {p.new:>9}  {p.reprocess:>9}  "
            f"[{p.earliest}, {p.end}]" + (f"  ({'; '.join(extra)})" if extra else "")
        )
    lines.append(
        f"  total: {plan.reprocess} message{'s' if plan.reprocess != 1 else ''} to reprocess"
    )
    for p in plan.partitions:
        if p.reprocess < 0:
            lines.append(
                f"  WARNING: partition {p.partition} moves forward: {-p.reprocess} "
                f"message{'s' if p.reprocess != -1 else ''} will be SKIPPED by {plan.stage}"
            )
    return lines


def parse_datetime(text: str, now_ms: int | None = None) -> int:
    """``--to-datetime``'s value -> epoch ms, in the syntax of ``dlq list --since`` (both
    are ``streams/timeparse.py``: ISO 8601, naive = UTC, or ``30m``, ``2h``, ``7d`` back)."""
    now = None if now_ms is None else datetime.fromtimestamp(now_ms / 1000, UTC)
    try:
        return to_epoch_ms(parse_time(text, now))
    except InvalidTime as exc:
        raise InvalidTime(f"--to-datetime: {exc}") from None


# --- talking to the broker ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class GroupInfo:
    group: str
    state: str
    members: tuple[tuple[str, str, str], ...]  # (member_id, client_id, host)

    @property
    def idle(self) -> bool:
        return self.state in IDLE_STATES and not self.members

    def busy_message(self, stage: str) -> str:
        hosts: dict[str, int] = {}
        for _, _, host in self.members:
            hosts[host] = hosts.get(host, 0) + 1
        where = ", ".join(f"{h} x{n}" if n > 1 else h for h, n in hosts.items()) or "none listed"
        n = len(self.members)
        return (
            f"group {self.group} has {n} live member{'s' if n != 1 else ''} "
            f"(state {self.state}; hosts {where}); stop the {stage} workers first, "
            "then run replay again"
        )


async def _retrying(settings: Settings, what: str, call: Callable[[], Awaitable[T]]) -> T:
    """A call that may fail while the broker warms up (no group coordinator yet); a refusal
    for good is one line for the operator, naming what was refused."""
    try:
        return await kafka.retrying(what, call, deadline_s=10.0, broker=settings.broker)
    except KafkaError as exc:
        raise RagstreamError(f"{what}: {type(exc).__name__}: {exc}") from None


async def describe_group(settings: Settings, group: str) -> GroupInfo:
    async with kafka.started(kafka.admin(settings), settings) as client:
        responses = await _retrying(
            settings,
            f"describing group {group}",
            lambda: client.describe_consumer_groups([group]),
        )
    for resp in responses:
        for error_code, name, state, _ptype, _proto, members, *_ in resp.groups:
            if name != group:
                continue
            if error_code:
                raise RagstreamError(f"cannot describe group {group}: broker error {error_code}")
            return GroupInfo(
                group,
                state,
                tuple((m[0], m[1], m[2].lstrip("/")) for m in members),
            )
    return GroupInfo(group, "Dead", ())


async def read_plan(
    settings: Settings,
    stage: str,
    target: Target,
    partitions: list[int] | None = None,
) -> Plan:
    """The broker's view (bounds, commits, offsets by time) turned into a plan."""
    if stage not in STAGES:
        raise RagstreamError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    topic = settings.topic(STAGES[stage])
    group = settings.group(stage)
    async with (
        kafka.started(kafka.admin(settings), settings) as client,
        kafka.started(kafka.consumer(settings), settings) as consumer,
    ):
        known = {tp.partition for tp in await kafka.partitions(client, [topic])}
        if not known:
            raise RagstreamError(f"topic {topic} does not exist on {settings.broker}")
        chosen = sorted(known) if not partitions else sorted(set(partitions))
        missing = [p for p in chosen if p not in known]
        if missing:
            raise RagstreamError(
                f"topic {topic} has no partition {', '.join(map(str, missing))} "
                f"(it has 0..{max(known)})"
            )
        tps = [TopicPartition(topic, p) for p in chosen]
        earliest = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        committed = await _retrying(
            settings,
            f"reading the offsets of group {group}",
            lambda: client.list_consumer_group_offsets(group, partitions=tps),
        )
        by_time: dict[int, int | None] = {}
        if target.kind == "datetime":
            found = await consumer.offsets_for_times({tp: target.value for tp in tps})
            by_time = {
                tp.partition: (v.offset if v is not None else None) for tp, v in found.items()
            }
    states = [
        PartitionState(
            tp.partition,
            earliest[tp],
            ends[tp],
            committed[tp].offset if tp in committed and committed[tp].offset >= 0 else None,
        )
        for tp in tps
    ]
    return make_plan(stage, group, topic, target, states, by_time)


async def apply_plan(settings: Settings, plan: Plan) -> dict[int, int]:
    """Commit the plan's offsets for its group; returns what the broker then holds.

    The committing consumer joins no group (``assign``, not ``subscribe``): the broker
    accepts a member-less commit only while the group is empty, so a worker that started
    since the check makes this fail instead of silently racing it.
    """
    offsets = plan.offsets()
    if not offsets:
        return {}
    info = await describe_group(settings, plan.group)
    if not info.idle:
        raise RagstreamError(info.busy_message(plan.stage))
    tps = {p: TopicPartition(plan.topic, p) for p in offsets}
    async with kafka.started(kafka.consumer(settings, group_id=plan.group), settings) as consumer:
        consumer.assign(list(tps.values()))
        try:
            await consumer.commit({tps[p]: off for p, off in offsets.items()})
        except CommitFailedError:
            info = await describe_group(settings, plan.group)
            raise RagstreamError(
                info.busy_message(plan.stage)
                if not info.idle
                else f"the broker refused the commit for group {plan.group}; run replay again"
            ) from None
    for p, off in sorted(offsets.items()):
        log.info("group %s: %s[%d] committed offset %d", plan.group, plan.topic, p, off)
    async with kafka.started(kafka.admin(settings), settings) as client:
        held = await client.list_consumer_group_offsets(plan.group, partitions=list(tps.values()))
    out = {tp.partition: meta.offset for tp, meta in held.items()}
    wrong = {p: (off, out.get(p)) for p, off in offsets.items() if out.get(p) != off}
    if wrong:
        raise RagstreamError(f"group {plan.group}: offsets not as committed: {wrong}")
    return out
