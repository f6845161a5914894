"""Following published URLs until each is searchable or dead-lettered, and why some failed.

``publish --wait`` is three library calls around the publish itself: a :class:`Baseline`
taken before (the stages' offsets and the end of every dead-letter partition), :func:`follow`
after (the committed offsets moving past the published messages, so it works with workers
anywhere), then :func:`failures_since` (the dead letters written since the baseline that are
about these URLs, read back through the one dead-letter reader, ``ops.deadletters``).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable

from aiokafka import TopicPartition

from ops.deadletters import end_positions, iter_entries
from ops.progress import Snapshot, snapshot_raw, wait_indexed
from streams.ids import normalize_url
from streams.settings import Settings
from streams.topics import ensure_topics


@dataclasses.dataclass(frozen=True, slots=True)
class Failures:
    """Dead letters about the published URLs, by (stage, error_class), with one example."""

    counts: dict[tuple[str, str], int]
    examples: dict[tuple[str, str], str]
    other: int  # dead letters in the same span about other URLs (another publisher's)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def failed_urls(self, stage: str) -> int:
        return sum(n for (s, _), n in self.counts.items() if s == stage)


@dataclasses.dataclass(frozen=True, slots=True)
class Baseline:
    """Where the pipeline stood before publishing: counts are taken relative to it."""

    offsets: dict[str, int]
    dead: dict[TopicPartition, int]

    @classmethod
    async def take(cls, settings: Settings) -> Baseline:
        await ensure_topics(settings)
        return cls(await snapshot_raw(settings), await end_positions(settings))


def norm(url: str) -> str:
    """The URL as the stages key it; one that does not normalise stays as given."""
    try:
        return normalize_url(url)
    except ValueError:
        return url


async def follow(
    settings: Settings,
    base: Baseline,
    n_urls: int,
    on_update: Callable[[Snapshot], None] | None = None,
    timeout_s: float = 3600.0,
) -> tuple[Snapshot, bool]:
    """Until the ``n_urls`` published since ``base`` went through every stage: the last
    snapshot, and whether ``timeout_s`` ran out first."""
    last: list[Snapshot] = []

    def update(snap: Snapshot) -> None:
        last[:] = [snap]
        if on_update is not None:
            on_update(snap)

    try:
        return await wait_indexed(settings, base.offsets, n_urls, update, timeout_s), False
    except TimeoutError:
        if not last:
            raise
        return last[0], True


async def failures_since(
    settings: Settings, since: dict[TopicPartition, int], urls: Iterable[str]
) -> Failures:
    """The dead letters written after ``since`` (end offsets of a :class:`Baseline`),
    counted for those about ``urls``; the others are only counted as ``other``. Reads
    without a consumer group, up to the end offsets of now."""
    wanted = {norm(u) for u in urls}
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    examples: dict[tuple[str, str], str] = {}
    other = 0
    async for entry in iter_entries(settings, since=since):
        letter = entry.letter
        if letter is None or letter.url is None or norm(letter.url) not in wanted:
            other += 1
            continue
        key = (letter.stage, letter.error_class)
        counts[key] += 1
        text = letter.error
        examples.setdefault(key, text if letter.url in text else f"{letter.url}: {text}")
    return Failures(dict(counts), examples, other)
