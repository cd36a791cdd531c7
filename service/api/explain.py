"""POST /v1/explain/{method} (synchronous) and the /v1/jobs routes (asynchronous), over one call path."""
from __future__ import annotations

import asyncio
from typing import Any

import pybase64
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from ..errors import Busy
from ..jobs import Job
from ..runtime import Runtime
from .body import parse_body, parse_job_body
from .deprecation import deprecated_route
from .deps import RuntimeDep
from .errors import as_api_error
from .responses import FastJSONResponse
from .schemas import ErrorOut, ExplainRequest, ExplainResponse, JobOut, JobRequest

router = APIRouter(prefix="/v1", tags=["explain"])


def _request_body(json_model: type[BaseModel], method_field: bool) -> dict[str, Any]:
    """Both request forms; `method_field`: the body names the method (api/openapi.py lists its values)."""
    properties: dict[str, Any] = {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "model": {"type": "string"}, "target": {"type": "string"},
        "outputs": {"type": "string", "description": "comma list: npy,png,overlay,raw,metrics"},
        "metrics_steps": {"type": "integer", "minimum": 2, "maximum": 100,
                          "description": "with outputs metrics: K, the curves' steps (default 20)"},
        "metrics_replacement": {"type": "string", "enum": ["blur", "black", "mean"],
                                "description": "with outputs metrics: what a removed pixel becomes"},
        "size": {"type": "string", "enum": ["original", "input"]}}
    if method_field:
        properties["method"] = {"type": "string", "description": "the method: one of GET /v1/methods (a "
                                "method's own parameter `method`, Integrated Gradients' rule: params.method)"}
    multipart = {"type": "object", "required": ["image", "method"] if method_field else ["image"],
                 "properties": properties,
                 "additionalProperties": {"type": "string",
                                          "description": "the method's parameters, as NAME or params.NAME"}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_model.model_json_schema(
            ref_template="#/components/schemas/{model}")},
        "multipart/form-data": {"schema": multipart}}}}


_REQUEST_BODY = _request_body(ExplainRequest, method_field=False)
_JOB_REQUEST_BODY = _request_body(JobRequest, method_field=True)
_GRACE_S = 1.0  # how long a call past its sync wait, not yet started, may take to start or fail
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut}
                                            for code in (400, 404, 406, 413, 415, 422, 429, 503, 504)}


async def start_call(request: Request, runtime: Runtime, method_name: str | None, *, png: bool = False,
                     deadline_s: float | None = None, hold: bool = False) -> Job:
    """Parse the body and hand the call to the runtime (service/runtime.py), which queues it and returns its
    job. `method_name` None: the body names the method (POST /v1/jobs)."""
    runtime.require_ready()
    if method_name is None:
        method_name, body = await parse_job_body(request, runtime.settings)
    else:
        body = await parse_body(request, runtime.settings)
    return await runtime.start_call(method_name, body, overlay_only=png, deadline_s=deadline_s, hold=hold)


def _task(job: Job) -> asyncio.Task:
    """The task that completes a started call (Runtime.start_call always sets it)."""
    if job.task is None:
        raise RuntimeError(f"job {job.id} has no task")
    return job.task


class _ClientGone(Exception):
    pass


async def _result_unless_gone(request: Request, task: asyncio.Task, timeout: float):
    """The task's result; TimeoutError after `timeout`; _ClientGone if the caller hangs up first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError
        await asyncio.wait({task}, timeout=min(0.25, remaining))
        if not task.done() and await request.is_disconnected():
            raise _ClientGone
    return task.result()


async def _answer(request: Request, runtime: Runtime, job: Job, timeout: float):
    """The call's body, or a 499 Response when the caller hung up; TimeoutError after `timeout`."""
    try:
        return await _result_unless_gone(request, _task(job), timeout)
    except _ClientGone:
        runtime.cancel(job)  # nobody will read the answer: free the worker for those still waiting
        return Response(status_code=499)
    except TimeoutError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped onto the API's errors
        raise as_api_error(exc) from None  # classified (and logged) by the runtime


def _wants_png(request: Request) -> bool:
    """The overlay PNG itself when the caller prefers image/png to application/json (q-values honoured)."""
    quality: dict[str, float] = {}
    for entry in request.headers.get("accept", "").split(","):
        media, *options = (part.strip() for part in entry.split(";"))
        q = 1.0
        for option in options:
            key, _, value = option.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    return quality.get("image/png", 0.0) > quality.get("application/json", 0.0)


@router.post("/explain/{method}", operation_id="explain", response_model=ExplainResponse,
             openapi_extra=_REQUEST_BODY,
             responses={202: {"model": JobOut, "description": "still running after the sync wait: a job"},
                        200: {"content": {"image/png": {}}}, **_ERRORS})
async def explain(method: str, request: Request, runtime: RuntimeDep):
    """Explain one or more images; `method` is one of GET /v1/methods. multipart or JSON body."""
    png = _wants_png(request)
    job = await start_call(request, runtime, method, png=png)
    if job.deferred:  # it would start past its deadline: a job at once, rather than a wait that ends in 504
        return _as_job(job)
    try:
        body = await _answer(request, runtime, job, runtime.settings.sync_wait_s)
    except TimeoutError:
        body = await _past_sync_wait(request, runtime, job)
        if body is None:  # the caller polls it as a job
            return _as_job(job)
    return body if isinstance(body, Response) else _ok(body, png)


async def _past_sync_wait(request: Request, runtime: Runtime, job: Job):
    """A call still unanswered after sync_wait_s: None once it is held as a job, else its answer."""
    if not job.started:
        # Still queued: with the defaults its start deadline (queue_deadline_s) falls due with the sync wait,
        # and a 202 for a job about to fail would hide the 504 the call is owed.
        await asyncio.wait({_task(job)}, timeout=_GRACE_S)
    if _task(job).done():
        return await _answer(request, runtime, job, 0)
    try:
        await runtime.job_book.hold(job)
    except Busy:  # max_jobs are held: answer on this connection when done rather than refuse running work
        return await _answer(request, runtime, job, float("inf"))
    return None


def _as_job(job: Job) -> Response:
    return FastJSONResponse(job.view(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


def _ok(body: dict, png: bool) -> Response:
    if png:
        return Response(pybase64.b64decode(body["results"][0]["map"]["overlay"]), media_type="image/png")
    return FastJSONResponse(body)


@router.post("/jobs", operation_id="submit_job", status_code=202, response_model=JobOut,
             openapi_extra=_JOB_REQUEST_BODY, responses=_ERRORS)
async def submit_job(request: Request, runtime: RuntimeDep):
    """Start an explanation as a job (for long work such as MoreauGrad), its method named by the body's
    `method` field; poll GET /v1/jobs/{id}."""
    job = await start_call(request, runtime, None, deadline_s=runtime.settings.job_deadline_s, hold=True)
    return _as_job(job)


async def submit_job_by_path(method: str, request: Request, runtime: RuntimeDep):
    """Deprecated, to be removed: POST /v1/jobs with the method in the path. Kept for clients in the wild,
    but left out of the schema, where its path overlapped GET/DELETE /v1/jobs/{job_id}."""
    job = await start_call(request, runtime, method, deadline_s=runtime.settings.job_deadline_s, hold=True)
    return _as_job(job)


# after POST /v1/jobs, before GET/DELETE /v1/jobs/{job_id}; every answer says Deprecation and its successor
router.add_api_route("/jobs/{method}", submit_job_by_path, methods=["POST"], status_code=202,
                     include_in_schema=False, route_class_override=deprecated_route("/v1/jobs"))


@router.get("/jobs/{job_id}", operation_id="get_job", response_model=JobOut,
            responses={404: {"model": ErrorOut}})
async def get_job(job_id: str, runtime: RuntimeDep):
    """Status, progress (done/total steps) and, when done, the result."""
    return FastJSONResponse(await runtime.job_book.view(job_id))


@router.delete("/jobs/{job_id}", operation_id="cancel_job", response_model=JobOut,
               responses={404: {"model": ErrorOut}})
async def cancel_job(job_id: str, runtime: RuntimeDep):
    """Cancel a job: queued work is dropped, running work stops at its next step."""
    return FastJSONResponse(await runtime.job_book.cancel(job_id))
