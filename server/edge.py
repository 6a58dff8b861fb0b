"""The ASGI front door: every HTTP request passes here before any route, the fast paths included.

In order: the ``Host`` header against the allow-list (DNS rebinding: a web page that makes its
own name resolve to 127.0.0.1 still sends its own name as ``Host``), then the key
(``server.keys``): a route needs one whenever any key is configured, except ``/health``,
``/ready`` (load balancers call them; they carry no patient data) and the dashboard's static page
(``/dashboard``: no data in it; it asks for the admin key and sends it with its own calls).
``/admin/*`` needs an admin key, ``/metrics`` a metrics (or admin) key, the rest a client key:
401 without a valid key, 403 with a key of the wrong role. Then the key's rate (``RateLimiter``,
429 + Retry-After). While the server drains (``server.drain``) it counts the requests in flight,
and once the grace period is over refuses new ones with 503 + Retry-After. The key that passed is left in ``scope["understudy.key"]`` for the handlers
(per-key caps, logs). No CORS headers are ever sent: browsers on other origins cannot read
answers.

One instance wraps ``server.app.FastPaths``; event-loop thread only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import JSONResponse

from server.auth import bearer_token
from server.drain import Drain
from server.errors import ApiError, Forbidden, InvalidRequest, ShuttingDown, Unauthorized
from server.keys import KeyStore
from server.limits import RateLimiter

OPEN_PATHS = ("/health", "/ready")
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def route_class(path: str) -> str:
    if path in OPEN_PATHS or path == "/dashboard" or path.startswith("/dashboard/"):
        return "open"
    if path == "/metrics":
        return "metrics"
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    return "client"


def host_name(value: str) -> str:
    """``example.org:8080`` -> ``example.org``; ``[::1]:8080`` -> ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Edge:
    def __init__(self, app: Any, keys: KeyStore, allowed_hosts: frozenset[str] | None, drain: Drain,
                 limiter: RateLimiter | None = None) -> None:
        """``allowed_hosts``: None allows any ``Host`` (a server bound beyond loopback, whose keys
        are its protection, unless ``[server] allowed_hosts`` narrows it)."""
        self.app = app
        self.keys = keys
        self.allowed_hosts = allowed_hosts
        self.drain = drain
        self.limiter = limiter or RateLimiter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._admit(scope)
        except ApiError as exc:
            await JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())(scope, receive, send)
            return
        scope["understudy.drain"] = self.drain
        drain = self.drain
        task = asyncio.current_task()
        assert task is not None
        drain.register(task)
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not drain.was_cut(task):
                raise
            task.uncancel()  # ended by the drain (server.drain) before it answered: a clean 503
            if not started:
                exc = ShuttingDown("The server is shutting down; retry the request (another box may take it).", retry_after=5)
                await JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())(scope, receive, send)
        finally:
            drain.unregister(task)

    def _admit(self, scope: dict[str, Any]) -> None:
        headers = {k: v for k, v in scope.get("headers", ()) if k in (b"host", b"authorization")}
        if self.allowed_hosts is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                raise InvalidRequest("The Host header names a host this server does not answer for "
                                     "(see [server] allowed_hosts).", code="host_not_allowed")
        cls = route_class(scope.get("path", ""))
        if self.drain.refusing and cls != "open":
            raise ShuttingDown("The server is shutting down; retry the request (another box may take it).", retry_after=5)
        if cls == "open" or not self.keys.enabled:
            return
        token = bearer_token(headers.get(b"authorization", b"").decode("latin-1") or None)
        if token is None:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        key = self.keys.match(token)
        if key is None:
            raise Unauthorized("Incorrect API key provided.")
        if not self.keys.allows(key, cls):
            raise Forbidden(f"This API key ({key.id}, role {key.role}) may not use {cls} routes.")
        scope["understudy.key"] = key
        if cls == "client":
            self.limiter.check(key)
