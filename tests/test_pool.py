"""The worker pool: batching under load, per-item results, and its failure policy."""

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

import service.worker.pool as pool_module
from service.errors import DeadlineExceeded, QueueFull, WorkerStopped
from service.worker.item import Item
from service.worker.pool import WorkerPool, default_is_oom

TIMEOUT = 5.0  # generous bound on future.result(); the tests normally finish in milliseconds


class Runner:
    """Doubles each payload; the first call blocks until `release()` so that a queue can build up."""

    def __init__(self, fail: Callable[[list[Item]], None] | None = None, gated: bool = True) -> None:
        self.fail = fail
        self.batches: list[list] = []  # payloads of every call, including failed ones
        self.started = threading.Event()
        self._gate = threading.Event()
        if not gated:
            self._gate.set()
        self._lock = threading.Lock()

    def release(self) -> None:
        self._gate.set()

    def __call__(self, items: list[Item]) -> list:
        with self._lock:
            self.batches.append([item.payload for item in items])
        self.started.set()
        assert self._gate.wait(TIMEOUT)
        if self.fail is not None:
            self.fail(items)
        return [item.payload * 2 for item in items]

    def successful_sizes(self, failing: Callable[[list], bool]) -> list[int]:
        return [len(batch) for batch in self.batches if not failing(batch)]


def item(payload, key="k", cost=1, deadline_in=60.0) -> Item:
    return Item(key=key, cost=cost, payload=payload, deadline=time.monotonic() + deadline_in)


@pytest.fixture
def make_pool() -> Iterator[Callable[..., WorkerPool]]:
    pools: list[WorkerPool] = []

    def build(runner, **overrides) -> WorkerPool:
        options = dict(max_queue=64, max_cost=100, max_items=8, max_wait=0.0, watchdog_interval=0.05)
        options.update(overrides)
        pool = WorkerPool(runner, **options)
        pool.start()
        pools.append(pool)
        return pool

    yield build
    for pool in pools:
        pool.stop(grace=1.0)


def fill_behind_a_blocked_batch(pool: WorkerPool, runner: Runner, payloads: list) -> list:
    """Submit one item, wait until the runner holds it, then queue `payloads` behind it."""
    first = pool.submit(item(0))
    assert runner.started.wait(TIMEOUT)
    futures = [pool.submit(item(p)) for p in payloads]
    runner.release()
    assert first.result(TIMEOUT) == 0
    return futures


def test_concurrent_submits_form_batches_and_each_gets_its_own_result(make_pool):
    runner = Runner()
    pool = make_pool(runner, max_items=4)
    first = pool.submit(item(100))
    assert runner.started.wait(TIMEOUT)
    with ThreadPoolExecutor(max_workers=8) as clients:
        futures = list(clients.map(lambda n: pool.submit(item(n)), range(12)))
        runner.release()
        results = [future.result(TIMEOUT) for future in futures]
    assert first.result(TIMEOUT) == 200
    assert results == [n * 2 for n in range(12)]
    sizes = [len(batch) for batch in runner.batches]
    assert max(sizes) > 1 and max(sizes) <= 4
    assert pool.stats.batches == len(sizes)


def test_max_wait_gathers_a_batch_from_a_trickle(make_pool):
    runner = Runner(gated=False)
    pool = make_pool(runner, max_items=3, max_wait=0.2)
    futures = [pool.submit(item(n)) for n in range(3)]
    assert [future.result(TIMEOUT) for future in futures] == [0, 2, 4]
    assert runner.batches == [[0, 1, 2]]


def test_full_queue_raises_queue_full_with_a_retry_hint(make_pool):
    runner = Runner()
    pool = make_pool(runner, max_queue=2)
    pool.submit(item(0))
    assert runner.started.wait(TIMEOUT)
    pool.submit(item(1))
    pool.submit(item(2))
    with pytest.raises(QueueFull) as raised:
        pool.submit(item(3))
    assert raised.value.retry_after >= 1.0
    assert pool.depth == 2
    runner.release()


def test_an_item_past_its_deadline_fails_with_deadline_exceeded(make_pool):
    runner = Runner()
    pool = make_pool(runner)
    pool.submit(item(0))
    assert runner.started.wait(TIMEOUT)
    late = pool.submit(item(1, deadline_in=0.05))
    time.sleep(0.1)
    runner.release()
    with pytest.raises(DeadlineExceeded):
        late.result(TIMEOUT)
    assert [1] not in runner.batches
    assert pool.stats.expired == 1


def test_out_of_memory_splits_the_batch_until_it_fits(make_pool):
    def oom_above_two(items):
        if len(items) > 2:
            raise MemoryError("simulated OOM")

    runner = Runner(fail=oom_above_two)
    pool = make_pool(runner, max_items=8)
    futures = fill_behind_a_blocked_batch(pool, runner, list(range(1, 9)))
    assert [future.result(TIMEOUT) for future in futures] == [n * 2 for n in range(1, 9)]
    assert 8 in [len(batch) for batch in runner.batches]  # the full batch was tried first
    assert max(runner.successful_sizes(lambda batch: len(batch) > 2)) == 2
    assert pool.stats.oom_splits >= 1


def test_a_single_item_that_still_runs_out_of_memory_fails_with_that_error(make_pool):
    def always_oom(items):
        raise MemoryError("simulated OOM")

    pool = make_pool(Runner(fail=always_oom, gated=False))
    with pytest.raises(MemoryError):
        pool.submit(item(1)).result(TIMEOUT)


def test_a_poisoned_item_fails_alone(make_pool):
    def reject_bad(items):
        if any(i.payload == "bad" for i in items):
            raise ValueError("bad input")

    runner = Runner(fail=reject_bad)
    pool = make_pool(runner)
    futures = fill_behind_a_blocked_batch(pool, runner, ["a", "bad", "c"])
    assert futures[0].result(TIMEOUT) == "aa"
    with pytest.raises(ValueError, match="bad input"):
        futures[1].result(TIMEOUT)
    assert futures[2].result(TIMEOUT) == "cc"
    assert pool.stats.isolated_reruns == 1


def test_an_exception_returned_as_a_result_fails_only_that_item(make_pool):
    def runner(items):
        return [KeyError(i.payload) if i.payload == 2 else i.payload for i in items]

    pool = make_pool(runner)
    assert pool.submit(item(1)).result(TIMEOUT) == 1
    with pytest.raises(KeyError):
        pool.submit(item(2)).result(TIMEOUT)


def test_a_wrong_number_of_results_fails_the_batch_clearly(make_pool):
    pool = make_pool(lambda items: [])
    with pytest.raises(RuntimeError, match="returned 0 results for a batch of 1"):
        pool.submit(item(1)).result(TIMEOUT)


def test_a_dead_worker_thread_is_restarted_and_keeps_its_queue(make_pool, monkeypatch):
    real_collate = pool_module.collate
    crashes = []

    def collate_that_crashes_once(*args, **kwargs):
        if not crashes:
            crashes.append(1)
            raise RuntimeError("injected fault")
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(pool_module, "collate", collate_that_crashes_once)
    pool = make_pool(Runner(gated=False))
    future = pool.submit(item(21))
    # The watchdog notices the dead thread and restarts it; the queued item is then served.
    assert future.result(TIMEOUT) == 42
    assert crashes == [1]
    assert pool.stats.restarts == 1
    assert pool.alive


