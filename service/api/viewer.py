"""GET / and /static/{name}: the web viewer, plain HTML/CSS/JS files from service/static (no build step)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..errors import quote
from .errors import ApiError

STATIC = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Only the files that ship in service/static are served, by exact name: no paths, so no traversal.
FILES = {p.name: p for p in sorted(STATIC.iterdir()) if p.is_file() and p.suffix in MEDIA_TYPES}
# The page runs only its own scripts and styles and talks only to this server; maps arrive as data/blob URLs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Content-Security-Policy": CSP,
           "Referrer-Policy": "no-referrer"}

router = APIRouter(tags=["viewer"], include_in_schema=False)


def _serve(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise ApiError(404, "not_found", f"no viewer file {quote(name)}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/", operation_id="viewer")
async def viewer() -> FileResponse:
    """The viewer: upload an image, pick methods and parameters, compare the maps."""
    return _serve("index.html")


@router.get("/static/{name}", operation_id="viewer_file")
async def viewer_file(name: str) -> FileResponse:
    return _serve(name)
