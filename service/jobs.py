"""Explain calls in flight, as jobs: progress, result, cancel. Every call is one; async ones are listed."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .api.errors import ApiError


@dataclass(eq=False)
class Job:
    method: str
    model: str
    total: list[int]  # per image: steps expected (updated by progress reports)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    done: list[int] = field(default_factory=list)
    started: bool = False
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
            raise ApiError(429, "too_many_jobs", f"{self.max_jobs} jobs are held; wait for some to finish",
                           {"Retry-After": "10"})
        self._jobs[job.id] = job

    def get(self, job_id: str) -> Job:
        self._evict()
        try:
            return self._jobs[job_id]
        except KeyError:
            raise ApiError(404, "unknown_job", f"no job {job_id!r} (unknown or expired)") from None

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
        """Forget jobs finished more than ttl ago; with `room` (adding one), also the oldest finished ones when
        full. Reading must not evict: a GET would otherwise drop another job's result."""
        now = time.time()
        for job_id, job in list(self._jobs.items()):
            if job.finished_at is not None and now - job.finished_at > self.ttl:
                del self._jobs[job_id]
        finished = sorted((j for j in self._jobs.values() if j.finished_at), key=lambda j: j.finished_at)
        if room and len(self._jobs) >= self.max_jobs:
            for job in finished[: len(self._jobs) - self.max_jobs + 1]:
                del self._jobs[job.id]
            finished = [job for job in finished if job.id in self._jobs]
        if self.max_result_bytes is not None:
            for job in finished[: oldest_to_forget([payload_bytes(j.result) for j in finished],
                                                   self.max_result_bytes)]:
                del self._jobs[job.id]
