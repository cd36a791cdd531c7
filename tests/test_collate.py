"""The batching rules of `collate`, one by one, with explicit clocks."""

import pytest

from service.worker.collate import collate
from service.worker.item import Item

FAR = 1e9  # a deadline that never passes in these tests


def make(key="a", cost=1, at=0.0, deadline=FAR, payload=None) -> Item:
    return Item(key=key, cost=cost, payload=payload, deadline=deadline, enqueued_at=at)


def run(pending, now=0.0, max_cost=10, max_items=4, max_wait=1.0):
    return collate(pending, now=now, max_cost=max_cost, max_items=max_items, max_wait=max_wait)


def test_empty_queue_has_nothing_to_do():
    result = run([])
    assert result.batch == [] and result.expired == [] and result.remaining == [] and result.wait is None


def test_oldest_item_picks_the_key_and_others_keep_their_order():
    a1, b1, a2, c1, b2 = make("a"), make("b"), make("a"), make("c"), make("b")
    result = run([a1, b1, a2, c1, b2], now=5.0)
    assert result.batch == [a1, a2]
    assert result.remaining == [b1, c1, b2]


def test_batch_is_fifo_within_the_key():
    items = [make("a", at=i * 0.01) for i in range(3)]
    assert run(items, now=5.0).batch == items


def test_cost_cap_stops_at_the_first_item_that_does_not_fit():
    first, second, too_big, small = make(cost=4), make(cost=4), make(cost=4), make(cost=1)
    result = run([first, second, too_big, small], max_cost=10)
    # The batch is full (the third would overflow), so it is ready at once; FIFO: `small` does not jump ahead.
    assert result.batch == [first, second]
    assert result.remaining == [too_big, small]


def test_max_items_caps_the_batch_and_makes_it_ready():
    items = [make() for _ in range(5)]
    result = run(items, max_items=3)
    assert result.batch == items[:3]
    assert result.remaining == items[3:]
    assert result.wait is None


def test_exactly_max_cost_is_full():
    items = [make(cost=5), make(cost=5)]
    assert run(items, max_cost=10).batch == items


def test_oversized_item_runs_alone_instead_of_starving():
    huge, small = make(cost=50), make(cost=1)
    result = run([huge, small], max_cost=10)
    assert result.batch == [huge]
    assert result.remaining == [small]


def test_not_ready_before_max_wait_and_wait_says_how_long():
    item = make(at=10.0)
    result = run([item], now=10.3, max_wait=1.0)
    assert result.batch == []
    assert result.remaining == [item]
    assert result.wait == pytest.approx(0.7)


def test_ready_once_the_oldest_has_waited_max_wait():
    oldest, newer = make(at=10.0), make(at=10.9)
    result = run([oldest, newer], now=11.0, max_wait=1.0)
    assert result.batch == [oldest, newer]
    assert result.remaining == []


def test_zero_max_wait_runs_immediately():
    item = make(at=3.0)
    assert run([item], now=3.0, max_wait=0.0).batch == [item]


def test_expired_items_are_separated_and_the_oldest_live_item_picks_the_key():
    dead_a = make("a", deadline=4.0)
    live_b = make("b", at=0.0)
    dead_b = make("b", deadline=1.0)
    live_a = make("a", at=0.1)
    result = run([dead_a, live_b, dead_b, live_a], now=5.0)
    assert result.expired == [dead_a, dead_b]
    assert result.batch == [live_b]
    assert result.remaining == [live_a]


def test_deadline_equal_to_now_is_not_expired():
    item = make(deadline=5.0)
    result = run([item], now=5.0)
    assert result.expired == []
    assert result.batch == [item]  # ready now: waiting any longer would let it expire


def test_only_expired_items():
    item = make(deadline=1.0)
    result = run([item], now=2.0)
    assert result.expired == [item] and result.batch == [] and result.remaining == [] and result.wait is None


def test_a_member_deadline_shortens_the_wait():
    item = make(at=0.0, deadline=0.4)
    result = run([item], now=0.1, max_wait=1.0)
    assert result.batch == []
    assert result.wait == pytest.approx(0.3)


def test_collate_does_not_mutate_its_input():
    items = [make("a"), make("b", deadline=-1.0)]
    snapshot = list(items)
    run(items, now=0.0)
    assert items == snapshot


def test_invalid_limits_are_rejected():
    with pytest.raises(ValueError):
        run([make()], max_items=0)


def test_work_item_cost_must_be_positive():
    with pytest.raises(ValueError):
        make(cost=0)
