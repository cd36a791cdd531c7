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


class ExplainResponse(BaseModel):
    model: str
    method: str
    params: dict[str, Any]
    results: list[ImageResult]


class JobProgress(BaseModel):
    done: int
    total: int


class JobOut(BaseModel):
    id: str
    method: str
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: JobProgress
    created: float
    result: ExplainResponse | None = None
    error: dict[str, Any] | None = None


class ModelOut(BaseModel):
    name: str
    architecture: str
    description: str = ""
    available: bool
    reason: str | None = None
    device: str | None = None
    input_size: list[int] | None = None
    num_classes: int | None = None
    default_layer: str | None = None
    layers: list[str] = Field(default_factory=list, description="layers usable by Grad-CAM")
    default: bool = False
    folded_batchnorms: int = Field(0, description="BatchNorms folded into the convolutions before them at "
                                                  "load (the same function; setting fold_batchnorm)")


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


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody
