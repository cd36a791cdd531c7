from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.head("/healthz", operation_id="health_head")
@router.get("/healthz", operation_id="health")
async def healthz() -> dict:
    """The process is up and answering."""
    return {"status": "ok"}


_NOT_READY: dict[int | str, dict[str, Any]] = {503: {"description": "models loading or worker down"}}


@router.head("/readyz", operation_id="ready_head", responses=_NOT_READY)
@router.get("/readyz", operation_id="ready", responses=_NOT_READY)
async def readyz(runtime: RuntimeDep):
    """Models loaded and the worker running; 503 until then."""
    body = runtime.readiness()
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
