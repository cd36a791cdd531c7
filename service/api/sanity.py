"""POST and GET /v1/models/{name}/sanity: a model's sanity report, started as a job and read when done
(service/sanity_runs.py runs them; docs/sanity.md says how to read one)."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from ..errors import NotFound, quote
from ..runtime import Runtime
from ..sanity_runs import SanityAsk
from ..zoo import LoadedModel
from .deps import RuntimeDep
from .errors import ApiError
from .responses import FastJSONResponse
from .schemas import ErrorOut, JobOut, SanityReport, SanityRequest

router = APIRouter(prefix="/v1", tags=["sanity"])

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (404, 422, 429, 503)}


def _model(runtime: Runtime, name: str) -> LoadedModel:
    registry = runtime.require_ready()
    try:
        return registry.get(name)
    except LookupError as exc:
        raise NotFound(str(exc), code="unknown_model") from None


@router.post("/models/{name}/sanity", operation_id="start_sanity", status_code=202, response_model=JobOut,
             responses=_ERRORS)
async def start_sanity(name: str, runtime: RuntimeDep, body: Annotated[SanityRequest | None, Body()] = None):
    """Start the model's sanity report as a job (cascading parameter randomisation and the random-class check
    of every method on the shipped photos); follow it at GET /v1/jobs/{id}, cancel it with DELETE. A kept
    report of the same weights, profile, seed and methods answers at once (a finished job) unless
    `refresh`."""
    ask = body or SanityRequest()
    job = await runtime.sanity.start(_model(runtime, name), SanityAsk(
        methods=tuple(ask.methods) if ask.methods is not None else None, seed=ask.seed, profile=ask.profile,
        refresh=ask.refresh))
    return FastJSONResponse(job.view(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/models/{name}/sanity", operation_id="get_sanity", response_model=SanityReport,
            responses={404: {"model": ErrorOut}, 503: {"model": ErrorOut}})
async def get_sanity(name: str, runtime: RuntimeDep):
    """The model's newest finished sanity report; 404 no_sanity_report when there is none yet."""
    model = _model(runtime, name)
    report = runtime.sanity.latest(model.name)
    if report is None:
        raise ApiError(404, "no_sanity_report", f"no sanity report of model {quote(model.name)} yet: POST "
                                                f"/v1/models/{model.name}/sanity starts one")
    return FastJSONResponse(report)
