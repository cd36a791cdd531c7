"""GET /v1/models and /v1/methods: what can be asked, from the same models that validate requests."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..detection.base import LoadedDetector
from ..detection.explain import BOX_GRADCAM, DETECTION_ONLY, DRISE, DRISE_FACTS, detector_methods
from ..detection.params import DriseParams
from ..evidence.spec import MetricsParams
from ..methods import METHODS
from ..selftest import SelfTest
from .deps import RuntimeDep
from .schemas import MethodOut, ModelOut, SelfTestOut

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/models", operation_id="list_models", response_model=list[ModelOut])
async def list_models(runtime: RuntimeDep) -> list[ModelOut]:
    registry = runtime.require_ready()
    out = [ModelOut(name=m.name, architecture=m.card.architecture, description=m.card.description,
                    available=True, device=runtime.backend.serving_device(),
                    input_size=list(m.preprocess.size), num_classes=m.num_classes,
                    default_layer=m.card.cam.target_layer, layers=list(m.cam_layers),
                    default=m.name == runtime.settings.default_model, folded_batchnorms=m.folded_norms,
                    sanity=runtime.sanity.summary(m.name), **_self_test(runtime.self_tests.get(m.name)))
           for m in registry.models.values()]
    out += [_detector(d) for d in registry.detectors.values()]
    out += [ModelOut(name=u.card_name, architecture=u.architecture, available=False, reason=u.reason,
                     task=u.task)
            for u in registry.unavailable.values()]
    return out


def _detector(detector: LoadedDetector) -> ModelOut:
    takes = detector_methods(detector)
    why = f"{detector.name} is an object detector: its methods are {', '.join(takes)}"
    return ModelOut(name=detector.name, architecture=detector.card.architecture, task="detection",
                    description=detector.card.description, available=True, device=str(detector.device),
                    num_classes=detector.num_classes, default_layer=detector.cam_layer, methods=takes,
                    pass_batch=detector.pass_batch,
                    methods_not_applicable={m: why for m in [*METHODS, *DETECTION_ONLY] if m not in takes})


def _self_test(report: SelfTest | None) -> dict[str, Any]:
    if report is None:
        return {}
    problems = {name: check.problems for name, check in report.methods.items() if check.problems}
    not_applicable = {**report.not_applicable,
                      **{m: "explains object detectors; this model is a classifier" for m in DETECTION_ONLY}}
    return {"methods": report.applicable, "methods_not_applicable": not_applicable,
            "self_test": SelfTestOut(passed=report.passed, problems=problems)}


@router.get("/methods", operation_id="list_methods", response_model=list[MethodOut])
async def list_methods() -> list[MethodOut]:
    """Each method's facts, as its class declares them (service/methods/base.py `Method`)."""
    return [MethodOut(name=m.name, title=m.title, cost=m.cost_text(), cost_factors=list(m.cost_factors),
                      passes_at_defaults=m.cost(m.Params()), iterative=m.iterative, diagnostics=m.diagnostics,
                      parameters=m.Params.model_json_schema(),
                      metrics_forwards_at_defaults=MetricsParams().forwards,
                      tasks=["classification", "detection"] if m.name == BOX_GRADCAM else ["classification"])
            for m in METHODS.values()] + [
        MethodOut(name=DRISE, parameters=DriseParams.model_json_schema(), tasks=["detection"],
                  passes_at_defaults=DriseParams().n_masks, metrics_forwards_at_defaults=0, **DRISE_FACTS)]
