"""The OpenAPI document, true to what the server enforces: the methods a `{method}` path or a body's
`method` field takes (the registry's, when the document is made), the per-request image limit, and the
statuses every /v1 route can answer."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..detection.explain import DETECTION_ONLY
from ..methods import METHODS
from ..settings import Settings

ERROR_REF = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
# Answered by any /v1 route: a missing or wrong API key (when one is set), and a fault of the service.
COMMON = {"401": {"description": "missing or wrong API key (when the server has one)", **ERROR_REF},
          "500": {"description": "a fault of the service (logged); never the caller's mistake", **ERROR_REF}}


def install(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = complete(schema, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    methods = sorted(set(METHODS) | DETECTION_ONLY)  # drise: the detectors' own (gradcam: both kinds)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "method":
                    parameter["schema"] = {**parameter.get("schema", {}), "enum": methods}
            if path.startswith("/v1/"):
                responses = operation.setdefault("responses", {})
                for status, response in COMMON.items():
                    responses.setdefault(status, response)
            _limit_images(operation.get("requestBody", {}), settings.max_images)
            _name_methods(operation.get("requestBody", {}), methods)
    for name in ("ExplainRequest", "JobRequest"):
        request = schema.get("components", {}).get("schemas", {}).get(name)
        if request is not None:
            body = {"content": {"application/json": {"schema": request}}}
            _limit_images(body, settings.max_images)
            _name_methods(body, methods)
    return schema


def _name_methods(body: dict[str, Any], methods: list[str]) -> None:
    """A body's `method` field (POST /v1/jobs) takes the registered methods, in either request form."""
    for media in body.get("content", {}).values():
        field = media.get("schema", {}).get("properties", {}).get("method")
        if field is not None:
            field["enum"] = methods


def _limit_images(body: dict[str, Any], max_images: int) -> None:
    """At most `max_images` images per request (and as many targets), in either request form."""
    for media in body.get("content", {}).values():
        properties = media.get("schema", {}).get("properties", {})
        for name in ("images", "image"):
            if name in properties:
                properties[name]["maxItems"] = max_images
        targets = properties.get("targets", {})
        for variant in targets.get("anyOf", []):
            if variant.get("type") == "array":
                variant.update(minItems=1, maxItems=max_images)
