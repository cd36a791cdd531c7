"""Grad-CAM (Selvaraju et al., 2017): ReLU(sum_k mean_ij(d y_c / d A^k_ij) A^k), upsampled, min-max."""
from __future__ import annotations

import torch
from pydantic import Field

from ..errors import InvalidInput, quote
from .base import Attribution, MethodParams, ServedModel, SinglePassMethod
from .hooks import OutputCapture, get_layer
from .passes import class_scores, resolve_targets, widen
from .postprocess import minmax, upsample


class GradCAMParams(MethodParams):
    layer: str | None = Field(
        None, max_length=200, pattern=r"^[A-Za-z0-9_.]+$",
        description="dotted module path of the target layer (default: the model card's)")


class GradCAM(SinglePassMethod):
    name = "gradcam"
    title = "Grad-CAM (Selvaraju et al. 2017)"
    Params = GradCAMParams
    diagnostics = {"layer": "the layer whose activations and gradients made the map",
                   "layer_size": "that layer's (height, width): the map's resolution before upsampling"}

    def check_model(self, model: ServedModel, params: GradCAMParams) -> None:  # type: ignore[override]
        if params.layer is not None and params.layer not in model.cam_layers:
            raise InvalidInput(f"layer {quote(params.layer)} is not a layer of {model.name} usable by "
                               f"Grad-CAM (see GET /v1/models)", code="unknown_layer")

    def attribute_chunk(self, model, x, targets, params):
        path = params.layer or model.cam_layer
        if not path:
            raise ValueError("gradcam needs a layer: this model has no default target layer")
        layer = get_layer(model.module, path)
        with torch.enable_grad(), OutputCapture({path: layer}) as capture:
            logits = model.module(x.detach().requires_grad_(True))  # frozen weights: the graph hangs on x
        if not capture.records:
            raise ValueError(f"layer {path!r} produced no tensor output in the forward pass")
        # The first call of the layer; the backward stops there (only d score / d activation is computed).
        activation = capture.records[0].output
        targets = resolve_targets(logits, targets)
        (grad,) = torch.autograd.grad(class_scores(logits, targets).sum(), activation)
        activation = activation.detach()
        shift = getattr(layer, "folded_shift", None)  # a conv that absorbed a BatchNorm (service/zoo/fold.py)
        if shift is not None:  # its own output, as the unfolded model computes it, up to a per-channel scale
            activation = activation - shift.view(1, -1, 1, 1)  # that Grad-CAM's weights cancel
        # float32 from here on (under autocast the layer may be bf16/fp16)
        acts, grads = widen(model.reshape(activation)), widen(model.reshape(grad))
        if acts.dim() != 4:
            raise ValueError(f"layer {path!r} output has shape {tuple(activation.shape)}, not (B, C, h, w); "
                             "choose a convolutional layer or set the card's reshape transform")
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = (weights * acts).sum(1, keepdim=True)  # signed, at layer resolution
        heat = minmax(upsample(cam.clamp_min(0), tuple(x.shape[-2:])).squeeze(1))
        return Attribution(cam, heat, [{"layer": path, "layer_size": list(cam.shape[-2:])}
                                       for _ in range(x.shape[0])], logits.detach(), targets)
