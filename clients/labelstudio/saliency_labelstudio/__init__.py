"""A Label Studio ML backend: brush and rectangle pre-annotations from the saliency service, scored by the
explained class's probability or (SALIENCY_SCORE_BY=faithfulness) by the map's faithfulness
(faithfulness.py)."""
from .app import create_app
from .settings import BackendSettings

__all__ = ["create_app", "BackendSettings"]
