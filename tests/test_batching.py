"""How the embed stage cuts a pool of texts into encode calls (``plan_batches``): every text
once, no call over the padded-token budget or the batch cap, and no call cut short."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.batching import plan_batches

lengths_st = st.lists(st.integers(0, 600), max_size=200)
budgets = st.integers(1, 5000)
max_batches = st.integers(1, 64)


def padded(batch: list[int], lengths: list[int]) -> int:
    """What encoding ``batch`` costs: its size times its longest text (at least 1 token)."""
    return len(batch) * max(max(lengths[i], 1) for i in batch)


@given(lengths_st, budgets, max_batches)
def test_every_text_is_in_exactly_one_batch(lengths: list[int], budget: int, cap: int) -> None:
    batches = plan_batches(lengths, budget, cap)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(batches), "no empty batch"


@given(lengths_st, budgets, max_batches)
def test_no_batch_over_the_budget_or_the_cap(lengths: list[int], budget: int, cap: int) -> None:
    for batch in plan_batches(lengths, budget, cap):
        assert len(batch) <= cap
        # a text longer than the whole budget still has to be encoded: alone
        assert padded(batch, lengths) <= budget or len(batch) == 1


@given(lengths_st, budgets, max_batches)
def test_longest_first_and_no_batch_cut_short(lengths: list[int], budget: int, cap: int) -> None:
    """Sorted longest first (ties in input order), so a batch's padding is small; and a
    batch ends only when the next text would break the cap or the budget, so the number
    of encode calls is not inflated."""
    batches = plan_batches(lengths, budget, cap)
    flat = [i for b in batches for i in b]
    assert flat == sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for batch, after in zip(batches, batches[1:], strict=False):
        assert len(batch) == cap or padded([*batch, after[0]], lengths) > budget


def test_examples() -> None:
    assert plan_batches([], 100, 8) == []
    # 3 texts of 40 tokens fit a budget of 120; a 4th would make 160
    assert plan_batches([40, 40, 40, 40], 120, 8) == [[0, 1, 2], [3]]
    assert plan_batches([40, 40, 40, 40], 1000, 2) == [[0, 1], [2, 3]]
    # the 500-token text is alone over budget; the short ones share a call
    assert plan_batches([5, 500, 5, 0], 100, 8) == [[1], [0, 2, 3]]


@pytest.mark.parametrize(("budget", "cap"), [(0, 8), (100, 0), (-1, -1)])
def test_a_budget_or_cap_below_one_is_refused(budget: int, cap: int) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        plan_batches([1, 2], budget, cap)
