"""The call lifecycle, in one place for every backend: admission, budgets, deadlines, the cache, jobs and
encoding, around a backend that runs the passes (service/backends/: embedded lanes, or Ray Serve).

A call's life (docs/architecture.md draws it): `start_call` resolves the method, model and parameters, then in
a request thread decodes and validates the images (`pipeline.prepare`) and hands one item per image to the
backend (cached images are answered at once); `complete` awaits the items, encodes each one as it finishes (in
the encoder pool), and records the outcome on the call's job.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from .backends.base import Backend, CallItem
from .budget import PixelBudget
from .cache import ResultCache
from .detection import calls as detection_calls
from .detection.admission import DetectionAdmission
from .detection.budget import calibrate_detectors
from .detection.explain import DETECTION_ONLY
from .engine import ImageExplanation
from .errors import (
    Busy,
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    NotAcceptable,
    Unavailable,
    WorkerStopped,
    as_service_error,
)
from .jobs import Job, JobStore
from .metrics import Metrics
from .pipeline import Call, CallRequest, encode_result, prepare, resolve, response_body
from .sanity_runs import SanityRuns
from .selftest import SelfTest, describe, quick_self_test
from .settings import Settings
from .timings import RecentTimings
from .worker import Item
from .zoo import ModelRegistry

log = logging.getLogger(__name__)


class Runtime:
    """What the app holds while it runs: the models that validate requests, the call lifecycle, and its
    backend."""

    def __init__(self, settings: Settings, backend: Backend):
        self.settings, self.backend = settings, backend
        self.metrics = Metrics()
        backend.register_metrics(self.metrics.registry)
        self.jobs = JobStore(settings.max_jobs, settings.job_ttl_s, settings.max_job_result_bytes)
        self.job_book = backend.job_book(self.jobs)  # where GET/DELETE /v1/jobs/{id} look
        self.sanity = SanityRuns(settings, self.job_book)  # models' sanity reports, as jobs
        self.cache = ResultCache(settings.cache_bytes)
        self.pixels_in_flight = PixelBudget(settings.max_pixels_in_flight)
        self.metrics.pixels_in_flight.set_function(lambda: self.pixels_in_flight.held)
        self._encoder = ThreadPoolExecutor(thread_name_prefix="encode")  # maps -> .npy/PNG/base64, per image
        self.registry: ModelRegistry | None = None
        self.load_error: str | None = None
        self.default_error: str | None = None  # why the default model is not served (not ready while set)
        self.self_tests: dict[str, SelfTest] = {}  # per model, its quick self-test at load
        self.timings = RecentTimings()  # seconds per pass of recent answers (GET /v1/timings)
        self.detection_calls = DetectionAdmission()  # detection calls admitted and not yet answered
        self._loaded = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the backend and load the models in the background (so /healthz answers and /readyz says 503
        meanwhile); models given already are booted here."""
        self.backend.start()
        if self.backend.preloaded:
            self._boot()
        else:
            threading.Thread(target=self._boot, name="model-loader", daemon=True).start()

    def _boot(self) -> None:
        try:
            self.registry = self.backend.boot()
            calibrate_detectors(self.registry.detectors, self.settings)
            if self.settings.self_test_at_load:  # before ready: which methods apply to which model
                self.self_tests = {name: quick_self_test(model)
                                   for name, model in self.registry.models.items()}
                for report in self.self_tests.values():
                    if not report.passed:
                        log.warning("self-test of %s: %s", report.model, "; ".join(describe(report)[1:]))
            log.info("models ready: %s; unavailable: %s", sorted(self.registry.models),
                     sorted(self.registry.unavailable))
            self.default_error = default_model_problem(self.settings, self.registry)
            if self.default_error:
                log.error("not ready: %s", self.default_error)
        except Exception as exc:  # noqa: BLE001 - reported by /readyz
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")
        finally:
            self._loaded.set()

    def stop(self, grace: float) -> None:
        for job in self.jobs.all():
            job.cancel_event.set()
        self.sanity.stop()
        self.backend.stop(grace)
        self._encoder.shutdown(wait=False)  # encodings under way finish; their callers are answered

    @property
    def ready(self) -> bool:
        return (self._loaded.is_set() and self.registry is not None and bool(self.registry.models)
                and self.default_error is None and self.backend.workers_alive and self.backend.warmed)

    def readiness(self) -> dict[str, Any]:
        return {"ready": self.ready, "models_loaded": self._loaded.is_set(),
                "worker_alive": self.backend.workers_alive,
                "models": sorted(self.registry.models) if self.registry else [],
                "default_model": self.settings.default_model, "error": self.load_error or self.default_error}

    def require_ready(self) -> ModelRegistry:
        if self.default_error:  # a setting to fix, not a wait: no Retry-After
            raise Unavailable(f"not ready: {self.default_error}")
        if not self.ready or self.registry is None:
            raise Unavailable("the service is starting (models loading) or its worker is down", retry_after=5)
        return self.registry

    # ------------------------------------------------------------------ a call
    async def start_call(self, method_name: str, request: CallRequest, *, overlay_only: bool = False,
                         deadline_s: float | None = None, hold: bool = False, defer: bool = True) -> Job:
        """Resolve, decode, validate, admit and queue a call; the job's task awaits and encodes its results.

        `overlay_only`: the answer is one image's overlay (NotAcceptable for several images). With `hold`, the
        job is held (Busy when max_jobs are) before any work is queued, so a refused call never runs. With
        `defer` (a synchronous call, not held), a call expected to start only past its deadline is held as a
        job at once (`job.deferred`), with the start deadline of jobs, instead of being queued to expire."""
        registry = self.require_ready()
        detector = registry.detectors.get(request.model or self.settings.default_model)
        if detector is not None:  # an object detector: its own call path (service/detection/calls.py)
            if overlay_only:
                raise NotAcceptable(f"{detector.name} is an object detector, answered with a map per "
                                    "detection: accept application/json")
            return await detection_calls.start(self.settings, detector, method_name, request, self.job_book,
                                               hold=hold, admission=self.detection_calls,
                                               record=self.timings.record,
                                               pixels=self.pixels_in_flight,
                                               seconds_per_pass=self.timings.seconds_per_pass)
        if method_name in DETECTION_ONLY:
            name = request.model or self.settings.default_model
            raise InvalidInput(f"{method_name} explains object detectors; model {name!r} is a classifier "
                               "(GET /v1/models gives each model's task)", code="method_not_applicable")
        model, method, params = resolve(registry, self.settings, request.model, method_name, request.params)
        reason = self.not_applicable(model.name).get(method.name)
        if reason is not None:  # the method refused this model in its self-test: say why before any work
            raise InvalidInput(reason, code="method_not_applicable")
        if overlay_only and len(request.blobs) != 1:
            raise NotAcceptable(f"Accept: image/png answers with one image's overlay; this call has "
                                f"{len(request.blobs)} images: accept application/json for several")
        outputs = ["overlay"] if overlay_only else request.outputs or self.default_outputs
        job = Job(method=method.name, model=model.name, total=[method.steps(params)] * len(request.blobs))
        if hold:
            await self.job_book.hold(job)
        try:
            call, items = await self._enqueue(
                lambda: prepare(self.settings, model, method, params, request, outputs), job,
                deadline_s or self.settings.queue_deadline_s, defer=defer and not hold)
        except BaseException:
            if hold:
                await self.job_book.discard(job)
            raise
        job.task = asyncio.create_task(self.complete(call, job, items))
        job.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # outcome lives on the job
        return job

    async def _enqueue(self, make_call, job: Job, deadline_s: float, *,
                       defer: bool) -> tuple[Call, list[Item]]:
        """Decode and validate (`make_call`), admit and queue the call; in one trip to a request thread when
        the backend takes items from threads and the call is admitted as it is, so its worker can start
        while the event loop hears back."""
        def prepare_and_admit() -> tuple[Call, list[Item] | None, float]:
            call = make_call()
            expected = self.start_estimate(call)
            if expected > deadline_s or not self.backend.submits_from_threads:
                return call, None, expected
            return call, self.submit(call, job, deadline_s), expected

        call, items, expected = await run_in_threadpool(prepare_and_admit)
        if items is not None:
            return call, items
        if expected > deadline_s:
            deadline_s = await self._admit_late(call, job, expected, deadline_s, defer)
        return call, self.submit(call, job, deadline_s)

    def start_estimate(self, call: Call) -> float:
        """Seconds until the call would likely start on its lane (0 when the backend cannot tell yet)."""
        return self.backend.start_estimate(self.lane(call)) or 0.0

    async def _admit_late(self, call: Call, job: Job, expected: float, deadline_s: float,
                          defer: bool) -> float:
        """A call expected to start past its start deadline: a synchronous call (`defer`) is held as a job
        at once, with the start deadline of jobs, when it would start within that; otherwise it is refused
        (Busy) with a Retry-After of when it would start in time. Returns the deadline to queue it with."""
        job_deadline_s = self.settings.job_deadline_s
        if defer and expected <= job_deadline_s:
            await self.job_book.hold(job)  # Busy when max_jobs are held
            job.deferred = True
            return job_deadline_s
        limit = job_deadline_s if defer else deadline_s
        raise Busy(f"this call would start in about {expected:.0f} s (the work queued ahead of it on the "
                   f"{self.lane(call)} lane), past its start deadline of {limit:.0f} s: retry later",
                   code="overloaded", retry_after=expected - limit)

    def not_applicable(self, model_name: str) -> dict[str, str]:
        """The methods that do not apply to the model, with the reason (from its self-test at load)."""
        report = self.self_tests.get(model_name)
        return report.not_applicable if report is not None else {}

    @property
    def default_outputs(self) -> list[str]:
        """A call's outputs when it names none."""
        return ["npy", "metrics"] if self.settings.metrics_by_default else ["npy"]

    def lane(self, call: Call) -> str:
        return "bulk" if call.passes_per_image > self.settings.bulk_cost else "interactive"

    def cache_key(self, call: Call, index: int) -> tuple:
        return (call.hashes[index], call.model.name, call.method.name, call.params.model_dump_json(),
                call.targets[index], call.metrics.model_dump_json() if call.metrics else None)

    def submit(self, call: Call, job: Job, deadline_s: float) -> list[Item]:
        """One item per image, answered from the cache or handed to the backend; the call's pixels are held in
        the in-flight budget until every item is done."""
        key = (call.model.name, call.method.name, call.params.model_dump_json(),
               call.metrics.model_dump_json() if call.metrics else None)
        cost, passes = call.method.batch_cost(call.params), call.passes_per_image
        deadline = time.monotonic() + deadline_s
        items = [Item(key=key, cost=cost, passes=passes, payload=CallItem(call, i, job), deadline=deadline,
                      progress=job.progress_for(i)) for i in range(len(call.uploads))]
        for item in items:
            item.payload.siblings = items
        lane = self.lane(call)
        pixels = self.hold_pixels(call, lane)
        submitted: list[Item] = []
        try:
            for i, item in enumerate(items):
                cached = self.cache.get(self.cache_key(call, i), "raw" in call.outputs)
                if cached is not None:  # answered from the cache: no queue, no model pass
                    item.started_at = item.enqueued_at
                    item.future.set_running_or_notify_cancel()
                    item.future.set_result(cached)
                    job.progress_for(i)(*[call.method.steps(call.params)] * 2)
                    continue
                self.backend.submit(item, lane)
                submitted.append(item)
        except BaseException:
            for item in submitted:
                item.future.cancel()
            self.backend.withdraw(job)
            self.pixels_in_flight.release(pixels)
            raise
        # Held until the backend is done with every image (or it was cancelled or expired), whether or not
        # anyone still awaits the call.
        self.pixels_in_flight.release_when_done(pixels, [item.future for item in items])
        return items

    def hold_pixels(self, call: Call, lane: str) -> int:
        """Reserve the call's decoded pixels in the in-flight budget, or refuse the call (Busy)."""
        pixels = call.upload_pixels
        if not self.pixels_in_flight.hold(pixels):
            raise Busy(f"the calls in flight hold {self.pixels_in_flight.held} pixels of images and this one "
                       f"{pixels}; the limit is {self.settings.max_pixels_in_flight}: retry shortly",
                       retry_after=self.backend.retry_after(lane))
        return pixels

    async def complete(self, call: Call, job: Job, items: list[Item]) -> dict[str, Any]:
        """Await every image's encoded result (encoded off the event loop); the job records the outcome.
        Raises the call's error as a service error."""
        started = time.monotonic()
        job.status = "queued"
        loop = asyncio.get_running_loop()
        # A queue looks at its items only between batches; a timer enforces the start deadline meanwhile.
        timers = [loop.call_later(max(0.0, item.deadline - time.monotonic()), _expire, item)
                  for item in items]
        try:
            encoded = await asyncio.gather(*(asyncio.wrap_future(self._encoded(call, item))
                                             for item in items))
            body = response_body(call, encoded)
            job.status, job.result = "succeeded", body
            return body
        except BaseException as exc:
            for item in items:  # one image failed: the call has failed, drop the rest of its queued work
                item.future.cancel()
            if job.cancelled or isinstance(exc, (asyncio.CancelledError, Cancelled)):
                job.status, job.error = "cancelled", {"code": "cancelled", "message": "the job was cancelled"}
                raise
            error = as_service_error(exc)
            job.status, job.error = "failed", {"code": error.code, "message": error.message}
            if error is exc:
                raise
            raise error from exc
        finally:
            for timer in timers:
                timer.cancel()
            for item in items:
                item.payload.siblings = []
            self.backend.withdraw(job)
            job.finished_at = time.time()
            self.metrics.latency.labels(call.method.name).observe(time.monotonic() - started)
            await asyncio.shield(self.job_book.finished(job))

    def _encoded(self, call: Call, item: Item) -> Future:
        """A future of the item's response entry. Its encoding starts in the encoder threads from the callback
        of the backend's future, as soon as the item is done: no round trip through the event loop between
        the two, and each image of a call encodes while others run."""
        out: Future = Future()
        held = [item]  # a future keeps its callbacks for good: chain lets go of the item when it runs

        def chain(done: Future) -> None:
            item = held.pop()
            part: CallItem = item.payload
            if done.cancelled():
                if part.expired:
                    _settle(out, error=DeadlineExceeded())
                else:
                    out.cancel()
            elif done.exception() is not None:
                _settle(out, error=done.exception())
            else:
                try:
                    self._encoder.submit(self._encode_one, call, item, done.result(), out)
                except RuntimeError:  # the executor has shut down
                    _settle(out, error=WorkerStopped())

        item.future.add_done_callback(chain)
        return out

    def _encode_one(self, call: Call, item: Item, result: ImageExplanation, out: Future) -> None:
        if out.cancelled():  # the call failed or its caller left meanwhile
            return
        part: CallItem = item.payload
        try:
            if not torch.isfinite(result.heatmap).all():  # this call's parameters overflowed; not cached
                raise InvalidInput(f"image {part.index}: the {call.method.name} map is not finite: the "
                                   f"computation overflowed with these parameters "
                                   f"({call.params.model_dump()})")
            self.cache.put(self.cache_key(call, part.index), result)
            started = item.started_at or item.enqueued_at
            entry = encode_result(call, part.index, result, (started - item.enqueued_at) * 1000,
                                  part.compute_s * 1000)
            self.timings.record(call.model.name, call.method.name, call.passes_per_image, part.compute_s)
        except Exception as exc:  # noqa: BLE001 - the call fails with it, the encoder thread goes on
            _settle(out, error=exc)
            return
        _settle(out, result=entry)

    def cancel(self, job: Job) -> None:
        """Stop a call nobody waits for any more (its caller hung up)."""
        job.cancel()
        self.backend.withdraw(job)

    async def refresh_metrics(self) -> None:
        """Before /metrics renders: the backend's figures, the jobs and the cache."""
        await self.backend.refresh_metrics()
        counts = await self.job_book.counts()
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            self.metrics.jobs.labels(status).set(counts.get(status, 0))
        self.metrics.cache_hits.set(self.cache.hits)
        self.metrics.cache_misses.set(self.cache.misses)
        self.metrics.cache_bytes.set(self.cache.bytes)


