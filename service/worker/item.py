"""One unit of queued work: an item (one image of a call)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

ProgressCallback = Callable[[int, int], None]


@dataclass(eq=False)  # identity equality: two requests with equal fields are still two requests
class Item:
    """One image to explain, as the queue sees it.

    The queue knows nothing of models: `key` decides which items may share a batch,
    `cost` how much of the batch budget the item uses, and `payload` is opaque to it.
    """

    key: Hashable  # only items with equal keys share a batch (same model, method, params)
    cost: int  # images it adds to each forward pass of its batch (e.g. IG with n_steps=50 -> 50), >= 1
    payload: Any  # what the runner needs (a preprocessed tensor, a target, ...)
    deadline: float  # time.monotonic() by which work must start, else DeadlineExceeded
    enqueued_at: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)  # the runner's result for this item, or an exception
    progress: ProgressCallback | None = None  # forwarded to the runner, which reports (done, total)
    started_at: float | None = None
    # forward+backward image-passes it runs in all, what its time grows with (0: `cost`). Differs from `cost`
    # for iterative methods: MoreauGrad adds n_samples images to each pass, for `iterations` passes.
    passes: int = 0

    def __post_init__(self) -> None:
        if self.cost < 1:
            raise ValueError(f"cost must be >= 1, got {self.cost}")
        self.passes = self.passes or self.cost
