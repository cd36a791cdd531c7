"""The service's wire models, mirrored field for field.

The client cannot import the server package, so these are copies; tests/test_client.py compares their JSON
schemas with service/api/schemas.py and with the live server's OpenAPI document, so drift fails a test.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

Output = Literal["npy", "png", "overlay", "raw", "metrics"]
MapSize = Literal["original", "input"]


def _npy_only() -> list[Output]:
    return ["npy"]


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    images: list[str] = Field(..., min_length=1)
    targets: list[StrictInt | None] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    outputs: list[Output] = Field(default_factory=_npy_only)
    metrics: dict[str, Any] | None = None  # the per-map metrics' parameters: steps, replacement
    size: MapSize = "original"


class ClassScore(BaseModel):
    index: int
    label: str
    probability: float


class MapOut(BaseModel):
    height: int
    width: int
    npy: str | None = None
    png: str | None = None
    overlay: str | None = None


class Timing(BaseModel):
    queue: float
    compute: float


class ImageResult(BaseModel):
    target: int
    label: str
    probability: float
    top_k: list[ClassScore]
    map: MapOut
    raw: str | None = None
    diagnostics: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    timing_ms: Timing


class DetectionOut(BaseModel):
    box: list[float]  # x1, y1, x2, y2 in pixels of the uploaded image
    label: str
    label_index: int
    score: float
    map: MapOut
    diagnostics: dict[str, Any] = Field(default_factory=dict)


class DetectionTiming(BaseModel):
    compute: float


class DetectionImageResult(BaseModel):
    width: int  # of the uploaded image: the boxes' frame
    height: int
    detections: list[DetectionOut]
    timing_ms: DetectionTiming


Task = Literal["classification", "detection"]


class ExplainResponse(BaseModel):
    model: str
    method: str
    task: Task = "classification"  # a classifier's answer leaves it out
    params: dict[str, Any]
    results: list[ImageResult] | list[DetectionImageResult]


class JobProgress(BaseModel):
    done: int
    total: int


class SanityLevel(BaseModel):
    layers: list[str]  # the blocks this level randomises (cumulative: the levels above it stay randomised)
    spearman: float  # mean rank correlation of the map before and after, over the photos
    spearman_abs: float | None = None
    constant_maps: int = 0


class SanityMethod(BaseModel):
    levels: list[SanityLevel]
    random_target: dict[str, float | None]
    cross_image: dict[str, float | None]
    verdict: Literal["pass", "fail"]
    reason: str


class SanityReport(BaseModel):
    model: str
    images: int
    methods: dict[str, SanityMethod]
    skipped: dict[str, str] = Field(default_factory=dict)  # methods that do not apply: name -> reason
    seed: int
    profile: Literal["quick", "full"]
    params: dict[str, dict[str, Any]]
    photos: list[str]
    weights_sha256: str
    device: str
    elapsed_s: float
    created: float


class SanityRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    methods: list[str] | None = Field(None, min_length=1, max_length=64)
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1)
    profile: Literal["quick", "full"] = "quick"
    refresh: bool = False


class SanitySummary(BaseModel):
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    job_id: str | None = None
    methods: dict[str, dict[str, str]] = Field(default_factory=dict)  # name -> verdict, reason


class JobOut(BaseModel):
    id: str
    method: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: JobProgress
    created: float
    result: ExplainResponse | SanityReport | None = None  # a sanity job's (method "sanity"): its report
    error: dict[str, Any] | None = None


class SelfTestOut(BaseModel):
    passed: bool
    problems: dict[str, list[str]] = Field(default_factory=dict)


class ModelOut(BaseModel):
    name: str
    architecture: str
    description: str = ""
    task: Task = "classification"  # detection: an object detector (drise, per-box maps)
    available: bool
    reason: str | None = None
    device: str | None = None
    input_size: list[int] | None = None
    num_classes: int | None = None
    default_layer: str | None = None
    layers: list[str] = Field(default_factory=list)
    pass_batch: int | None = None  # a detector's most masked images per D-RISE forward
    default: bool = False
    folded_batchnorms: int = 0
    sanity: SanitySummary | None = None  # its sanity report's verdicts; None: never asked for
    methods: list[str] | None = None  # the methods that apply (its self-test at load); None: not tested
    methods_not_applicable: dict[str, str] = Field(default_factory=dict)  # name -> why not
    self_test: SelfTestOut | None = None


def _classification() -> list[Task]:
    return ["classification"]


class MethodOut(BaseModel):
    name: str
    title: str
    cost: str
    cost_factors: list[str] = Field(default_factory=list)  # parameters whose product is the passes per image
    passes_at_defaults: int = 1
    iterative: bool = False  # long work: best sent as a job (`submit`)
    diagnostics: dict[str, str] = Field(default_factory=dict)  # each result's diagnostics: name -> meaning
    parameters: dict[str, Any]
    metrics_forwards_at_defaults: int  # forward passes per image that outputs=metrics adds (4 (K - 1) + 1)
    # the models it explains, by task: classification, detection (GET /v1/models `task`)
    tasks: list[Task] = Field(default_factory=_classification)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


WIRE_MODELS = (ExplainRequest, ClassScore, MapOut, Timing, ImageResult, DetectionOut, DetectionTiming,
               DetectionImageResult, ExplainResponse, JobProgress, JobOut,
               ModelOut, MethodOut, ErrorBody, ErrorOut, SanityLevel, SanityMethod, SanityReport,
               SanityRequest, SanitySummary, SelfTestOut)
