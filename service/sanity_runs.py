"""Models' sanity reports as jobs (POST and GET /v1/models/{name}/sanity): their lifecycle, as
service/runtime.py is a call's. The math is service/evidence/sanity.py.

A report runs in a thread of its own beside the lanes (one report at a time; at most `max_sanity_jobs`
queued or running), on the model as the server holds it (the randomised levels on a copy: service/methods/
hooks.py keeps a capture to its own thread, so passes of the lanes on the same module are untouched), on the
four shipped photos. It stops at its next method pass when its job is cancelled or runs past
`sanity_deadline_s`. Where the server holds the models (worker=thread) it runs on the serving device; with
worker=process (the default on a GPU) and on Ray, on the CPU copy the server process validates with.
Finished reports are kept per model weights (a SHA-256 of the served state dict), profile, seed and
methods: asking again answers from the kept report unless `refresh` is set.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from starlette.concurrency import run_in_threadpool

from .backends.base import JobBook
from .errors import Busy, Cancelled, DeadlineExceeded, InvalidInput, ServiceError, as_service_error, quote
from .evidence.sanity import PHOTOS, PROFILES, profile_params, sanity_report, shipped_photos
from .jobs import Job
from .methods import METHODS
from .settings import Settings
from .zoo import LoadedModel

log = logging.getLogger(__name__)

JOB_METHOD = "sanity"  # a sanity job's `method` in GET /v1/jobs/{id}
KEPT_REPORTS = 32  # finished reports kept (a report is a few KB); the oldest go first


@dataclass(frozen=True)
class SanityAsk:
    """What a caller asks of a report (validated by the API layer's SanityRequest)."""

    methods: tuple[str, ...] | None = None  # None: every registered method
    seed: int = 0
    profile: str = "quick"
    refresh: bool = False


class SanityRuns:
    def __init__(self, settings: Settings, job_book: JobBook):
        self.settings, self.job_book = settings, job_book
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sanity")
        self._reports: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._latest: dict[str, tuple] = {}  # model name -> key of its newest report
        self._jobs: dict[tuple, Job] = {}  # key -> the job computing it (until it finishes)
        self._last_job: dict[str, Job] = {}  # model name -> its newest sanity job
        self._digests: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ asking
    async def start(self, model: LoadedModel, ask: SanityAsk) -> Job:
        """The job of `model`'s report: the one already computing it, a finished one answered from the kept
        report, or a new one. Busy when `max_sanity_jobs` are queued or running; InvalidInput for an unknown
        method or profile."""
        names = self._methods(ask)
        if ask.profile not in PROFILES:
            raise InvalidInput(f"profile must be one of {', '.join(PROFILES)}; got {quote(ask.profile)}",
                               code="invalid_sanity")
        digest = await run_in_threadpool(self.digest, model)
        key = (model.name, digest, ask.profile, ask.seed, names)
        running = self._jobs.get(key)
        if running is not None and running.finished_at is None:
            return running
        if not ask.refresh and key in self._reports:
            return await self._answered(model, key)
        active = [job for job in self._jobs.values() if job.finished_at is None]
        if len(active) >= self.settings.max_sanity_jobs:
            raise Busy(f"{len(active)} sanity reports are queued or running (max_sanity_jobs); retry when "
                       "one has finished", code="too_many_sanity_jobs", retry_after=60)
        job = Job(method=JOB_METHOD, model=model.name, total=[0])
        await self.job_book.hold(job)  # Busy when max_jobs are held
        self._jobs[key], self._last_job[model.name] = job, job
        job.task = asyncio.create_task(self._run(model, ask, names, key, job))
        job.task.add_done_callback(lambda t: t.cancelled() or t.exception())  # outcome lives on the job
        return job

    def latest(self, model_name: str) -> dict[str, Any] | None:
        """The newest finished report of the model, or None."""
        key = self._latest.get(model_name)
        return self._reports.get(key) if key is not None else None

    def summary(self, model_name: str) -> dict[str, Any] | None:
        """For GET /v1/models: the newest job's status ("done" once it succeeded) and id, and the verdicts of
        the newest finished report; None when no report was ever asked for."""
        job, report = self._last_job.get(model_name), self.latest(model_name)
        if job is None and report is None:
            return None
        status = "done" if job is None else job.view()["status"]
        methods = {name: {"verdict": r["verdict"], "reason": r["reason"]}
                   for name, r in (report["methods"] if report else {}).items()}
        return {"status": "done" if status == "succeeded" else status, "job_id": job.id if job else None,
                "methods": methods}

    def stop(self) -> None:
        for job in self._jobs.values():
            job.cancel_event.set()
        self._thread.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ running
    def _methods(self, ask: SanityAsk) -> tuple[str, ...]:
        if ask.methods is None:
            return tuple(METHODS)
        unknown = [name for name in ask.methods if name not in METHODS]
        if unknown:
            raise InvalidInput(f"unknown method {quote(unknown[0])} in methods; available: {sorted(METHODS)}",
                               code="invalid_sanity")
        if not ask.methods:
            raise InvalidInput("methods must name at least one method (or be left out: every method)",
                               code="invalid_sanity")
        return tuple(dict.fromkeys(ask.methods))  # in the caller's order, once each

    async def _answered(self, model: LoadedModel, key: tuple) -> Job:
        """A job finished at once with the kept report (its id can be followed like any other)."""
        job = Job(method=JOB_METHOD, model=model.name, total=[1])
        job.done, job.started, job.status = [1], True, "succeeded"
        job.result, job.finished_at = self._reports[key], time.time()
        await self.job_book.hold(job)
        await self.job_book.finished(job)
        self._last_job[model.name] = job
        return job

    async def _run(self, model: LoadedModel, ask: SanityAsk, names: tuple[str, ...], key: tuple,
                   job: Job) -> None:
        try:
            job.status = "queued"
            running = self._thread.submit(self._compute, model, ask, names, key[1], job)
            report = await asyncio.wrap_future(running)
            self._keep(key, report)
            job.status, job.result = "succeeded", report
        except BaseException as exc:
            if job.cancelled or isinstance(exc, (asyncio.CancelledError, Cancelled)):
                job.cancel_event.set()  # a task cancelled otherwise (shutdown): the thread stops too
                job.status, job.error = "cancelled", {"code": "cancelled", "message": "the job was cancelled"}
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            error = as_service_error(exc)
            if not isinstance(exc, ServiceError):
                log.error("sanity report of %s failed", model.name, exc_info=exc)
            job.status, job.error = "failed", {"code": error.code, "message": error.message}
        finally:
            if self._jobs.get(key) is job:
                del self._jobs[key]
            job.finished_at = time.time()
            await asyncio.shield(self.job_book.finished(job))

    def _compute(self, model: LoadedModel, ask: SanityAsk, names: tuple[str, ...], digest: str,
                 job: Job) -> dict[str, Any]:
        """In the sanity thread: the report, or Cancelled / DeadlineExceeded at the next method pass."""
        limit = self.settings.sanity_deadline_s
        deadline = time.monotonic() + limit

        def progress(done: int, total: int) -> None:
            if job.cancelled:
                raise Cancelled()
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"the sanity report ran past sanity_deadline_s ({limit:g} s); ask for "
                                       "fewer methods, profile quick, or raise the setting")
            job.started = True
            job.done[0], job.total[0] = done, total

        progress(0, 0)
        methods = [METHODS[name] for name in names]
        params = {m.name: profile_params(m, ask.profile) for m in methods}
        x = torch.stack([model.preprocess(photo) for photo in shipped_photos()])
        started = time.perf_counter()
        report = sanity_report(model, methods, x, params=params, progress=progress, seed=ask.seed)
        return {**report, "seed": ask.seed, "profile": ask.profile,
                "params": {name: p.model_dump() for name, p in params.items()},
                "photos": sorted(path.name for path in PHOTOS.glob("*.jpg")), "weights_sha256": digest,
                "device": str(model.device), "elapsed_s": round(time.perf_counter() - started, 3),
                "created": time.time()}

    def _keep(self, key: tuple, report: dict[str, Any]) -> None:
        self._reports[key] = report
        self._reports.move_to_end(key)
        self._latest[key[0]] = key
        while len(self._reports) > KEPT_REPORTS:
            old, _ = self._reports.popitem(last=False)
            if self._latest.get(old[0]) == old:
                del self._latest[old[0]]

    def digest(self, model: LoadedModel) -> str:
        """SHA-256 of the model's served state dict (names, dtypes, shapes and bytes), once per module."""
        with self._lock:
            known = self._digests.get(model.module)
        if known is not None:
            return known
        h = hashlib.sha256()
        for name, tensor in model.module.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        found = h.hexdigest()
        with self._lock:
            self._digests[model.module] = found
        return found
