"""Wire models of the pinned HTTP API (the Python client reuses these field names)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

Output = Literal["npy", "png", "overlay", "raw", "metrics"]
MapSize = Literal["original", "input"]


def _default_outputs() -> list[Output]:
    return ["npy"]


class ExplainRequest(BaseModel):
    """The JSON request form: images are base64-encoded image files."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model name (default: the server's default model)")
    images: list[str] = Field(..., min_length=1, description="base64 image files (PNG, JPEG, ...)")
    # strict: JSON true is not class 1
    targets: list[StrictInt | None] | None = Field(None,
                                                   description="class index per image; null = top-1 class")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    outputs: list[Output] = Field(
        default_factory=_default_outputs,
        description="npy (default), png, overlay, raw, metrics (the per-map metrics; the server's "
                    "metrics_by_default adds it to the default)")
    metrics: dict[str, Any] | None = Field(
        None, description="the per-map metrics' parameters (with outputs metrics): steps (K, 2-100, default "
                          "20), replacement (blur, black, mean; default blur)")
    size: MapSize = Field("original", description="map at the original image size or the model input size")


class JobRequest(ExplainRequest):
    """The JSON form of POST /v1/jobs: a call whose method the body names (the path names it for
    /v1/explain/{method})."""

    method: str = Field(..., description="the method: one of GET /v1/methods")


class ClassScore(BaseModel):
    index: int
    label: str
    probability: float


class MapOut(BaseModel):
    height: int
    width: int
    npy: str | None = Field(None, description="base64 .npy, float32 HxW in [0, 1]")
    png: str | None = Field(None, description="base64 8-bit grayscale PNG")
    overlay: str | None = Field(None, description="base64 PNG: colour heat map blended on the image")


class Timing(BaseModel):
    queue: float
    compute: float


class ImageResult(BaseModel):
    target: int
    label: str
    probability: float
    top_k: list[ClassScore]
    map: MapOut
    raw: str | None = Field(None, description="base64 .npy of the signed attribution (when asked)")
    diagnostics: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] | None = Field(
        None, description="with outputs metrics: deletion_auc, insertion_auc and the same for a random order "
                          "of the pixels (_random), their curves, steps, replacement, stability (stochastic "
                          "methods; else null)")
    timing_ms: Timing


class DetectionOut(BaseModel):
    """One detection of a detector's answer, and its map ("why did the model put this box here?")."""

    box: list[float] = Field(description="x1, y1, x2, y2 in pixels of the uploaded image")
    label: str
    label_index: int
    score: float = Field(description="the detector's score of the box")
    map: MapOut
    diagnostics: dict[str, Any] = Field(default_factory=dict)


class DetectionTiming(BaseModel):
    compute: float


class DetectionImageResult(BaseModel):
    """One image's answer from a detection model (task detection): a map per detection explained."""

    width: int = Field(description="of the uploaded image, in pixels (the boxes' frame)")
    height: int
    detections: list[DetectionOut] = Field(description="by score; empty when the detector finds nothing "
                                                       "above score_threshold")
    timing_ms: DetectionTiming


class ExplainResponse(BaseModel):
    model: str
    method: str
    task: Literal["classification", "detection"] = Field(
        "classification", description="the model's task (GET /v1/models): classification answers one map "
                                      "per image (ImageResult), detection one per detection "
                                      "(DetectionImageResult); absent means classification")
    params: dict[str, Any]
    results: list[ImageResult] | list[DetectionImageResult]


class JobProgress(BaseModel):
    done: int
    total: int


class SanityLevel(BaseModel):
    layers: list[str] = Field(description="the blocks this level randomises (it also keeps the levels above "
                                          "it randomised: cumulative, from the logits down)")
    spearman: float = Field(description="mean over the photos of the rank correlation of the map before and "
                                        "after randomising down to this level")
    spearman_abs: float | None = Field(None, description="the same on the per-pixel sum of |attribution| "
                                                         "(methods with signed per-pixel attributions)")
    constant_maps: int = Field(0, description="randomised maps that are constant (each counts 0)")


class SanityMethod(BaseModel):
    levels: list[SanityLevel]
    random_target: dict[str, float | None] = Field(
        description="spearman: the map for a random other class against the top class's")
    cross_image: dict[str, float | None] = Field(
        description="spearman: the maps of different photos against each other (context for a failure)")
    verdict: Literal["pass", "fail"]
    reason: str = Field(description="why, in one line")


