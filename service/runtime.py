"""What the app holds while it runs: models, the worker pool, jobs and metrics, and the call lifecycle."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from .api.errors import ApiError
from .budget import PixelBudget
from .cache import ResultCache
from .calibrate import calibrate_lane
from .engine import ImageExplanation, explain
from .engine_process import Batch, EngineProcess, EngineProcessDied
from .hostmem import retain_freed_memory
from .jobs import Job, JobStore
from .metrics import Metrics
from .openmp import passes_in_passing_threads, run_in_passing_thread
from .pipeline import ExplainCall, encode_result, response_body
from .settings import Settings
from .warmup import warm_up
from .worker import DeadlineExceeded, QueueFull, WorkerPool, WorkerStopped, WorkItem
from .zoo import ModelRegistry, resolve_device, set_cudnn_autotuning

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Every item of the running batch was cancelled."""


class Payload:
    __slots__ = ("call", "index", "job", "compute_s", "expired")

    def __init__(self, call: ExplainCall, index: int, job: Job):
        self.call, self.index, self.job = call, index, job
        self.compute_s = 0.0  # duration of the batch this image ran in
        self.expired = False


class Runtime:
    def __init__(self, settings: Settings, registry: ModelRegistry | None = None):
        self.settings = settings
        self.registry = registry
        self.device = resolve_device(settings.device)
        self.metrics = Metrics()
        self.jobs = JobStore(settings.max_jobs, settings.job_ttl_s, settings.max_job_result_bytes)
        self.cache = ResultCache(settings.cache_bytes)
        self.pixels_in_flight = PixelBudget(settings.max_pixels_in_flight)
        self.metrics.pixels_in_flight.set_function(lambda: self.pixels_in_flight.held)
        self._encoder = ThreadPoolExecutor(thread_name_prefix="encode")  # maps -> .npy/PNG/base64, per image
        # Where the passes run: a thread of this process, or a child process per lane (service/engine_process.py).
        self.isolated = self._isolate(settings)
        if self.isolated and registry is not None:
            raise ValueError("worker=process: the engine processes load the models from models_dir; "
                             "pass no registry")
        lanes = ("worker", "bulk")
        self.engines = ({lane: EngineProcess(settings.model_dump_json(), f"engine-{lane}-{self.device}")
                         for lane in lanes} if self.isolated else {})
        # Two lanes on the device: long work (a MoreauGrad image is thousands of passes) runs on its own
        # worker so it never holds up interactive requests queued behind it.
        self.pool, self.bulk_pool = (
            WorkerPool(lambda items, lane=lane: self._run_batch(items, lane), max_queue=settings.max_queue,
                       max_cost=settings.max_batch_cost, max_items=settings.max_batch_items,
                       max_wait=settings.max_wait_ms / 1000,
                       name=f"{lane}-{self.device}", on_batch=self._on_batch,
                       watchdog_interval=settings.watchdog_s,
                       on_thread_start=lambda lane=lane: self._warm_thread(lane))
            for lane in lanes)
        self._warmed = {lane: threading.Event() for lane in lanes}  # each lane's pass thread: see _warm_thread
        self._stopping = False
        self.load_error: str | None = None
        self.pass_batch: dict[str, int] = {}  # images per forward pass, per model (measured on a GPU)
        self._loaded = threading.Event()
        # Fault injection for tests: called with each batch before it runs (may raise, e.g. a fake CUDA OOM).
        self.fault_hook: Callable[[list[WorkItem]], None] | None = None

    def _isolate(self, settings: Settings) -> bool:
        return settings.worker == "process" or (settings.worker == "auto" and self.device.type == "cuda")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load models in the background (so /healthz answers and /readyz says 503 meanwhile)."""
        if self.settings.retain_host_memory:
            retain_freed_memory()
        set_cudnn_autotuning(self.settings.cudnn_benchmark)
        for pool in self.pools:
            pool.start()
        if self.registry is not None:
            self.pass_batch = calibrate_lane(self.registry.models, self.settings)
            self._loaded.set()
            return
        threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            only = set(self.settings.models) if self.settings.models else None
            if self.isolated:  # the models here only serve validation and preprocessing: keep them off the device
                self.registry = ModelRegistry.from_dir(self.settings.models_dir, torch.device("cpu"), only,
                                                       self.settings.fold_batchnorm)
                with ThreadPoolExecutor(len(self.engines)) as starting:
                    self.pass_batch = list(starting.map(EngineProcess.start, self.engines.values()))[0]
            else:
                self.registry = ModelRegistry.from_dir(self.settings.models_dir, self.device, only,
                                                       self.settings.fold_batchnorm)
                self.pass_batch = calibrate_lane(self.registry.models, self.settings)
            log.info("models ready: %s; unavailable: %s", sorted(self.registry.models),
                     sorted(self.registry.unavailable))
        except Exception as exc:  # noqa: BLE001 - reported by /readyz
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")
        finally:
            self._loaded.set()

    def _warm_thread(self, lane: str) -> None:
        """In a lane's worker thread, before it serves: once the models are loaded, warm this thread's GPU pass
        shapes (service/warmup.py). Engine processes warm their own main thread instead."""
        try:
            while not self._loaded.wait(0.5):
                if self._stopping:
                    return
            passing = passes_in_passing_threads(lane, self.device)  # then nothing to warm: service/openmp.py
            if not self.isolated and not passing and self.registry is not None and self.load_error is None:
                warm_up(self.registry.models, self.pass_batch, self.settings)
        finally:
            self._warmed[lane].set()

    def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        for job in self.jobs.all():
            job.cancel_event.set()
        for pool in self.pools:
            pool.stop(grace)
        for engine in self.engines.values():
            engine.stop(grace)
        self._encoder.shutdown(wait=False)  # encodings under way finish; their callers are answered

    @property
    def pools(self) -> tuple[WorkerPool, WorkerPool]:
        return self.pool, self.bulk_pool

    @property
    def workers_alive(self) -> bool:
        return all(pool.alive for pool in self.pools)

    @property
    def ready(self) -> bool:
        return (self._loaded.is_set() and self.registry is not None and bool(self.registry.models)
                and self.workers_alive and self.warmed)

    @property
    def warmed(self) -> bool:
        """Each lane's pass thread has run its warm-up (a no-op off a GPU): see `_warm_thread`."""
        return all(warmed.is_set() for warmed in self._warmed.values())

    def serving_device(self) -> str:
        """Where the passes run: this process's registry may sit on the CPU only to validate and preprocess
        (worker=process, where the engine processes own the device)."""
        return str(self.device)

    def readiness(self) -> dict[str, Any]:
        return {"ready": self.ready, "models_loaded": self._loaded.is_set(), "worker_alive": self.workers_alive,
                "models": sorted(self.registry.models) if self.registry else [], "error": self.load_error}

    def require_ready(self) -> ModelRegistry:
        if not self.ready:
            raise ApiError(503, "not_ready", "the service is starting (models loading) or its worker is down",
                           {"Retry-After": "5"})
        return self.registry

    # ------------------------------------------------------------------ worker side
    def _run_batch(self, items: list[WorkItem], lane: str) -> list[Any]:
        """Runs on the lane's worker thread, except the bulk lane's torch work on a CPU, which runs in a thread
        that ends with the batch (service/openmp.py)."""
        if not self.isolated and passes_in_passing_threads(lane, self.device):
            return run_in_passing_thread(self._run_batch_here, items, lane)
        return self._run_batch_here(items, lane)

    def _run_batch_here(self, items: list[WorkItem], lane: str) -> list[Any]:
        """Items share model, method and params (their key says so)."""
        call = items[0].payload.call
        jobs = [item.payload.job for item in items]

        def progress(done: int, total: int) -> None:
            for item in items:
                item.payload.job.progress_for(item.payload.index)(done, total)
            if all(job.cancelled for job in jobs):
                raise Cancelled("cancelled")

        for job in jobs:  # "running" from now on, even for methods that report progress only at the end
            job.started = True
        if self.fault_hook is not None:
            self.fault_hook(items)
        x = torch.stack([item.payload.call.pixels[item.payload.index] for item in items])
        targets = [item.payload.call.targets[item.payload.index] for item in items]
        raw = ["raw" in item.payload.call.outputs for item in items]
        sizes = [item.payload.call.original_size(item.payload.index) for item in items]
        started = time.monotonic()
        if self.isolated:
            batch = Batch(call.model.name, call.method.name, call.params, x.numpy(), targets, raw, sizes)
            results = self.engines[lane].run(batch, progress)
        else:
            if self.device.type == "cuda":
                x = x.pin_memory()  # page-locked, so the copy to the device below does not block this thread
            try:
                results = explain(call.model, call.method, x, targets, call.params, progress=progress,
                                  top_k=self.settings.top_k, keep_attribution=raw, map_sizes=sizes,
                                  max_batch=self.pass_batch.get(call.model.name, self.settings.max_pass_batch))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()  # the pool splits the batch and retries
                raise
        for item in items:  # recorded before the pool resolves the futures: encoding reads it
            item.payload.compute_s = time.monotonic() - started
        return results

    def worker_restarts(self, lane: str) -> int:
        """Worker threads of the lane restarted, plus its engine processes started again."""
        pool = self.bulk_pool if lane == "bulk" else self.pool
        engine = self.engines.get(lane)
        return pool.stats.restarts + (engine.restarts if engine else 0)

    def record_device_memory(self) -> None:
        if self.isolated:  # the engine processes report theirs with each batch; this process holds no device
            self.metrics.device_memory.labels(str(self.device)).set(
                sum(engine.device_memory for engine in self.engines.values()))
        else:
            self.metrics.sample_device(self.device)

    def _on_batch(self, items: list[WorkItem], duration: float) -> None:
        method = items[0].payload.call.method.name
        self.metrics.batch_size.labels(method).observe(len(items))
        self.metrics.compute.labels(method).observe(duration)

    # ------------------------------------------------------------------ call side
    def cache_key(self, call: ExplainCall, index: int) -> tuple:
        return (call.hashes[index], call.model.name, call.method.name, call.params.model_dump_json(),
                call.targets[index])

    async def enqueue(self, prepare: Callable[[], ExplainCall], job: Job, deadline_s: float
                      ) -> tuple[ExplainCall, list[WorkItem]]:
        """Decode and validate (`prepare`) and queue the call, in one trip to a request thread: the worker can
        start while the event loop hears back (submit is thread-safe here)."""
        def prepare_and_submit() -> tuple[ExplainCall, list[WorkItem]]:
            call = prepare()
            return call, self.submit(call, job, deadline_s)

        return await run_in_threadpool(prepare_and_submit)

    def submit(self, call: ExplainCall, job: Job, deadline_s: float) -> list[WorkItem]:
        key = (call.model.name, call.method.name, call.params.model_dump_json())
        cost = call.method.batch_cost(call.params)
        deadline = time.monotonic() + deadline_s
        items = [WorkItem(key=key, cost=cost, payload=Payload(call, i, job), deadline=deadline,
                          progress=job.progress_for(i)) for i in range(len(call.uploads))]
        pool = self.bulk_pool if call.method.cost(call.params) > self.settings.bulk_cost else self.pool
        pixels = self.hold_pixels(call, pool.retry_after)
        submitted: list[WorkItem] = []
        try:
            for item in items:
                cached = self.cache.get(self.cache_key(call, item.payload.index), "raw" in call.outputs)
                if cached is not None:  # answered from the cache: no queue, no model pass
                    item.started_at = item.enqueued_at
                    item.future.set_running_or_notify_cancel()
                    item.future.set_result(cached)
                    job.progress_for(item.payload.index)(*[call.method.steps(call.params)] * 2)
                    continue
                pool.submit(item)
                submitted.append(item)
        except QueueFull as exc:
            self._withdraw(submitted, pixels)
            raise ApiError(429, "queue_full", f"the queue is full; retry after {exc.retry_after:.0f}s",
                           {"Retry-After": str(max(1, round(exc.retry_after)))}) from None
        except WorkerStopped:
            self._withdraw(submitted, pixels)
            raise ApiError(503, "shutting_down", "the service is shutting down") from None
        except BaseException:
            self._withdraw(submitted, pixels)
            raise
        # Held until the worker is done with every image (or it was cancelled or expired), whether or not
        # anyone still awaits the call.
        self.pixels_in_flight.release_when_done(pixels, [item.future for item in items])
        return items

    def hold_pixels(self, call: ExplainCall, retry_after: Callable[[], float]) -> int:
        """Reserve the call's decoded pixels in the in-flight budget, or refuse the call with a 429."""
        pixels = call.upload_pixels
        if not self.pixels_in_flight.hold(pixels):
            raise ApiError(429, "queue_full", f"the calls in flight hold {self.pixels_in_flight.held} pixels of "
                                              f"images and this one {pixels}; the limit is "
                                              f"{self.settings.max_pixels_in_flight}: retry shortly",
                           {"Retry-After": str(max(1, round(retry_after())))})
        return pixels

    def _withdraw(self, submitted: list[WorkItem], pixels: int) -> None:
        for item in submitted:
            item.future.cancel()
        self.pixels_in_flight.release(pixels)

    async def complete(self, call: ExplainCall, job: Job, items: list[WorkItem]) -> dict[str, Any]:
        """Await every image's encoded result (encoded off the event loop); the job records the outcome."""
        started = time.monotonic()
        job.status = "queued"
        loop = asyncio.get_running_loop()
        # The worker only looks at the queue between batches; a timer enforces the start deadline meanwhile.
        timers = [loop.call_later(max(0.0, item.deadline - time.monotonic()), _expire, item) for item in items]
        try:
            encoded = await asyncio.gather(*(asyncio.wrap_future(self._encoded(call, item)) for item in items))
            body = response_body(call, encoded)
            job.status, job.result = "succeeded", body
            return body
        except BaseException as exc:
            for item in items:  # one image failed: the call has failed, drop the rest of its queued work
                item.future.cancel()
            if job.cancelled or isinstance(exc, (asyncio.CancelledError, Cancelled)):
                job.status, job.error = "cancelled", {"code": "cancelled", "message": "the job was cancelled"}
            else:
                error = as_api_error(exc)
                job.status, job.error = "failed", {"code": error.code, "message": error.message}
            raise
        finally:
            for timer in timers:
                timer.cancel()
            job.finished_at = time.time()
            self.metrics.latency.labels(call.method.name).observe(time.monotonic() - started)

    def _encoded(self, call: ExplainCall, item: WorkItem) -> Future:
        """A future of the item's response entry. Its encoding starts in the encoder threads from the callback
        of the worker's future, as soon as the item is done: no round trip through the event loop between
        the two (about 0.5 ms per request on 2 cores), and each image of a call encodes while others run."""
        out: Future = Future()

        def chain(done: Future) -> None:
            if done.cancelled():
                if item.payload.expired:
                    _settle(out, error=DeadlineExceeded())
                else:
                    out.cancel()
            elif done.exception() is not None:
                _settle(out, error=done.exception())
            else:
                try:
                    self._encoder.submit(self._encode_one, call, item, done.result(), out)
                except RuntimeError:  # the executor has shut down
                    _settle(out, error=WorkerStopped("the service is shutting down"))

        item.future.add_done_callback(chain)
        return out

    def _encode_one(self, call: ExplainCall, item: WorkItem, result: ImageExplanation, out: Future) -> None:
        if out.cancelled():  # the call failed or its caller left meanwhile
            return
        try:
            if not torch.isfinite(result.heatmap).all():  # this call's parameters overflowed; not cached
                raise ValueError(f"image {item.payload.index}: the {call.method.name} map is not finite: the "
                                 f"computation overflowed with these parameters ({call.params.model_dump()})")
            self.cache.put(self.cache_key(call, item.payload.index), result)
            started = item.started_at or item.enqueued_at
            entry = encode_result(call, item.payload.index, result, (started - item.enqueued_at) * 1000,
                                  item.payload.compute_s * 1000)
        except Exception as exc:  # noqa: BLE001 - the call fails with it, the encoder thread goes on
            _settle(out, error=exc)
            return
        _settle(out, result=entry)

    def cancel(self, job: Job) -> None:
        job.cancel_event.set()
        if job.task is not None:
            job.task.cancel()

    # ------------------------------------------------------------------ hooks for the routes (a distributed
    # runtime, service/distributed/ray_runtime.py, keeps jobs and worker metrics in a shared actor)
    async def hold_job(self, job: Job) -> None:
        """Keep `job` so that GET/DELETE /v1/jobs/{id} find it (429 when max_jobs are held)."""
        self.jobs.add(job)

    async def discard_job(self, job: Job) -> None:
        """Undo `hold_job` for a call refused before any work was queued."""
        self.jobs.discard(job.id)

    async def job_view(self, job_id: str) -> dict[str, Any]:
        return self.jobs.get(job_id).view()

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job.finished_at is None:
            self.cancel(job)
            if job.task is not None:  # answer with the job as cancelled, not as it was a moment ago
                await asyncio.wait([job.task], timeout=5)
        return job.view()

    async def job_counts(self) -> dict[str, int]:
        return self.jobs.counts()

    async def refresh_metrics(self) -> None:
        """Called before /metrics renders (the embedded runtime's metrics are all in this process)."""


def _expire(item: WorkItem) -> None:
    """Fails a still-queued item at its deadline (cancel() is refused once the worker has started it)."""
    item.payload.expired = True  # before cancel(): its callbacks read it
    if not item.future.cancel():
        item.payload.expired = False


def _settle(future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve `future` unless it was cancelled meanwhile (its caller has gone)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def as_api_error(exc: BaseException, log_unexpected: bool = True) -> ApiError:
    """Map what the worker or the engine raised onto the API's errors."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", "the work could not start before its deadline; the service "
                                                  "is overloaded, retry later")
    if isinstance(exc, EngineProcessDied):
        return ApiError(500, "engine_crashed", f"{exc}; another engine process takes the next request")
    if isinstance(exc, WorkerStopped):
        return ApiError(503, "shutting_down", "the service is shutting down")
    if isinstance(exc, (ValueError, LookupError)):
        return ApiError(422, "invalid", str(exc))
    if log_unexpected:
        log.error("explain failed: %s: %s", type(exc).__name__, exc)
    return ApiError(500, "internal", f"{type(exc).__name__} while explaining; see the server log")
