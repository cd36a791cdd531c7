"""The service on Ray Serve, on a local Ray (CPU replicas), for the contract and replica tests."""
from __future__ import annotations

import contextlib

from service.settings import Settings
from tests.server import free_port, wait_ready

# The contract app: two tiny_cnn replicas (the replica tests need two), one EfficientNet replica; each
# replica takes a quarter of a core's reservation and one torch thread, so all fit in ray.init(num_cpus=2).
EXPLAINERS = {"*": {"ray_actor_options": {"num_cpus": 0.25}},
              "tiny_cnn": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}}


def start_ray(num_cpus: int = 2) -> None:
    import ray

    # Worker processes import torch (seconds each on a busy 2-core machine): let them start side by side.
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config={"worker_maximum_startup_concurrency": 8})


@contextlib.contextmanager
def running_ray_server(settings: Settings, explainers: dict | None = None, ready_timeout: float = 240.0):
    """Serve's proxy on a free loopback port; yields (base URL, None): the app lives in the ingress
    replica."""
    from ray import serve

    from service.distributed.app import APP_NAME, build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(settings, EXPLAINERS if explainers is None else explainers, threads=1), name=APP_NAME,
              route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, ready_timeout, what="Ray Serve app")
    try:
        yield base, None
    finally:
        serve.shutdown()
