"""The Ray Serve backend of an ingress replica: the call lifecycle is the embedded one (service/runtime.py);
the passes run on the explainer deployments and the jobs live in the state deployment.

- Work: `submit` sends each item to its model's explainer deployment (a `DeploymentHandle`) and settles the
  item's future from the replica's answer, so decoding, encoding, the sync-wait-then-job fallback and errors
  are the lifecycle's own code.
- Replica death: an item whose replica died (ray.kill, a crash, a lost node) is sent again, up to `retries`
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
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from ..backends.base import CallItem
from ..errors import Busy, Cancelled, NotFound, Unavailable
from ..jobs import Job, JobStore, unknown_job
from ..settings import Settings
from ..worker import Item
from ..zoo import ModelRegistry
from .messages import Outcome, RemoteItem

log = logging.getLogger(__name__)

_REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class RayBackend:
    submits_from_threads = False  # the handles schedule their calls on the event loop

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None, *,
                 explainers: dict[str, Any], state: Any, retries: int = 3):
        self.settings, self.explainers, self.state, self.retries = settings, explainers, state, retries
        self.preloaded = registry is not None
        self._given = registry
        self._explainers_up = threading.Event()
        self._dispatches: dict[str, list[asyncio.Task]] = {}  # job id -> its items' remote calls
        self._families: list = []
        self.replica_lost: Counter | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._await_explainers())

    def boot(self) -> ModelRegistry:
        """The ingress's models, on the CPU: it only validates and preprocesses; the replicas own devices."""
        if self._given is not None:
            return self._given
        only = set(self.settings.models) if self.settings.models else None
        return ModelRegistry.from_dir(self.settings.card_dirs, torch.device("cpu"), only,
                                      self.settings.fold_batchnorm)

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

    def stop(self, grace: float) -> None:
        for tasks in self._dispatches.values():
            for task in tasks:
                task.cancel()

    @property
    def workers_alive(self) -> bool:
        return self._explainers_up.is_set()

    @property
    def warmed(self) -> bool:
        return True  # no local pass threads: the explainer replicas warm their own

    def serving_device(self) -> str:
        # each explainer replica resolves the device setting where it runs
        return f"ray:{self.settings.device}"

    # ------------------------------------------------------------------ work
    def submit(self, item: Item, lane: str) -> None:
        part: CallItem = item.payload
        call = part.call
        handle = self.explainers.get(call.model.name)
        if handle is None:
            raise Unavailable(f"no explainer deployment serves {call.model.name!r}", code="no_explainer",
                              retry_after=30)
        item.future.set_running_or_notify_cancel()  # the replica enforces the start deadline, not a timer
        remote = RemoteItem(key=item.key, method=call.method.name, params=call.params,
                            pixels=call.pixels[part.index].clone(), target=call.targets[part.index],
                            cost=min(item.cost, self.settings.max_batch_cost),
                            deadline=time.time() + (item.deadline - time.monotonic()), job_id=part.job.id,
                            index=part.index, bulk=lane == "bulk", raw="raw" in call.outputs,
                            size=call.original_size(part.index), metrics=call.metrics)
        task = asyncio.get_running_loop().create_task(self._dispatch(handle, remote, item))
        self._dispatches.setdefault(part.job.id, []).append(task)

    def retry_after(self, lane: str) -> float:
        return 1.0  # the replicas' queues are not visible from here

    def start_estimate(self, lane: str) -> float | None:
        return None  # neither: each replica enforces its items' start deadlines (docs/architecture.md)

    def withdraw(self, job: Job) -> None:
        for task in self._dispatches.pop(job.id, []):
            task.cancel()

    async def _dispatch(self, handle, remote: RemoteItem, item: Item) -> None:
        try:
            outcome = await self._call(handle, remote)
        except asyncio.CancelledError:
            _settle(item, error=Cancelled())
            raise
        except BaseException as exc:  # noqa: BLE001 - the item's error, classified by the lifecycle
            _settle(item, error=exc.cause if isinstance(exc, RayTaskError) and exc.cause else exc)
            return
        item.started_at = max(item.enqueued_at, time.monotonic() - outcome.compute_s)
        item.payload.compute_s = outcome.compute_s
        if outcome.error is None:
            _settle(item, result=outcome.result)
        else:
            _settle(item, error=outcome.error)

    async def _call(self, handle, remote: RemoteItem) -> Outcome:
        for attempt in range(self.retries + 1):
            try:
                return await handle.explain.remote(remote)
            except BackPressureError:
                raise Busy("the explainers' queues are full; retry after 1s", retry_after=1) from None
            except _REPLICA_GONE as exc:
                if self.replica_lost is not None:
                    self.replica_lost.inc()
                log.warning("explainer replica lost (%s); attempt %d of %d", type(exc).__name__, attempt + 1,
                            self.retries + 1)
                if attempt == self.retries:
                    raise Unavailable("the explainer replica running this request was lost and no other "
                                      "could take it; nothing was computed, retry", code="replica_lost",
                                      retry_after=2) from None
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ jobs and metrics
    def job_book(self, store: JobStore) -> SharedJobs:
        return SharedJobs(self.state, store)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """The families of the passes come from the state (fed by every explainer replica)."""
        registry.register(_RemoteFamilies(self))
        self.replica_lost = Counter("saliency_replica_lost", "calls whose explainer replica died under them "
                                    "(each was sent again, or failed with 503 replica_lost)",
                                    registry=registry)

    async def refresh_metrics(self) -> None:
        try:
            self._families = await self.state.families.remote()
        except Exception as exc:  # noqa: BLE001 - /metrics still answers with the ingress's own
            log.warning("could not fetch the explainers' metrics: %s", exc)


