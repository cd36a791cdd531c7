"""A Label Studio ML backend: brush and rectangle pre-annotations from the saliency service."""
from .app import create_app
from .settings import BackendSettings

__all__ = ["create_app", "BackendSettings"]
