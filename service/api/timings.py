"""GET /v1/timings: the server's recent seconds per pass and its queues' waits, for estimates before a run
(the viewer's cost line; service/timings.py records them)."""
from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ..backends import LANES
from .deps import RuntimeDep
from .schemas import ErrorOut

router = APIRouter(prefix="/v1", tags=["catalog"])


class PassRateOut(BaseModel):
    model: str
    method: str
    seconds_per_pass: float = Field(description="compute seconds per forward+backward pass of this model and "
                                                "method, over its recent images (an image batched with "
                                                "others counts its whole batch: on the long side)")
    images: int = Field(description="how many recent images the figure is from (at most 20)")


class TimingsOut(BaseModel):
    rates: list[PassRateOut] = Field(description="per model and method that ran since the server started; "
                                                 "none before its first answer")
    queue_s: dict[str, float | None] = Field(
        description="per lane (interactive, bulk): seconds until work queued now would likely start; null "
                    "when the lane has not timed a batch yet")
    bulk_above_passes: int = Field(description="a call of more passes per image than this runs on the bulk "
                                               "lane (setting bulk_cost)")


@router.get("/timings", operation_id="recent_timings", response_model=TimingsOut,
            responses={503: {"model": ErrorOut}})
async def recent_timings(runtime: RuntimeDep) -> TimingsOut:
    """Recent seconds per pass per model and method, and each lane's expected wait: a run of P passes per
    image takes about P x seconds_per_pass once it starts."""
    runtime.require_ready()
    return TimingsOut(rates=[PassRateOut(model=r.model, method=r.method, seconds_per_pass=r.seconds_per_pass,
                                         images=r.images) for r in runtime.timings.rates()],
                      queue_s={lane: runtime.backend.start_estimate(lane) for lane in LANES},
                      bulk_above_passes=runtime.settings.bulk_cost)
