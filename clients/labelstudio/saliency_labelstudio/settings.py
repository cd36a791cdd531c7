"""Settings from the environment; a project's /setup `extra_params` may override method, model, threshold,
params and score_by."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

PER_PROJECT = ("method", "model", "threshold", "params", "score_by")
# A prediction's score: the explained class's probability, or the map's faithfulness (faithfulness.py), which
# asks the service for the map's metrics: 4(K-1)+1 = 77 forward passes more per image at its default K = 20.
SCORE_BY = ("probability", "faithfulness")


class SettingsError(ValueError):
    """A project's extra params that cannot be used (answered 400 by /setup)."""


@dataclass(frozen=True)
class BackendSettings:
    saliency_url: str = "http://127.0.0.1:8000"
    saliency_api_key: str | None = None
    method: str = "gradcam"
    model: str | None = None
    threshold: float = 0.5  # of the map's peak: the rectangle's region
    params: dict[str, Any] = field(default_factory=dict)  # the method's parameters
    label_studio_url: str | None = None
    label_studio_api_key: str | None = None
    basic_auth: tuple[str, str] | None = None  # required of Label Studio's calls when set
    timeout: float = 90.0  # for a whole /predict, under Label Studio's 100 s read timeout
    score_by: str = "probability"  # or "faithfulness" (SCORE_BY)

    def __post_init__(self) -> None:
        if self.score_by not in SCORE_BY:
            raise SettingsError(f"score_by must be one of {', '.join(SCORE_BY)}, not {self.score_by!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BackendSettings:
        env = os.environ if env is None else env
        user, password = env.get("BASIC_AUTH_USER"), env.get("BASIC_AUTH_PASS")
        return cls(saliency_url=env.get("SALIENCY_URL", cls.saliency_url),
                   saliency_api_key=env.get("SALIENCY_API_KEY") or None,
                   method=env.get("SALIENCY_METHOD", cls.method),
                   model=env.get("SALIENCY_MODEL") or None,
                   threshold=float(env.get("SALIENCY_THRESHOLD", cls.threshold)),
                   label_studio_url=(env.get("LABEL_STUDIO_URL") or env.get("LABEL_STUDIO_HOST") or None),
                   label_studio_api_key=(env.get("LABEL_STUDIO_API_KEY")
                                         or env.get("LABEL_STUDIO_ACCESS_TOKEN") or None),
                   basic_auth=(user, password) if user and password else None,
                   score_by=env.get("SALIENCY_SCORE_BY") or cls.score_by)

    def for_project(self, extra: dict[str, Any] | None) -> BackendSettings:
        """This backend's settings with a project's overrides (unknown keys are ignored)."""
        extra = extra or {}
        if not isinstance(extra, dict):
            raise SettingsError(f"extra_params must be an object, not {type(extra).__name__}")
        update = {k: extra[k] for k in PER_PROJECT if extra.get(k) is not None}
        for key in ("method", "model", "score_by"):
            if key in update and not isinstance(update[key], str):
                raise SettingsError(f"extra_params.{key} must be a string, not {update[key]!r}")
        if "threshold" in update:
            try:
                update["threshold"] = float(update["threshold"])
            except (TypeError, ValueError):
                raise SettingsError("extra_params.threshold must be a number, "
                                    f"not {update['threshold']!r}") from None
            if not 0.0 < update["threshold"] <= 1.0:  # salient_region's own range
                raise SettingsError(f"extra_params.threshold must be in (0, 1] (of the map's peak), "
                                    f"not {update['threshold']}")
        if "params" in update and not isinstance(update["params"], dict):
            raise SettingsError("extra_params.params must be an object of the method's parameters, "
                                f"not {update['params']!r}")
        return replace(self, **update)

    def model_version(self, served_model: str) -> str:
        """`saliency-<method>-<model>`, where `served_model` is the model the service explains with: this
        backend's `model`, else the service's default (an explain answer's `model`, or GET /v1/models)."""
        return f"saliency-{self.method}-{served_model}"
