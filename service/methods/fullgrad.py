"""FullGrad (Srinivas & Fleuret, 2019): input-gradient x input plus every bias-gradient, as a map.

Decomposition: f(x) = sum(grad_x f * x) + sum over layers of sum(grad_z f * b), exact for piecewise-linear
nets. Clamping activations (ReLU6, Hardtanh) are piecewise linear with constant pieces: a unit clipped at 6
outputs 6 whatever its input, an implicit bias counted like the others (without it the decomposition of
EfficientNet-Lite0 missed 12% to 240% of the score). Each image's completeness gap is reported; SiLU/sigmoid
nets are flagged, not hidden.

Each bias runs along its layer's channel dim: dim 1 for conv/BatchNorm outputs (N, C, ...), the last dim for
nn.Linear, whatever its leading dims. The map is defined for CNNs: the input term plus the conv/BatchNorm (and
clipped-unit) terms with a channel dim 1 and spatial dims; Linear terms of a CNN's head, (N, C), enter the
completeness sum only. A Linear acting on tokens (N, T, C) or channels-last features (N, H, W, C) (ViT, Swin,
ConvNeXt) carries a bias with no place in that map, so such models are refused (FullGradUnsupported, a
ValueError: the API answers 422 with its message) rather than explained with most of their biases missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Attribution, MethodParams, SinglePassMethod
from .hooks import ClampCapture, GradientCapture
from .passes import class_scores, resolve_targets
from .postprocess import minmax, minmax_channel_sum, per_image_sum, upsample

COMPLETE_TOLERANCE = 1e-3  # relative gap under which the decomposition counts as complete (float32 noise)


class FullGradParams(MethodParams):
    pass


def bias_layers(module: nn.Module) -> tuple[dict[str, nn.Module], set[str], dict[str, torch.Tensor]]:
    """Modules to hook, the ones hooked on their input, and each one's effective bias.

    BatchNorm's bias is folded: beta - mu * gamma / sqrt(var + eps). timm fuses BatchNorm with its activation
    (BatchNormAct2d); there the BatchNorm output is the input of the `act` submodule, so that is hooked.
    """
    hooked, pre_input, biases = {}, set(), {}
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not m.track_running_stats or m.running_mean is None or m.running_var is None:
                continue
            gamma = m.weight if m.affine else torch.ones_like(m.running_mean)
            beta = m.bias if m.affine else torch.zeros_like(m.running_mean)
            bias = beta - m.running_mean * gamma / torch.sqrt(m.running_var + m.eps)
            act = getattr(m, "act", None)
            if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
                key = f"{name}.act"
                hooked[key] = act
                pre_input.add(key)
            else:
                key = name
                hooked[key] = m
            biases[key] = bias.detach()
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            hooked[name] = m
            biases[name] = m.bias.detach()
    return hooked, pre_input, biases


def clamp_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Activations whose clipped units are implicit biases (ReLU6 is a Hardtanh from 0 to 6)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Hardtanh)}


class FullGradUnsupported(ValueError):
    """A model FullGrad is not defined for. A ValueError: every runtime answers 422 with its message."""


# Kinds of term: a bias along dim 1 (conv/BatchNorm), a bias along the last dim (Linear), clipped units.
CHANNEL, LINEAR, CLAMP = "channel", "linear", "clamp"


def _bias_term(grad: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.Tensor:
    """grad_z f * b, with b broadcast along the layer's channel dim: dim 1 for conv/BatchNorm outputs
    (N, C, ...); the last dim for nn.Linear, whose bias runs along its output's last dim whatever the leading
    dims ((N, C), tokens (N, T, C), channels-last (N, H, W, C))."""
    bias = bias.to(grad.dtype)
    if kind == LINEAR:
        return grad * bias
    return grad * bias.view((1, -1) + (1,) * (grad.dim() - 2))


@dataclass
class Decomposition:
    """f(x) = sum(input_term) + sum of every term's sum, per image (exact for piecewise-linear nets;
    FullGrad's attribute_chunk sums them as it builds the map).

    The bias terms are made one at a time from the captured gradients (`terms()`), never all held at once."""

    logits: torch.Tensor
    targets: torch.Tensor
    score: torch.Tensor  # (B,) logits[b, targets[b]]
    input_term: torch.Tensor  # grad_x f * x
    bias_records: list  # hooks.Record per bias layer: its name and the gradient reaching its output
    clamp_records: list  # hooks.Record per clamping activation: gradient and the clipped units' constants
    biases: dict[str, torch.Tensor]
    kinds: dict[str, str]  # bias layer -> CHANNEL | LINEAR

    def terms(self):
        """(layer name, CHANNEL | LINEAR | CLAMP, term shaped like the layer's output) in forward order:
        grad_z f * b per bias layer, then grad_out f * constant per clamping activation. A record without a
        gradient is a layer that did not influence the score (e.g. an unused head)."""
        dtype = self.input_term.dtype
        for record in self.bias_records:
            if record.grad is not None:
                kind = self.kinds[record.name]
                yield record.name, kind, _bias_term(record.grad.to(dtype), self.biases[record.name], kind)
        for record in self.clamp_records:
            if record.grad is not None:
                yield record.name, CLAMP, record.grad.to(dtype) * record.output.to(dtype)

    def refuse_token_models(self) -> None:
        """FullGrad's map is a CNN's: refuse a model with a Linear layer acting on tokens or channels-last
        features. Checked on the gradients' shapes (those of the layers' outputs), before any term is made."""
        for record in self.bias_records:
            grad = record.grad
            if grad is not None and self.kinds[record.name] == LINEAR and grad.dim() > 2:
                raise FullGradUnsupported(
                    f"FullGrad needs a CNN: Linear layer {record.name!r} acts on tokens or channels-last "
                    f"features (its output is {tuple(grad.shape[1:])} per image, not a feature vector), as "
                    f"in ViT, Swin or ConvNeXt; its bias has no place in FullGrad's per-pixel map. Explain "
                    f"this model with another method of GET /v1/methods")


def decompose(module: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> Decomposition:
    """One forward and one backward: what each image's target score decomposes into."""
    hooked, pre_input, biases = bias_layers(module)
    kinds = {name: LINEAR if isinstance(m, nn.Linear) else CHANNEL for name, m in hooked.items()}
    with torch.enable_grad(), GradientCapture(hooked, pre_input) as capture, \
            ClampCapture(clamp_layers(module)) as clamps:
        xg = x.detach().requires_grad_(True)
        logits = module(xg)
        targets = resolve_targets(logits, targets)
        score = class_scores(logits, targets)
        (grad_x,) = torch.autograd.grad(score.sum(), xg)  # fires the tensor hooks of every bias layer
    return Decomposition(logits, targets, score, grad_x * x, capture.records, clamps.records, biases, kinds)


