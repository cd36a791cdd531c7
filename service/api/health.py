from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.api_route("/healthz", methods=["GET", "HEAD"], operation_id="health")
async def healthz() -> dict:
    """The process is up and answering."""
    return {"status": "ok"}


@router.api_route("/readyz", methods=["GET", "HEAD"], operation_id="ready",
                  responses={503: {"description": "models loading or worker down"}})
async def readyz(runtime: RuntimeDep):
    """Models loaded and the worker running; 503 until then."""
    body = runtime.readiness()
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
