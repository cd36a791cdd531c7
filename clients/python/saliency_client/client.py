"""Client and AsyncClient: the same methods over httpx's sync and async transports."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from . import errors
from ._core import DEFAULT_URL, Core, Flow, Sleep
from .images import ImageInput
from .results import AnyExplanation, Job
from .schemas import MethodOut, ModelOut, SanityReport, SanityRequest

Images = ImageInput | Sequence[ImageInput]
Targets = int | Sequence[int | None] | None


def _transport_error(exc: httpx.TransportError) -> errors.APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return errors.APITimeoutError(f"timed out: {exc}")
    return errors.APIConnectionError(f"cannot reach the service: {exc}")


class _Base:
    """Arguments shared by both clients; `**httpx_kwargs` go to the httpx client (transport, proxy,
    headers, ...)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, *, timeout: float = 120.0,
                 max_retries: int = 0, max_retry_wait: float = 60.0, poll_interval: float = 0.25):
        self._core = Core(base_url, api_key, timeout, max_retries, max_retry_wait, poll_interval)

    @property
    def base_url(self) -> str:
        return self._core.base_url

    def _explain_flow(self, images, method, model, targets, outputs, size, progress, timeout, params,
                      more, metrics=None) -> Flow:
        body = self._core.body(images, model, targets, outputs, size, _merged(params, more), metrics)
        return self._core.explain(method, body, progress=progress, timeout=timeout)

    def _submit_flow(self, images, method, model, targets, outputs, size, params, more, metrics=None) -> Flow:
        return self._core.submit(method, self._core.body(images, model, targets, outputs, size,
                                                         _merged(params, more), metrics))

    def _headers(self, httpx_kwargs: dict[str, Any]) -> dict[str, str]:
        """The client's own headers, then the caller's (`headers=` of httpx) over them."""
        return {**self._core.headers(), **dict(httpx_kwargs.pop("headers", None) or {})}


def _sanity_request(methods: Sequence[str] | None, seed: int, profile: str, refresh: bool) -> SanityRequest:
    """Built unvalidated, like an explain body: the server validates and answers a bad value with its 422."""
    fields: dict[str, Any] = {"methods": list(methods) if methods is not None else None, "seed": seed,
                              "profile": profile, "refresh": refresh}
    return SanityRequest.model_construct(**fields)


