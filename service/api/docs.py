"""GET /docs and /redoc: the interactive API docs, Swagger UI's and ReDoc's files served by this server.

FastAPI's own pages load those files from CDNs (and ReDoc its fonts from Google), so offline (air-gapped
sites, machines without internet) they are blank. The files ship in the fastapi-standalone-docs package: its
static/ folder holds swagger/ (swagger-ui-bundle.js, swagger-ui.css), redoc/ (redoc.standalone.js, patched to
take its logo from beside the page instead of a CDN, and that logo-mini.svg) and fastapi/ (favicon.png).
app.py mounts that folder at ASSETS_URL. Public pages, like the viewer: the key guards the /v1 calls made from
them, not the pages.
"""
from __future__ import annotations

from pathlib import Path

import fastapi_standalone_docs
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(fastapi_standalone_docs.__file__).resolve().parent / "static"


def assets() -> StaticFiles:
    """The package's files, for app.mount(ASSETS_URL, ...): StaticFiles serves only what is in that folder."""
    return StaticFiles(directory=ASSETS_DIR)


router = APIRouter(tags=["docs"], include_in_schema=False)


def _root(request: Request) -> str:
    """The path prefix a proxy serves the app under (uvicorn --root-path), as FastAPI's own pages use it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs", operation_id="docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/fastapi/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters)


@router.get("/redoc", operation_id="redoc")
async def redoc(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    return get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/fastapi/favicon.png", with_google_fonts=False)


@router.get("/redoc/logo-mini.svg", operation_id="redoc_logo")
async def redoc_logo() -> FileResponse:
    """The package's ReDoc asks for its logo at the page's own path + /logo-mini.svg."""
    return FileResponse(ASSETS_DIR / "redoc" / "logo-mini.svg", media_type="image/svg+xml")