def default_model_problem(settings: Settings, registry: ModelRegistry) -> str | None:
    """Why the default model (the model of every call that names none) is not served, or None when it is."""
    name = settings.default_model
    if name in registry.models:
        return None
    if name in registry.unavailable:
        return f"default model {name!r} is unavailable: {registry.unavailable[name].reason}"
    if settings.models and name not in settings.models:
        return (f"default model {name!r} is not among the models to load ({', '.join(settings.models)}); "
                "add it to SALIENCY_MODELS or set SALIENCY_DEFAULT_MODEL to one of them")
    found = sorted({*registry.models, *registry.unavailable})
    dirs = ", ".join(str(d) for d in settings.card_dirs)
    hint = ""
    if settings.models_mode == "replace":
        hint = " (or SALIENCY_MODELS_MODE=add to keep the shipped cards)"
    return (f"default model {name!r} has no card in {dirs}; cards found: {', '.join(found) or 'none'}. "
            f"Set SALIENCY_DEFAULT_MODEL to one of them{hint}")


def _expire(item: Item) -> None:
    """Fails a still-queued item at its deadline (cancel() is refused once the worker has started it), unless
    its call has started meanwhile (CallItem.call_started lifts the deadline)."""
    if math.isinf(item.deadline):  # lifted: the call has started (a timer may fire a hair before its time)
        return
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
