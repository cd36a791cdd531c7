"""The OpenAPI document says what the server enforces (issue 24, finding 8): the methods a `{method}` path
takes, at most max_images images (and targets) per request, 401 and 500 on every /v1 route; and a 405 names
every method its path allows, though two routes share the path."""
from __future__ import annotations

import httpx
import pytest
import torch

from service.methods import METHODS
from service.settings import Settings
from service.zoo import ModelRegistry
from tests.conftest import MODELS
from tests.server import running_server


@pytest.fixture(scope="module")
def served():
    registry = ModelRegistry.from_dir(MODELS, torch.device("cpu"), only={"tiny_cnn"})
    with running_server(Settings(default_model="tiny_cnn", max_images=7), registry) as (base, _):
        yield base, httpx.get(f"{base}/openapi.json").json()


def test_the_method_path_parameter_lists_the_registered_methods(served):
    _, schema = served
    for path in ("/v1/explain/{method}", "/v1/jobs/{method}"):
        (parameter,) = [p for p in schema["paths"][path]["post"]["parameters"] if p["name"] == "method"]
        assert parameter["schema"]["enum"] == sorted(METHODS)


def test_image_and_target_limits_are_in_the_schema(served):
    _, schema = served
    body = schema["paths"]["/v1/explain/{method}"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["image"]["maxItems"] == 7
    request = body["application/json"]["schema"]
    assert request["properties"]["images"]["maxItems"] == 7
    (array,) = [v for v in request["properties"]["targets"]["anyOf"] if v.get("type") == "array"]
    assert (array["minItems"], array["maxItems"]) == (1, 7)


def test_every_v1_route_lists_401_and_500(served):
    _, schema = served
    for path, operations in schema["paths"].items():
        if path.startswith("/v1/"):
            for name, operation in operations.items():
                assert {"401", "500"} <= set(operation["responses"]), (path, name)


def test_a_405_allows_the_methods_of_every_route_of_its_path(served):
    base, _ = served
    r = httpx.request("OPTIONS", f"{base}/v1/jobs/abc")
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) >= {"POST", "GET", "DELETE"}
    assert r.json()["error"]["code"] == "method_not_allowed"
