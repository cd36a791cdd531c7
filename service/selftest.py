"""A model's self-test: which methods apply to it, and do their maps keep the invariants they must?

Two depths, one probe photo (a shipped one: service/evidence/photos/chelsea.jpg), every registered method:
- quick (`quick_self_test`, at load, before /readyz says ready): each method once at its cheapest parameters
  (every cost factor at its minimum). A method that refuses the model (its ValueError / InvalidInput: FullGrad
  on a transformer, attention relevance on a CNN) does not apply, with that reason; one that applies must give
  finite logits and a finite map. One forward+backward or two per method: well under a second per model on a
  CPU for the small models, so the server knows before it serves which methods a model takes.
- full (`full_self_test`, `python -m service check-model NAME`): the same, plus each method's invariants at
  parameters where they are meant to hold, and the served model's logits against the model as built (its
  card's module with the weights loaded, before the BatchNorm folding and memory-format changes at load).

Invariants (full):
- every method: finite map and logits; the map not constant (a constant map ranks nothing);
- Integrated Gradients: completeness, |sum of attributions - (F(x) - F(baseline))| <= 5 % of |F(x) -
  F(baseline)| at 128 Riemann-trapezoid steps (Sundararajan et al. 2017 suggest checking within 5 %; fewer
  steps miss it on ReLU6 nets);
- FullGrad: completeness of its decomposition (its `complete` diagnostic: the gap within its tolerance), or
  the reason it does not apply: a refusal (token models), or an activation that is not piecewise linear
  (SiLU, Hardswish, GELU, ...), where the decomposition is approximate and its gap is reported, not failed;
- the served logits equal the built model's within 1e-3 of their scale (folding is the same function, up to
  float rounding).
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .engine import explain
from .errors import InvalidInput, ServiceError
from .evidence.sanity import PHOTOS, profile_params
from .methods import METHODS, Method, MethodParams
from .zoo import LoadedModel

PROBE = PHOTOS / "chelsea.jpg"
IG_STEPS = 128  # full: enough for completeness within IG_TOLERANCE on the shipped CNNs
IG_TOLERANCE = 0.05
LOGITS_TOLERANCE = 1e-3


@dataclass
class MethodCheck:
    applies: bool
    reason: str | None = None  # why it does not apply
    problems: list[str] = field(default_factory=list)  # invariants it broke (applies only)
    figures: dict[str, Any] = field(default_factory=dict)  # what was measured, for the report

    @property
    def passed(self) -> bool:
        return self.applies and not self.problems


@dataclass
class SelfTest:
    model: str
    depth: str  # "quick" or "full"
    methods: dict[str, MethodCheck]
    problems: list[str] = field(default_factory=list)  # the model's own (logits)

    @property
    def applicable(self) -> list[str]:
        return [name for name, check in self.methods.items() if check.applies]

    @property
    def not_applicable(self) -> dict[str, str]:
        return {name: check.reason or "" for name, check in self.methods.items() if not check.applies}

    @property
    def passed(self) -> bool:
        return not self.problems and all(c.passed for c in self.methods.values() if c.applies)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "depth": self.depth, "passed": self.passed, "problems": self.problems,
                "methods": {name: {"applies": c.applies, "reason": c.reason, "passed": c.passed,
                                   "problems": c.problems, "figures": c.figures}
                            for name, c in self.methods.items()}}


def probe(model: LoadedModel) -> torch.Tensor:
    with Image.open(PROBE) as image:
        return model.preprocess(image.convert("RGB")).unsqueeze(0)


def cheapest_params(method: Method) -> MethodParams:
    """The method's parameters with every cost factor at its minimum (1 pass where it can)."""
    schema = method.Params.model_json_schema().get("properties", {})
    return method.Params(**{name: max(1, int(schema.get(name, {}).get("minimum", 1)))
                            for name in method.cost_factors})


def full_params(method: Method) -> MethodParams:
    """Where the invariants are meant to hold: a path integral (`n_steps`) at IG_STEPS at least, the rest at
    the sanity report's quick profile (the sampling methods' invariants do not depend on the count)."""
    params = profile_params(method, "quick")
    if "n_steps" in method.Params.model_fields:
        return params.model_copy(update={"n_steps": max(IG_STEPS, params.model_dump()["n_steps"])})
    return params


def _run(model: LoadedModel, method: Method, params: MethodParams, x: torch.Tensor,
         invariants: bool) -> MethodCheck:
    """Run `method` once; `invariants`: check its completeness too (full depth only: at the quick depth's one
    step an integral is not meant to be complete)."""
    try:
        method.check_model(model, params)
        result = explain(model, method, x, [None], params, top_k=1)[0]
    except (InvalidInput, ValueError, LookupError) as exc:
        message = exc.message if isinstance(exc, ServiceError) else str(exc)
        return MethodCheck(applies=False, reason=message)
    except Exception as exc:  # noqa: BLE001 - a method that applies and crashes: the self-test's finding
        return MethodCheck(applies=True, problems=[f"{type(exc).__name__}: {exc}"])
    check = MethodCheck(applies=True)
    heat = result.heatmap
    if not bool(torch.isfinite(heat).all()):
        check.problems.append("its map has non-finite values")
    elif float(heat.max() - heat.min()) == 0.0:
        check.problems.append("its map is constant")
    if not all(math.isfinite(p.probability) for p in result.top_k):
        check.problems.append("the model's logits are not finite")
    check.figures["diagnostics"] = {k: v for k, v in result.diagnostics.items()
                                    if isinstance(v, (int, float))}
    if invariants:
        _invariants(method, result.diagnostics, check, smooth_activation(model.module))
    return check


