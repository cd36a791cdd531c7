"""A JSONResponse rendered by orjson (SIMD).

An explain response is mostly base64 maps (a 451x300 float map is 720 KB of text), which the standard
library's encoder and pydantic-core spend most of their time scanning for characters to escape; orjson scans
them with SIMD, a small fraction of their time (docs/benchmarks.md, section "Service overhead: one request on
an idle server"). orjson writes NaN and infinity as null, so the body is always valid JSON; types it does not
know (a pydantic model, say) go through pydantic-core's conversion.
"""
from __future__ import annotations

from typing import Any

import orjson
import pydantic_core
from fastapi.responses import JSONResponse

_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=pydantic_core.to_jsonable_python, option=_OPTIONS)
