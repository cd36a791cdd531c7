"""Prometheus metrics, on a registry of the app's own (several apps may live in one process: tests)."""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import Match


def rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return float("nan")


def device_memory(device) -> float:
    """Allocated device memory on a GPU, the process's RSS on a CPU."""
    if device.type == "cuda":
        import torch

        return float(torch.cuda.memory_allocated(device))
    return rss_bytes()


class Metrics:
    """The call side's families: requests, latency, jobs, cache, pixels in flight. The families of the passes
    (`WorkerMetrics`) live where the passes are counted: this registry for the embedded backend, the shared
    state's for Ray Serve (service/distributed/state.py)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("saliency_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.cache_hits = Gauge("saliency_cache_hits",
                                "result cache hits (images answered with no model pass)", registry=r)
        self.cache_misses = Gauge("saliency_cache_misses", "result cache misses", registry=r)
        self.cache_bytes = Gauge("saliency_cache_bytes", "bytes held by the result cache", registry=r)
        self.in_flight = Gauge("saliency_requests_in_flight", "HTTP requests being handled", registry=r)
        self.pixels_in_flight = Gauge("saliency_pixels_in_flight", "decoded pixels held by calls queued or "
                                      "running (limit: max_pixels_in_flight)", registry=r)
        self.latency = Histogram(
            "saliency_request_seconds", "explain latency, arrival to response", ["method"], registry=r,
            buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
        self.jobs = Gauge("saliency_jobs", "jobs held, by status", ["status"], registry=r)


class WorkerMetrics:
    """The families of the passes: batches, compute, queue depth, device memory, restarts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.queue_depth = Gauge("saliency_queue_depth", "images waiting in a worker's queue", ["worker"],
                                 registry=r)
        self.batch_size = Histogram("saliency_batch_size", "images per batch run on the device", ["method"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.compute = Histogram(
            "saliency_compute_seconds", "device time per batch", ["method"], registry=r,
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
        self.device_memory = Gauge("saliency_device_memory_bytes", "allocated device memory (CUDA), or on "
                                   "the CPU the RSS of the process(es) running the passes", ["device"],
                                   registry=r)
        self.worker_restarts = Gauge("saliency_worker_restarts",
                                     "worker threads and engine processes restarted", ["worker"], registry=r)

    def sample_device(self, device) -> None:
        self.device_memory.labels(str(device) if device.type == "cuda" else "cpu").set(device_memory(device))


class RequestCounter:
    """ASGI middleware counting responses by route template and status (plain ASGI: no body buffering)."""

    def __init__(self, app, counter: Counter, in_flight: Gauge):
        self.app, self.counter, self.in_flight = app, counter, in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = "500"

        async def observe(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        self.in_flight.inc()
        try:
            await self.app(scope, receive, observe)
        finally:
            self.in_flight.dec()
            self.counter.labels(_route_template(scope), status).inc()


def _route_template(scope) -> str:
    """The matched route's path template. A request refused before routing (413 from BodyLimit) is matched
    here against the app's routes, so it counts under its route too; only paths of no route are 'unmatched'
    (templates, never raw paths: a label per URL would grow without bound)."""
    route = scope.get("route")
    if route is None and scope.get("app") is not None:
        route = next((r for r in scope["app"].router.routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", "unmatched")
