"""The request logic shared by Client and AsyncClient, written once as generators.

A flow yields `Call`s (an HTTP request to make) and `Sleep`s; the sync and async clients only execute them,
so building requests, retrying on 429/503, following a 202 into its job and parsing answers are not repeated.
"""
from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from . import errors
from .images import ImageInput, as_list, b64, to_bytes
from .results import Explanation, Job
from .schemas import ExplainRequest, ExplainResponse, JobOut, MethodOut, ModelOut

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
    def request(self, call: Call) -> Flow:
        """One call, retried on 429/503 while `max_retries` allows and the server's Retry-After is short enough."""
        attempt = 0
        while True:
            response: httpx.Response = yield call
            if response.status_code < 400:
                return response
            error = errors.from_response(response)
            wait = errors.retry_after(response)
            if (response.status_code in (429, 503) and attempt < self.max_retries and wait is not None
                    and wait <= self.max_retry_wait):
                attempt += 1
                yield Sleep(wait)
                continue
            raise error

    @staticmethod
    def body(images: ImageInput | Sequence[ImageInput], model: str | None, targets, outputs, size: str,
             params: dict[str, Any]) -> dict[str, Any]:
        blobs = [b64(to_bytes(i)) for i in as_list(images)]
        if targets is not None and not isinstance(targets, (list, tuple)):
            targets = [targets] * len(blobs)  # one class for every image
        # Built unvalidated: the server validates (one source of truth), and a bad value comes back as the
        # APIStatusError of its status with the server's code, like every other refusal.
        req = ExplainRequest.model_construct(model=model, images=blobs, targets=targets, params=params,
                                             outputs=[outputs] if isinstance(outputs, str) else list(outputs),
                                             size=size)
        return req.model_dump(exclude_none=True)

    # ------------------------------------------------------------------ flows
    def explain(self, method: str, body: dict[str, Any], progress: bool = False) -> Flow:
        response = yield from self.request(Call("POST", f"/v1/explain/{method}", body))
        if response.status_code == 202:  # the server turned a slow call into a job: follow it
            job = JobOut.model_validate(response.json())
            return (yield from self.wait(job.id, progress=progress, first=job))
        return Explanation.from_wire(ExplainResponse.model_validate(response.json()))

    def submit(self, method: str, body: dict[str, Any]) -> Flow:
        response = yield from self.request(Call("POST", f"/v1/jobs/{method}", body))
        return JobOut.model_validate(response.json())

    def job(self, job_id: str) -> Flow:
        response = yield from self.request(Call("GET", f"/v1/jobs/{job_id}"))
        return JobOut.model_validate(response.json())

    def cancel(self, job_id: str) -> Flow:
        response = yield from self.request(Call("DELETE", f"/v1/jobs/{job_id}"))
        return JobOut.model_validate(response.json())

    def wait(self, job_id: str, progress: bool = False, timeout: float | None = None,
             first: Job | None = None) -> Flow:
        """Poll until the job ends; its Explanation, or JobFailedError. `timeout` bounds the wait (seconds)."""
        bar = _bar(job_id) if progress else None
        waited = 0.0
        try:
            job = first or (yield from self.job(job_id))
            while True:
                if bar is not None:
                    bar.total = max(job.progress.total, 1)
                    bar.n = job.progress.done
                    bar.refresh()
                if job.status == "succeeded" and job.result is not None:
                    return Explanation.from_wire(job.result)
                if job.status in ("failed", "cancelled"):
                    raise errors.JobFailedError(job)
                if timeout is not None and waited >= timeout:
                    raise errors.APITimeoutError(f"job {job_id} still {job.status} after {timeout:g}s")
                yield Sleep(self.poll_interval)
                waited += self.poll_interval
                job = yield from self.job(job_id)
        finally:
            if bar is not None:
                bar.close()

    def models(self) -> Flow:
        response = yield from self.request(Call("GET", "/v1/models"))
        return [ModelOut.model_validate(m) for m in response.json()]

    def methods(self) -> Flow:
        response = yield from self.request(Call("GET", "/v1/methods"))
        return [MethodOut.model_validate(m) for m in response.json()]

    def health(self) -> Flow:
        """/readyz as a dict (`ready`, `models`, ...); raises ServiceUnavailableError while starting."""
        response = yield from self.request(Call("GET", "/readyz"))
        return response.json()


def _bar(job_id: str):
    from tqdm.auto import tqdm

    return tqdm(total=1, desc=f"job {job_id[:8]}", unit="step", leave=False)
