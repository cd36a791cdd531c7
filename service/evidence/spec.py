"""What a caller asks of the per-map metrics (`outputs=metrics`): validated like a method's parameters, part
of the batch and cache keys, and counted in the call's cost."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .curves import forwards_per_image


class MetricsParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(20, ge=2, le=100, description="K: the deletion and insertion curves remove or restore "
                                                     "the map's pixels in K equal steps (K + 1 points each)")
    replacement: Literal["blur", "black", "mean"] = Field(
        "blur", description="what a removed pixel becomes (and what insertion starts from): the image "
                            "blurred (Gaussian, 11 px, sigma 5, as RISE), black, or the image's per-channel "
                            "mean")

    @property
    def forwards(self) -> int:
        """Forward passes (no backward) per image: counted as passes in the call's cost."""
        return forwards_per_image(self.steps)
