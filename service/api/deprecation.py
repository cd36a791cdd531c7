"""Routes kept for clients in the wild after their successor came: every answer from one, errors included,
carries `Deprecation: true` and a `Link` to its successor, so a client can learn of the change from any
response before the route goes."""
from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from .errors import as_api_error

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def deprecation_headers(successor: str) -> dict[str, str]:
    return {"Deprecation": "true", "Link": f'<{successor}>; rel="successor-version"'}


def deprecated_route(successor: str) -> type[APIRoute]:
    """A route class (add_api_route's route_class_override) that marks every answer deprecated."""
    headers = deprecation_headers(successor)

    class DeprecatedRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            # the handler resolves the dependencies too: a 401 from the API key check is marked as well
            return _marked(super().get_route_handler(), headers)

    return DeprecatedRoute


def _marked(handle: Handler, headers: dict[str, str]) -> Handler:
    async def marked(request: Request) -> Response:
        try:
            response = await handle(request)
        except HTTPException as exc:  # left to the app's handler (a 405 gets its Allow there)
            exc.headers = {**(exc.headers or {}), **headers}
            raise
        except Exception as exc:  # noqa: BLE001 - every other error as the API's answer, then marked
            error = as_api_error(exc)
            error.headers = {**error.headers, **headers}
            raise error from None
        response.headers.update(headers)
        return response

    return marked
