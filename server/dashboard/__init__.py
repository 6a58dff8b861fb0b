"""``/dashboard``: a static status page served by Understudy itself (no CDN, works offline).

The page holds no data: its script asks for the admin key once, keeps it in ``sessionStorage``
and sends it as a Bearer header to the JSON endpoints it reads (``/admin/status``,
``/admin/hardware``, ``/admin/readiness``, ``/admin/events``), so there are no cookies and no
CSRF. ``server.edge`` leaves ``/dashboard`` and its assets open for that reason.
``mount(app)`` is called once by ``server.app.create_app``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse, Response

HERE = Path(__file__).resolve().parent
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".svg": "image/svg+xml"}
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                                       "connect-src 'self'; frame-ancestors 'none'"}


def _asset(name: str) -> Response:
    path = HERE / name
    if path.suffix not in _TYPES or path.parent != HERE or not path.is_file():
        return Response(status_code=404)
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)


def mount(app: FastAPI) -> None:
    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        return _asset("index.html")

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_asset(name: str) -> Response:
        return _asset(name)