class FullGrad(SinglePassMethod):
    name = "fullgrad"
    title = "FullGrad (Srinivas & Fleuret 2019)"
    Params = FullGradParams
    diagnostics = {"completeness_gap": "|score - sum of the map's terms| / |score|: 0 for a piecewise-linear "
                                       "net (SiLU/sigmoid nets are not)",
                   "complete": f"completeness_gap <= {COMPLETE_TOLERANCE:g}",
                   "score": "the explained class's logit",
                   "bias_layers": "bias terms in the decomposition",
                   "clamp_layers": "clipping activations (ReLU6) counted as implicit biases"}

    def attribute_chunk(self, model, x, targets, params):
        parts = decompose(model.module, x, targets)
        parts.refuse_token_models()
        size = tuple(x.shape[-2:])
        total = per_image_sum(parts.input_term)
        saliency = minmax_channel_sum(parts.input_term.abs())
        for _, kind, term in parts.terms():
            total = total + per_image_sum(term)
            if kind != LINEAR and term.dim() == 4:  # (N, C, H, W): conv/BatchNorm biases and clipped units
                # Channel sum before upsampling: bilinear interpolation is linear, so this equals the
                # reference's upsample-then-sum without a (B, C, H, W) tensor per layer.
                layer_map = minmax_channel_sum(term.abs())
                saliency = saliency + upsample(layer_map, size, align_corners=True)
        score = parts.score.detach().to(x.dtype)
        gaps = ((score - total).abs() / score.abs().clamp_min(1e-12)).tolist()
        diagnostics = [{"completeness_gap": g, "complete": g <= COMPLETE_TOLERANCE, "score": s,
                        "bias_layers": len(parts.bias_records), "clamp_layers": len(parts.clamp_records)}
                       for g, s in zip(gaps, score.tolist(), strict=True)]
        return Attribution(saliency.detach(), minmax(saliency.squeeze(1)).detach(), diagnostics,
                           parts.logits.detach(), parts.targets)
