"""The request logic shared by Client and AsyncClient, written once as generators.

A flow yields `Call`s (an HTTP request to make) and `Sleep`s; the sync and async clients only execute them,
so building requests, retrying on 429/503, following a 202 into its job and parsing answers are not repeated.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from . import errors
from .images import ImageInput, as_list, b64, to_bytes
from .results import Job, from_wire
from .schemas import ExplainRequest, ExplainResponse, JobOut, MethodOut, ModelOut, SanityReport, SanityRequest

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json: Any = None
    timeout: float | None = None  # None: the client's timeout


@dataclass(frozen=True)
class Sleep:
    seconds: float


Flow = Generator["Call | Sleep", Any, Any]


class Core:
    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 0, max_retry_wait: float = 60.0, poll_interval: float = 0.25):
        self.base_url = base_url.rstrip("/")
        self.api_key, self.timeout = api_key, timeout
        self.max_retries, self.max_retry_wait, self.poll_interval = max_retries, max_retry_wait, poll_interval

    def headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": "saliency-client/0.1"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    # ------------------------------------------------------------------ building blocks
    def request(self, call: Call, deadline: float | None = None) -> Flow:
        """One call, retried on 429/503 while `max_retries` allows and the server's Retry-After is short
        enough.

        `deadline` (time.monotonic()) bounds the call with its retries: each try gets the time left at most.
        """
        attempt = 0
        while True:
            if deadline is not None:
                left = _time_left(deadline, call.path)
                call = replace(call, timeout=min(left, call.timeout or self.timeout))
            response: httpx.Response = yield call
            if response.status_code < 400:
                return response
            error = errors.from_response(response)
            wait = errors.retry_after(response)
            if (response.status_code in (429, 503) and attempt < self.max_retries and wait is not None
                    and wait <= self.max_retry_wait
                    and (deadline is None or time.monotonic() + wait < deadline)):
                attempt += 1
                yield Sleep(wait)
                continue
            raise error

    @staticmethod
    def body(images: ImageInput | Sequence[ImageInput], model: str | None, targets, outputs, size: str,
             params: dict[str, Any], metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
        blobs = [b64(to_bytes(i)) for i in as_list(images)]
        targets = _plain(targets)
        if targets is not None and not isinstance(targets, list):
            targets = [targets] * len(blobs)  # one class for every image
        # Built unvalidated: the server validates (one source of truth), and a bad value comes back as the
        # APIStatusError of its status with the server's code, like every other refusal.
        fields: dict[str, Any] = {"model": model, "images": blobs, "targets": targets, "params": params,
                                  "outputs": [outputs] if isinstance(outputs, str) else list(outputs),
                                  "size": size, "metrics": dict(metrics) if metrics is not None else None}
        req = ExplainRequest.model_construct(**fields)
        return req.model_dump(exclude_none=True)

    # ------------------------------------------------------------------ flows
    def explain(self, method: str, body: dict[str, Any], progress: bool = False,
                timeout: float | None = None) -> Flow:
        """`timeout` bounds the whole call (seconds), a job it turned into included: that job is then
        cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        response = yield from self.request(Call("POST", f"/v1/explain/{method}", body), deadline)
        if response.status_code != 202:
            return from_wire(ExplainResponse.model_validate(response.json()))
        # the server turned a slow call into a job: follow it, as the same call
        job = JobOut.model_validate(response.json())
        try:
            return (yield from self.wait(job.id, progress=progress, first=job, deadline=deadline))
        except errors.APITimeoutError:
            yield from self._cancel_quietly(job.id)
            raise
        except errors.JobFailedError as exc:
            error = exc.job.error or {}
            if error.get("code") == "deadline_exceeded":  # what the call itself would have answered: 504
                raise errors.DeadlineExceededError(504, error["code"], str(error.get("message", ""))) from exc
            raise

    def submit(self, method: str, body: dict[str, Any]) -> Flow:
        # the method named in the body: POST /v1/jobs/{method} is deprecated (its path overlapped the job's)
        response = yield from self.request(Call("POST", "/v1/jobs", {**body, "method": method}))
        return JobOut.model_validate(response.json())

    def job(self, job_id: str, deadline: float | None = None) -> Flow:
        response = yield from self.request(Call("GET", f"/v1/jobs/{job_id}"), deadline)
        return JobOut.model_validate(response.json())

    def cancel(self, job_id: str) -> Flow:
        response = yield from self.request(Call("DELETE", f"/v1/jobs/{job_id}"))
        return JobOut.model_validate(response.json())

    def _cancel_quietly(self, job_id: str) -> Flow:
        """Best effort: the caller has given up, so the server need not finish the work."""
        with contextlib.suppress(errors.SaliencyError):
            yield from self.request(Call("DELETE", f"/v1/jobs/{job_id}", timeout=min(5.0, self.timeout)))

    def wait(self, job_id: str, progress: bool = False, timeout: float | None = None,
             first: Job | None = None, deadline: float | None = None) -> Flow:
        """Poll until the job ends; its Explanation (DetectionExplanation of a detector), or JobFailedError.

        `timeout` bounds the wait (seconds).
        """
        job = yield from self.follow(job_id, progress, timeout, first, deadline)
        if not isinstance(job.result, ExplainResponse):
            raise errors.SaliencyError(f"job {job_id} is a {job.method} job, not an explanation: its result "
                                       "is job(id).result")
        return from_wire(job.result)

    def follow(self, job_id: str, progress: bool = False, timeout: float | None = None,
               first: Job | None = None, deadline: float | None = None) -> Flow:
        """Poll until the job ends: the succeeded job (its `result` set), or JobFailedError."""
        if timeout is not None:
            ends = time.monotonic() + timeout
            deadline = ends if deadline is None else min(deadline, ends)
        bar = _bar(job_id) if progress else None
        try:
            job = first or (yield from self.job(job_id, deadline))
            while True:
                if bar is not None:
                    bar.total = max(job.progress.total, 1)
                    bar.n = job.progress.done
                    bar.refresh()
                if job.status == "succeeded" and job.result is not None:
                    return job
                if job.status in ("failed", "cancelled"):
                    raise errors.JobFailedError(job)
                if deadline is not None and time.monotonic() + self.poll_interval >= deadline:
                    raise errors.APITimeoutError(f"job {job_id} still {job.status} at the call's time limit")
                yield Sleep(self.poll_interval)
                job = yield from self.job(job_id, deadline)
        finally:
            if bar is not None:
                bar.close()

    def models(self) -> Flow:
        response = yield from self.request(Call("GET", "/v1/models"))
        return [ModelOut.model_validate(m) for m in response.json()]

    def sanity(self, model: str, ask: SanityRequest, progress: bool = False,
               timeout: float | None = None) -> Flow:
        """Start the model's sanity report (or find it kept) and wait for it; `timeout` bounds the wait, and
        a report still running then is cancelled."""
        deadline = None if timeout is None else time.monotonic() + timeout
        body = ask.model_dump(exclude_defaults=True)
        response = yield from self.request(Call("POST", f"/v1/models/{model}/sanity", body), deadline)
        first = JobOut.model_validate(response.json())
        try:
            job = yield from self.follow(first.id, progress=progress, first=first, deadline=deadline)
        except errors.APITimeoutError:
            yield from self._cancel_quietly(first.id)
            raise
        if not isinstance(job.result, SanityReport):
            raise errors.SaliencyError(f"job {first.id} did not answer with a sanity report")
        return job.result

    def sanity_report(self, model: str) -> Flow:
        """The model's newest finished sanity report, or None when there is none yet."""
        try:
            response = yield from self.request(Call("GET", f"/v1/models/{model}/sanity"))
        except errors.NotFoundError as exc:
            if exc.code == "no_sanity_report":
                return None
            raise
        return SanityReport.model_validate(response.json())

    def methods(self) -> Flow:
        response = yield from self.request(Call("GET", "/v1/methods"))
        return [MethodOut.model_validate(m) for m in response.json()]

    def health(self) -> Flow:
        """/readyz as a dict (`ready`, `models`, ...); raises ServiceUnavailableError while starting."""
        response = yield from self.request(Call("GET", "/readyz"))
        return response.json()


def _time_left(deadline: float, path: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.APITimeoutError(f"{path}: the call's time limit ran out")
    return left


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python ints and lists (JSON has no int64); anything else as it is."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _bar(job_id: str):
    from tqdm.auto import tqdm

    return tqdm(total=1, desc=f"job {job_id[:8]}", unit="step", leave=False)
