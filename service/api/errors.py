"""Errors as JSON `{"error": {"code", "message"}}`; callers' mistakes are 4xx, never 500.

The one place that knows HTTP statuses: the domain's error kinds (service/errors.py) map onto them here, and
the API layer's own refusals (malformed bodies, Accept) are `ApiError`s.
"""
from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import errors as domain


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# Each domain kind's status; a subclass takes its base's (QueueFull is Busy: 429).
STATUS: dict[type[domain.ServiceError], int] = {
    domain.BadInput: 400,
    domain.NotFound: 404,
    domain.NotAcceptable: 406,
    domain.Cancelled: 409,
    domain.TooLarge: 413,
    domain.InvalidInput: 422,
    domain.Busy: 429,
    domain.Internal: 500,
    domain.EngineCrashed: 500,
    domain.EngineOutOfMemory: 500,
    domain.Unavailable: 503,
    domain.DeadlineExceeded: 504,
}


def status_of(error: domain.ServiceError) -> int:
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def as_api_error(exc: BaseException) -> ApiError:
    """Whatever a call ended with, as the API's answer (unclassified exceptions are classified and logged)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError):  # FastAPI's own check of a route's declared parameters
        return ApiError(422, "invalid", domain.describe_validation(exc.errors()))
    error = domain.as_service_error(exc)
    headers = ({"Retry-After": str(max(1, round(error.retry_after)))}
               if error.retry_after is not None else None)
    return ApiError(status_of(error), error.code, error.message, headers)


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          413: "too_large", 415: "unsupported_media_type", 422: "invalid", 429: "queue_full",
          503: "not_ready", 504: "deadline_exceeded"}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(domain.ServiceError)
    async def _domain(_: Request, exc: domain.ServiceError):
        error = as_api_error(exc)
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        error = as_api_error(exc)
        return error_response(error.status, error.code, error.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # every route of this path, not only the first one the router tried
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(exc.status_code, _CODES.get(exc.status_code, "error"), str(exc.detail), headers)


def allowed_methods(request: Request) -> list[str]:
    """The methods of every documented route whose path template matches the request's path (two routes of
    one path, as GET and DELETE /v1/jobs/{job_id}, are two operations of it). Undocumented routes are not
    offered: the deprecated POST /v1/jobs/{method} still answers, but a client is pointed to POST /v1/jobs."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)), request.url.path):
            methods |= {name.upper() for name in operations}
    return sorted(methods)
