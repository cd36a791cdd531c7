"""The parameters of the detection methods, validated like the classifier methods' (422 naming the field).

Common to both: which detections are explained (the detector's own above `score_threshold`, at most
`max_detections` per image, by score; or the one matching `box` and `label`), and for D-RISE its masks.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .drise import DEFAULT_GRID, DEFAULT_MASKS, MAX_GRID, MAX_MASKS, MIN_GRID, MIN_MASKS


class DetectionParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="detections below this score are not "
                                                                   "returned (nor explained)")
    max_detections: int = Field(20, ge=1, le=100, description="at most this many detections per image, by "
                                                              "score; each gets a map")
    box: tuple[float, float, float, float] | None = Field(
        None, description="explain the detection that best matches this box (x1,y1,x2,y2 in pixels of the "
                          "upload; IoU >= 0.5, same label when `label` is given) instead of all")
    label: str | None = Field(None, max_length=200, description="with `box`: the detection's class name (or "
                                                                "index)")

    @field_validator("box", mode="before")
    @classmethod
    def _box_text(cls, value):
        """A form field gives the box as text: "x1,y1,x2,y2"."""
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            if len(parts) != 4:
                raise ValueError("box must be four numbers x1,y1,x2,y2")
            return tuple(parts)
        return value

    @field_validator("box")
    @classmethod
    def _box_order(cls, value):
        if value is not None:
            x1, y1, x2, y2 = value
            if not (x2 > x1 and y2 > y1 and min(value) >= 0):
                raise ValueError("box must be x1,y1,x2,y2 with x2 > x1 >= 0 and y2 > y1 >= 0")
        return value


class DriseParams(DetectionParams):
    """D-RISE (Petsiuk et al. 2021): the defaults are the paper's grid and keep probability; 1,000 masks
    rather than its 5,000 (bench/drise.py: the map's correlation with a high-N reference against the cost)."""

    n_masks: int = Field(DEFAULT_MASKS, ge=MIN_MASKS, le=MAX_MASKS,
                         description="random masks (the cost: forwards of the detector per image)")
    grid_size: int = Field(DEFAULT_GRID, ge=MIN_GRID, le=MAX_GRID,
                           description="the masks' coarse grid, s x s cells")
    keep_prob: float = Field(0.5, gt=0.0, lt=1.0, description="probability that a cell is kept")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the masks' random seed (same seed, same map)")
    early_stop: bool = Field(False, description="stop once the map stops changing (the masks used are "
                                                "reported)")


class BoxGradcamParams(DetectionParams):
    """Grad-CAM of each detection's score at the detector's backbone feature map."""

    layer: str | None = Field(None, max_length=300, description="the layer (default: the backbone's feature "
                                                                "map, GET /v1/models default_layer)")
