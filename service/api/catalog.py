"""GET /v1/models and /v1/methods: what can be asked, from the same models that validate requests."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

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
    out += [ModelOut(name=d.name, architecture=d.card.architecture, description=d.card.description,
                     task="detection", available=True, device=str(d.device), num_classes=d.num_classes,
                     default_layer=d.cam_layer, methods=None)
            for d in registry.detectors.values()]
    out += [ModelOut(name=u.card_name, architecture=u.architecture, available=False, reason=u.reason,
                     task=u.task)
            for u in registry.unavailable.values()]
    return out


def _self_test(report: SelfTest | None) -> dict[str, Any]:
    if report is None:
        return {}
    problems = {name: check.problems for name, check in report.methods.items() if check.problems}
    return {"methods": report.applicable, "methods_not_applicable": report.not_applicable,
            "self_test": SelfTestOut(passed=report.passed, problems=problems)}


@router.get("/methods", operation_id="list_methods", response_model=list[MethodOut])
async def list_methods() -> list[MethodOut]:
    """Each method's facts, as its class declares them (service/methods/base.py `Method`)."""
    return [MethodOut(name=m.name, title=m.title, cost=m.cost_text(), cost_factors=list(m.cost_factors),
                      passes_at_defaults=m.cost(m.Params()), iterative=m.iterative, diagnostics=m.diagnostics,
                      parameters=m.Params.model_json_schema(),
                      metrics_forwards_at_defaults=MetricsParams().forwards) for m in METHODS.values()]
