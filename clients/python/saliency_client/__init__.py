"""Thin client for the saliency HTTP service: `Client`, `AsyncClient`, typed results and errors."""
from .client import AsyncClient, Client
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    DeadlineExceededError,
    JobFailedError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    SaliencyError,
    ServerError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from .regions import SalientRegion, salient_region, salient_region_in_box
from .results import (
    AnyExplanation,
    Detection,
    DetectionExplanation,
    Explanation,
    ImageDetections,
    ImageExplanation,
    Job,
)

__all__ = [
    "Client", "AsyncClient", "Explanation", "ImageExplanation", "DetectionExplanation", "ImageDetections",
    "Detection", "AnyExplanation", "Job", "SalientRegion", "salient_region",
    "salient_region_in_box",
    "SaliencyError", "APIConnectionError", "APITimeoutError", "APIStatusError", "BadRequestError",
    "AuthenticationError", "NotFoundError", "PayloadTooLargeError", "UnsupportedMediaTypeError",
    "ValidationError", "RateLimitError", "ServerError", "ServiceUnavailableError", "DeadlineExceededError",
    "JobFailedError",
]
__version__ = "0.1.0"
