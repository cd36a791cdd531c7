"""create_app(settings): the FastAPI app, its routers and its lifespan (models, backend)."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from .api import catalog, docs, errors, explain, health, metrics, openapi, sanity, timings
from .api.security import BodyLimit, require_api_key
from .api.viewer import router as viewer_router
from .backends import Backend, EmbeddedBackend
from .metrics import RequestCounter
from .runtime import Runtime
from .settings import Settings
from .zoo import ModelRegistry

BackendFactory = Callable[[Settings, ModelRegistry | None], Backend]


def create_app(settings: Settings | None = None, registry: ModelRegistry | None = None,
               backend: BackendFactory = EmbeddedBackend) -> FastAPI:
    """`backend` builds what runs the passes: the embedded lanes by default, or Ray Serve's explainers
    (service/distributed/ray_backend.py), behind the same routes. `registry`: models loaded already
    (tests)."""
    settings = settings or Settings()
    runtime = Runtime(settings, backend(settings, registry))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime.start()
        try:
            yield
        finally:
            runtime.stop(grace=settings.shutdown_grace_s)

    # docs_url/redoc_url None: FastAPI's pages load their scripts from a CDN; api/docs.py serves them here
    app = FastAPI(title="Saliency service", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Explains what vision models look at: Grad-CAM, Integrated Gradients, "
                              "SmoothGrad, FullGrad, MoreauGrad and the plain gradient, batched on one "
                              "device.")
    app.state.runtime = runtime
    errors.install(app)
    openapi.install(app, settings)
    app.include_router(health.router)  # open: probes carry no key
    app.include_router(viewer_router)  # the web viewer at / (public page; its /v1 calls send the key)
    app.include_router(docs.router)  # /docs and /redoc (public pages), their scripts from this server
    app.mount(docs.ASSETS_URL, docs.assets(), name="docs-assets")
    # every /v1 route, and /metrics (load, queue, memory: operational data), need the API key when one is set
    for module in (catalog, explain, sanity, timings, metrics):
        app.include_router(module.router, dependencies=[Depends(require_api_key)])

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestCounter, counter=runtime.metrics.requests, in_flight=runtime.metrics.in_flight)
    return app
