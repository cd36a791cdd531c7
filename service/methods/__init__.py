"""Saliency methods: one module each, one verb (`attribute`), an explicit registry by wire name.

Adding a method: its module, one line in `_BUILTIN` below, and its tests (docs/adding-a-method.md). A plugin
or a test registers one at run time with `register_method`.
"""
from ..errors import quote
from .attention_relevance import AttentionRelevance
from .base import Attribution, Explainee, Method, MethodParams, Progress, ServedModel
from .fullgrad import FullGrad
from .gradcam import GradCAM
from .gradient import Gradient
from .integrated_gradients import IntegratedGradients
from .moreaugrad import MoreauGrad
from .smoothgrad import SmoothGrad

# In the order GET /v1/methods lists them (the viewer checks the first by default).
_BUILTIN: tuple[type[Method], ...] = (GradCAM, IntegratedGradients, SmoothGrad, FullGrad, MoreauGrad,
                                      Gradient, AttentionRelevance)

METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Serve `method` under its `name` (a ValueError if the name is taken)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is registered already")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise LookupError(f"unknown method {quote(name)}; available: {sorted(METHODS)}") from None


for _method in _BUILTIN:
    register_method(_method())

__all__ = ["METHODS", "Attribution", "Explainee", "Method", "MethodParams", "Progress", "ServedModel",
           "get_method", "register_method", "unregister_method"]
