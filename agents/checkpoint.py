"""The commit rule of every stage, written once: flush an event's outputs, then ack it.

An event (a ``urls``, ``chunks`` or ``vectors`` message) is acked only after its outcome
is durable: its output messages acknowledged by the broker (``acks=all``), its rows
written to Milvus, or, when the event cannot be processed, its dead letter acknowledged
on the dead-letter topic. Faust commits the highest contiguous acked offset, so an ack
is a promise that nothing before that offset will be needed again.

When the outcome cannot be made durable (Kafka or Milvus failing in a way the stage
cannot wait out), the process exits (:func:`fatal`, status :data:`EXIT_FATAL`) and the
consumer group redelivers everything after the last commit. Outputs are idempotent
(chunk ids are pure functions of the page, writes are upserts), so a redelivery costs
work, never correctness. Why not just leave the event unacked and carry on:

- faust-streaming's commit path can skip an offset still in flight (faust issue #606,
  ``faust/transport/consumer.py``): an unacked event behind acked ones may be committed
  past and lost. Never skip; stop.
- ``stream.take()`` acks its buffer in a ``finally``, even when the batch raised. Stages
  read with ``stream.noack()`` / ``stream.noack_take()`` and ack through this module only.

A message the broker can never take (over ``max.message.bytes``) is not a failure here:
``agents.common.produce`` turns it into a dead letter, which is its outcome, and the
stage goes on. Only an outcome that cannot be delivered at all is fatal.

The shape follows quixstreams' ``checkpointing/checkpoint.py`` (flush the producer and
sinks, then commit offsets), with Faust's per-event ack in place of a consumer commit:

- :class:`Checkpoint` ``.commit(events, work)``: await the work (it returns once its
  outputs are delivered), then ack the events in order; exit if it raised. The writer
  commits each window this way, one after the other.
- :class:`InOrder`: several units of work in flight at once, committed in the order they
  were added, so a committed offset never passes work still running. The fetch stage
  runs many pages at once this way; the embed stage uses it with one pool in flight so
  the next pool is gathered while the model encodes the current one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import NoReturn

from faust.types import EventT

log = logging.getLogger(__name__)

EXIT_FATAL = 70
"""Exit status of a stage that stopped rather than skip an event (EX_SOFTWARE)."""

Ack = Callable[[EventT], Awaitable[object]]
"""How a stage acks one event: ``stream.ack`` of the stream it reads (noack)."""


def fatal(message: str, exc: BaseException | None = None) -> NoReturn:
    """Stop the process now: redelivery from the last commit is the recovery.

    ``os._exit`` rather than an exception: Faust would log an agent's exception and may
    carry on (or commit on the way out); nothing may run after the decision to stop.
    """
    log.critical("%s: %r; exiting so the group redelivers from the last commit", message, exc)
    sys.stderr.flush()
    os._exit(EXIT_FATAL)


async def delivered(futures: Iterable[Awaitable[object]]) -> None:
    """Wait until every message sent was acknowledged (acks=all); raise if one was not."""
    futures = list(futures)
    if futures:
        await asyncio.gather(*futures)


def _offsets(events: Sequence[EventT]) -> str:
    if not events:
        return "no events"
    first, last = events[0].message, events[-1].message
    if len(events) == 1:
        return f"{first.topic}[{first.partition}]@{first.offset}"
    return f"{len(events)} events, {first.topic}[{first.partition}]@{first.offset}..{last.offset}"


class Checkpoint:
    """Acks events once their work is durable; exits when it cannot be.

    ``what`` names the work in the log line of a fatal exit ("writing a window").
    ``commit``, when given, commits the acked offsets right after each unit instead of at
    Faust's next commit tick (``commit_interval_s``): the writer's windows, whose commit is
    where a page counts as written for lag, progress and the bench's freshness, and after
    which a restart no longer rewrites them. Faust commits only the contiguous acked
    offsets, so an early commit is as safe as the periodic one.
    """

    def __init__(
        self, ack: Ack, what: str, commit: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        self._ack = ack
        self._commit = commit
        self.what = what

    async def commit(self, events: Sequence[EventT], work: Awaitable[object]) -> None:
        """Await ``work``, then ack ``events`` in the order given.

        ``work`` must return only once every output of ``events`` (or each one's dead
        letter) was delivered: use :func:`delivered` on the send futures. If it raises,
        the process exits before any of ``events`` is acked.
        """
        try:
            await work
        except Exception as exc:
            fatal(f"{self.what} failed ({_offsets(events)})", exc)
        for event in events:
            await self._ack(event)
        if self._commit is not None and events:
            try:
                await self._commit()
            except Exception as exc:  # acked: the periodic commit takes it up again
                log.warning("commit after %s failed: %r", self.what, exc)


class InOrder:
    """Units of work in flight, committed in the order they were added.

    :meth:`add` takes a unit's events and its work: a running task (fetch: pages run
    concurrently) or a coroutine not started yet (embed: the runner starts it when its
    turn comes, so units run one after the other). At most ``in_flight`` units wait to be
    committed; :meth:`add` blocks beyond that, which is the stage's backpressure. Use as
    ``async with InOrder(...)``: the committing task runs inside the block.
    """

    def __init__(self, checkpoint: Checkpoint, in_flight: int) -> None:
        self.checkpoint = checkpoint
        self._queue: asyncio.Queue[tuple[list[EventT], Awaitable[object]]] = asyncio.Queue(
            maxsize=in_flight
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Units added and not yet taken up for committing."""
        return self._queue.qsize()

    async def add(self, events: Sequence[EventT], work: Awaitable[object]) -> None:
        await self._queue.put((list(events), work))

    async def run(self) -> None:
        while True:
            events, work = await self._queue.get()
            await self.checkpoint.commit(events, work)
            self._queue.task_done()

    async def join(self) -> None:
        """Wait until every unit added so far is committed (tests, orderly shutdown)."""
        await self._queue.join()

    async def __aenter__(self) -> InOrder:
        self._task = asyncio.create_task(self.run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Units not committed stay unacked: the group redelivers them after a restart.
        if self._task is not None:
            self._task.cancel()
            self._task = None
        while not self._queue.empty():
            _, work = self._queue.get_nowait()
            if asyncio.iscoroutine(work):
                work.close()  # never started: say so quietly, not "never awaited"
            elif isinstance(work, asyncio.Future):
                work.cancel()  # started (a fetch's page, an embed pool): its events stay
                # unacked, so its outputs are redone after the restart; stop spending on it
