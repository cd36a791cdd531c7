"""A real uvicorn server on a free loopback port, in a background thread, for API tests."""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn

from service.app import create_app
from service.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float, alive=lambda: True, what: str = "server") -> None:
    """Poll /readyz until it answers 200; RuntimeError after `timeout` or once `alive()` turns false."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not alive():
            raise RuntimeError(f"the {what} did not become ready")
        time.sleep(0.1)


@contextlib.contextmanager
def running_server(settings: Settings | None = None, registry=None, ready_timeout: float = 120.0):
    settings = (settings or Settings()).model_copy(update={"port": free_port()})
    app = create_app(settings, registry)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{settings.port}"
    app.state.base = base
    try:
        wait_ready(base, ready_timeout, thread.is_alive)
    except RuntimeError:
        server.should_exit = True
        raise
    try:
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
