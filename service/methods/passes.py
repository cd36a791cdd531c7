"""How the gradient methods run their passes: class scores, top-1 targets, input gradients in chunks that fit
the pass budget. The one gradient helper every gradient method uses: d logit[b, target_b] / d input."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Checkpoint = Callable[[], None]  # called before each forward pass; raises to stop the work (a cancelled call)


def no_checkpoint() -> None:
    """Nothing to check: the work is not cancellable (a direct library call)."""


def class_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits[b, targets[b]]: in eval mode the gradient of their sum is every image's own gradient."""
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


def widen(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (from autocast) to float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def resolve_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-1 means the image's top-1 class."""
    return torch.where(targets < 0, logits.argmax(1), targets)


def even_chunk(total: int, max_batch: int | None) -> int:
    """The pass size that splits `total` images into as few passes as `max_batch` allows, of equal size:
    10 noisy copies with a budget of 8 run as 5 + 5, not 8 + 2 (a pass of 2 costs more per image)."""
    if not max_batch or total <= max_batch:
        return max(total, 1)
    passes = -(-total // max_batch)
    return -(-total // passes)


def clean_logits(module: nn.Module, x: torch.Tensor, max_batch: int,
                 checkpoint: Checkpoint = no_checkpoint) -> torch.Tensor:
    outputs = []
    with torch.no_grad():
        for chunk in x.split(even_chunk(x.shape[0], max_batch)):
            checkpoint()
            outputs.append(module(chunk))
    return torch.cat(outputs)


def input_gradients(module: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                    max_batch: int | None = None, checkpoint: Checkpoint = no_checkpoint
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradients like x, target scores (B,)). Only the input's gradient is computed (no parameter grads)."""
    grads, scores = [], []
    step = even_chunk(x.shape[0], max_batch)
    for xc, tc in zip(x.split(step), targets.split(step), strict=True):
        checkpoint()
        with torch.enable_grad():
            xc = xc.detach().requires_grad_(True)
            score = class_scores(module(xc), tc)
            (grad,) = torch.autograd.grad(score.sum(), xc)
        grads.append(grad)
        scores.append(score.detach())
    return torch.cat(grads), torch.cat(scores)
