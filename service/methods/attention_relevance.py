"""Gradient-weighted attention relevance for Vision Transformers (Chefer, Gur & Wolf, ICCV 2021, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", the self-attention
rule, their eqs. 5-6).

R = I (tokens x tokens); for each self-attention block in forward order, with A its softmax attention
probabilities (heads x tokens x tokens) and grad A the gradient of the target class's logit with respect to
them: Abar = mean over heads of (grad A * A) clamped at 0 (clamped per head, then averaged, as the reference
code), R <- R + Abar R. The map is the readout token's row of R over the patch tokens, on the patch grid,
upsampled bilinearly to the input and min-maxed like Grad-CAM's.

Chosen over the CVPR 2021 LRP-based rule of the same authors because it needs no relevance rule per layer
(it runs on timm's models as they are) and over attention rollout (Abnar & Zuidema 2020) because rollout has
no gradient: the same map for every class. One forward and one backward.

timm's `Attention` runs fused scaled-dot-product attention, which never forms A: for the call its `fused_attn`
is switched off (counted per module, so concurrent calls on a shared model restore it once, after the last),
and a forward hook on its `attn_drop` (the identity in eval mode) keeps A, from the calling thread only
(hooks.py). The model is not edited; a concurrent forward on another thread meanwhile runs the unfused path,
the same attention computed in another order.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInput, quote
from .base import Attribution, MethodParams, ServedModel, SinglePassMethod
from .hooks import Record, _Capture
from .passes import class_scores, resolve_targets, widen
from .postprocess import minmax, upsample

# The readouts of timm's ViTs (`global_pool`, and DeiT's distillation head) and what the map reads for each.
CLASS_TOKEN = "class token"
CLASS_AND_DISTILLATION = "mean of the class and distillation tokens"
MEAN_OF_PATCHES = "mean of the patch tokens"
MEAN_OF_TOKENS = "mean of all tokens"


class AttentionRelevanceParams(MethodParams):
    pass


@dataclass(frozen=True)
class TokenLayout:
    """What the map is read from in a ViT: its attention blocks (dotted path -> module, forward order), the
    tokens ahead of the patches (class, distillation, registers) and the readout its classifier uses."""

    attentions: dict[str, nn.Module]
    prefix: int
    readout: str

    def readout_weights(self, tokens: int, device: torch.device) -> torch.Tensor:
        """(tokens,): the weights of R's rows the readout averages."""
        w = torch.zeros(tokens, device=device)
        if self.readout == CLASS_TOKEN:
            w[0] = 1.0
        elif self.readout == CLASS_AND_DISTILLATION:
            w[:2] = 0.5
        elif self.readout == MEAN_OF_PATCHES:
            w[self.prefix:] = 1.0 / (tokens - self.prefix)
        else:
            w[:] = 1.0 / tokens
        return w


def _refuse(model_name: str, why: str) -> InvalidInput:
    return InvalidInput(f"attention-relevance explains Vision Transformers: {model_name} {why}; explain it "
                        f"with another method of GET /v1/methods")


def attention_blocks(module: nn.Module) -> dict[str, nn.Module]:
    """timm `Attention` modules by dotted path, in registration order. When timm.layers was never imported no
    such module can exist, so a CNN is answered without importing timm."""
    layers = sys.modules.get("timm.layers")
    if layers is None:
        return {}
    return {name: m for name, m in module.named_modules() if isinstance(m, layers.Attention)}


def token_layout(module: Any, model_name: str = "this model") -> TokenLayout:
    """The model's layout, or InvalidInput saying why the method does not apply to it (`module`: an
    nn.Module, read by the attributes timm's ViTs have)."""
    attentions = attention_blocks(module)
    if not attentions:
        raise _refuse(model_name, "has no self-attention blocks (timm's Attention) whose attention "
                                  "probabilities the relevance is made of; a CNN has none")
    missing = [a for a in ("num_prefix_tokens", "global_pool", "patch_embed") if not hasattr(module, a)]
    if missing:
        raise _refuse(model_name, f"has attention blocks but not a ViT's token layout (no "
                                  f"{', '.join(missing)})")
    if getattr(module, "attn_pool", None) is not None:
        raise _refuse(model_name, "reads its tokens out through an attention-pooling head (global_pool "
                                  f"{quote(module.global_pool)}), which the relevance rule does not cover")
    prefix, pool = int(module.num_prefix_tokens), module.global_pool
    if pool == "token" and getattr(module, "head_dist", None) is not None and prefix >= 2:
        readout = CLASS_AND_DISTILLATION  # DeiT-distilled: the logits average the two heads (eval mode)
    elif pool == "token" and getattr(module, "has_class_token", prefix > 0):
        readout = CLASS_TOKEN
    elif pool == "avg":
        readout = MEAN_OF_TOKENS if getattr(module, "pool_include_prefix", False) else MEAN_OF_PATCHES
    else:
        raise _refuse(model_name, f"pools its tokens with global_pool {quote(pool)}; the map is read from "
                                  "the class token ('token') or the mean of the patch tokens ('avg')")
    return TokenLayout(attentions, prefix, readout)


