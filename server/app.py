"""The HTTP application: FastAPI routes, error shape, start-up and shutdown.

``create_app(config, hardware)`` builds everything once and keeps it on ``app.state`` (no module
globals). At start-up a thread verifies and loads the models (``ModelRegistry.load_all``), so
``/health`` answers at once and ``/ready`` turns 200 when every model of the catalog is loaded.
Handlers only parse, submit and await: the model work happens on the engines' threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from hardware.detect import HardwareInfo
from models.registry import ModelRegistry, ModelState
from server import openai_format as fmt
from server.auth import check_key
from server.config import Config
from server.errors import ApiError, InvalidRequest, ModelNotFound
from server.local import ClientGone, LocalModels
from server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, parse_request

log = logging.getLogger("understudy.http")

MAX_BODY_BYTES = 32 * 1024 * 1024
ROUTE_HEADER = "X-Understudy-Route"
MODEL_HEADER = "X-Understudy-Model"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def read_json(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise InvalidRequest(f"The request body is larger than {MAX_BODY_BYTES} bytes.", code="request_too_large")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequest(f"The request body is larger than {MAX_BODY_BYTES} bytes.", code="request_too_large")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON "
            "(and the Content-Type application/json).", code="invalid_json") from None


def create_app(config: Config, hardware: HardwareInfo) -> FastAPI:
    registry = ModelRegistry(list(config.models), hardware)
    local = LocalModels(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        app.state.started = time.monotonic()
        loader = threading.Thread(target=registry.load_all, args=(loop,), name="model-loader", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loader.join)
            await asyncio.to_thread(registry.close)

    app = FastAPI(title="Understudy", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.hardware = hardware
    app.state.registry = registry
    app.state.local = local

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
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": {"message": "Internal server error.", "type": "server_error", "param": None, "code": "internal_error"}}, status_code=500)

    def authorize(request: Request) -> None:
        check_key(request.headers.get("authorization"), config.server.api_keys)

    # -- health --------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        models = {e.id: e.state.value for e in registry.entries}
        if not registry.loading_done:
            return JSONResponse({"status": "loading", "reason": "models are still loading", "models": models}, status_code=503)
        bad = {e.id: e.reason for e in registry.entries if e.state is not ModelState.READY}
        if bad:
            return JSONResponse({"status": "degraded", "reason": "some models are not available", "unavailable": bad, "models": models}, status_code=503)
        return JSONResponse({"status": "ready", "models": models})

    # -- models --------------------------------------------------------------------------------
    def model_object(entry: Any) -> dict[str, Any]:
        return {
            "id": entry.id, "object": "model", "created": entry.created, "owned_by": "understudy",
            "understudy": {"kind": entry.spec.kind.value, "state": entry.state.value, "context_length": entry.context_length or None},
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_object(e) for e in registry.entries]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        entry = registry.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id)
        return model_object(entry)

    # -- generation ----------------------------------------------------------------------------
    async def generate(request: Request, gen: Any, stream: bool, prefix: str) -> Response:
        rid = fmt.new_id(prefix)
        headers = {ROUTE_HEADER: "local", MODEL_HEADER: gen.entry.id, "X-Request-Id": rid}
        channel = local.submit(gen)
        receive = request.receive
        try:
            if not stream:
                body = await local.complete(gen, channel, rid, receive)
                return JSONResponse(body, headers=headers)
            first = await local.first_items(channel, receive)
        except ClientGone:
            return Response(status_code=499)
        except ApiError as exc:
            exc.extra_headers.update(headers)
            raise
        return StreamingResponse(local.stream(gen, channel, rid, first), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = parse_request(ChatCompletionRequest, await read_json(request))
        return await generate(request, local.prepare_chat(req, req.model), req.stream, "chatcmpl")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse_request(CompletionRequest, await read_json(request))
        return await generate(request, local.prepare_completion(req, req.model), req.stream, "cmpl")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        authorize(request)
        req = parse_request(EmbeddingRequest, await read_json(request))
        try:
            body = await local.embed(req, req.model, request.receive)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(body, headers={ROUTE_HEADER: "local", MODEL_HEADER: req.model})

    # -- admin ---------------------------------------------------------------------------------
    @app.get("/admin/status")
    async def admin_status(request: Request) -> dict[str, Any]:
        authorize(request)
        return {
            "models": {e.id: {**e.describe(), "engine": e.engine.status() if e.engine else None} for e in registry.entries},
            "uptime_s": round(time.monotonic() - getattr(app.state, "started", time.monotonic()), 1),
        }

    return app
