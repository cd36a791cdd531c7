"""Model zoo: cards, safe loading, preprocessing, labels."""
from .cards import CardError, ModelCard, read_card
from .preprocess import Preprocessor
from .registry import (
    LoadedModel,
    ModelRegistry,
    UnavailableModel,
    load_model,
    resolve_device,
    set_cudnn_autotuning,
)

__all__ = ["CardError", "LoadedModel", "ModelCard", "ModelRegistry", "Preprocessor", "UnavailableModel",
           "load_model", "read_card", "resolve_device", "set_cudnn_autotuning"]