def patch_grid(module: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of patches for an input of `size`: the patch embedding's, per input when the model
    takes any size."""
    embed: Any = module.patch_embed
    if getattr(module, "dynamic_img_size", False) and hasattr(embed, "dynamic_feat_size"):
        rows, cols = embed.dynamic_feat_size(size)
    else:
        rows, cols = embed.grid_size
    return int(rows), int(cols)


# Per Attention module: how many calls hold it unfused, and the `fused_attn` to restore after the last.
_UNFUSED: weakref.WeakKeyDictionary[nn.Module, list[Any]] = weakref.WeakKeyDictionary()
_UNFUSED_LOCK = threading.Lock()


@contextlib.contextmanager
def unfused(attentions: Sequence[Any]) -> Iterator[None]:
    """Switch `fused_attn` off on `attentions` while inside, restoring each module's own value on exit (an
    exception too). Counted per module: overlapping calls from several threads restore it once, after the
    last leaves, never in the middle of another's pass."""
    with _UNFUSED_LOCK:
        for attention in attentions:
            entry = _UNFUSED.get(attention)
            if entry is None:
                _UNFUSED[attention] = [1, attention.fused_attn]
                attention.fused_attn = False
            else:
                entry[0] += 1
    try:
        yield
    finally:
        with _UNFUSED_LOCK:
            for attention in attentions:
                entry = _UNFUSED[attention]
                entry[0] -= 1
                if entry[0] == 0:
                    attention.fused_attn = entry[1]
                    del _UNFUSED[attention]


class AttentionCapture(_Capture):
    """The attention probabilities each hooked `attn_drop` passes on (its output is its input in eval mode),
    in call order, as the graph saw them: `torch.autograd.grad(score, record.output)` is d score / d A. Not
    copied: nothing modifies A in place after it (timm's `attn @ v`)."""

    def _register(self, name, module):
        def hook(_module, _inputs, output):
            if self._mine() and isinstance(output, torch.Tensor):
                self.records.append(Record(name, output))

        return module.register_forward_hook(hook)


def capture_attention(module: nn.Module, layout: TokenLayout, x: torch.Tensor
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One forward pass, unfused, keeping every block's attention probabilities A (B, heads, N, N) in forward
    order as the graph saw them: (those A, the logits)."""
    drops: dict[str, nn.Module] = {f"{name}.attn_drop": attention.get_submodule("attn_drop")
                                   for name, attention in layout.attentions.items()}
    with torch.enable_grad(), unfused(list(layout.attentions.values())), AttentionCapture(drops) as capture:
        logits = module(x.detach().requires_grad_(True))  # frozen weights: the graph hangs on x
    attentions = [r.output for r in capture.records if r.output is not None]
    tokens = attentions[0].shape[-1] if attentions else 0
    if not attentions or any(a.dim() != 4 or a.shape[-2:] != (tokens, tokens) for a in attentions):
        shapes = [tuple(a.shape[1:]) for a in attentions]
        raise ValueError("attention-relevance found no (heads, tokens, tokens) attention probabilities of "
                         f"one token sequence in the forward pass: {shapes}")
    return attentions, logits


def relevance(attentions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              readout: torch.Tensor) -> torch.Tensor:
    """readout^T R for each image: (B, N), with A and grad A (B, heads, N, N) per block in forward order and
    `readout` (N,) the weights of R's rows the classifier reads.

    R = (I + Abar_L) ... (I + Abar_1), so its readout row is propagated from the last block down as a row
    vector, u <- u + u Abar_l: N^2 per block and image instead of the N^3 of updating all of R."""
    u = readout.to(widen(attentions[0]).dtype).expand(attentions[0].shape[0], -1).unsqueeze(1)  # (B, 1, N)
    for a, g in zip(reversed(attentions), reversed(grads), strict=True):
        abar = (widen(g) * widen(a)).clamp_min(0).mean(1)  # (B, N, N)
        u = u + u @ abar
    return u.squeeze(1)


class AttentionRelevance(SinglePassMethod):
    name = "attention-relevance"
    title = "Gradient-weighted attention relevance (Chefer et al. 2021)"
    Params = AttentionRelevanceParams
    diagnostics = {"grid": "the patch grid (rows, columns): the map's resolution before upsampling",
                   "blocks": "self-attention blocks whose gradient-weighted attention made the map",
                   "readout": "the tokens whose row of R is the map: the class token, the mean of the class "
                              "and distillation tokens (DeiT-distilled) or the mean of the patch tokens "
                              "(global_pool 'avg')",
                   "prefix_tokens": "tokens ahead of the patches (class, distillation, registers), dropped "
                                    "from the map"}

    def check_model(self, model: ServedModel, params: AttentionRelevanceParams) -> None:  # type: ignore[override]
        module = getattr(model, "module", None)  # a served LoadedModel has it; else refused at attribute time
        if isinstance(module, nn.Module):
            token_layout(module, quote(model.name))

    def attribute_chunk(self, model, x, targets, params):
        module, size = model.module, (x.shape[-2], x.shape[-1])
        layout = token_layout(module)
        attentions, logits = capture_attention(module, layout, x)
        targets = resolve_targets(logits, targets)
        grads = torch.autograd.grad(class_scores(logits, targets).sum(), attentions, allow_unused=True,
                                    materialize_grads=True)
        tokens = attentions[0].shape[-1]
        rows, cols = patch_grid(module, size)
        if rows * cols != tokens - layout.prefix:
            raise ValueError(f"attention-relevance: {tokens} tokens are not {layout.prefix} prefix tokens "
                             f"and a {rows} x {cols} patch grid")
        row = relevance(attentions, grads, layout.readout_weights(tokens, x.device)).detach()
        grid = row[:, layout.prefix:].reshape(-1, 1, rows, cols)
        heat = minmax(upsample(grid, size).squeeze(1))
        diagnostics = [{"grid": [rows, cols], "blocks": len(attentions), "readout": layout.readout,
                        "prefix_tokens": layout.prefix} for _ in range(x.shape[0])]
        return Attribution(grid, heat, diagnostics, logits.detach(), targets)
