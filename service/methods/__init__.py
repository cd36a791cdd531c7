"""Saliency methods: one module each, one verb (`attribute`), an explicit registry by wire name."""
from .base import Attribution, Explainee, Method, MethodParams, Progress
from .fullgrad import FullGrad
from .gradcam import GradCAM
from .gradient import Gradient
from .integrated_gradients import IntegratedGradients
from .moreaugrad import MoreauGrad
from .smoothgrad import SmoothGrad

METHODS: dict[str, Method] = {m.name: m for m in (GradCAM(), IntegratedGradients(), SmoothGrad(), FullGrad(),
                                                    MoreauGrad(), Gradient())}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise LookupError(f"unknown method {name!r}; available: {sorted(METHODS)}") from None


__all__ = ["METHODS", "Attribution", "Explainee", "Method", "MethodParams", "Progress", "get_method"]
