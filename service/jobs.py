"""Explain calls in flight, as jobs: progress, result, cancel. Every call is one; async ones are listed."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import Busy, NotFound, quote

T = TypeVar("T")


@dataclass(eq=False)
class Job:
    method: str
    model: str
    total: list[int]  # per image: steps expected (updated by progress reports)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    done: list[int] = field(default_factory=list)
    started: bool = False
    deferred: bool = False  # a synchronous call held as a job at once: it would start past its deadline
    status: str = "queued"
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task | None = None
    finished_at: float | None = None

    def __post_init__(self):
        self.done = [0] * len(self.total)

    def progress_for(self, index: int):
        """The callback the worker calls for image `index` (from the worker thread)."""

        def report(done: int, total: int) -> None:
            self.started = True
            self.done[index], self.total[index] = done, total

        return report

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        """Stop the job's work: queued items are dropped, running ones stop at their next progress report."""
        self.cancel_event.set()
        if self.task is not None:
            self.task.cancel()

    def view(self) -> dict[str, Any]:
        status = self.status
        if status == "queued" and self.started:
            status = "running"
        return {"id": self.id, "method": self.method, "model": self.model, "status": status,
                "progress": {"done": sum(self.done), "total": sum(self.total)}, "created": self.created,
                "result": self.result, "error": self.error}


def payload_bytes(result: dict[str, Any] | None) -> int:
    """The encoded maps a finished job's result holds (base64 strings: nearly all of its memory)."""
    if not result:
        return 0
    total = 0
    for entry in result.get("results", []):
        total += sum(len(v) for v in entry.get("map", {}).values() if isinstance(v, str))
        total += len(entry.get("raw") or "")
    return total


def oldest_to_forget(sizes: list[int], budget: int) -> int:
    """How many of the oldest results (`sizes`, oldest first) to forget so the rest fit in `budget`; the
    newest is never counted (a result alone larger than the budget is still kept until the next one)."""
    held, count = sum(sizes), 0
    while held > budget and count < len(sizes) - 1:
        held -= sizes[count]
        count += 1
    return count


class JobStore:
    """Jobs by id, bounded: finished jobs expire after `ttl` and are evicted first when full, and the oldest
    finished ones also go when their results together pass `max_result_bytes` (a 12 MP map at the original
    size is 65 MB of base64; a thousand of those would not fit in memory). The newest finished job stays."""

    def __init__(self, max_jobs: int, ttl: float, max_result_bytes: int | None = None):
        self.max_jobs, self.ttl, self.max_result_bytes = max_jobs, ttl, max_result_bytes
        self._jobs: dict[str, Job] = {}

    def add(self, job: Job) -> None:
        self._evict(room=True)
        if len(self._jobs) >= self.max_jobs:
            raise Busy(f"{self.max_jobs} jobs are held; wait for some to finish", code="too_many_jobs",
                       retry_after=10)
        self._jobs[job.id] = job

    def get(self, job_id: str) -> Job:
        self._evict()
        try:
            return self._jobs[job_id]
        except KeyError:
            raise unknown_job(job_id) from None

    def discard(self, job_id: str) -> None:
        """Forget a job whose call was refused after it was held: its id was never given out."""
        self._jobs.pop(job_id, None)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for job in self._jobs.values():
            status = job.view()["status"]
            out[status] = out.get(status, 0) + 1
        return out

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def _evict(self, room: bool = False) -> None:
        """Reading must not make room: a GET would otherwise drop another job's result."""
        evict(self._jobs, lambda job: job.finished_at, lambda job: payload_bytes(job.result), ttl=self.ttl,
              max_jobs=self.max_jobs if room else None, max_result_bytes=self.max_result_bytes)


def evict(entries: dict[str, T], finished_at: Callable[[T], float | None],
          result_bytes: Callable[[T], int], *, ttl: float, max_jobs: int | None,
          max_result_bytes: int | None) -> None:
    """Forget entries (jobs by id) finished more than `ttl` ago; with `max_jobs` (making room for one more),
    also the oldest finished ones while full; and the oldest finished ones while their results together pass
    `max_result_bytes` (the newest stays). Used by this process's JobStore and by Ray's shared state."""
    now = time.time()
    for key, entry in list(entries.items()):
        done = finished_at(entry)
        if done is not None and now - done > ttl:
            del entries[key]
    finished = sorted(((key, entry) for key, entry in entries.items() if finished_at(entry)),
                      key=lambda pair: finished_at(pair[1]) or 0.0)
    if max_jobs is not None and len(entries) >= max_jobs:
        for key, _ in finished[: len(entries) - max_jobs + 1]:
            del entries[key]
        finished = [(key, entry) for key, entry in finished if key in entries]
    if max_result_bytes is not None:
        sizes = [result_bytes(entry) for _, entry in finished]
        for key, _ in finished[: oldest_to_forget(sizes, max_result_bytes)]:
            del entries[key]


def unknown_job(job_id: str) -> NotFound:
    return NotFound(f"no job {quote(job_id)} (unknown or expired)", code="unknown_job")


class LocalJobs:
    """The job book of one server process: its JobStore (the embedded backend's; Ray's is shared,
    service/distributed/ray_backend.py)."""

    def __init__(self, store: JobStore):
        self.store = store

    async def hold(self, job: Job) -> None:
        """Keep `job` so that GET/DELETE /v1/jobs/{id} find it (Busy when max_jobs are held)."""
        self.store.add(job)

    async def discard(self, job: Job) -> None:
        """Undo `hold` for a call refused before any work was queued."""
        self.store.discard(job.id)

    async def view(self, job_id: str) -> dict[str, Any]:
        return self.store.get(job_id).view()

    async def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.store.get(job_id)
        if job.finished_at is None:
            job.cancel()
            if job.task is not None:  # answer with the job as cancelled, not as it was a moment ago
                await asyncio.wait([job.task], timeout=5)
        return job.view()

    async def counts(self) -> dict[str, int]:
        return self.store.counts()

    async def finished(self, job: Job) -> None:
        """The job's call has ended (its outcome is on the job)."""
