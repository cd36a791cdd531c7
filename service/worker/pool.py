"""A bounded queue served by one worker thread (one per device) that runs batches formed by `collate`.

The pool knows nothing of models: the engine supplies a runner that turns a batch of items into one
result per item. The pool owns the failure policy around it: deadlines, OOM splitting, isolating a
poisoned item, an output-length guard, and restarting the thread if it dies.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, replace
from typing import Any

from service.errors import DeadlineExceeded, QueueFull, WorkerStopped
from service.worker.collate import collate
from service.worker.item import Item

logger = logging.getLogger(__name__)

Runner = Callable[[list[Item]], list[Any]]  # one result per item, in order; an Exception fails that item
BatchHook = Callable[[list[Item], float], None]

_RECENT_BATCHES = 32  # how many recent batches inform the start-time and retry-after estimates
_MAX_RETRY_AFTER = 300.0


def default_is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors: MemoryError, or torch's CUDA OOM when torch is loaded."""
    if isinstance(exc, MemoryError):
        return True
    # Look torch up instead of importing it: if it was never imported, the runner cannot have raised this.
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return isinstance(oom_type, type) and isinstance(exc, oom_type)


@dataclass
class WorkerStats:
    batches: int = 0  # runner batches completed (after splits, one per scheduled batch)
    items_done: int = 0  # items resolved with a result
    items_failed: int = 0  # items resolved with an exception (runner errors, length guard)
    expired: int = 0  # items dropped with DeadlineExceeded
    cancelled: int = 0  # items whose future was cancelled before they ran
    oom_splits: int = 0  # times a batch was halved after an OOM
    isolated_reruns: int = 0  # times a failing batch was rerun item by item
    restarts: int = 0  # times the supervisor restarted a dead worker thread


