"""The HTTP application: FastAPI routes, error shape, start-up and shutdown.

``create_app(config, hardware)`` builds everything once and keeps it on ``app.state`` (no module
globals): the model registry and local engines, the upstream clients with their breakers, the
router, the journal. At start-up a thread verifies and loads the models
(``ModelRegistry.load_all``), so ``/health`` answers at once and ``/ready`` turns 200 when every
model of the catalog is loaded; one prober task per upstream starts too. Handlers only parse and
hand the request to the router: model work happens on the engines' threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hardware.detect import HardwareInfo
from hardware.fallbacks import fallback_warnings
from hardware.nvml import detect_gpus
from models.capabilities import engine_caps
from models.client import LocalClient
from models.registry import ModelRegistry, ModelState
from models.sizing import plan_for
from server.box import box_id
from server.config import Config, is_loopback
from server.dashboard import mount as mount_dashboard
from server.drain import Drain
from server.drill import DrillManager
from server.edge import LOOPBACK_HOSTS, Edge, host_name
from server.errors import ApiError, InternalError, InvalidRequest, ModelNotFound, RequestTooLarge
from server.events import EventBus
from server.journal import Journal
from server.keys import KeyFileError, KeyStore
from server.limits import check_json_shape, check_key_caps
from server.logs import request_log
from server.metrics import CONTENT_TYPE, Metrics, StateCollector, cached
from server.local import LocalModels
from server.prober import Prober
from server.routing import CHAT, COMPLETIONS, EMBEDDINGS, SUMMARIZE, TRIAGE, Endpoint, Router
from server.upstream import Upstream, UpstreamError, UpstreamSet

log = logging.getLogger("understudy.http")

MAX_BODY_BYTES = 32 * 1024 * 1024


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


def crash_response(exc: Exception, method: str, path: str) -> JSONResponse:
    """A bug: logged with its traceback (never the request's content, nor the exception's message:
    ``server.logs``), a plain 500 for the client. JSON too deep for the parser is the client's 400."""
    if isinstance(exc, RecursionError):
        return error_response(InvalidRequest("The JSON body is nested too deeply.", code="invalid_json"))
    log.error("unhandled %s on %s %s", type(exc).__name__, method, path, exc_info=exc)
    return error_response(InternalError("Internal server error."))


async def read_json(request: Request) -> tuple[bytes, Any]:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise RequestTooLarge(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InvalidRequest("The JSON body is nested too deeply.", code="invalid_json") from None
    except ValueError:  # not JSON, not UTF-8, or an integer of more than 4300 digits
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON "
            "(and the Content-Type application/json).", code="invalid_json") from None
    check_json_shape(body)
    return raw, body