def _merged(params: Mapping[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    """The method's parameters: `params=` (any name, IG's own `method` included) and keyword arguments."""
    return {**(params or {}), **more}


class Client(_Base):
    """Blocking client.

    >>> with Client("http://127.0.0.1:8000") as c:
    ...     heat = c.explain("cat.jpg", method="gradcam")[0].map
    """

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, *, timeout: float = 120.0,
                 max_retries: int = 0, max_retry_wait: float = 60.0, poll_interval: float = 0.25,
                 **httpx_kwargs: Any):
        super().__init__(base_url, api_key, timeout=timeout, max_retries=max_retries,
                         max_retry_wait=max_retry_wait, poll_interval=poll_interval)
        headers = self._headers(httpx_kwargs)
        self._http = httpx.Client(base_url=self._core.base_url, headers=headers, timeout=timeout,
                                  **httpx_kwargs)

    def _run(self, flow: Flow):
        step = next(flow)
        try:
            while True:
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    response = self._http.request(step.method, step.path, json=step.json,
                                                  timeout=step.timeout or httpx.USE_CLIENT_DEFAULT)
                except httpx.TransportError as exc:
                    step = flow.throw(_transport_error(exc))
                    continue
                step = flow.send(response)
        except StopIteration as done:
            return done.value

    def explain(self, images: Images, method: str = "gradcam", *, model: str | None = None,
                targets: Targets = None, outputs: Sequence[str] | str = ("npy",), size: str = "original",
                progress: bool = False, timeout: float | None = None, params: Mapping[str, Any] | None = None,
                metrics: Mapping[str, Any] | None = None, **more: Any) -> AnyExplanation:
        """Explain one image or a list. Method parameters are keyword arguments (n_steps=32, ...) or `params=`
        (the only way to pass IG's own `method`). `timeout` bounds the whole call in seconds, a job the server
        turned it into included (that job is then cancelled); None: no bound beyond each request's.
        `metrics`: the per-map metrics' parameters ({"steps": 20, "replacement": "blur"}), with "metrics" in
        `outputs`; each result's `metrics` then holds the figures.

        A classifier's answer is an Explanation (a map per image); a detection model's (`drise`, or `gradcam`
        of a torchvision detector) a DetectionExplanation: per image its detections, each with box, label,
        score and map. Their `task` ("classification" or "detection") tells them apart."""
        return self._run(self._explain_flow(images, method, model, targets, outputs, size, progress, timeout,
                                            params, more, metrics))

    def submit(self, images: Images, method: str = "gradcam", *, model: str | None = None,
               targets: Targets = None, outputs: Sequence[str] | str = ("npy",), size: str = "original",
               params: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
               **more: Any) -> Job:
        """Start the work as a job and return at once (its id, status and progress)."""
        return self._run(self._submit_flow(images, method, model, targets, outputs, size, params, more,
                                           metrics))

    def job(self, job_id: str) -> Job:
        return self._run(self._core.job(job_id))

    def wait(self, job_id: str, *, progress: bool = False, timeout: float | None = None) -> AnyExplanation:
        """Poll a job until it ends (a tqdm bar when `progress`); JobFailedError when failed or cancelled."""
        return self._run(self._core.wait(job_id, progress=progress, timeout=timeout))

    def cancel(self, job_id: str) -> Job:
        return self._run(self._core.cancel(job_id))

    def models(self) -> list[ModelOut]:
        return self._run(self._core.models())

    def sanity(self, model: str, *, methods: Sequence[str] | None = None, seed: int = 0,
               profile: str = "quick", refresh: bool = False, progress: bool = False,
               timeout: float | None = None) -> SanityReport:
        """The model's sanity report (docs/sanity.md): started as a job on the server, or found kept for the
        same weights, profile, seed and methods (unless `refresh`), and waited for. `timeout` bounds the wait
        in seconds (the report is then cancelled)."""
        return self._run(self._core.sanity(model, _sanity_request(methods, seed, profile, refresh), progress,
                                           timeout))

    def sanity_report(self, model: str) -> SanityReport | None:
        """The model's newest finished sanity report, or None when none was made yet."""
        return self._run(self._core.sanity_report(model))

    def methods(self) -> list[MethodOut]:
        return self._run(self._core.methods())

    def health(self) -> dict[str, Any]:
        return self._run(self._core.health())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """The same methods as Client, awaitable."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, *, timeout: float = 120.0,
                 max_retries: int = 0, max_retry_wait: float = 60.0, poll_interval: float = 0.25,
                 **httpx_kwargs: Any):
        super().__init__(base_url, api_key, timeout=timeout, max_retries=max_retries,
                         max_retry_wait=max_retry_wait, poll_interval=poll_interval)
        headers = self._headers(httpx_kwargs)
        self._http = httpx.AsyncClient(base_url=self._core.base_url, headers=headers, timeout=timeout,
                                       **httpx_kwargs)

    async def _run(self, flow: Flow):
        step = next(flow)
        try:
            while True:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                    step = flow.send(None)
                    continue
                try:
                    response = await self._http.request(step.method, step.path, json=step.json,
                                                        timeout=step.timeout or httpx.USE_CLIENT_DEFAULT)
                except httpx.TransportError as exc:
                    step = flow.throw(_transport_error(exc))
                    continue
                step = flow.send(response)
        except StopIteration as done:
            return done.value

    async def explain(self, images: Images, method: str = "gradcam", *, model: str | None = None,
                      targets: Targets = None, outputs: Sequence[str] | str = ("npy",),
                      size: str = "original", progress: bool = False, timeout: float | None = None,
                      params: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
                      **more: Any) -> AnyExplanation:
        return await self._run(self._explain_flow(images, method, model, targets, outputs, size, progress,
                                                  timeout, params, more, metrics))

    async def submit(self, images: Images, method: str = "gradcam", *, model: str | None = None,
                     targets: Targets = None, outputs: Sequence[str] | str = ("npy",), size: str = "original",
                     params: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None,
                     **more: Any) -> Job:
        return await self._run(self._submit_flow(images, method, model, targets, outputs, size, params, more,
                                                 metrics))

    async def job(self, job_id: str) -> Job:
        return await self._run(self._core.job(job_id))

    async def wait(self, job_id: str, *, progress: bool = False,
                   timeout: float | None = None) -> AnyExplanation:
        return await self._run(self._core.wait(job_id, progress=progress, timeout=timeout))

    async def cancel(self, job_id: str) -> Job:
        return await self._run(self._core.cancel(job_id))

    async def models(self) -> list[ModelOut]:
        return await self._run(self._core.models())

    async def sanity(self, model: str, *, methods: Sequence[str] | None = None, seed: int = 0,
                     profile: str = "quick", refresh: bool = False, progress: bool = False,
                     timeout: float | None = None) -> SanityReport:
        return await self._run(self._core.sanity(model, _sanity_request(methods, seed, profile, refresh),
                                                 progress, timeout))

    async def sanity_report(self, model: str) -> SanityReport | None:
        return await self._run(self._core.sanity_report(model))

    async def methods(self) -> list[MethodOut]:
        return await self._run(self._core.methods())

    async def health(self) -> dict[str, Any]:
        return await self._run(self._core.health())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