# Activations that are not piecewise linear (timm's own classes included, by name): FullGrad's decomposition
# is exact only without them, so on such a model its completeness gap is a figure, not a failure.
SMOOTH_ACTIVATIONS = frozenset({"silu", "swish", "swishme", "hardswish", "hardswishme", "hardsigmoid",
                                "hardsigmoidme", "sigmoid", "gelu", "gelutanh", "quickgelu", "tanh", "mish",
                                "mishme", "elu", "selu", "celu", "softplus", "glu"})


def smooth_activation(module: torch.nn.Module) -> str | None:
    """The first activation of `module` that is not piecewise linear (its class name), or None."""
    names = (type(m).__name__ for m in module.modules())
    return next((name for name in names if name.lower() in SMOOTH_ACTIVATIONS), None)


def _invariants(method: Method, diagnostics: dict[str, Any], check: MethodCheck,
                smooth: str | None = None) -> None:
    """The completeness checks of the methods that have one (read from their own diagnostics). `smooth`: the
    model's first activation that is not piecewise linear, where FullGrad's completeness is not expected."""
    if "relative_delta" in diagnostics and "n_steps" in method.Params.model_fields:
        relative = float(diagnostics["relative_delta"])
        check.figures["completeness"] = relative
        if not relative <= IG_TOLERANCE:
            check.problems.append(f"completeness: |sum of attributions - (F(x) - F(baseline))| is "
                                  f"{relative:.1%} of F(x) - F(baseline), above {IG_TOLERANCE:.0%}")
    if "complete" in diagnostics and "completeness_gap" in diagnostics:
        gap = float(diagnostics["completeness_gap"])
        check.figures["completeness"] = gap
        if not diagnostics["complete"] and smooth is not None:
            check.figures["completeness_note"] = (f"approximate: {smooth} is not piecewise linear, so the "
                                                  "decomposition is not exact on this model")
        elif not diagnostics["complete"]:
            check.problems.append(f"completeness: the decomposition misses {gap:.1%} of the score")


def quick_self_test(model: LoadedModel) -> SelfTest:
    """Kept per module and methods registered: a registry shared by several apps (the tests') is tested
    once."""
    key = tuple(METHODS)
    with _lock:
        kept = _quick.get(model.module)
    if kept is not None and kept[0] == key:
        return kept[1]
    x = probe(model)
    report = SelfTest(model.name, "quick", {name: _run(model, m, cheapest_params(m), x, invariants=False)
                                            for name, m in METHODS.items()})
    with _lock:
        _quick[model.module] = (key, report)
    return report


_quick: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[str, ...], SelfTest]] = \
    weakref.WeakKeyDictionary()
_lock = threading.Lock()


def full_self_test(model: LoadedModel, built: torch.nn.Module | None = None) -> SelfTest:
    """`built`: the card's module with its weights, as built (no folding), to compare the logits with."""
    x = probe(model)
    report = SelfTest(model.name, "full", {})
    if built is not None:
        with torch.no_grad():
            served = model.module(x.to(model.device)).float().cpu()
            reference = built.to(model.device).eval()(x.to(model.device)).float().cpu()
        scale = max(1.0, float(reference.abs().max()))
        error = float((served - reference).abs().max()) / scale
        if not error <= LOGITS_TOLERANCE:
            report.problems.append(f"the served model's logits differ from the model as built by {error:.2g} "
                                   f"of their scale (above {LOGITS_TOLERANCE:g})")
    for name, method in METHODS.items():
        report.methods[name] = _run(model, method, full_params(method), x, invariants=True)
    return report


def describe(report: SelfTest) -> list[str]:
    """The report as lines for a terminal."""
    lines = [f"{report.model}: {'passed' if report.passed else 'FAILED'} ({report.depth} self-test)"]
    lines += [f"  model: {problem}" for problem in report.problems]
    for name, check in report.methods.items():
        if not check.applies:
            lines.append(f"  {name:<22} does not apply: {check.reason}")
        elif check.problems:
            lines.append(f"  {name:<22} FAILED: {'; '.join(check.problems)}")
        else:
            figures = check.figures
            extra = (f" (completeness {figures['completeness']:.2%})" if "completeness" in figures else "")
            if "completeness_note" in figures:
                extra = f" (completeness {figures['completeness']:.2%}, {figures['completeness_note']})"
            lines.append(f"  {name:<22} ok{extra}")
    return lines