class FastPaths:
    """ASGI front door: ``POST`` to the generation endpoints goes straight to the router.

    FastAPI's middleware stack and per-route machinery cost about 0.3 ms a request, which is most
    of a pass-through's budget (the drill's target is 2 ms added); these endpoints parse their own
    bodies and need none of it. Everything else (and lifespan) goes to the FastAPI app. Errors are
    rendered exactly as the app's exception handlers would.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.routes: dict[str, Endpoint] = app.state.fast_paths
        self.dispatch = app.state.dispatch

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        endpoint = self.routes.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive, send)
        try:
            response = await self.dispatch(endpoint, request)
        except ApiError as exc:
            exc.extra_headers.setdefault("X-Understudy-Route", "none")  # refused before any backend was chosen
            response = error_response(exc)
        except Exception as exc:
            response = crash_response(exc, "POST", scope["path"])
        await response(scope, receive, send)


def create_app(config: Config, hardware: HardwareInfo, transport: Any = None) -> FastAPI:
    """``transport`` replaces the upstreams' network (an ``httpx.MockTransport`` in unit tests)."""
    registry = ModelRegistry(list(config.models), hardware, cache_dir=config.server.classifier_cache)
    local = LocalModels(LocalClient(registry))
    journal = Journal(config.server.state_dir / "journal.sqlite3")
    metrics = Metrics({s.id for s in config.models}, {w.name for w in config.workloads})
    events = EventBus([journal.consume, metrics.consume, request_log])
    upstreams = UpstreamSet()
    for up in config.upstreams:
        def listener(old: Any, new: Any, why: str, name: str = up.name) -> None:
            log.warning("upstream %s: breaker %s -> %s (%s)", name, old.value, new.value, why)
            events.record_breaker(name, old.value, new.value, why)
        upstreams.by_name[up.name] = Upstream(up, transport=transport, listener=listener)
    default = config.default_upstream
    upstreams.default = upstreams.by_name[default.name] if default is not None else None
    router = Router(local, upstreams, config.workloads, events)
    drills = DrillManager(upstreams, router.workloads, journal, registry, config.server.state_dir, config.server.max_drill_s,
                          router.drilled, readiness=lambda: router.shadow.readiness(list(config.workloads)), events=events)
    server_cfg = config.server
    keys = KeyStore(server_cfg.api_keys, server_cfg.admin_key, server_cfg.metrics_key, server_cfg.key_file)
    drain = Drain(server_cfg.drain_grace_s, server_cfg.drain_timeout_s)
    metrics.registry.register(StateCollector(
        models=lambda: [(e.id, e.state.value) for e in registry.entries],
        load=local.client.load,
        breakers=lambda: [(u.name, u.breaker.state.value) for u in upstreams.by_name.values()],
        hedges=lambda: dict(router.stats),
        readiness=lambda: router.shadow.readiness(list(config.workloads)),
        gpus=cached(detect_gpus, 10.0) if hardware.gpu.gpus else None,
    ))

    def reload_keys() -> None:
        """SIGHUP: re-read the key file; a broken file keeps the old keys (and says why)."""
        if keys.key_file is None:
            log.warning("SIGHUP: no [server] key_file to reload; keys from the environment need a restart")
            return
        try:
            count = keys.reload()
        except KeyFileError as exc:
            log.error("keys not reloaded, the old keys stay valid: %s", exc)
            events.record_admin("keys_reload_failed", None, str(exc).split(":")[0])
            return
        log.warning("keys reloaded from %s: %d keys valid", keys.key_file, count)
        events.record_admin("keys_reload", None, f"{count} keys valid")

    async def prune_journal() -> None:
        while True:
            journal.prune(server_cfg.journal_retention_days * 86400)
            await asyncio.sleep(3600)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        app.state.started = time.monotonic()
        app.state.engines = await asyncio.to_thread(engine_caps)
        registry.plan = await asyncio.to_thread(plan_for, [e.spec for e in registry.entries], hardware, app.state.engines)
        log.info("%s", registry.plan.summary())
        app.state.warnings = fallback_warnings(hardware, app.state.engines) + list(registry.plan.warnings)
        for warning in app.state.warnings:
            log.warning("%s", warning)
        loader = threading.Thread(target=registry.load_all, args=(loop,), name="model-loader", daemon=True)
        loader.start()
        probers = [asyncio.create_task(Prober(u).run(), name=f"probe-{u.name}") for u in upstreams.by_name.values()]
        probers.append(asyncio.create_task(prune_journal(), name="journal-retention"))
        if threading.current_thread() is threading.main_thread():  # always: SIGHUP's default would kill the server
            loop.add_signal_handler(signal.SIGHUP, reload_keys)
        try:
            yield
        finally:
            await drills.close()
            await router.shadow.close()
            for task in probers:
                task.cancel()
            await asyncio.gather(*probers, return_exceptions=True)
            await upstreams.aclose()
            await asyncio.to_thread(loader.join)
            await asyncio.to_thread(registry.close)
            journal.close()

    app = FastAPI(title="Understudy", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.hardware = hardware
    app.state.registry = registry
    app.state.router = router
    app.state.journal = journal
    app.state.drills = drills
    app.state.keys = keys
    app.state.drain = drain
    app.state.events = events

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(InvalidRequest("The request is not valid.", code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": f"{exc.detail}: {request.method} {request.url.path}", "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return crash_response(exc, request.method, request.url.path)

    def key_id(request: Request) -> str | None:
        """The caller's key id (``server.edge`` checked the key already), for the journal."""
        key = request.scope.get("understudy.key")
        return key.id if key is not None else None

    # -- health --------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """200 when every model is loaded. ``warnings``: what this machine has that the engines do
        not use (a GPU a CPU-only build ignores...), never silent (``hardware.fallbacks``)."""
        models = {e.id: e.state.value for e in registry.entries}
        warnings = getattr(app.state, "warnings", [])
        if drain.state != "serving":
            return JSONResponse({"status": "draining", "reason": "the server is shutting down", "models": models},
                                status_code=503, headers={"Retry-After": "5"})
        if not registry.loading_done:
            return JSONResponse({"status": "loading", "reason": "models are still loading", "models": models, "warnings": warnings},
                                status_code=503)
        bad = {e.id: e.reason for e in registry.entries if e.state is not ModelState.READY}
        if bad:
            return JSONResponse({"status": "degraded", "reason": "some models are not available", "unavailable": bad, "models": models,
                                 "warnings": warnings}, status_code=503)
        return JSONResponse({"status": "ready", "box": box_id(), "models": models, "warnings": warnings})

    @app.get("/admin/hardware")
    async def admin_hardware(request: Request) -> dict[str, Any]:
        """What was detected, what the engines can use, the plan (each setting with its reason), the
        warnings, and each model's settings as loaded."""
        engines = getattr(app.state, "engines", None)
        return {"hardware": hardware.to_dict(), "engines": engines.to_dict() if engines is not None else None,
                "plan": registry.plan.to_dict() if registry.plan is not None else None,
                "warnings": getattr(app.state, "warnings", []),
                "models": {e.id: {"state": e.state.value, "settings": e.settings} for e in registry.entries}}

    # -- models --------------------------------------------------------------------------------
    def model_object(entry: Any) -> dict[str, Any]:
        return {
            "id": entry.id, "object": "model", "created": entry.created, "owned_by": "understudy",
            "understudy": {"kind": entry.spec.kind.value, "state": entry.state.value, "context_length": entry.context_length or None},
        }

    def workload_objects() -> list[dict[str, Any]]:
        out = []
        for wl in config.workloads:
            for name in (wl.name, *wl.models):
                out.append({"id": name, "object": "model", "created": 0, "owned_by": "understudy",
                            "understudy": {"kind": "workload", "workload": wl.name, "fallback": wl.fallback, "local_model": wl.local_model}})
        return out

    async def cloud_models() -> list[dict[str, Any]]:
        up = upstreams.default
        if up is None or up.breaker.state.value not in ("closed", "slow"):
            return []
        try:
            data = await up.get_json("models")
        except UpstreamError:
            return []
        return [m for m in data.get("data", []) if isinstance(m, dict) and "id" in m]

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        data = [model_object(e) for e in registry.entries] + workload_objects()
        seen = {m["id"] for m in data}
        data += [m for m in await cloud_models() if m["id"] not in seen]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        entry = registry.get(model_id)
        if entry is not None:
            return model_object(entry)
        for obj in workload_objects():
            if obj["id"] == model_id:
                return obj
        for obj in await cloud_models():
            if obj["id"] == model_id:
                return obj
        raise ModelNotFound(model_id)

    # -- generation ----------------------------------------------------------------------------
    async def dispatch(endpoint: Endpoint, request: Request) -> Response:
        raw, body = await read_json(request)
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
        if check_key_caps(request.scope.get("understudy.key"), body):
            raw = json.dumps(body).encode()  # the cap set as max_tokens reaches the cloud too
        return await router.handle(endpoint, request, raw, body)

    fast = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS, "/v1/embeddings": EMBEDDINGS, "/v1/triage": TRIAGE,
            "/v1/summarize": SUMMARIZE}
    for path, endpoint in fast.items():  # so that other methods get 405, as for any route
        async def handler(request: Request, endpoint: Endpoint = endpoint) -> Response:
            return await dispatch(endpoint, request)
        app.router.routes.append(Route(path, handler, methods=["POST"]))
    app.state.fast_paths = {path: endpoint for path, endpoint in fast.items()}
    app.state.dispatch = dispatch
    app.openapi = lambda: openapi_with_fast_paths(app, fast)  # type: ignore[method-assign]
    mount_dashboard(app)

    # -- admin ---------------------------------------------------------------------------------
    @app.get("/admin/status")
    async def admin_status(request: Request) -> dict[str, Any]:
        return {
            "models": {e.id: {**e.describe(), "engine": e.engine.status() if e.engine else None} for e in registry.entries},
            "upstreams": {u.name: {"breaker": u.breaker.state.value, "retry_after_s": round(u.breaker.retry_after(), 1),
                                   "last_failure": u.breaker.last_reason or None} for u in upstreams.by_name.values()},
            "failover": router.failover_status(),
            "uptime_s": round(time.monotonic() - getattr(app.state, "started", time.monotonic()), 1),
            "box": box_id(),
        }

    @app.get("/admin/readiness")
    async def readiness(request: Request) -> dict[str, Any]:
        """Shadow mode's per-workload local readiness over the last day (``server.shadow``)."""
        return {"object": "readiness", "workloads": router.shadow.readiness(list(config.workloads))}

    @app.post("/admin/drill")
    async def drill_start(request: Request) -> JSONResponse:
        """Start an outage drill (``server.drill``): 200 with the drill, 400 for bad input, 409 if one runs."""
        _, body = await read_json(request)
        drill = drills.start(body)
        events.record_admin("drill_start", key_id(request), f"{drill.id}, {body.get('duration_s')} s")
        covered = [w.name for w in config.workloads if w.covered and not w.local_only
                   and (not drill.workloads or w.name in drill.workloads)]
        uncovered = [w.name for w in config.workloads if not w.covered] if drill.upstreams else []
        return JSONResponse({"drill": drill.describe(time.monotonic()), "answered_locally": covered,
                             "refused_503": uncovered})

    @app.get("/admin/drill")
    async def drill_status(request: Request) -> dict[str, Any]:
        return drills.status()

    @app.delete("/admin/drill")
    async def drill_abort(request: Request) -> dict[str, Any]:
        drill = await drills.abort()
        events.record_admin("drill_abort", key_id(request), drill.id)
        return {"drill": drill.describe(time.monotonic()), "report": drill.report}

    @app.get("/admin/events")
    async def admin_events(request: Request, limit: int = 100, kind: str | None = None) -> dict[str, Any]:
        if kind not in (None, "route", "breaker", "drill", "shadow", "admin"):
            raise InvalidRequest("kind must be 'route', 'breaker', 'drill', 'shadow' or 'admin'.", param="kind")
        rows = await asyncio.to_thread(journal.recent, max(1, min(limit, 10_000)), kind)
        return {"object": "list", "box": box_id(), "data": rows}

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        """Prometheus text format (``server.metrics``); a metrics, admin (or, without those, client) key."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)  # ~1 ms on the loop: the collector reads loop-owned state

    return app


def openapi_with_fast_paths(app: FastAPI, fast: dict[str, Endpoint]) -> dict[str, Any]:
    """``/openapi.json``: FastAPI's schema plus the generation endpoints, which ``FastPaths``
    serves outside FastAPI's routing, each with its real request schema (the pydantic model the
    router validates with) and OpenAI's error shape. Built once."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    components["Error"] = error
    for path, endpoint in fast.items():
        model = endpoint.schema
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        errors = {str(code): {"description": why, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                  for code, why in ((400, "invalid request"), (401, "no or wrong API key"), (404, "unknown model"),
                                    (413, "body too large"), (429, "overloaded"), (503, "unavailable"))}
        schema.setdefault("paths", {})[path] = {"post": {
            "summary": f"OpenAI-compatible {endpoint.name}" if endpoint.name not in ("triage", "summarize") else endpoint.name,
            "operationId": f"create_{endpoint.name}",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
            "responses": {"200": {"description": "the answer (JSON, or an SSE stream with stream=true)"}, **errors},
        }}
    app.openapi_schema = schema
    return schema


def build_asgi(app: FastAPI) -> Edge:
    """What uvicorn serves: ``Edge`` (host, keys, rate, drain) -> ``FastPaths`` -> the FastAPI app."""
    server = app.state.config.server
    hosts = server.allowed_hosts
    if hosts is None:
        allowed = LOOPBACK_HOSTS if is_loopback(server.host) else None
    else:
        allowed = None if "*" in hosts else frozenset(host_name(h) for h in hosts) | LOOPBACK_HOSTS
    return Edge(FastPaths(app), app.state.keys, allowed, app.state.drain)
