"""The seam between the call lifecycle (service/runtime.py) and what runs the passes.

A backend takes the items of a validated call (one image each, service/worker/item.py), runs them in batches
somewhere, and settles each item's future with its `ImageExplanation` or a service error. The lifecycle does
everything else, once for every backend: admission, budgets, deadlines, the cache, jobs, encoding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from ..jobs import Job, JobStore
    from ..pipeline import Call
    from ..worker import Item
    from ..zoo import ModelRegistry

# Two lanes on a device: long work (a MoreauGrad image is thousands of passes) runs on `bulk`, so it never
# holds up the interactive requests queued behind it.
LANES = ("interactive", "bulk")


@dataclass(eq=False)
class CallItem:
    """An item's payload on the server side: which image of which call, for which job."""

    call: Call
    index: int
    job: Job
    compute_s: float = 0.0  # duration of the batch this image ran in
    expired: bool = False  # failed at its start deadline (the lifecycle's timer)
    siblings: list[Item] = field(default_factory=list)  # the items of the call, this one included

    def call_started(self) -> None:
        """A backend starts this item: the call has started, and its other images no longer expire (the
        start deadline is the call's: a started call finishes, or is cancelled)."""
        for sibling in self.siblings:
            sibling.deadline = math.inf


class JobBook(Protocol):
    """Where jobs are found by id: this process's store (embedded), or a store every replica reaches (Ray)."""

    async def hold(self, job: Job) -> None: ...
    async def discard(self, job: Job) -> None: ...
    async def view(self, job_id: str) -> dict[str, Any]: ...
    async def cancel(self, job_id: str) -> dict[str, Any]: ...
    async def counts(self) -> dict[str, int]: ...
    async def finished(self, job: Job) -> None: ...


class Backend(Protocol):
    # Whether `submit` may be called from a request thread (the embedded queue is thread-safe), or only on the
    # event loop (Ray's handles schedule their calls there).
    submits_from_threads: bool
    # Whether the models are given already (tests): the lifecycle then boots in `start`, not in a thread.
    preloaded: bool

    def start(self) -> None:
        """On the event loop, before the models load: start the lanes (they wait for `boot`)."""

    def boot(self) -> ModelRegistry:
        """In a loader thread: load what runs the passes; return the models that validate and preprocess."""

    def stop(self, grace: float) -> None: ...

    @property
    def workers_alive(self) -> bool: ...

    @property
    def warmed(self) -> bool:
        """Every thread that runs passes is warmed (service/warmup.py)."""

    def serving_device(self) -> str:
        """Where the passes run, as GET /v1/models reports it."""

    def submit(self, item: Item, lane: str) -> None:
        """Queue one item on `lane` (QueueFull, WorkerStopped, Unavailable when it cannot be taken)."""

    def retry_after(self, lane: str) -> float:
        """Seconds until `lane` has likely room again."""

    def start_estimate(self, lane: str) -> float | None:
        """Seconds until an item queued on `lane` now would likely start (admission compares it with the
        call's start deadline); None when the backend cannot tell."""

    def withdraw(self, job: Job) -> None:
        """The job's call has ended or failed: stop whatever of it still runs out of the lifecycle's reach."""

    def job_book(self, store: JobStore) -> JobBook: ...

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add the families of the passes to the app's registry."""

    async def refresh_metrics(self) -> None:
        """Update those families before /metrics renders."""
