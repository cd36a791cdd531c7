"""The state every replica can reach: jobs (by id) and the explainers' metrics, in one small actor.

It runs as a one-replica Serve deployment (a Ray actor that Serve owns and restarts). The ingress that
accepted a job owns its task and records the outcome here; explainer replicas report progress here and
learn from the answer whether the job was cancelled. Plain Python: no Ray import, tested without Ray.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter

from ..jobs import evict, payload_bytes
from ..metrics import WorkerMetrics

# The families an explainer replica feeds; the ingress serves them next to its own (requests, latency, jobs).
WORKER_FAMILIES = ("saliency_batch_size", "saliency_compute_seconds", "saliency_queue_depth",
                   "saliency_device_memory_bytes", "saliency_replica_images")


class SharedState:
    def __init__(self, max_jobs: int = 1000, ttl_s: float = 3600.0, max_result_bytes: int | None = None):
        self.max_jobs, self.ttl_s, self.max_result_bytes = max_jobs, ttl_s, max_result_bytes
        self._jobs: dict[str, dict[str, Any]] = {}
        self.registry = CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.replica_images = Counter("saliency_replica_images", "images explained, by explainer replica",
                                      ["deployment", "replica"], registry=self.registry)

    # ------------------------------------------------------------------ jobs
    async def add(self, view: dict[str, Any], total: list[int]) -> str | None:
        """Hold a job (its `Job.view()` and steps per image); returns an error message when max_jobs are
        held."""
        self._evict(room=True)
        if view["id"] in self._jobs:
            return None
        if len(self._jobs) >= self.max_jobs:
            return f"{self.max_jobs} jobs are held; wait for some to finish"
        self._jobs[view["id"]] = {"view": dict(view), "done": [0] * len(total), "total": list(total),
                                  "cancelled": False, "finished_at": None,
                                  "started": view["status"] == "running"}
        return None

    async def discard(self, job_id: str) -> None:
        """Forget a job whose call was refused after it was held (as service.jobs.JobStore.discard)."""
        self._jobs.pop(job_id, None)

    async def view(self, job_id: str) -> dict[str, Any] | None:
        self._evict()
        record = self._jobs.get(job_id)
        return None if record is None else _render(record)

    async def progress(self, reports: list[tuple[str, int, int, int]]) -> list[bool]:
        """An explainer's reports (job id, image index, done, total); answers, per report, whether its job
        was cancelled (unknown jobs, such as synchronous calls, are only answered)."""
        out = []
        for job_id, index, done, total in reports:
            record = self._jobs.get(job_id)
            if record is not None and record["finished_at"] is None and 0 <= index < len(record["done"]):
                record["started"] = True
                record["done"][index], record["total"][index] = done, total
            out.append(record is not None and record["cancelled"])
        return out

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        record = self._jobs.get(job_id)
        if record is None:
            return None
        if record["finished_at"] is None:
            record["cancelled"] = True
        return _render(record)

    async def finish(self, view: dict[str, Any], total: list[int], finished_at: float) -> None:
        """The owning ingress records the outcome (status, result or error); it may come before `add`."""
        if view["id"] not in self._jobs:
            await self.add(view, total)
        record = self._jobs.get(view["id"])
        if record is None:
            return
        record["view"] = dict(view)
        record["finished_at"] = finished_at
        if view["status"] == "succeeded":  # the last throttled report may not have come: the work is all done
            record["done"] = list(record["total"])

    async def counts(self) -> dict[str, int]:
        self._evict()
        out: dict[str, int] = {}
        for record in self._jobs.values():
            status = _render(record)["status"]
            out[status] = out.get(status, 0) + 1
        return out

    def _evict(self, room: bool = False) -> None:
        """As service.jobs.JobStore: with `room`, also the oldest finished ones when full."""
        evict(self._jobs, lambda r: r["finished_at"], lambda r: payload_bytes(r["view"].get("result")),
              ttl=self.ttl_s, max_jobs=self.max_jobs if room else None,
              max_result_bytes=self.max_result_bytes)

    # ------------------------------------------------------------------ metrics
    async def observe_batch(self, deployment: str, replica: str, method: str, size: int, seconds: float,
                            depth: int, memory: float, device: str) -> None:
        m = self.metrics
        m.batch_size.labels(method).observe(size)
        m.compute.labels(method).observe(seconds)
        m.queue_depth.labels(f"{deployment}/{replica}").set(depth)
        m.device_memory.labels(f"{deployment}/{replica}/{device}").set(memory)
        self.replica_images.labels(deployment, replica).inc(size)

    async def families(self) -> list:
        """The worker-side metric families (prometheus_client Metric objects, picklable)."""
        return [family for family in self.registry.collect() if family.name in WORKER_FAMILIES]


def _render(record: dict[str, Any]) -> dict[str, Any]:
    view = dict(record["view"])
    view["progress"] = {"done": sum(record["done"]), "total": sum(record["total"])}
    if view["status"] == "queued" and record["started"]:
        view["status"] = "running"
    return view
