"""Exceptions by cause: transport failures, then HTTP statuses (each with the server's code and message)."""
from __future__ import annotations

import httpx


class SaliencyError(Exception):
    """Base of every error this client raises."""


class APIConnectionError(SaliencyError):
    """The server could not be reached (refused, DNS, reset)."""


class APITimeoutError(APIConnectionError):
    """No answer within the client's timeout."""


class APIStatusError(SaliencyError):
    """The server answered with an error status; `code` and `message` are its own."""

    def __init__(self, status_code: int, code: str, message: str, response: httpx.Response | None = None):
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code, self.code, self.message, self.response = status_code, code, message, response


class BadRequestError(APIStatusError):
    """400: a malformed body or image."""


class AuthenticationError(APIStatusError):
    """401/403."""


class NotFoundError(APIStatusError):
    """404: unknown method, model route or job."""


class PayloadTooLargeError(APIStatusError):
    """413: image or body over the server's limits."""


class UnsupportedMediaTypeError(APIStatusError):
    """415."""


class ValidationError(APIStatusError):
    """422: a parameter, target, model or output the server refuses."""


class RateLimitError(APIStatusError):
    """429: the queue is full; `retry_after` is the server's hint in seconds."""

    def __init__(self, *args, retry_after: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class ServerError(APIStatusError):
    """5xx."""


class ServiceUnavailableError(ServerError):
    """503: models still loading, worker down or shutting down."""


class DeadlineExceededError(ServerError):
    """504: the work could not start before its deadline."""


class JobFailedError(SaliencyError):
    """A job ended as failed or cancelled; `job` is its last state."""

    def __init__(self, job):
        detail = (job.error or {}).get("message", job.status)
        super().__init__(f"job {job.id} {job.status}: {detail}")
        self.job = job


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
              413: PayloadTooLargeError, 415: UnsupportedMediaTypeError, 422: ValidationError,
              429: RateLimitError, 503: ServiceUnavailableError, 504: DeadlineExceededError}


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not sent by this service
        return None


def from_response(response: httpx.Response) -> APIStatusError:
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "error", response.text[:500] or response.reason_phrase
    status = response.status_code
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIStatusError)
    if cls is RateLimitError:
        return RateLimitError(status, code, message, response, retry_after=retry_after(response))
    return cls(status, code, message, response)
