"""Fold each eval-mode BatchNorm into the convolution that feeds it.

In eval mode a BatchNorm is a per-channel affine map, y = s * z + c with s = gamma / sqrt(var + eps) and
c = beta - s * mu, so conv-then-BatchNorm is one convolution with weights s * W and bias c: the same function
with one fewer op per layer. Each removed op is a full read and write of an activation in the forward and
again in the backward, so the input-gradient methods run faster on the CPU (bench/fold.py; docs/benchmarks.md,
section "BatchNorm folding"). On a GPU, where small passes wait on the host's kernel launches, each folded
BatchNorm is one launch fewer per pass.

What the methods see stays the same:
- every input-gradient method (gradient, IG, SmoothGrad, MoreauGrad) sees the same function of the input;
- FullGrad's bias terms are the same tensors: the folded conv's bias is the BatchNorm's bias c, applied to
  the same values (only bias-free convs are folded, so no two terms merge into one);
- a BatchNorm's output is the folded conv's output, so Grad-CAM at a BatchNorm layer is unchanged. At a
  folded conv, Grad-CAM subtracts the conv's `folded_shift` (c) from the activation, which gives exactly the
  unfolded map: with A' = s * A + c and dy/dA = s * dy/dA',
  sum_k mean(dy/dA_k) A_k = sum_k mean(dy/dA'_k) (A'_k - c_k).

The arithmetic is torch's (`fuse_conv_bn_weights`). Its graph-level fuser
(`torch.fx.experimental.optimization.fuse`) matches exact types only, so it skips timm's BatchNormAct2d,
and it returns a traced GraphModule. Here the pairs are found by running the model once and matching a conv's
output tensor with a BatchNorm's input, and the modules keep their paths. The folded model is then checked
against the original on a probe input, and kept only if the logits agree.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import fuse_conv_bn_weights

log = logging.getLogger(__name__)

RELATIVE_TOLERANCE = 1e-4  # of the largest logit: float32 rounding is ~1e-6 of it, a wrong fold far more


class NormActivation(nn.Module):
    """What remains of timm's BatchNormAct2d once its BatchNorm is folded: dropout, then the activation.
    The children keep their names (`drop`, `act`): layer paths and FullGrad's clamp hooks still find them."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _timm_class(name: str) -> type | None:
    """A layer class of timm's, or None without timm (torchvision and builtin models do not need it)."""
    try:
        import timm.layers
    except ImportError:
        return None
    return getattr(timm.layers, name, None)


def _linear_in_weight(conv: nn.Module) -> bool:
    """Convs whose forward uses `weight` as is (not e.g. timm's StdConv2d, which standardises it)."""
    return type(conv) in (nn.Conv2d, _timm_class("Conv2dSame"))


def _foldable_norm(norm: nn.Module) -> bool:
    return (type(norm) in (nn.BatchNorm2d, _timm_class("BatchNormAct2d")) and not norm.training
            and norm.running_mean is not None)


@dataclass(frozen=True)
class Pair:
    conv: str
    norm: str


def find_pairs(module: nn.Module, probe: torch.Tensor) -> list[Pair]:
    """(conv, BatchNorm) pairs where the BatchNorm's input is the conv's output, each module called once."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # holds the tensors, so no id is reused while we look
    calls: dict[str, int] = {}
    candidates: list[Pair] = []

    def conv_hook(name):
        def hook(_m, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            outputs[id(output)] = (name, output)
        return hook

    def norm_hook(name):
        def hook(_m, inputs):
            calls[name] = calls.get(name, 0) + 1
            found = outputs.get(id(inputs[0]))
            if found is not None and found[1] is inputs[0]:
                candidates.append(Pair(found[0], name))
        return hook

    handles = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d) and _linear_in_weight(m) and m.bias is None:
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif _foldable_norm(m):
            handles.append(m.register_forward_pre_hook(norm_hook(name)))
    try:
        with torch.no_grad():
            module(probe)
    finally:
        for handle in handles:
            handle.remove()
    per_conv = Counter(p.conv for p in candidates)  # one output into two BatchNorms: neither can take it
    return [p for p in candidates if calls[p.conv] == 1 and calls[p.norm] == 1 and per_conv[p.conv] == 1]


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _fold(module: nn.Module, pair: Pair) -> None:
    conv, norm = module.get_submodule(pair.conv), module.get_submodule(pair.norm)
    # What find_pairs matched: a Conv2d (timm's Conv2dSame is one) and an eval-mode BatchNorm2d (timm's
    # BatchNormAct2d is one) that keeps running statistics.
    assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
    assert norm.running_mean is not None and norm.running_var is not None
    with torch.no_grad():
        weight, bias = fuse_conv_bn_weights(conv.weight, None, norm.running_mean, norm.running_var, norm.eps,
                                            norm.weight, norm.bias)
    conv.weight, conv.bias = weight.requires_grad_(False), bias.requires_grad_(False)
    conv.register_buffer("folded_shift", bias.detach().clone())  # the conv had no bias: all of it is c
    if type(norm) is nn.BatchNorm2d:
        _replace(module, pair.norm, nn.Identity())
    else:
        _replace(module, pair.norm, NormActivation(norm.get_submodule("drop"), norm.get_submodule("act")))


def fold_batchnorms(module: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, int]:
    """The module with every foldable BatchNorm folded, and how many; the module itself, unchanged, with 0
    when nothing folds or the folded copy does not compute the same logits on `probe`."""
    pairs = find_pairs(module, probe)
    if not pairs:
        return module, 0
    folded = copy.deepcopy(module)
    for pair in pairs:
        _fold(folded, pair)
    # The check runs the convolutions in full float32: with TF32 (cuDNN's default on a GPU) both sides carry
    # ~1e-3 relative rounding of their own, above the bound, and no fold would ever pass on a GPU.
    cudnn = torch.backends.cudnn
    with torch.no_grad(), cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark,
                                      deterministic=cudnn.deterministic, allow_tf32=False):
        expected, got = module(probe).float(), folded(probe).float()
    error = (expected - got).abs().max().item()
    bound = RELATIVE_TOLERANCE * max(1.0, expected.abs().max().item())
    if not error <= bound:
        log.warning("BatchNorm folding changed the logits by %.3g (bound %.3g); serving the model unfolded",
                    error, bound)
        return module, 0
    return folded, len(pairs)