class SanityReport(BaseModel):
    """A model's sanity report (docs/sanity.md): cascading parameter randomisation and the random-class
    check, per method, on the shipped photos."""

    model: str
    images: int
    methods: dict[str, SanityMethod]
    skipped: dict[str, str] = Field(default_factory=dict,
                                    description="methods that do not apply to this model, with the reason")
    seed: int
    profile: Literal["quick", "full"]
    params: dict[str, dict[str, Any]] = Field(description="each method's parameters in this report")
    photos: list[str]
    weights_sha256: str = Field(description="the served weights the report is of (reports are kept per "
                                            "weights, profile, seed and methods)")
    device: str
    elapsed_s: float
    created: float


class SanityRequest(BaseModel):
    """POST /v1/models/{name}/sanity's optional JSON body."""

    model_config = ConfigDict(extra="forbid")

    methods: list[str] | None = Field(None, min_length=1, max_length=64,
                                      description="the methods to check (default: every method)")
    seed: StrictInt = Field(0, ge=0, le=2**31 - 1,
                            description="of the randomised weights and the random other classes: the same "
                                        "seed, the same report")
    profile: Literal["quick", "full"] = Field(
        "quick", description="quick: the iterative methods at a fraction of their defaults (IG 16 steps, "
                             "SmoothGrad 8 samples, MoreauGrad 10 x 4), minutes on a CPU; full: every method "
                             "at its defaults (hours on a CPU for MoreauGrad)")
    refresh: bool = Field(False, description="compute again even when a report of these weights, profile, "
                                             "seed and methods is kept")


class SanitySummary(BaseModel):
    status: Literal["queued", "running", "done", "failed", "cancelled"] = Field(
        description="of the model's newest sanity job (done: its report is in methods)")
    job_id: str | None = None
    methods: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="per method of the newest finished report: verdict (pass or fail) "
                                          "and reason; GET /v1/models/{name}/sanity has the whole report")


class JobOut(BaseModel):
    id: str
    method: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: JobProgress
    created: float
    result: ExplainResponse | SanityReport | None = Field(
        None, description="when succeeded: the explanation, or for a sanity job (method \"sanity\") the "
                          "report")
    error: dict[str, Any] | None = None


class SelfTestOut(BaseModel):
    passed: bool = Field(description="every method that applies kept its invariants at load (finite, "
                                     "non-constant maps and logits)")
    problems: dict[str, list[str]] = Field(default_factory=dict, description="per method, what it broke")


class ModelOut(BaseModel):
    name: str
    architecture: str
    description: str = ""
    task: Literal["classification", "detection"] = Field(
        "classification", description="classification: the methods of GET /v1/methods; detection: an object "
                                      "detector (D-RISE, per-box maps)")
    available: bool
    reason: str | None = None
    device: str | None = None
    input_size: list[int] | None = None
    num_classes: int | None = None
    default_layer: str | None = None
    layers: list[str] = Field(default_factory=list, description="layers usable by Grad-CAM")
    pass_batch: int | None = Field(None, description="a detector's pass budget: most masked images per "
                                                     "forward of D-RISE, from measured memory on a GPU, "
                                                     "the cpu_pass_batch setting on a CPU")
    default: bool = False
    folded_batchnorms: int = Field(0, description="BatchNorms folded into the convolutions before them at "
                                                  "load (the same function; setting fold_batchnorm)")
    sanity: SanitySummary | None = Field(None, description="its sanity report's verdicts (POST "
                                                           "/v1/models/{name}/sanity); null: never asked for")
    methods: list[str] | None = Field(None, description="the methods that apply to it (its self-test at "
                                                        "load); null: not self-tested (self_test_at_load)")
    methods_not_applicable: dict[str, str] = Field(
        default_factory=dict, description="the methods that do not apply, with the reason (they answer 422 "
                                          "method_not_applicable)")
    self_test: SelfTestOut | None = None


Task = Literal["classification", "detection"]


def _classification() -> list[Task]:
    return ["classification"]


class MethodOut(BaseModel):
    name: str
    title: str
    cost: str = Field(description="forward+backward passes per image, in words (\"n_steps passes\")")
    cost_factors: list[str] = Field(default_factory=list, description="the parameters whose product is the "
                                    "passes per image (none: 1 pass)")
    passes_at_defaults: int = Field(1, description="passes per image at the default parameters")
    iterative: bool = Field(False, description="its passes run one after another and report progress: long "
                            "work, best sent as a job (POST /v1/jobs)")
    diagnostics: dict[str, str] = Field(default_factory=dict, description="what each result's `diagnostics` "
                                        "holds, name -> meaning")
    parameters: dict[str, Any] = Field(description="JSON schema of the parameters (types, defaults, bounds)")
    metrics_forwards_at_defaults: int = Field(
        description="forward passes (no backward) per image that outputs=metrics adds at the default steps: "
                    "4 (K - 1) + 1 for K steps (metrics_steps); 0 where the metrics do not apply (detectors)")
    tasks: list[Task] = Field(default_factory=_classification,
                              description="the models it explains, by their task (GET /v1/models `task`)")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody
