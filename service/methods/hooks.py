"""Forward-hook captures owned by a context manager: registered on enter, always removed on exit.

Hooks live on the (shared) model, so each capture records only calls made from the thread that opened it;
a concurrent forward pass on another thread passes through untouched.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn


def get_layer(module: nn.Module, path: str) -> nn.Module:
    """A submodule by dotted path; ValueError naming the path when it does not exist."""
    try:
        return module.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"layer {path!r} does not exist in this model") from exc


@dataclass(eq=False)
class Record:
    name: str
    output: torch.Tensor | None = None
    grad: torch.Tensor | None = None


@dataclass(eq=False)
class _Capture:
    modules: dict[str, nn.Module]
    records: list[Record] = field(default_factory=list)
    _handles: list = field(default_factory=list)
    _owner: int = 0

    def __enter__(self):
        self._owner = threading.get_ident()
        try:
            for name, module in self.modules.items():
                self._handles.append(self._register(name, module))
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _mine(self) -> bool:
        return threading.get_ident() == self._owner

    def _wants_grad(self, tensor) -> bool:
        return self._mine() and isinstance(tensor, torch.Tensor) and tensor.requires_grad

    def _keep_grad(self, name: str, tensor: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Record the gradient that will reach `tensor` in the next backward (with `kept`, a detached
        payload).

        The record must not hold the tensor: tensor -> hook -> record -> tensor would be a cycle through
        autograd's C++ side that Python's garbage collector cannot free (a leak per call)."""
        record = Record(name, output=kept)
        self.records.append(record)

        def keep(grad: torch.Tensor) -> None:
            record.grad = grad

        tensor.register_hook(keep)

    def _register(self, name: str, module: nn.Module):
        raise NotImplementedError


class OutputCapture(_Capture):
    """Keeps each module's output as the graph saw it and hands the rest of the network a copy.

    The copy matters when a later op works in place (torchvision's `out += identity`): the kept tensor is
    never modified, so its values and `torch.autograd.grad(score, record.output)` both refer to this layer.
    """

    def _register(self, name, module):
        def hook(_module, _inputs, output):
            if self._mine() and isinstance(output, torch.Tensor):
                self.records.append(Record(name, output))
                return output.clone()
            return None

        return module.register_forward_hook(hook)


class GradientCapture(_Capture):
    """Records module outputs and, through a tensor hook, the gradient reaching them in the next backward.

    A tensor hook is registered before any in-place op that follows (in-place ReLU), so it receives the
    gradient of the value this module produced; full backward hooks fail on exactly that case.
    `pre_input=True` records the module's input instead of its output (used for BatchNorm fused with an
    activation, where the BatchNorm output only exists as the activation's input).
    """

    def __init__(self, modules: dict[str, nn.Module], pre_input: set[str] | None = None):
        super().__init__(modules)
        self.pre_input = pre_input or set()

    def _track(self, name: str, tensor) -> None:
        if self._wants_grad(tensor):
            self._keep_grad(name, tensor)

    def _register(self, name, module):
        if name in self.pre_input:
            return module.register_forward_pre_hook(lambda _m, args: self._track(name, args[0]))
        return module.register_forward_hook(lambda _m, _i, output: self._track(name, output))


class ClampCapture(_Capture):
    """For clamping activations (ReLU6, Hardtanh): the constant each unit outputs where it is clipped, and the
    gradient reaching the activation's output. A clipped unit is an implicit bias: there the output is the
    constant itself (6 for ReLU6), whatever its input, so FullGrad must count it like a bias."""

    def _register(self, name, module):
        def hook(_module, _inputs, output):
            if not self._wants_grad(output):
                return
            with torch.no_grad():
                low, high = module.min_val, module.max_val
                constant = (output >= high) * high
                if low != 0:
                    constant = constant + (output <= low) * low
            self._keep_grad(name, output, kept=constant)

        return module.register_forward_hook(hook)
