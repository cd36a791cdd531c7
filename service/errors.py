"""The service's error kinds, below every other module: domain code raises them, only `api/` maps them to
HTTP statuses and the JSON envelope (service/api/errors.py).

Each kind has a default wire `code`; an instance may name a finer one (`NotFound(..., code="unknown_model")`).
They pickle whole (message, code, retry hint), so the same exception crosses the engine-process pipe and Ray.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error the service answers with. `retry_after`: seconds after which a retry may
    succeed."""

    code: str = "internal"
    default_message: ClassVar[str] = "the service failed"

    def __init__(self, message: str | None = None, *, code: str | None = None,
                 retry_after: float | None = None):
        self.message = message or self.default_message
        super().__init__(self.message)
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.message, self.code, self.retry_after)


def _rebuild(kind: type[ServiceError], message: str, code: str, retry_after: float | None) -> ServiceError:
    return kind(message, code=code, retry_after=retry_after)


class InvalidInput(ServiceError, ValueError):
    """The request is well-formed but asks for something impossible (parameters, targets, cost). A ValueError,
    as a library caller of the engine expects."""

    code = "invalid"


class BadInput(ServiceError):
    """The request's content cannot be read (an image that does not decode)."""

    code = "bad_request"


class TooLarge(ServiceError):
    """The request exceeds a documented size limit (images, pixels)."""

    code = "too_large"


class NotFound(ServiceError):
    code = "not_found"


class NotAcceptable(ServiceError):
    """The answer cannot take the form the caller asked for."""

    code = "not_acceptable"


class Busy(ServiceError):
    """No room now (queue, jobs, pixels in flight): retry after `retry_after` seconds."""

    code = "queue_full"


class QueueFull(Busy):
    """A lane's queue holds its maximum number of items."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the queue is full; retry after {retry_after:.0f}s", retry_after=retry_after)

    def __reduce__(self) -> tuple[Any, ...]:
        return QueueFull, (self.retry_after,)


class Unavailable(ServiceError):
    """The service cannot serve now (starting, stopping, a replica lost)."""

    code = "not_ready"


class WorkerStopped(Unavailable):
    """The worker stopped before the item could run."""

    code = "shutting_down"
    default_message = "the service is shutting down"


class DeadlineExceeded(ServiceError):
    """The item waited past its start deadline, so it was dropped rather than computed late."""

    code = "deadline_exceeded"
    default_message = "the work could not start before its deadline; the service is overloaded, retry later"


class Cancelled(ServiceError):
    """Every item of the running batch was cancelled (a job's DELETE, or its caller left)."""

    code = "cancelled"
    default_message = "the job was cancelled"


class EngineCrashed(ServiceError):
    """The process running the passes died under this batch; another one takes the next."""

    code = "engine_crashed"


class EngineOutOfMemory(ServiceError, MemoryError):
    """The device ran out of memory: a MemoryError, so the worker pool halves the batch and retries; a single
    image that still does not fit is a fault of the service's sizing (500 internal)."""

    code = "internal"


class Internal(ServiceError):
    """A fault of the service (logged where it happened): never the caller's mistake."""

    code = "internal"


QUOTE_LIMIT = 80


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A caller's value for an error message: its repr, of at most `limit` characters of it, then an ellipsis
    and its length. Every message that echoes input goes through here, so an answer stays small however large
    the input (a 1 MB parameter name, model name or job id)."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}\u2026 ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}\u2026"


def describe_validation(errors: Any, limit: int = 20) -> str:
    """pydantic's errors as one sentence a caller can act on: each field, what is wrong, what was given.
    The field's path (which may be a caller's parameter name) and the value are quoted bounded; at most
    `limit` errors are described."""
    parts = []
    errors = list(errors)
    for e in errors[:limit]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        if len(loc) > QUOTE_LIMIT:
            loc = quote(loc)
        msg = str(e.get("msg")).removeprefix("Value error, ")  # a validator's own sentence needs no label
        text = f"{loc}: {msg}" if loc else msg
        given = e.get("input")
        if isinstance(given, (str, int, float, bool)) and e.get("type") != "missing":
            text += f" (got {quote(given)})"
        parts.append(text)
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)


def as_service_error(exc: BaseException) -> ServiceError:
    """The one place where a method's plain exception gets its kind: ValueError and LookupError are what the
    methods, Captum and the zoo raise for a request they cannot do (InvalidInput); anything else is a fault of
    ours, logged here."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, (ValueError, LookupError)):
        return InvalidInput(str(exc))
    log.error("explain failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return Internal(f"{type(exc).__name__} while explaining; see the server log")