class WorkerPool:
    """One worker thread pulling batches from a bounded queue; thread-safe, no global state."""

    def __init__(
        self,
        runner: Runner,
        *,
        max_queue: int,
        max_cost: int,
        max_items: int,
        max_wait: float,
        is_oom: Callable[[BaseException], bool] = default_is_oom,
        name: str = "worker",
        on_batch: BatchHook | None = None,
        watchdog_interval: float = 1.0,
        on_thread_start: Callable[[], None] | None = None,
    ) -> None:
        if max_queue < 1 or max_cost < 1 or max_items < 1 or max_wait < 0:
            raise ValueError("max_queue, max_cost and max_items must be >= 1 and max_wait >= 0")
        self._runner = runner
        self._max_queue = max_queue
        self._max_cost = max_cost
        self._max_items = max_items
        self._max_wait = max_wait
        self._is_oom = is_oom
        self.name = name
        self.on_batch = on_batch
        # Run first in each worker thread (a restarted one too): per-thread state the runner needs, e.g. a GPU
        # warm-up (service/warmup.py). Its failure is logged; the thread goes on to serve.
        self.on_thread_start = on_thread_start
        self._watchdog_interval = watchdog_interval

        self._cond = threading.Condition()
        self._pending: list[Item] = []
        self._in_flight: list[Item] = []
        self._started = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        self._stats = WorkerStats()
        self._recent: deque[tuple[int, float]] = deque(maxlen=_RECENT_BATCHES)  # (image-passes, seconds)
        self._batch_started = 0.0  # when the batch in flight started

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._started:
                return
            self._started = True
            self._spawn_locked()
        self._watchdog = threading.Thread(target=self._watch, name=f"{self.name}-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self, grace: float = 10.0) -> None:
        """Refuse new work, let the started batch finish within `grace`, fail the rest with WorkerStopped."""
        with self._cond:
            self._stopping = True
            leftover, self._pending = self._pending, []
            thread = self._thread
            self._cond.notify_all()
        self._watchdog_stop.set()
        for item in leftover:
            self._fail(item, WorkerStopped(f"the service is shutting down ({self.name} stopped before the "
                                           "item ran)"))
        if thread is not None and thread is not threading.current_thread():
            thread.join(grace)
        # Work still running after the grace period is abandoned (its thread is a daemon); callers are told.
        with self._cond:
            stuck = list(self._in_flight) if thread is not None and thread.is_alive() else []
        for item in stuck:
            self._fail(item, WorkerStopped(f"the service is shutting down ({self.name} stopped before the "
                                           "item finished)"))

    def ensure_alive(self) -> None:
        """Restart the worker thread if it died; pending items stay queued for the new one."""
        with self._cond:
            if not self._started or self._stopping or self._thread_alive_locked():
                return
            self._stats.restarts += 1
            logger.warning("%s: worker thread died, restarting (restart %d)", self.name, self._stats.restarts)
            self._spawn_locked()

    # --- submitting and observing ----------------------------------------------------------------

    def submit(self, item: Item) -> Future:
        """Queue `item`; its future resolves with the runner's result. Raises QueueFull or WorkerStopped."""
        self.ensure_alive()
        with self._cond:
            if not self._started or self._stopping:
                raise WorkerStopped(f"the service is shutting down ({self.name} is not running)")
            self._drop_cancelled_locked()
            if len(self._pending) >= self._max_queue:
                raise QueueFull(self._retry_after_locked())
            self._pending.append(item)
            self._cond.notify_all()
        return item.future

    @property
    def alive(self) -> bool:
        with self._cond:
            return self._thread_alive_locked()

    @property
    def depth(self) -> int:
        """Items waiting to start (not counting the batch being run, nor those cancelled while queued)."""
        with self._cond:
            return sum(1 for item in self._pending if not item.future.cancelled())

    @property
    def running(self) -> int:
        """Items in the batch being run now."""
        with self._cond:
            return len(self._in_flight)

    @property
    def stats(self) -> WorkerStats:
        """A snapshot of the counters."""
        with self._cond:
            return replace(self._stats)

    # --- the worker thread -----------------------------------------------------------------------

    def _spawn_locked(self) -> None:
        self._generation += 1
        thread_name = f"{self.name}-{self._generation}"
        self._thread = threading.Thread(target=self._serve, name=thread_name, daemon=True)
        self._thread.start()

    def _thread_alive_locked(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _watch(self) -> None:
        while not self._watchdog_stop.wait(self._watchdog_interval):
            self.ensure_alive()

    def _serve(self) -> None:
        if self.on_thread_start is not None:
            try:
                self.on_thread_start()
            except Exception:  # noqa: BLE001 - a thread that cannot warm up still serves, only slower at first
                logger.exception("%s: thread start hook failed", self.name)
        try:
            while True:
                batch, expired = self._take_next()
                for item in expired:
                    self._fail(item, DeadlineExceeded())
                if batch is None:
                    return
                if batch:
                    self._run_batch(batch)
                # let go of the batch before waiting for the next one: its results may hold large maps
                del batch, expired
        except BaseException as exc:  # noqa: BLE001 - whatever killed the thread, its callers must hear of it
            # The thread ends here and the supervisor starts another; the batch it held cannot be trusted
            # (it may have caused the crash), so its callers get the error rather than a silent rerun.
            logger.exception("%s: worker thread crashed", self.name)
            with self._cond:
                held, self._in_flight = self._in_flight, []
            for item in held:
                self._fail(item, RuntimeError(f"{self.name} crashed while running this item: {exc!r}"))

    def _take_next(self) -> tuple[list[Item] | None, list[Item]]:
        """Block until a batch is ready or items expired; (None, []) once stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return None, []
                self._drop_cancelled_locked()
                if not self._pending:
                    self._cond.wait()
                    continue
                collation = collate(
                    self._pending,
                    now=time.monotonic(),
                    max_cost=self._max_cost,
                    max_items=self._max_items,
                    max_wait=self._max_wait,
                )
                self._pending = collation.remaining
                self._stats.expired += len(collation.expired)
                if collation.batch:
                    self._in_flight = collation.batch
                    self._batch_started = time.monotonic()
                    return collation.batch, collation.expired
                if collation.expired:
                    return [], collation.expired
                self._cond.wait(collation.wait)

    def _drop_cancelled_locked(self) -> None:
        # Cancelled requests free their queue slot at once instead of when they reach the head.
        kept = [item for item in self._pending if not item.future.cancelled()]
        self._stats.cancelled += len(self._pending) - len(kept)
        self._pending = kept

    def _run_batch(self, batch: list[Item]) -> None:
        now = time.monotonic()
        runnable = []
        for item in batch:
            if item.future.set_running_or_notify_cancel():
                item.started_at = now
                runnable.append(item)
        with self._cond:
            self._stats.cancelled += len(batch) - len(runnable)
        if runnable:
            self._execute(runnable)
            duration = time.monotonic() - now
            with self._cond:
                self._stats.batches += 1
                self._recent.append((sum(item.passes for item in runnable), duration))
            self._notify_batch(runnable, duration)
        with self._cond:
            self._in_flight = []

    def _execute(self, items: list[Item]) -> None:
        """Run `items` through the runner, splitting on OOM and isolating a failing item."""
        try:
            results = self._runner(items)
        except Exception as exc:
            if len(items) == 1:
                self._fail(items[0], exc)
            elif self._is_oom(exc):
                with self._cond:
                    self._stats.oom_splits += 1
                middle = len(items) // 2
                self._execute(items[:middle])
                self._execute(items[middle:])
            else:
                # Rerun one by one so only the item that causes the error fails.
                with self._cond:
                    self._stats.isolated_reruns += 1
                for item in items:
                    self._execute([item])
            return
        try:
            count = len(results)
        except TypeError:
            count = None
        if count != len(items):
            error = RuntimeError(f"runner returned {count} results for a batch of {len(items)} items")
            for item in items:
                self._fail(item, error)
            return
        for item, result in zip(items, results, strict=True):
            if isinstance(result, BaseException):
                self._fail(item, result)
            else:
                self._succeed(item, result)

    def _notify_batch(self, items: list[Item], duration: float) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(items, duration)
        except Exception:
            logger.exception("%s: on_batch hook failed", self.name)  # metrics must not stop the worker

    # --- resolving futures -----------------------------------------------------------------------

    def _succeed(self, item: Item, result: Any) -> None:
        try:
            item.future.set_result(result)
        except InvalidStateError:
            return  # already resolved (stop() gave up on it, or it was cancelled)
        with self._cond:
            self._stats.items_done += 1

    def _fail(self, item: Item, error: BaseException) -> None:
        try:
            item.future.set_exception(error)
        except InvalidStateError:
            return
        if not isinstance(error, DeadlineExceeded):
            with self._cond:
                self._stats.items_failed += 1

    def retry_after(self) -> float:
        with self._cond:
            return self._retry_after_locked()

    def start_estimate(self, stopping: Callable[[Item], bool] | None = None) -> float | None:
        """Seconds until an item queued now would likely start: what remains of the batch in flight and the
        image-passes queued ahead, at the seconds per image-pass of recent batches. None until a batch has
        been timed (nothing to estimate from). `stopping(item)`: a running item whose work is being stopped
        (it ends within a pass), not counted."""
        with self._cond:
            return self._start_estimate_locked(stopping)

    def _start_estimate_locked(self, stopping: Callable[[Item], bool] | None = None) -> float | None:
        if not self._recent:
            return None
        rate = sum(seconds for _, seconds in self._recent) / max(1, sum(passes for passes, _ in self._recent))
        ahead = sum(item.passes for item in self._pending if not item.future.cancelled())
        running = sum(item.passes for item in self._in_flight if stopping is None or not stopping(item))
        remaining = max(0.0, running * rate - (time.monotonic() - self._batch_started)) if running else 0.0
        return remaining + ahead * rate

    def _retry_after_locked(self) -> float:
        """Seconds until the queue has likely drained (an item queued now would start); at least 1."""
        estimate = self._start_estimate_locked()
        return 1.0 if estimate is None else min(max(estimate, 1.0), _MAX_RETRY_AFTER)
