"""The OpenAPI document says what the server enforces (issue 24, finding 8): the methods a `{method}` path
or POST /v1/jobs's `method` field takes, at most max_images images (and targets) per request, 401 and 500 on
every /v1 route, no two paths that one request could match; and a 405 names every method its path allows,
though two routes share the path."""
from __future__ import annotations

import httpx
import pytest
import torch

from service.detection.explain import DETECTION_ONLY
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


# the classifier methods and the detectors' own (drise; gradcam serves both)
ALL_METHODS = sorted(set(METHODS) | DETECTION_ONLY)


def test_the_method_path_parameter_lists_the_registered_methods(served):
    _, schema = served
    operation = schema["paths"]["/v1/explain/{method}"]["post"]
    (parameter,) = [p for p in operation["parameters"] if p["name"] == "method"]
    assert parameter["schema"]["enum"] == ALL_METHODS and "drise" in ALL_METHODS


def test_submitting_a_job_names_its_method_in_the_body_in_either_form(served):
    _, schema = served
    operation = schema["paths"]["/v1/jobs"]["post"]
    assert operation["operationId"] == "submit_job" and not operation.get("parameters")
    for media, body in operation["requestBody"]["content"].items():
        assert body["schema"]["properties"]["method"]["enum"] == ALL_METHODS, media
        assert "method" in body["schema"]["required"], media


def segments(template: str) -> list[str]:
    return template.strip("/").split("/")


def overlap(a: str, b: str) -> bool:
    """Some path matches both templates: as many segments, each pair equal or either one a {parameter}."""
    def free(segment: str) -> bool:
        return segment.startswith("{") and segment.endswith("}")

    return len(segments(a)) == len(segments(b)) and all(
        x == y or free(x) or free(y) for x, y in zip(segments(a), segments(b), strict=True))


def test_the_overlap_matcher():
    assert overlap("/v1/jobs/{method}", "/v1/jobs/{job_id}") and overlap("/a/{x}/c", "/a/b/{y}")
    assert overlap("/v1/models", "/v1/models")
    assert not overlap("/v1/jobs", "/v1/jobs/{job_id}") and not overlap("/v1/explain/{m}", "/v1/jobs/{j}")


def test_no_two_paths_overlap(served):
    """A schema reader (a generated client, a gateway) must tell every path's operations apart."""
    _, schema = served
    paths = sorted(schema["paths"])
    clashes = [(a, b) for i, a in enumerate(paths) for b in paths[i + 1:] if overlap(a, b)]
    assert not clashes
    assert "/v1/jobs/{method}" not in paths  # the deprecated submit route is not documented


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
    # GET and DELETE are two routes; the deprecated POST /v1/jobs/{method} answers but is not offered
    assert set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.request("OPTIONS", f"{base}/v1/jobs")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