def test_ensure_alive_restarts_a_dead_worker_without_the_watchdog(make_pool, monkeypatch):
    real_collate = pool_module.collate
    crashed = threading.Event()

    def collate_that_crashes_once(*args, **kwargs):
        if not crashed.is_set():
            crashed.set()
            raise RuntimeError("injected fault")
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(pool_module, "collate", collate_that_crashes_once)
    pool = make_pool(Runner(gated=False), watchdog_interval=60.0)
    future = pool.submit(item(1))
    assert crashed.wait(TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while pool.alive and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not pool.alive
    pool.ensure_alive()
    assert future.result(TIMEOUT) == 2


def test_stop_finishes_the_running_batch_and_fails_the_queue(make_pool):
    runner = Runner()
    pool = make_pool(runner)
    running = pool.submit(item(5))
    assert runner.started.wait(TIMEOUT)
    queued = pool.submit(item(6))
    threading.Timer(0.05, runner.release).start()
    pool.stop(grace=TIMEOUT)
    assert running.result(0) == 10
    with pytest.raises(WorkerStopped):
        queued.result(0)
    with pytest.raises(WorkerStopped):
        pool.submit(item(7))
    assert not pool.alive


def test_stop_gives_up_on_a_batch_that_outlasts_the_grace_period(make_pool):
    runner = Runner()
    pool = make_pool(runner)
    stuck = pool.submit(item(1))
    assert runner.started.wait(TIMEOUT)
    pool.stop(grace=0.05)
    with pytest.raises(WorkerStopped):
        stuck.result(0)
    runner.release()  # the abandoned thread finishes; its late result is ignored


def test_cancelled_items_are_skipped(make_pool):
    runner = Runner()
    pool = make_pool(runner)
    pool.submit(item(0))
    assert runner.started.wait(TIMEOUT)
    cancelled = pool.submit(item(1))
    kept = pool.submit(item(2))
    assert cancelled.cancel()
    assert pool.depth == 1  # the queue depth gauge counts only work still to do
    runner.release()
    assert kept.result(TIMEOUT) == 4
    assert [1] not in runner.batches and all(1 not in batch for batch in runner.batches)
    assert pool.stats.cancelled == 1


def test_on_batch_hook_sees_each_batch_and_cannot_break_the_worker(make_pool):
    seen = []

    def hook(items, seconds):
        seen.append(([i.payload for i in items], seconds))
        raise RuntimeError("broken metrics")

    pool = make_pool(Runner(gated=False), on_batch=hook)
    assert pool.submit(item(1)).result(TIMEOUT) == 2
    assert pool.submit(item(2)).result(TIMEOUT) == 4
    assert [payloads for payloads, _ in seen] == [[1], [2]]
    assert all(seconds >= 0 for _, seconds in seen)
    assert pool.stats.restarts == 0


def test_started_at_is_set_before_the_runner_sees_the_item(make_pool):
    def runner(items):
        return [i.started_at is not None and i.started_at >= i.enqueued_at for i in items]

    pool = make_pool(runner)
    assert pool.submit(item(None)).result(TIMEOUT) is True


def test_submit_before_start_is_refused():
    pool = WorkerPool(lambda items: items, max_queue=1, max_cost=1, max_items=1, max_wait=0.0)
    with pytest.raises(WorkerStopped):
        pool.submit(item(1))


def test_default_is_oom():
    assert default_is_oom(MemoryError())
    assert not default_is_oom(ValueError())
    torch = pytest.importorskip("torch")
    assert default_is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not default_is_oom(RuntimeError("shape mismatch"))


def test_the_thread_start_hook_runs_in_the_worker_thread_before_its_first_batch(make_pool):
    events = []
    pool = make_pool(lambda items: [events.append(("batch", threading.current_thread().name)) or i.payload
                                    for i in items],
                     on_thread_start=lambda: events.append(("start", threading.current_thread().name)))
    assert pool.submit(item(1)).result(5) == 1
    assert events[0][0] == "start" and events[1][0] == "batch"
    assert events[0][1] == events[1][1] != threading.current_thread().name


def test_a_failing_thread_start_hook_leaves_the_worker_serving(make_pool):
    def broken():
        raise RuntimeError("no GPU after all")

    pool = make_pool(lambda items: [i.payload for i in items], on_thread_start=broken)
    assert pool.submit(item(7)).result(5) == 7
