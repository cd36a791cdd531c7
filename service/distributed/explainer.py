"""The explainer deployment: one per model, each replica owning a device and batching with `@serve.batch`.

Serve forms a batch from the replica's queue (full at `max_batch_cost` passes, or after `max_wait_ms`);
`collate`, the embedded queue's own pure function, then splits it into engine batches of compatible items
(same model, method and params) within `max_batch_cost` and `max_batch_items`, dropping items past their
start deadline. Each batch runs through the engine core (service/engine_core.py), as everywhere. Two lanes, as
in the embedded engine: long work runs on `bulk` so it never holds up interactive batches.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from ray import serve

from ..backends.base import LANES
from ..engine_core import Batch, EngineCore, boot_host
from ..errors import Cancelled, DeadlineExceeded, ServiceError
from ..host import passes_in_passing_threads, run_in_passing_thread
from ..methods import get_method
from ..metrics import device_memory
from ..settings import Settings
from ..worker import Item, collate
from ..zoo import resolve_device
from .messages import Outcome, RemoteItem, batch_cost

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.05  # progress reports to the state (which answer whether the jobs were cancelled)


class Explainer:
    def __init__(self, settings: dict, model: str, state, threads: int = 0):
        self.settings = Settings(**settings)
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(self.settings.device)
        boot_host(self.settings, self.device)  # before the lanes' threads start
        # One thread per lane runs its passes, warmed before the replica answers: PyTorch builds cuDNN plans
        # per thread and shape (service/warmup.py), so passes spread over a pool of threads would each build
        # them. On a CPU only the interactive lane's thread keeps an OpenMP team (service/host.py): the model
        # loads in it, and the bulk lane's passes run in passing threads.
        self.lanes = {lane: ThreadPoolExecutor(1, thread_name_prefix=f"passes-{lane}") for lane in LANES}
        # A model that cannot load fails the replica's start, and Serve reports why.
        self.core = self.lanes["interactive"].submit(EngineCore.boot, self.settings, only={model}).result()
        self.model = self.core.registry.get(model)
        warming = [lane.submit(self.core.warm_up)
                   for name, lane in self.lanes.items() if not passes_in_passing_threads(name, self.device)]
        for done in warming:
            done.result()
        self.state = state
        context = serve.get_replica_context()
        self.deployment, self.replica = context.deployment, context.replica_id.unique_id
        for lane in (self.interactive, self.bulk):  # serve.batch's wrappers, typed as the plain methods
            lane.set_max_batch_size(self.settings.max_batch_cost)  # type: ignore[attr-defined]
            lane.set_batch_wait_timeout_s(self.settings.max_wait_ms / 1000)  # type: ignore[attr-defined]
        self.pending = 0

    async def ping(self) -> str:
        return self.replica

    async def explain(self, item: RemoteItem) -> Outcome:
        self.pending += 1
        try:
            return await (self.bulk(item) if item.bulk else self.interactive(item))
        finally:
            self.pending -= 1

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=batch_cost)
    async def interactive(self, items: list[RemoteItem]) -> list[Outcome]:
        return await self._run(items, "interactive")

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=batch_cost)
    async def bulk(self, items: list[RemoteItem]) -> list[Outcome]:
        return await self._run(items, "bulk")

    async def _run(self, remote: list[RemoteItem], lane: str) -> list[Outcome]:
        """Split Serve's batch into compatible engine batches (`collate`) and run them one after another."""
        wall, now = time.time(), time.monotonic()
        pending = [Item(key=r.key, cost=r.cost, payload=r, deadline=now + r.deadline - wall, enqueued_at=now)
                   for r in remote]
        order = list(pending)
        outcomes: dict[int, Outcome] = {}
        while pending:
            step = collate(pending, now=time.monotonic(), max_cost=self.settings.max_batch_cost,
                           max_items=self.settings.max_batch_items, max_wait=0.0)
            for item in step.expired:
                outcomes[id(item)] = Outcome(error=DeadlineExceeded(), replica=self.replica)
            if step.batch:
                compute = ((lambda batch: run_in_passing_thread(self._compute, batch))
                           if passes_in_passing_threads(lane, self.device) else self._compute)
                results = await asyncio.get_running_loop().run_in_executor(
                    self.lanes[lane], compute, [item.payload for item in step.batch])
                outcomes.update((id(item), outcome)
                                for item, outcome in zip(step.batch, results, strict=True))
            pending = step.remaining
        return [outcomes[id(item)] for item in order]

    def _compute(self, remote: list[RemoteItem]) -> list[Outcome]:
        """On a lane's thread: one engine batch; a failing batch is rerun item by item so a poisoned one fails
        alone."""
        first = remote[0]
        started = time.monotonic()
        reporter = _Reporter(self.state, remote)
        try:
            # The jobs are "running" from here (methods other than MoreauGrad report only at the end), and a
            # batch whose jobs were all cancelled while it queued stops before its passes.
            reporter(0, get_method(first.method).steps(first.params))
            results = self.core.run_batch(Batch(self.model.name, first.method, first.params,
                                                torch.stack([r.pixels for r in remote]),
                                                [r.target for r in remote], [r.raw for r in remote],
                                                [r.size for r in remote], first.metrics), reporter)
        except Cancelled as error:
            return [Outcome(error=error, replica=self.replica)] * len(remote)
        except ServiceError as error:  # classified (and logged) by the engine core
            if len(remote) > 1:
                return [outcome for one in remote for outcome in self._compute([one])]
            return [Outcome(error=error, replica=self.replica)]
        duration = time.monotonic() - started
        self._observe(first.method, len(remote), duration)
        return [Outcome(result=result, compute_s=duration, replica=self.replica) for result in results]

    def _observe(self, method: str, size: int, duration: float) -> None:
        """Batch metrics to the state, before the results leave (a scrape after a response sees its batch)."""
        try:
            self.state.observe_batch.remote(self.deployment, self.replica, method, size, duration,
                                            self.pending, device_memory(self.device),
                                            str(self.device)).result(timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - metrics never fail a request
            log.warning("could not report batch metrics: %s", exc)


class _Reporter:
    """The engine's progress callback: throttled reports to the state; raises Cancelled when every job of
    the batch was cancelled (as the embedded worker does)."""

    def __init__(self, state, remote: list[RemoteItem]):
        self.state, self.remote = state, remote
        self.last = float("-inf")  # the first report always goes

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < REPORT_EVERY_S and done < total:
            return
        self.last = now
        reports = [(r.job_id, r.index, done, total) for r in self.remote]
        try:
            cancelled = self.state.progress.remote(reports).result(timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - progress is best effort
            log.warning("could not report progress: %s", exc)
            return
        if all(cancelled):
            raise Cancelled()
