"""Where a call's items run: the backend seam (base.py) and its embedded implementation (embedded.py); the Ray
Serve one lives in service/distributed/ray_backend.py."""
from .base import LANES, Backend, CallItem, JobBook
from .embedded import EmbeddedBackend

__all__ = ["LANES", "Backend", "CallItem", "EmbeddedBackend", "JobBook"]
