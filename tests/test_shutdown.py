"""SIGTERM mid-load on a real server process: no accepted request is dropped; jobs end cancelled."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.server import free_port


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3),
                                                         dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def in_flight(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return float(re.search(r"^saliency_requests_in_flight ([0-9.]+)$", text, re.M).group(1))


@pytest.mark.slow
def test_sigterm_drains_accepted_requests():
    port = free_port()
    env = {**os.environ, "SALIENCY_MODELS": '["tiny_cnn"]', "SALIENCY_DEFAULT_MODEL": "tiny_cnn",
           "SALIENCY_SHUTDOWN_GRACE_S": "60", "SALIENCY_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        job = httpx.post(f"{base}/v1/jobs", files=[("image", ("x.png", png(99), "image/png"))],
                         data={"method": "moreaugrad", "iterations": "2000", "n_samples": "8"}).json()["id"]

        def one(i: int):
            try:
                # smoothgrad with many samples: each request takes a while, so many are in flight at SIGTERM
                r = httpx.post(f"{base}/v1/explain/smoothgrad",
                               files=[("image", ("x.png", png(i), "image/png"))],
                               data={"n_samples": "128"}, timeout=120)
                return "answered", r.status_code
            except httpx.ConnectError:
                return "refused", None  # never accepted: the client may retry elsewhere
            except httpx.HTTPError as exc:
                return "dropped", repr(exc)

        with ThreadPoolExecutor(24) as pool:
            futures = [pool.submit(one, i) for i in range(24)]
            # SIGTERM once the server has received all 24 (and while they are still running)
            while in_flight(base) < 25:  # 24 + this /metrics request
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            late = pool.submit(one, 1000)  # after SIGTERM: must be refused, not half-served
            outcomes = [f.result() for f in futures] + [late.result()]
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    answered = [o for o in outcomes if o[0] == "answered"]
    assert not [o for o in outcomes if o[0] == "dropped"], outcomes
    assert answered and all(status == 200 for _, status in answered), outcomes
    assert outcomes[-1][0] == "refused"
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    del job
