"""The Serve application: ingress (the FastAPI app of create_app), one explainer per model, the state.

    serve run deploy/ray-serve.yaml        # the Serve CLI, with the checked-in config
    python -m service --engine ray         # the same, started from Python on a local (or RAY_ADDRESS) Ray
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from ray import serve
from ray.serve import Application

from ..app import create_app
from ..settings import Settings
from ..zoo.cards import CardError, find_cards
from ..zoo.weights import resolve_weights
from .explainer import Explainer
from .ray_backend import RayBackend
from .state import SharedState

log = logging.getLogger(__name__)

APP_NAME = "saliency"

# Defaults; a Serve config file overrides any of them per deployment name.
STATE = serve.deployment(SharedState, name="state", num_replicas=1, max_ongoing_requests=1000,
                         ray_actor_options={"num_cpus": 0})
EXPLAINER = serve.deployment(Explainer, num_replicas=1, max_ongoing_requests=256,
                             ray_actor_options={"num_cpus": 1})


@serve.deployment(name="ingress", num_replicas=1, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """Runs the service's own FastAPI app (every route, schema, error and middleware) with a RayBackend."""

    def __init__(self, settings: dict[str, Any], explainers: dict[str, Any], state: Any):
        self.settings, self.explainers, self.state = Settings(**settings), explainers, state

    def __serve_build_asgi_app__(self):
        def backend(settings: Settings, registry):
            return RayBackend(settings, registry, explainers=self.explainers, state=self.state)

        return create_app(self.settings, backend=backend)


def servable_models(settings: Settings) -> list[str]:
    """Classifier cards whose weights are present (the others are listed as unavailable by the ingress, as
    embedded)."""
    names = []
    for found in find_cards(settings.card_dirs):
        card = found.card
        if card is None or (settings.models and card.name not in settings.models):
            continue
        if card.task != "classification":  # explainers serve the classifier methods; detectors: the ingress
            continue
        try:
            resolve_weights(card.weights, found.base, card.name)
        except CardError:
            continue
        names.append(card.name)
    return names


def explainer_name(model: str) -> str:
    return f"explainer_{model}"


def build(settings: Settings, explainer_options: dict[str, dict[str, Any]] | None = None,
          threads: int = 0) -> Application:
    """The application graph. `explainer_options`: Serve deployment options per model name, or "*" for all
    (num_replicas, autoscaling_config, ray_actor_options with num_gpus, ...). `threads`: torch threads per
    explainer replica (0: torch's default)."""
    options = explainer_options or {}
    plain = settings.model_dump(mode="json")
    # serve.deployment's stubs type the deployments as decorators: bind/options are theirs at run time
    state = STATE.bind(settings.max_jobs, settings.job_ttl_s, settings.max_job_result_bytes)  # type: ignore[attr-defined]
    explainers = {}
    for model in servable_models(settings):
        opts = {"max_queued_requests": settings.max_queue, **options.get("*", {}), **options.get(model, {})}
        deployment = EXPLAINER.options(name=explainer_name(model), **opts)  # type: ignore[attr-defined]
        explainers[model] = deployment.bind(plain, model, state, threads)
    return Ingress.bind(plain, explainers, state)  # type: ignore[attr-defined]


def app_builder(args: dict[str, Any]) -> Application:
    """For a Serve config file (`import_path: service.distributed.app:app_builder`): `args` are settings
    (the SALIENCY_* names in lower case) plus `threads`; per-deployment options live in the file."""
    args = dict(args or {})
    threads = int(args.pop("threads", 0))
    return build(Settings(**args), threads=threads)


def explainer_gpus(settings: Settings, resources: dict[str, float]) -> dict[str, dict[str, Any]]:
    """A GPU per explainer replica when the cluster has GPUs and the device setting may use one: Ray hides
    every GPU from an actor that did not ask for one, so `device=auto` would fall back to the CPU and
    `device=cuda` would fail. A Serve config file sets this per deployment instead."""
    if settings.device == "cpu" or resources.get("GPU", 0) < 1:
        return {}
    return {"*": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}}


def serve_forever(settings: Settings) -> None:
    """`python -m service --engine ray`: start (or join, with RAY_ADDRESS) Ray, run the app, wait for a
    signal."""
    import ray

    ray.init()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(settings, explainer_gpus(settings, ray.cluster_resources())), name=APP_NAME,
              route_prefix="/")
    log.info("serving on http://%s:%s (Ray Serve)", settings.host, settings.port)

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a flag only: no exception raised inside Ray's own calls
        signal.signal(sig, lambda *_: stopping.set())
    try:
        while not stopping.wait(1):
            pass
    finally:
        if os.environ.get("RAY_ADDRESS"):  # a shared cluster: remove this app only
            serve.delete(APP_NAME)
        else:  # the local Ray started above
            serve.shutdown()
        ray.shutdown()
