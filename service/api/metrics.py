from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .deps import RuntimeDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", operation_id="metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics: queue, batches, latency, compute, requests, jobs, device memory."""
    m = runtime.metrics
    await runtime.refresh_metrics()
    for lane, pool in zip(("worker", "bulk"), runtime.pools):
        m.queue_depth.labels(pool.name).set(pool.depth)
        m.worker_restarts.labels(pool.name).set(runtime.worker_restarts(lane))
    counts = await runtime.job_counts()
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        m.jobs.labels(status).set(counts.get(status, 0))
    runtime.record_device_memory()
    m.cache_hits.set(runtime.cache.hits)
    m.cache_misses.set(runtime.cache.misses)
    m.cache_bytes.set(runtime.cache.bytes)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
