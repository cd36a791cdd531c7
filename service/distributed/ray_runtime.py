"""The Runtime of an ingress replica on Ray Serve: the same call lifecycle, other places for work and jobs.

- Work: `submit` sends each image to its model's explainer deployment (a `DeploymentHandle`); the
  `WorkItem` futures that `Runtime.complete` awaits are settled from the replicas' answers, so decoding,
  encoding, the sync-wait-then-job fallback and errors are the embedded runtime's own code.
- Replica death: a call whose replica died (ray.kill, a crash, a lost node) is sent again, up to `retries`
  times; explanations are deterministic (seeded), so a rerun gives the same answer. When no replica could
  take it, the call fails with 503 `replica_lost` + Retry-After: nothing was computed, retry it.
- Jobs: held in the state deployment (every ingress replica finds them); the ingress that accepted a job
  owns its task and records the outcome there; explainers report progress there.
- Readiness: models loaded on the ingress (it validates and preprocesses) and every explainer answered.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import Counter
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.concurrency import run_in_threadpool

from ..api.errors import ApiError
from ..jobs import Job
from ..pipeline import ExplainCall
from ..runtime import Cancelled, Payload, Runtime
from ..settings import Settings
from ..worker import DeadlineExceeded, WorkItem
from ..zoo import ModelRegistry
from .messages import CANCELLED, DEADLINE, INVALID, Outcome, Task

log = logging.getLogger(__name__)

_REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class RayRuntime(Runtime):
    def __init__(self, settings: Settings, registry: ModelRegistry | None = None, *, explainers: dict[str, Any],
                 state: Any, retries: int = 3):
        super().__init__(settings, registry)
        self.device = torch.device("cpu")  # the ingress only validates and preprocesses; replicas own devices
        self.explainers, self.state, self.retries = explainers, state, retries
        self._explainers_up = threading.Event()
        self._dispatches: dict[str, list[asyncio.Task]] = {}  # job id -> its images' remote calls
        self._families: list = []
        # Worker-side families come from the state (fed by every explainer replica), not from local pools.
        for metric in (self.metrics.batch_size, self.metrics.compute, self.metrics.queue_depth,
                       self.metrics.device_memory, self.metrics.worker_restarts):
            self.metrics.registry.unregister(metric)
        self.metrics.registry.register(_RemoteFamilies(self))
        self.replica_lost = Counter("saliency_replica_lost", "calls whose explainer replica died under them "
                                    "(each was sent again, or failed with 503 replica_lost)",
                                    registry=self.metrics.registry)

    def _isolate(self, settings: Settings) -> bool:
        return False  # the explainer replicas are processes of their own already

    def serving_device(self) -> str:
        return f"ray:{self.settings.device}"  # each explainer replica resolves the device setting where it runs

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.registry is None:
            threading.Thread(target=self._load, name="model-loader", daemon=True).start()
        else:
            self._loaded.set()
        self._watcher = asyncio.get_running_loop().create_task(self._await_explainers())

    async def _await_explainers(self) -> None:
        pending = dict(self.explainers)
        while pending:
            for name, handle in list(pending.items()):
                try:
                    await asyncio.wait_for(handle.ping.remote(), 10)
                    del pending[name]
                except Exception as exc:  # noqa: BLE001 - not up yet: /readyz says 503
                    log.info("explainer %s not ready: %s", name, exc)
            if pending:
                await asyncio.sleep(0.5)
        self._explainers_up.set()

    def stop(self, grace: float = 10.0) -> None:
        for job in self.jobs.all():
            job.cancel_event.set()
        for tasks in self._dispatches.values():
            for task in tasks:
                task.cancel()
        self._encoder.shutdown(wait=False)

    @property
    def workers_alive(self) -> bool:
        return self._explainers_up.is_set()

    @property
    def warmed(self) -> bool:
        return True  # no local pass threads: the explainer replicas run the passes (and build their shapes' plans)

    # ------------------------------------------------------------------ work
    async def enqueue(self, prepare: Callable[[], ExplainCall], job: Job, deadline_s: float
                      ) -> tuple[ExplainCall, list[WorkItem]]:
        call = await run_in_threadpool(prepare)
        return call, self.submit(call, job, deadline_s)  # on the event loop: it schedules Ray calls there

    def submit(self, call: ExplainCall, job: Job, deadline_s: float) -> list[WorkItem]:
        handle = self.explainers.get(call.model.name)
        if handle is None:
            raise ApiError(503, "no_explainer", f"no explainer deployment serves {call.model.name!r}",
                           {"Retry-After": "30"})
        key = (call.model.name, call.method.name, call.params.model_dump_json())
        cost = min(call.method.batch_cost(call.params), self.settings.max_batch_cost)
        bulk = call.method.cost(call.params) > self.settings.bulk_cost
        deadline = time.time() + deadline_s
        loop = asyncio.get_running_loop()
        pixels = self.hold_pixels(call, lambda: 1.0)  # the replicas' queues are not visible from here
        items = []
        for i in range(len(call.uploads)):
            item = WorkItem(key=key, cost=cost, payload=Payload(call, i, job),
                            deadline=time.monotonic() + deadline_s)
            item.future.set_running_or_notify_cancel()  # the replica enforces the start deadline, not a timer
            items.append(item)
            cached = self.cache.get(self.cache_key(call, i), "raw" in call.outputs)  # this ingress's cache
            if cached is not None:
                item.started_at = item.enqueued_at
                item.future.set_result(cached)
                continue
            task = Task(key=key, method=call.method.name, params=call.params, pixels=call.pixels[i].clone(),
                        target=call.targets[i], cost=cost, deadline=deadline, job_id=job.id, index=i, bulk=bulk,
                        raw="raw" in call.outputs, size=call.original_size(i))
            self._dispatches.setdefault(job.id, []).append(loop.create_task(self._dispatch(handle, task, item)))
        self.pixels_in_flight.release_when_done(pixels, [item.future for item in items])
        return items

    async def _dispatch(self, handle, task: Task, item: WorkItem) -> None:
        try:
            outcome = await self._call(handle, task)
        except asyncio.CancelledError:
            _settle(item, error=Cancelled("cancelled"))
            raise
        except BaseException as exc:  # noqa: BLE001 - the call's error, mapped by as_api_error
            _settle(item, error=exc.cause if isinstance(exc, RayTaskError) and exc.cause else exc)
            return
        item.started_at = max(item.enqueued_at, time.monotonic() - outcome.compute_s)
        item.payload.compute_s = outcome.compute_s
        if outcome.error is None:
            _settle(item, result=outcome.result)
        else:
            _settle(item, error=_as_exception(outcome))

    async def _call(self, handle, task: Task) -> Outcome:
        for attempt in range(self.retries + 1):
            try:
                return await handle.explain.remote(task)
            except BackPressureError:
                raise ApiError(429, "queue_full", "the explainers' queues are full; retry after 1s",
                               {"Retry-After": "1"}) from None
            except _REPLICA_GONE as exc:
                self.replica_lost.inc()
                log.warning("explainer replica lost (%s); attempt %d of %d", type(exc).__name__, attempt + 1,
                            self.retries + 1)
                if attempt == self.retries:
                    raise ApiError(503, "replica_lost", "the explainer replica running this request was lost "
                                   "and no other could take it; nothing was computed, retry", {"Retry-After": "2"}
                                   ) from None
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def complete(self, call: ExplainCall, job: Job, items: list[WorkItem]) -> dict[str, Any]:
        try:
            return await super().complete(call, job, items)
        except BaseException:
            self._cancel_dispatches(job.id)  # one image failed or the job was cancelled: drop the rest
            raise
        finally:
            self._dispatches.pop(job.id, None)
            if job.id in self._held_ids():
                await asyncio.shield(self._publish(job))

    def cancel(self, job: Job) -> None:
        super().cancel(job)
        self._cancel_dispatches(job.id)

    def _cancel_dispatches(self, job_id: str) -> None:
        for task in self._dispatches.get(job_id, []):
            task.cancel()

    # ------------------------------------------------------------------ jobs, in the state deployment
    def _held_ids(self) -> set[str]:
        return {job.id for job in self.jobs.all()}

    async def _publish(self, job: Job) -> None:
        try:
            await self.state.finish.remote(job.view(), list(job.total), job.finished_at)
        except Exception as exc:  # noqa: BLE001 - the job stays 'running' in the state; say so in the log
            log.error("could not record job %s's outcome: %s", job.id, exc)

    async def hold_job(self, job: Job) -> None:
        error = await self.state.add.remote(job.view(), list(job.total))
        if error:
            raise ApiError(429, "too_many_jobs", error, {"Retry-After": "10"})
        self.jobs.add(job)  # owned here: this replica runs its task
        if job.finished_at is not None:  # it finished while being held
            await self._publish(job)

    async def discard_job(self, job: Job) -> None:
        self.jobs.discard(job.id)
        await self.state.discard.remote(job.id)

    async def job_view(self, job_id: str) -> dict[str, Any]:
        view = await self.state.view.remote(job_id)
        if view is None:
            raise ApiError(404, "unknown_job", f"no job {job_id!r} (unknown or expired)")
        return view

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        view = await self.state.cancel.remote(job_id)  # explainers stop at their next progress report
        if view is None:
            raise ApiError(404, "unknown_job", f"no job {job_id!r} (unknown or expired)")
        owned = next((job for job in self.jobs.all() if job.id == job_id), None)
        if owned is None or owned.finished_at is not None:
            return view  # another ingress replica owns it: it records the cancellation when its task ends
        self.cancel(owned)
        await asyncio.wait([owned.task], timeout=5)
        return {**owned.view(), "progress": view["progress"]}

    async def job_counts(self) -> dict[str, int]:
        return await self.state.counts.remote()

    async def refresh_metrics(self) -> None:
        try:
            self._families = await self.state.families.remote()
        except Exception as exc:  # noqa: BLE001 - /metrics still answers with the ingress's own
            log.warning("could not fetch the explainers' metrics: %s", exc)


class _RemoteFamilies:
    """A prometheus collector yielding the explainers' families as last fetched from the state."""

    def __init__(self, runtime: RayRuntime):
        self.runtime = runtime

    def describe(self) -> list:
        return []

    def collect(self):
        return iter(self.runtime._families)


def _settle(item: WorkItem, *, result: Any = None, error: BaseException | None = None) -> None:
    if item.future.done():
        return
    if error is None:
        item.future.set_result(result)
    else:
        item.future.set_exception(error)


def _as_exception(outcome: Outcome) -> BaseException:
    kind, message = outcome.error
    if kind == DEADLINE:
        return DeadlineExceeded(message)
    if kind == CANCELLED:
        return Cancelled(message)
    if kind == INVALID:
        return ValueError(message)
    return RuntimeError(f"{message} on explainer replica {outcome.replica}")
