"""create_app(settings): the FastAPI app, its routers and its lifespan (models, worker)."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from .api import catalog, errors, explain, health, metrics
from .api.security import BodyLimit, require_api_key
from .metrics import RequestCounter
from .api.viewer import router as viewer_router
from .runtime import Runtime
from .settings import Settings
from .zoo import ModelRegistry


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None,
               runtime_factory: Callable[[Settings, ModelRegistry | None], Runtime] = Runtime) -> FastAPI:
    """`runtime_factory` builds what runs the work: the embedded worker queue by default, or e.g.
    service.distributed.ray_runtime.RayRuntime (the same routes over Ray Serve)."""
    settings = settings or Settings()
    runtime = runtime_factory(settings, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        try:
            yield
        finally:
            runtime.stop(grace=10.0)

    app = FastAPI(title="Saliency service", version="0.1.0", lifespan=lifespan,
                  description="Explains what vision models look at: Grad-CAM, Integrated Gradients, SmoothGrad, "
                              "FullGrad, MoreauGrad and the plain gradient, batched on one device.")
    app.state.runtime = runtime
    errors.install(app)
    app.include_router(health.router)  # open: probes carry no key
    app.include_router(viewer_router)  # the web viewer at / (public page; its /v1 calls send the key)
    # every /v1 route, and /metrics (load, queue, memory: operational data), need the API key when one is set
    for module in (catalog, explain, metrics):
        app.include_router(module.router, dependencies=[Depends(require_api_key)])

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestCounter, counter=runtime.metrics.requests, in_flight=runtime.metrics.in_flight)
    return app
