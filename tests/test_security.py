"""Safe defaults: loopback bind, API key on /v1, no model loading by request, names never paths."""
from __future__ import annotations

import base64
import io
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS, ROOT
from tests.server import running_server

KEY = "s3cret-key-for-tests-0123456789"


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def secured():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn", api_key=KEY), registry) as (base, _):
        yield base


def test_defaults_are_safe():
    settings = Settings()
    assert settings.host == "127.0.0.1" and settings.api_key is None and not settings.allow_insecure_bind


def test_api_key_protects_every_v1_route_and_the_metrics(secured):
    base = secured
    body = {"images": [base64.b64encode(png()).decode()]}
    calls = [("GET", "/v1/models", None), ("GET", "/v1/methods", None), ("POST", "/v1/explain/gradcam", body),
             ("POST", "/v1/jobs", {**body, "method": "gradcam"}), ("GET", "/v1/jobs/x", None),
             ("DELETE", "/v1/jobs/x", None), ("GET", "/metrics", None),
             ("POST", "/v1/jobs/gradcam", body)]  # deprecated, still guarded
    for verb, path, payload in calls:
        r = httpx.request(verb, base + path, json=payload)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (path, r.text)
        assert ("deprecation" in r.headers) == (path == "/v1/jobs/gradcam")  # said even before the key
        assert httpx.request(verb, base + path, json=payload,
                             headers={"X-API-Key": "wrong"}).status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{base}/v1/models", headers={"X-API-Key": KEY}).status_code == 200
    r = httpx.post(f"{base}/v1/explain/gradcam", json=body, headers={"X-API-Key": KEY})
    assert r.status_code == 200
    assert httpx.get(f"{base}/healthz").status_code == 200 and httpx.get(f"{base}/readyz").status_code == 200
    assert httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_refuses_a_public_bind_without_a_key():
    r = subprocess.run([sys.executable, "-m", "service", "--host", "0.0.0.0", "--port", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "refusing to bind 0.0.0.0 without an API key" in r.stderr
    Settings(host="0.0.0.0", api_key=KEY).check_bind()
    Settings(host="0.0.0.0", allow_insecure_bind=True).check_bind()
    with pytest.raises(SystemExit):
        Settings(host="10.1.2.3").check_bind()


def test_no_route_loads_or_registers_models(secured):
    spec = httpx.get(f"{secured}/openapi.json").json()
    for path, ops in spec["paths"].items():
        if path == "/v1/models/{name}/sanity":  # a report about a served model: it loads nothing
            assert set(ops) == {"get", "post"}, path
        elif "model" in path:
            assert set(ops) == {"get"}, path
    r = httpx.post(f"{secured}/v1/models/..%2F..%2Fetc%2Fpasswd/sanity", headers={"X-API-Key": KEY}, json={})
    assert r.status_code == 404
    r = httpx.post(f"{secured}/v1/explain/gradcam", headers={"X-API-Key": KEY},
                   json={"images": [base64.b64encode(png()).decode()], "model": "../../../etc/passwd"})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]["message"]
    r = httpx.post(f"{secured}/v1/explain/gradcam", headers={"X-API-Key": KEY},
                   json={"images": [base64.b64encode(png()).decode()], "model": "https://evil.example/m.pt"})
    assert r.status_code == 404
