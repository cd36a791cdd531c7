"""A JSONResponse rendered by pydantic-core's serializer (Rust).

An explain response is mostly base64 maps (a 451x300 float map is 720 KB of text); the standard library's
encoder spends 2-4 ms scanning them for characters to escape, pydantic-core under 1 ms (docs/benchmarks.md).
NaN and infinity become null, so the body is always valid JSON.
"""
from __future__ import annotations

from typing import Any

import pydantic_core
from fastapi.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content, inf_nan_mode="null")