class SharedJobs:
    """The job book every ingress replica reaches: the state deployment; `store` holds the jobs this replica
    owns (their tasks run here)."""

    def __init__(self, state: Any, store: JobStore):
        self.state, self.store = state, store

    async def _publish(self, job: Job) -> None:
        try:
            await self.state.finish.remote(job.view(), list(job.total), job.finished_at)
        except Exception as exc:  # noqa: BLE001 - the job stays 'running' in the state; say so in the log
            log.error("could not record job %s's outcome: %s", job.id, exc)

    async def hold(self, job: Job) -> None:
        error = await self.state.add.remote(job.view(), list(job.total))
        if error:
            raise Busy(error, code="too_many_jobs", retry_after=10)
        self.store.add(job)  # owned here: this replica runs its task
        if job.finished_at is not None:  # it finished while being held
            await self._publish(job)

    async def discard(self, job: Job) -> None:
        self.store.discard(job.id)
        await self.state.discard.remote(job.id)

    async def view(self, job_id: str) -> dict[str, Any]:
        view = await self.state.view.remote(job_id)
        if view is None:
            raise unknown_job(job_id)
        return view

    async def cancel(self, job_id: str) -> dict[str, Any]:
        view = await self.state.cancel.remote(job_id)  # explainers stop at their next progress report
        if view is None:
            raise unknown_job(job_id)
        try:
            owned = self.store.get(job_id)
        except NotFound:
            return view  # another ingress replica owns it: it records the cancellation when its task ends
        if owned.finished_at is not None:
            return view
        owned.cancel()
        if owned.task is not None:
            await asyncio.wait([owned.task], timeout=5)
        return {**owned.view(), "progress": view["progress"]}

    async def counts(self) -> dict[str, int]:
        return await self.state.counts.remote()

    async def finished(self, job: Job) -> None:
        if any(held.id == job.id for held in self.store.all()):
            await self._publish(job)


class _RemoteFamilies:
    """A prometheus collector yielding the explainers' families as last fetched from the state."""

    def __init__(self, backend: RayBackend):
        self.backend = backend

    def describe(self) -> list:
        return []

    def collect(self):
        return iter(self.backend._families)


def _settle(item: Item, *, result: Any = None, error: BaseException | None = None) -> None:
    if item.future.done():
        return
    if error is None:
        item.future.set_result(result)
    else:
        item.future.set_exception(error)
