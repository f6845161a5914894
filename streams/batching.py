"""Token-budget batching: how a pool of texts is cut into encode calls.

A transformer's cost is (texts in the batch) x (longest text in it): padding is paid in
full. Sorting by length and capping *padded* tokens, rather than the number of texts,
keeps every call about equally expensive and wastes little on padding.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], budget_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest first.

    Each batch satisfies ``len(batch) * max(lengths in batch) <= budget_tokens`` (a single
    text longer than the budget still gets a batch of its own) and ``len(batch) <=
    max_batch``. Every index appears exactly once.
    """
    if budget_tokens < 1 or max_batch < 1:
        raise ValueError("budget_tokens and max_batch must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(int(lengths[i]), 1)
        longest_if_added = max(longest, n)
        if current and (
            len(current) >= max_batch or (len(current) + 1) * longest_if_added > budget_tokens
        ):
            batches.append(current)
            current, longest = [], 0
            longest_if_added = n
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches
