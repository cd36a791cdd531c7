"""The two request forms of POST /v1/explain/{method} and POST /v1/jobs, parsed into one shape.

The same fields either way, but for `method`: /v1/explain/{method} (and the deprecated /v1/jobs/{method})
name the method by the path, /v1/jobs by the body's `method` field. A form field `method` on a path that
names the method stays what it always was there, a method's parameter (Integrated Gradients' quadrature rule);
in a /v1/jobs form that parameter is given as `params.method`.
"""
from __future__ import annotations

import binascii
import json
import re

import pybase64
from fastapi import Request
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile

from ..detection.explain import DETECTION_ONLY
from ..errors import describe_validation, quote
from ..methods import METHODS
from ..pipeline import CallRequest
from ..settings import Settings
from .errors import ApiError
from .schemas import ExplainRequest

METRICS_FIELDS = {"metrics_steps": "steps", "metrics_replacement": "replacement"}  # form field -> parameter
RESERVED_FIELDS = {"image", "model", "target", "targets", "outputs", "size", *METRICS_FIELDS}
METHOD_FIELD = "method"  # reserved too in a form that names its method (POST /v1/jobs)
PARAM_PREFIX = "params."  # `params.NAME`: the method's parameter NAME, whatever the form reserves
OUTPUTS = {"npy", "png", "overlay", "raw", "metrics"}
TOP1 = ("null", "none", "top1", "top-1")  # the top-1 class
# ASCII digits only: int() would also take "2_85", "+285" and other scripts' digits ("٢٨٥")
CLASS_INDEX = re.compile(r"-?[0-9]+")


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _targets(values: list[str]) -> list[int | None] | None:
    items = _split(values)
    if not items:
        return None
    out: list[int | None] = []
    for v in items:
        if v.lower() in TOP1:
            out.append(None)
            continue
        try:
            if not CLASS_INDEX.fullmatch(v):
                raise ValueError(v)
            out.append(int(v))  # a negative index is refused by the range check
        except ValueError:  # not digits, or more digits than int() converts
            raise ApiError(422, "invalid_targets", f"target {quote(v)} is not an integer class index "
                                                   f"(ASCII digits 0-9) or top1/null") from None
    return out


def _check_outputs(outputs: list[str], size: str) -> None:
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        named = ", ".join(quote(o) for o in unknown[:4]) + (", ..." if len(unknown) > 4 else "")
        raise ApiError(422, "invalid_outputs", f"unknown outputs {named}; choose from {sorted(OUTPUTS)}")
    if size not in ("original", "input"):
        raise ApiError(422, "invalid_size", f"size {quote(size)} must be 'original' or 'input'")


def _check_closed(raw: bytes, content_type: str) -> None:
    """A multipart body must end with its close delimiter. Without it the parser keeps the parts it has and
    drops the truncated last one in silence (a `target` field lost would explain the wrong class)."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "malformed multipart body: the content type names no boundary")
    if raw.strip() and raw.rfind(b"--" + boundary + b"--") == -1:  # an empty body: "no images" says more
        raise ApiError(400, "bad_multipart", "malformed multipart body: it ends before its closing boundary "
                                             "(truncated?)")


def _texts(form, name: str) -> list[str]:
    values = form.getlist(name)
    if any(isinstance(v, UploadFile) for v in values):
        raise ApiError(422, "invalid_field", f"the {name!r} field must be text, not a file")
    return values


def _text(form, name: str) -> str | None:
    """A text field given at most once (a second value is refused rather than guessed at)."""
    values = _texts(form, name)
    if len(values) > 1:
        raise ApiError(422, "invalid_field", f"the {name!r} field is given {len(values)} times; give it once")
    return values[0] if values else None


def _params(form, reserved: set[str]) -> dict[str, str]:
    """The method's parameters: every text field not reserved, `params.NAME` as NAME."""
    params: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in reserved:
            continue
        key = key.removeprefix(PARAM_PREFIX)
        if isinstance(value, UploadFile):
            raise ApiError(422, "invalid_params",
                           f"parameter {quote(key)} is a file; only 'image' fields may be")
        if key in params:
            raise ApiError(422, "invalid_params",
                           f"parameter {quote(key)} is given more than once; give it once")
        params[key] = value
    return params


async def parse_multipart(request: Request, settings: Settings, content_type: str,
                          method_in_body: bool = False) -> tuple[str | None, CallRequest]:
    """The `method` field when `method_in_body` (None when absent), and the call."""
    # BodyLimit has bounded the body as it arrived; request.form() parses this same buffered body
    _check_closed(await request.body(), content_type)
    try:
        form = await request.form(max_files=settings.max_images, max_fields=64,
                                  max_part_size=settings.max_image_bytes)
    except ApiError:
        raise
    except Exception as exc:  # Starlette raises MultiPartException / HTTPException for malformed or oversize
        detail = str(getattr(exc, "detail", exc))
        if "Too many files" in detail:
            raise ApiError(413, "too_many_images", f"more than {settings.max_images} images; the limit is "
                                                   f"{settings.max_images} per request") from None
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {detail}") from None
    try:
        files = form.getlist("image")
        uploads = [f for f in files if isinstance(f, UploadFile)]
        if len(uploads) != len(files):
            raise ApiError(422, "bad_image", "the 'image' field must be a file upload")
        blobs = [await f.read() for f in uploads]
        params = _params(form, RESERVED_FIELDS | {METHOD_FIELD} if method_in_body else RESERVED_FIELDS)
        outputs = _split(_texts(form, "outputs"))  # none: the server's default
        size = _text(form, "size") or "original"
        metrics = {name: value for field, name in METRICS_FIELDS.items()
                   if (value := _text(form, field)) is not None}
        _check_outputs(outputs, size)
        model = _text(form, "model")
        method = _text(form, METHOD_FIELD) if method_in_body else None
        return method, CallRequest(
            model or None, blobs, _targets(_texts(form, "target") + _texts(form, "targets")), params, outputs,
            size, metrics or None)
    finally:
        await form.close()


def parse_json(raw: bytes) -> tuple[object, CallRequest]:
    """The top-level `method` field (None when absent; any JSON value) and the call (a method's own
    parameters are in `params`, so no name is shared)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"malformed JSON body: {exc}") from None
    except ValueError as exc:  # e.g. an integer past Python's 4,300-digit conversion limit
        raise ApiError(400, "bad_json", f"malformed JSON body: {str(exc)[:120]}") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "malformed JSON body: nested too deeply") from None
    # JobRequest is ExplainRequest and `method`: the rest validates the same for either route
    method = data.pop(METHOD_FIELD, None) if isinstance(data, dict) else None
    try:
        req = ExplainRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # a refused class index is `invalid_targets`, as in the multipart form
        code = "invalid_targets" if all(e["loc"][:1] == ("targets",) for e in errors) else "invalid"
        raise ApiError(422, code, describe_validation(errors)) from None
    blobs = []
    for i, text in enumerate(req.images):
        try:
            blobs.append(_b64decode(text))
        except (binascii.Error, ValueError):
            raise ApiError(400, "bad_base64", f"images[{i}] is not valid base64") from None
    outputs: list[str] = list(req.outputs) if "outputs" in req.model_fields_set else []  # none: default
    _check_outputs(outputs, req.size)
    return method, CallRequest(req.model, blobs, req.targets, req.params, outputs, req.size, req.metrics)


def _b64decode(text: str) -> bytes:
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        # MIME-style base64 (the `base64` tool's default) breaks lines every 76 characters: drop the
        # whitespace
        stripped = "".join(text.split())
        if stripped == text:
            raise
        return pybase64.b64decode(stripped, validate=True)


async def parse_body(request: Request, settings: Settings) -> CallRequest:
    """The body of a call whose path names its method. A JSON body's top-level `method` is refused, not
    ignored: its caller may believe it chose the method."""
    method, call = await _parse(request, settings, method_in_body=False)
    if method is not None:
        raise ApiError(422, "invalid_field", f"the path {quote(request.url.path)} names the method: drop the "
                                             "top-level 'method' field (a method's own parameters go in "
                                             "'params')")
    return call


async def parse_job_body(request: Request, settings: Settings) -> tuple[str, CallRequest]:
    """The body of POST /v1/jobs: the method its `method` field names, and the call."""
    method, call = await _parse(request, settings, method_in_body=True)
    if method is None or method == "":
        raise ApiError(422, "missing_method", "the job's method is missing: give the field 'method' (one of "
                                              f"{', '.join(sorted(set(METHODS) | DETECTION_ONLY))})")
    if not isinstance(method, str):
        raise ApiError(422, "invalid", f"method: must be a method's name (a string), not {quote(method)}")
    return method, call


async def _parse(request: Request, settings: Settings, method_in_body: bool) -> tuple[object, CallRequest]:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()  # media types are case-insensitive
    if media_type == "multipart/form-data":
        return await parse_multipart(request, settings, content_type, method_in_body)
    if media_type == "application/json":
        return parse_json(await request.body())  # BodyLimit has bounded its size as it arrived
    raise ApiError(415, "unsupported_media_type", f"content type {quote(content_type or '(none)')}: "
                                                  "send multipart/form-data or application/json")
