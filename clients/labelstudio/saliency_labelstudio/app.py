"""The ML backend protocol Label Studio speaks: /health, /setup, /predict, /webhook (/metrics, /versions)."""
from __future__ import annotations

import base64
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import replace

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from saliency_client import Client, SaliencyError

from .fetch import FetchError, ImageFetcher
from .predict import ConfigError, predict
from .settings import BackendSettings, SettingsError

log = logging.getLogger("saliency_labelstudio")


def create_app(settings: BackendSettings | None = None) -> Starlette:
    settings = settings or BackendSettings.from_env()
    projects: dict[str, BackendSettings] = {}  # per-project overrides from /setup
    state: dict[str, Client] = {}

    @asynccontextmanager
    async def lifespan(app):
        state["client"] = Client(settings.saliency_url, settings.saliency_api_key, timeout=settings.timeout,
                                 max_retries=2, max_retry_wait=10)
        yield
        state["client"].close()

    def authorized(request: Request) -> bool:
        if settings.basic_auth is None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        try:
            given = base64.b64decode(value).decode()
        except ValueError:
            return False
        expected = ":".join(settings.basic_auth)
        return scheme.lower() == "basic" and secrets.compare_digest(given, expected)

    def default_model() -> str:
        """The service's default model (GET /v1/models): the version's model when the backend names none."""
        for model in state["client"].models():
            if model.default:
                return model.name
        raise SaliencyError("the saliency service lists no default model")

    async def versions(*configs: BackendSettings) -> list[str]:
        """Each config's `saliency-<method>-<model>`; the service is asked only when one names no model."""
        default = await run_in_threadpool(default_model) if any(c.model is None for c in configs) else ""
        return [c.model_version(c.model or default) for c in configs]

    def guarded(handler):
        async def endpoint(request: Request):
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, status_code=401,
                                    headers={"WWW-Authenticate": "Basic"})
            return await handler(request)
        return endpoint

    async def health(request: Request):
        return JSONResponse({"status": "UP", "model_class": "SaliencyBackend"})

    async def setup(request: Request):
        body = await request.json()
        project = str(body.get("project", ""))
        try:
            current = settings.for_project(body.get("extra_params"))
        except SettingsError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if not settings.label_studio_url and body.get("hostname"):
            # Label Studio tells us its address and a token to fetch task files with
            current = replace(current, label_studio_url=body["hostname"],
                              label_studio_api_key=settings.label_studio_api_key or body.get("access_token"))
        try:
            [version] = await versions(current)
        except SaliencyError as exc:
            return JSONResponse({"error": f"no default model from the service: {exc}"}, status_code=502)
        projects[project.split(".")[0]] = current
        return JSONResponse({"model_version": version})

    async def predict_route(request: Request):
        body = await request.json()
        tasks = body.get("tasks") or []
        project = str(body.get("project") or "").split(".")[0]
        current = projects.get(project, settings)
        fetcher = ImageFetcher(current.label_studio_url, current.label_studio_api_key)
        try:
            results = await run_in_threadpool(predict, tasks, body.get("label_config", ""), current,
                                              state["client"], fetcher)
        except ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except (FetchError, SaliencyError) as exc:
            log.warning("predict failed: %s", exc)
            return JSONResponse({"error": str(exc)}, status_code=502)
        finally:
            fetcher.close()
        return JSONResponse({"results": results})

    async def webhook(request: Request):
        body = await request.json()
        # saliency needs no training: annotation events are acknowledged and ignored
        if body.get("action") in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED",
                                  "START_TRAINING"):
            return JSONResponse({"result": None, "status": "ok"}, status_code=201)
        return JSONResponse({"status": "Unknown event"})

    async def metrics(request: Request):
        return JSONResponse({})

    async def versions_route(request: Request):
        try:
            known = await versions(settings, *projects.values())
        except SaliencyError as exc:
            return JSONResponse({"error": f"no default model from the service: {exc}"}, status_code=502)
        return JSONResponse({"versions": sorted(set(known))})

    routes = [Route("/", guarded(health)), Route("/health", guarded(health)),
              Route("/setup", guarded(setup), methods=["POST"]), Route("/predict", guarded(predict_route),
                                                                       methods=["POST"]),
              Route("/webhook", guarded(webhook), methods=["POST"]), Route("/metrics", guarded(metrics)),
              Route("/versions", guarded(versions_route))]
    return Starlette(routes=routes, lifespan=lifespan)
