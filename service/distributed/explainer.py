"""The explainer deployment: one per model, each replica owning a device and batching with `@serve.batch`.

Serve forms a batch from the replica's queue (full at `max_batch_cost` passes, or after `max_wait_ms`);
`collate`, the embedded queue's own pure function, then splits it into engine batches of compatible tasks
(same model, method and params) within `max_batch_cost` and `max_batch_items`, dropping tasks past their
start deadline. Two lanes, as in the embedded engine: long work runs on `bulk` so it never holds up
interactive batches.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from ray import serve

from ..calibrate import calibrate_lane
from ..engine import explain
from ..hostmem import retain_freed_memory
from ..metrics import _rss_bytes
from ..methods import get_method
from ..openmp import passes_in_passing_threads, run_in_passing_thread
from ..runtime import Cancelled
from ..settings import Settings
from ..warmup import warm_up
from ..worker import WorkItem, collate
from ..zoo import ModelRegistry, resolve_device, set_cudnn_autotuning
from .messages import CANCELLED, DEADLINE, INTERNAL, INVALID, Outcome, Task, batch_cost

log = logging.getLogger(__name__)

LANES = ("interactive", "bulk")
REPORT_EVERY_S = 0.05  # progress reports to the state (which answer whether the jobs were cancelled)


class Explainer:
    def __init__(self, settings: dict, model: str, state, threads: int = 0):
        self.settings = Settings(**settings)
        if threads:
            torch.set_num_threads(threads)
        if self.settings.retain_host_memory:
            retain_freed_memory()
        set_cudnn_autotuning(self.settings.cudnn_benchmark)
        self.device = resolve_device(self.settings.device)
        # One thread per lane runs its passes, warmed before the replica answers: PyTorch builds cuDNN plans per
        # thread and shape (service/warmup.py), so passes spread over a pool of threads would each build them.
        # On a CPU only the interactive lane's thread keeps an OpenMP team (service/openmp.py): the model loads
        # in it, and the bulk lane's passes run in passing threads.
        self.lanes = {lane: ThreadPoolExecutor(1, thread_name_prefix=f"passes-{lane}") for lane in LANES}
        self.model, self.pass_batch = self.lanes["interactive"].submit(self._load, model).result()
        warming = [lane.submit(warm_up, {model: self.model}, {model: self.pass_batch}, self.settings)
                   for name, lane in self.lanes.items() if not passes_in_passing_threads(name, self.device)]
        for done in warming:
            done.result()
        self.state = state
        context = serve.get_replica_context()
        self.deployment, self.replica = context.deployment, context.replica_id.unique_id
        for lane in (self.interactive, self.bulk):
            lane.set_max_batch_size(self.settings.max_batch_cost)
            lane.set_batch_wait_timeout_s(self.settings.max_wait_ms / 1000)
        self.pending = 0

    def _load(self, model: str):
        registry = ModelRegistry.from_dir(self.settings.models_dir, self.device, only={model},
                                           fold_norms=self.settings.fold_batchnorm)
        loaded = registry.get(model)  # unavailable: the replica fails to start and Serve reports why
        # Images per forward pass: measured from free GPU memory, as the embedded runtime does (CPU: the setting).
        return loaded, calibrate_lane({model: loaded}, self.settings)[model]

    async def ping(self) -> str:
        return self.replica

    async def explain(self, task: Task) -> Outcome:
        self.pending += 1
        try:
            return await (self.bulk(task) if task.bulk else self.interactive(task))
        finally:
            self.pending -= 1

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=batch_cost)
    async def interactive(self, tasks: list[Task]) -> list[Outcome]:
        return await self._run(tasks, "interactive")

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=batch_cost)
    async def bulk(self, tasks: list[Task]) -> list[Outcome]:
        return await self._run(tasks, "bulk")

    async def _run(self, tasks: list[Task], lane: str) -> list[Outcome]:
        """Split Serve's batch into compatible engine batches and run them one after another."""
        wall, now = time.time(), time.monotonic()
        pending = [WorkItem(key=t.key, cost=t.cost, payload=t, deadline=now + t.deadline - wall, enqueued_at=now)
                   for t in tasks]
        order = list(pending)
        outcomes: dict[int, Outcome] = {}
        while pending:
            step = collate(pending, now=time.monotonic(), max_cost=self.settings.max_batch_cost,
                           max_items=self.settings.max_batch_items, max_wait=0.0)
            for item in step.expired:
                outcomes[id(item)] = Outcome(error=(DEADLINE, "the work could not start before its deadline"),
                                             replica=self.replica)
            if step.batch:
                compute = ((lambda tasks: run_in_passing_thread(self._compute, tasks))
                           if passes_in_passing_threads(lane, self.device) else self._compute)
                results = await asyncio.get_running_loop().run_in_executor(
                    self.lanes[lane], compute, [item.payload for item in step.batch])
                outcomes.update((id(item), outcome) for item, outcome in zip(step.batch, results))
            pending = step.remaining
        return [outcomes[id(item)] for item in order]

    def _compute(self, tasks: list[Task]) -> list[Outcome]:
        """On a thread: one engine batch; a failing batch is rerun task by task so a poisoned one fails alone."""
        first = tasks[0]
        started = time.monotonic()
        method, reporter = get_method(first.method), _Reporter(self.state, tasks)
        try:
            # The jobs are "running" from here (methods other than MoreauGrad report only at the end), and a
            # batch whose jobs were all cancelled while it queued stops before its passes.
            reporter(0, method.steps(first.params))
            results = explain(self.model, method, torch.stack([t.pixels for t in tasks]),
                              [t.target for t in tasks], first.params, progress=reporter,
                              top_k=self.settings.top_k, max_batch=self.pass_batch,
                              keep_attribution=[t.raw for t in tasks], map_sizes=[t.size for t in tasks])
        except Cancelled:
            return [Outcome(error=(CANCELLED, "the job was cancelled"), replica=self.replica)] * len(tasks)
        except Exception as exc:  # noqa: BLE001 - reported per task
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if len(tasks) > 1:
                return [outcome for task in tasks for outcome in self._compute([task])]
            kind = INVALID if isinstance(exc, (ValueError, LookupError)) else INTERNAL
            if kind == INTERNAL:
                log.error("explain failed: %s: %s", type(exc).__name__, exc)
            return [Outcome(error=(kind, str(exc) if kind == INVALID else type(exc).__name__), replica=self.replica)]
        duration = time.monotonic() - started
        self._observe(first.method, len(tasks), duration)
        return [Outcome(result=result, compute_s=duration, replica=self.replica) for result in results]

    def _observe(self, method: str, size: int, duration: float) -> None:
        """Batch metrics to the state, before the results leave (a scrape after a response sees its batch)."""
        memory = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else _rss_bytes()
        try:
            self.state.observe_batch.remote(self.deployment, self.replica, method, size, duration, self.pending,
                                            memory, str(self.device)).result(timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - metrics never fail a request
            log.warning("could not report batch metrics: %s", exc)


class _Reporter:
    """The engine's progress callback: throttled reports to the state; raises Cancelled when every job of
    the batch was cancelled (as the embedded worker does)."""

    def __init__(self, state, tasks: list[Task]):
        self.state, self.tasks = state, tasks
        self.last = float("-inf")  # the first report always goes

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < REPORT_EVERY_S and done < total:
            return
        self.last = now
        reports = [(t.job_id, t.index, done, total) for t in self.tasks]
        try:
            cancelled = self.state.progress.remote(reports).result(timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - progress is best effort
            log.warning("could not report progress: %s", exc)
            return
        if all(cancelled):
            raise Cancelled("cancelled")
