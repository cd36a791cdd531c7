"""Choosing the next batch from the pending items: a pure function, tested without threads or clocks."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.worker.item import Item


@dataclass
class Collation:
    batch: list[Item] = field(default_factory=list)  # empty: nothing is ready to run yet
    expired: list[Item] = field(default_factory=list)  # past their deadline: fail with DeadlineExceeded
    remaining: list[Item] = field(default_factory=list)  # still pending, in arrival order
    wait: float | None = None  # seconds until the batch becomes ready, when it is not ready now


def collate(
    pending: list[Item], *, now: float, max_cost: int, max_items: int, max_wait: float
) -> Collation:
    """Split `pending` (in arrival order) into the next batch, the expired items and the rest.

    The oldest live item picks the batch key; items with that key join in FIFO order while the
    batch stays within `max_cost` and `max_items`. An item costlier than `max_cost` runs alone
    rather than starving. The batch is ready when it is full, when the oldest item has waited
    `max_wait`, or when waiting longer would let one of its items pass its deadline.
    """
    if max_cost < 1 or max_items < 1:
        raise ValueError("max_cost and max_items must be >= 1")
    expired = [item for item in pending if item.deadline < now]
    live = [item for item in pending if item.deadline >= now]
    if not live:
        return Collation(expired=expired)

    key = live[0].key
    batch: list[Item] = []
    total_cost = 0
    full = False
    for item in live:
        if item.key != key:
            continue
        # FIFO: stop at the first compatible item that does not fit instead of skipping ahead of it.
        if batch and (len(batch) >= max_items or total_cost + item.cost > max_cost):
            full = True
            break
        batch.append(item)
        total_cost += item.cost
    full = full or len(batch) >= max_items or total_cost >= max_cost

    # Waiting for companions is only worth it until the oldest has waited max_wait, and never
    # past a member's deadline (deadline = latest start time).
    ready_at = min(live[0].enqueued_at + max_wait, min(item.deadline for item in batch))
    if full or now >= ready_at:
        chosen = set(map(id, batch))
        remaining = [item for item in live if id(item) not in chosen]
        return Collation(batch=batch, expired=expired, remaining=remaining)
    return Collation(expired=expired, remaining=live, wait=ready_at - now)
